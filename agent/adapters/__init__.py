"""Adapters: one small interface each over a device part (slots, bootloader, TPM, HTTP, ...), no policy.

Each moves bytes and reports facts; the decisions are in ``agent.core``. Imports only
``agent.core``, ``agent.errors`` and other adapters. See docs/architecture.md.
"""
