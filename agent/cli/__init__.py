"""The ``edgeops`` command: argument parsing, output, and the one mapping of errors to exit codes."""
