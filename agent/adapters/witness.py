"""Keep the journal's witness record in a file of its own, and its MAC key with the root of trust.

``WitnessFile`` reads and atomically replaces one file (``[device] witness``, by default
``STATE/witness.json``): a journal that is deleted, emptied or swapped does not take it
along, and a witness on another partition survives the loss of the whole state directory.
The record format and the judgement are ``agent.core.witness``; this module moves bytes.
``witness_key`` is the MAC key: sealed by the TPM (or kept by the provisioned keystore)
on a device that has a root of trust, generated there on first use; None without one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from agent.adapters.fsutil import atomic_write
from agent.core import witness
from agent.errors import DeviceError

KEY_NAME = "journal_witness"


class WitnessError(DeviceError):
    hint = "check the filesystem that holds the witness ([device] witness in the agent config)"


class SealsSecrets(Protocol):
    """The part of the root of trust (``agent.adapters.rot``) that keeps the MAC key."""

    def seal(self, name: str, secret: bytes) -> None: ...
    def unseal(self, name: str) -> bytes: ...


def witness_key(root: SealsSecrets | None) -> bytes | None:
    if root is None:
        return None
    # Imported here: a device with no root of trust (and 'edgeops status') never needs it.
    from agent.adapters.rot.base import NotProvisioned

    try:
        return root.unseal(KEY_NAME)
    except NotProvisioned:
        key = os.urandom(32)  # what secrets.token_bytes does
        root.seal(KEY_NAME, key)
        return key


class WitnessFile:
    def __init__(self, path: Path, key: bytes | None) -> None:
        self.path = path
        self.key = key

    def read(self) -> tuple[witness.Record, bool] | None:
        """(record, keyed by the root of trust), or None when there is no witness yet; raises
        ``witness.WitnessDamaged`` for a file that is not a record of this device's."""
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise WitnessError(f"witness {self.path} cannot be read: {exc.strerror}") from None
        return witness.decode(blob, self.key)

    def write(self, rec: witness.Record) -> None:
        try:
            atomic_write(self.path, witness.encode(rec, self.key), dir_mode=0o755)
        except OSError as exc:
            raise WitnessError(f"witness {self.path} cannot be written: {exc.strerror}") from None


__all__ = ["KEY_NAME", "SealsSecrets", "WitnessError", "WitnessFile", "witness_key"]
