"""What every root of trust offers: the ``RootOfTrust`` interface, its records and its errors.

The updater, the device identity and ``edgeops tpm`` talk to this interface only:
check the keyring against the anchor, read and raise the rollback floor, measure
what was installed or booted, quote, and seal the identity key. The backends are
``tpm`` (a TPM 2.0 over tpm2-pytss) and ``keystore`` (0600 files when there is
none); the chooser is ``agent.adapters.rot.open_root``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from agent.core.attest import Event, QuoteRefused
from agent.errors import ConfigError, DeviceError, StateError, UntrustedSigner


# --- errors --------------------------------------------------------------------------------------
class TpmError(DeviceError):
    hint = "check the TPM (tpm_tcti in the agent config) and 'edgeops tpm status'"


class TpmUnavailable(TpmError):
    hint = "install the [tpm] extra and check that the TPM device or simulator is reachable"


class TpmRequired(ConfigError):
    hint = "this board requires a TPM: fit one or set tpm_required = false"


class NotProvisioned(StateError):
    hint = "run 'edgeops tpm provision --config FILE' once, at the factory"


class KeyringMismatch(UntrustedSigner):
    hint = "the keyring file differs from the one anchored at provisioning; restore it or rotate roots"


# --- records -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quote:
    """Signed PCR evidence plus the event log that explains it, as ``edgeops tpm quote`` prints it."""

    kind: str  # "tpm" or "keystore": a keystore quote proves nothing about hardware
    attest: bytes
    signature: bytes  # DER ECDSA-SHA256 over attest
    ak_public_pem: bytes
    pcrs: tuple[int, ...]
    events: tuple[Event, ...]

    def to_dict(self) -> dict[str, Any]:
        """The quote document (``agent.core.evidence.parse_evidence`` reads it)."""
        return {
            "kind": self.kind, "attest": base64.b64encode(self.attest).decode(),
            "signature": base64.b64encode(self.signature).decode(),
            "ak_public_pem": self.ak_public_pem.decode(), "pcrs": list(self.pcrs),
            "events": [{"pcr": e.pcr, "label": e.label, "digest": e.digest.hex()} for e in self.events],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Quote:
        try:
            d = json.loads(text)
            return cls(str(d["kind"]), base64.b64decode(d["attest"]), base64.b64decode(d["signature"]),
                       str(d["ak_public_pem"]).encode(), tuple(int(p) for p in d["pcrs"]),
                       tuple(Event(int(e["pcr"]), str(e["label"]), bytes.fromhex(e["digest"]))
                             for e in d["events"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise QuoteRefused(f"quote document is malformed: {exc}") from None


@dataclass(frozen=True)
class RootStatus:
    """What ``edgeops tpm status`` explains."""

    kind: str
    anchor: str | None  # hex SHA-256, None: not provisioned
    anchor_locked: bool
    floor: int | None
    counter: int | None
    pcr: int
    measurements: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the interface -------------------------------------------------------------------------------
class RootOfTrust(Protocol):
    """What the updater and the identity code need from a TPM or its software stand-in."""

    kind: str

    def provision(self, keyring_pem: bytes) -> RootStatus:
        """Anchor the keyring and start the floor; idempotent for the same keyring."""

    def check_keyring(self, keyring_pem: bytes) -> None:
        """Raise ``KeyringMismatch`` unless ``keyring_pem`` is the anchored root set."""

    def rotate_keyring(self, current_pem: bytes, new_pem: bytes, signature: bytes) -> None:
        """Re-anchor to ``new_pem`` if a root of ``current_pem`` signed it; safe to retry."""

    def floor(self) -> int:
        """The lowest security_version this device still installs."""

    def raise_floor(self, security_version: int) -> int:
        """Raise the floor towards ``security_version`` (never lower it); return the new floor."""

    def measure(self, label: str, digest: bytes, *, once: bool = False) -> None:
        """Log and extend one event; with ``once``, skip it if already measured since reset."""

    def quote(self, nonce: bytes) -> Quote:
        """Sign the measurement PCR with the attestation key, bound to the verifier's nonce."""

    def ak_public_pem(self) -> bytes:
        """The attestation key's public half, recorded by the controller at enrolment."""

    def seal(self, name: str, secret: bytes) -> None:
        """Keep ``secret`` so that only this root can give it back."""

    def unseal(self, name: str) -> bytes:
        """A secret stored by ``seal``; ``NotProvisioned`` if there is none."""

    def status(self) -> RootStatus:
        """What is anchored, the floor and the number of measurements, for ``edgeops tpm status``."""


__all__ = ["KeyringMismatch", "NotProvisioned", "Quote", "RootOfTrust", "RootStatus", "TpmError",
           "TpmRequired", "TpmUnavailable"]
