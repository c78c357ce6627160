"""The pure core: decisions and byte-exact codecs, with no files, sockets, subprocesses, clock or sleep.

Bytes and ``now`` are passed in; decisions come out. Imports only ``agent.core`` and
``agent.errors`` (an import-linter contract in setup.cfg). See docs/architecture.md.
"""
