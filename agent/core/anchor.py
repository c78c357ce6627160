"""The keyring anchor: a root set's fingerprint, its NV record, and signed root rotation. Pure.

The anchor is what a root of trust stores instead of the keyring itself: the
SHA-256 of the sorted DER certificates, so order, comments and line endings of
the PEM file do not matter. The TPM keeps it in a write-locked NV index as a
fixed record (magic, anchor, the rollback counter's base value); the keystore
keeps its hex in a file. A rotation to a new root set is an Ed25519 signature by
a root of the *current* set over a fixed context and the new set's anchor.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.errors import UntrustedSigner

ROTATION_CONTEXT = b"edgeops keyring rotation v1\0"
RECORD_MAGIC = b"EOA1"
RECORD_SIZE = len(RECORD_MAGIC) + 32 + 8


def keyring_anchor(keyring_pem: bytes) -> bytes:
    """SHA-256 over the sorted DER of the roots: independent of order, comments and line endings."""
    try:
        certs = x509.load_pem_x509_certificates(keyring_pem)
    except ValueError as exc:
        raise UntrustedSigner(f"keyring is not PEM certificates: {exc}") from None
    ders = sorted(c.public_bytes(serialization.Encoding.DER) for c in certs)
    h = hashlib.sha256()
    for der in ders:
        h.update(struct.pack(">I", len(der)) + der)
    return h.digest()


def sign_rotation(root_key: ed25519.Ed25519PrivateKey, new_keyring_pem: bytes) -> bytes:
    """Host side: a current root approves the new root set (its anchor), nothing else."""
    return root_key.sign(ROTATION_CONTEXT + keyring_anchor(new_keyring_pem))


def verify_rotation(current_keyring_pem: bytes, new_keyring_pem: bytes, signature: bytes) -> bytes:
    """Return the new anchor if a root of the *current* set signed it; else raise UntrustedSigner."""
    new_anchor = keyring_anchor(new_keyring_pem)
    message = ROTATION_CONTEXT + new_anchor
    for cert in x509.load_pem_x509_certificates(current_keyring_pem):
        key = cert.public_key()
        if not isinstance(key, ed25519.Ed25519PublicKey):
            continue
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return new_anchor
    raise UntrustedSigner("root rotation is not signed by a currently anchored root",
                          hint="sign the new keyring with 'sign_rotation' using a current root key")


@dataclass(frozen=True)
class AnchorRecord:
    """The TPM's NV anchor: the root set's anchor and the counter value the floor counts from."""

    anchor: bytes  # 32 bytes, keyring_anchor()
    base: int  # the NV counter's value at provisioning: floor = counter - base

    def to_bytes(self) -> bytes:
        if len(self.anchor) != 32:
            raise ValueError(f"an anchor is 32 bytes, not {len(self.anchor)}")
        return RECORD_MAGIC + self.anchor + struct.pack(">Q", self.base)

    @classmethod
    def from_bytes(cls, data: bytes) -> AnchorRecord:
        """Raise ValueError for anything but an edgeops record (the index may hold someone else's)."""
        if len(data) != RECORD_SIZE or not data.startswith(RECORD_MAGIC):
            raise ValueError("not an edgeops keyring anchor record")
        (base,) = struct.unpack(">Q", data[36:])
        return cls(data[4:36], base)


__all__ = ["RECORD_SIZE", "ROTATION_CONTEXT", "AnchorRecord", "keyring_anchor", "sign_rotation",
           "verify_rotation"]
