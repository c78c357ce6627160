"""The software root of trust: ``RootOfTrust`` backed by 0600 files, for boards without a TPM.

It keeps every feature working on boards without a TPM, but it protects much
less, and says so once per process: the anchor, counter and keys are files a
thief with the disk can rewrite, and a re-image wipes the rollback floor. The
journal's own floor still applies. A board with ``tpm_required = true`` never
gets here (``agent.adapters.rot.open_root`` raises ``TpmRequired``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.adapters import fsutil
from agent.adapters.rot import keystore_provisioned
from agent.adapters.rot.base import (
    KeyringMismatch,
    NotProvisioned,
    Quote,
    RootOfTrust,
    RootStatus,
)
from agent.adapters.rot.eventlog import EventLog
from agent.core import attest, logs
from agent.core.anchor import keyring_anchor, verify_rotation

log = logs.get(__name__)
_warned = False


def _warn_once(state_dir: Path, reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("no TPM (%s): keyring anchor, rollback floor and identity key are kept in files "
                    "under %s; they do not survive re-imaging and anyone holding the disk can change "
                    "them. Fit a TPM and set tpm_required = true for hardware protection.",
                    reason, state_dir / "keystore")


def is_provisioned(state_dir: Path) -> bool:
    """Whether a keystore was provisioned under ``state_dir``: a board without a TPM opts in so."""
    return keystore_provisioned(state_dir)


def _write_secret(path: Path, data: bytes) -> None:
    fsutil.atomic_write(path, data, mode=fsutil.SECRET, dir_mode=0o700)


class KeystoreRoot:
    """Anchor, floor, attestation key and secrets as files under ``STATE/keystore``."""

    kind = "keystore"

    def __init__(self, state_dir: Path, *, pcr: int = 15, reason: str = "not configured") -> None:
        self.dir = state_dir / "keystore"
        self.pcr = pcr
        self.log = EventLog(self.dir / "measurements.jsonl")
        _warn_once(state_dir, reason)

    def _state(self) -> dict[str, object]:
        path = self.dir / "state.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def _save(self, state: dict[str, object]) -> None:
        _write_secret(self.dir / "state.json", json.dumps(state).encode())

    def _anchor(self) -> str:
        anchor = self._state().get("anchor")
        if not isinstance(anchor, str):
            raise NotProvisioned(f"the keystore under {self.dir} holds no keyring anchor")
        return anchor

    def provision(self, keyring_pem: bytes) -> RootStatus:
        anchor = keyring_anchor(keyring_pem).hex()
        state = self._state()
        if state.get("anchor") not in (None, anchor):
            raise KeyringMismatch("this keystore already anchors a different keyring")
        state.setdefault("floor", 0)
        state["anchor"] = anchor
        self._save(state)
        self._ak()  # create the attestation key now, as a TPM derives it at provisioning
        return self.status()

    def check_keyring(self, keyring_pem: bytes) -> None:
        if keyring_anchor(keyring_pem).hex() != self._anchor():
            raise KeyringMismatch("the keyring on disk does not match the keystore anchor")

    def rotate_keyring(self, current_pem: bytes, new_pem: bytes, signature: bytes) -> None:
        new_anchor = verify_rotation(current_pem, new_pem, signature)
        if self._anchor() == new_anchor.hex():
            return  # already done: a retry after a crash before the keyring file was replaced
        self.check_keyring(current_pem)
        state = self._state()
        state["anchor"] = new_anchor.hex()
        self._save(state)

    def floor(self) -> int:
        self._anchor()
        return int(str(self._state().get("floor", 0)))

    def raise_floor(self, security_version: int) -> int:
        state = self._state()
        new = max(int(str(state.get("floor", 0))), security_version)
        state["floor"] = new
        self._save(state)
        return new

    def measure(self, label: str, digest: bytes, *, once: bool = False) -> None:
        # The software "PCR" is the replay of the log itself; it cannot disagree with it.
        # It has no reset at boot, so "once" means once ever for this state dir.
        event = attest.Event(self.pcr, label, digest)
        if once and event in self.log.events():
            return
        self.log.append(event)

    def _ak(self) -> ec.EllipticCurvePrivateKey:
        path = self.dir / "ak.key"
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return key
        key = ec.generate_private_key(ec.SECP256R1())
        _write_secret(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        return key

    def ak_public_pem(self) -> bytes:
        return self._ak().public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)

    def quote(self, nonce: bytes) -> Quote:
        events = tuple(self.log.events())
        digest = attest.expected_digest(events, [self.pcr])
        body = attest.encode_attest(nonce=nonce, pcrs=[self.pcr], digest=digest,
                                    signer_name=hashlib.sha256(self.ak_public_pem()).digest())
        sig = self._ak().sign(body, ec.ECDSA(hashes.SHA256()))
        return Quote("keystore", body, sig, self.ak_public_pem(), (self.pcr,), events)

    def _secret_path(self, name: str) -> Path:
        if not name.isidentifier():
            raise ValueError(f"bad secret name {name!r}")
        return self.dir / f"{name}.secret"

    def seal(self, name: str, secret: bytes) -> None:
        _write_secret(self._secret_path(name), secret)

    def unseal(self, name: str) -> bytes:
        try:
            return self._secret_path(name).read_bytes()
        except FileNotFoundError:
            raise NotProvisioned(f"no stored '{name}' under {self.dir}") from None

    def status(self) -> RootStatus:
        state = self._state()
        anchor = state.get("anchor")
        floor = int(str(state.get("floor", 0))) if anchor else None
        return RootStatus("keystore", anchor if isinstance(anchor, str) else None, False, floor, floor,
                          self.pcr, len(self.log.events()))


def _conforms(root: KeystoreRoot) -> RootOfTrust:
    return root  # mypy checks here that KeystoreRoot implements the interface


__all__ = ["KeystoreRoot", "is_provisioned"]
