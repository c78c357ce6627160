"""The shell on a device: drives the core's state machine, calls adapters, persists before acting.

Never imports ``agent.controller`` or ``agent.host`` (import-linter contracts in setup.cfg).
"""
