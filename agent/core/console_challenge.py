"""Offline challenge-response for the console: the challenge's text, the answer's, and judging it. Pure.

The device shows one line; the technician's laptop signs exactly that line with the
technician key (``edgeops console answer``) and the answer is pasted back:

    challenge  edgeops-console-v1 <device-id> <nonce: 32 hex> <expires: unix seconds>
    answer     v1.<leaf certificate, DER, base64url>[.<intermediate> ...].<Ed25519 signature>

The technician certificate is issued by a root in the device keyring (the same roots that
sign bundles, ``edgeops console issue-technician``) and carries the technician purpose in
its extended key usage, so a bundle signer cannot log in and a technician cannot sign a
bundle (agent.core.trust refuses a leaf without code signing). It is judged like a bundle
signer: path to a keyring root (``trust.build_path``), each certificate unrevoked by the
root-signed CRLs the device holds (so the next bundle's CRL revokes a technician), valid at
the best-known time. The nonce is single-use by construction: the device makes a new one
per attempt and forgets it after.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from dataclasses import dataclass

from agent.core import ed25519, trust
from agent.core.certs import Cert, utc_day
from agent.errors import SignatureError, SignerExpired, SignerRevoked, TrustError, UntrustedSigner

PREFIX = "edgeops-console-v1"
# The technician purpose: an OID under 2.25 (ITU-T X.667, a UUID as an OID: no registry
# needed, no clash with anyone's arc). UUID 6f1e4b8e-0c35-4f5e-9a57-3c1d2b9e8a41.
TECHNICIAN_OID = "2.25." + str(int("6f1e4b8e0c354f5e9a573c1d2b9e8a41", 16))
MAX_ANSWER = 8192  # characters: a leaf and two intermediates in base64 fit easily
MAX_CERTS = trust.MAX_CHAIN
CHALLENGE_TTL = 300  # seconds a challenge stays answerable
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_B64 = re.compile(r"[A-Za-z0-9_-]+={0,2}")


@dataclass(frozen=True)
class Challenge:
    device_id: str
    nonce: str  # 32 lowercase hex digits
    expires: int

    def text(self) -> str:
        return f"{PREFIX} {self.device_id} {self.nonce} {self.expires}"

    @classmethod
    def make(cls, device_id: str, nonce: bytes, now: float, ttl: int = CHALLENGE_TTL) -> Challenge:
        if not _ID.fullmatch(device_id):
            raise UntrustedSigner(f"device id {device_id[:70]!r} cannot be put in a challenge")
        if len(nonce) != 16:
            raise ValueError("a challenge nonce is 16 bytes")
        return cls(device_id, nonce.hex(), int(now) + ttl)

    @classmethod
    def parse(cls, text: str) -> Challenge:
        """The challenge a technician's tool was given (bounded, exact)."""
        parts = text.strip().split(" ")
        if (len(text) > 200 or len(parts) != 4 or parts[0] != PREFIX or not _ID.fullmatch(parts[1])
                or not re.fullmatch(r"[0-9a-f]{32}", parts[2]) or not parts[3].isdigit()):
            raise TrustError("not a console challenge",
                             hint=f"copy the whole line that starts with '{PREFIX}'")
        return cls(parts[1], parts[2], int(parts[3]))


@dataclass(frozen=True)
class Technician:
    name: str  # the certificate subject
    serial: int


def encode_answer(chain_der: list[bytes], signature: bytes) -> str:
    parts = [_b64(c) for c in chain_der] + [_b64(signature)]
    return "v1." + ".".join(parts)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    if not _B64.fullmatch(text):
        raise binascii.Error("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_answer(answer: str) -> tuple[list[Cert], bytes]:
    answer = answer.strip()
    if len(answer) > MAX_ANSWER:
        raise TrustError(f"answer is {len(answer)} characters, at most {MAX_ANSWER}",
                         hint="paste only the line 'edgeops console answer' printed")
    parts = answer.split(".")
    if parts[0] != "v1" or not 3 <= len(parts) <= MAX_CERTS + 2:
        raise TrustError("not a console answer",
                         hint="paste the line 'edgeops console answer' printed (it starts 'v1.')")
    try:
        blobs = [_unb64(p) for p in parts[1:-1]]
        sig = _unb64(parts[-1])
    except (binascii.Error, ValueError):
        raise TrustError("the answer is damaged (not base64url DER)",
                         hint="paste the whole line again, without line breaks") from None
    return [trust.parse_certificate(b, i) for i, b in enumerate(blobs)], sig


def check_technician_usage(leaf: Cert) -> None:
    if leaf.ed25519_key is None:
        raise UntrustedSigner("technician key is not Ed25519")
    if leaf.ext_key_usage is None or TECHNICIAN_OID not in leaf.ext_key_usage:
        raise UntrustedSigner("that certificate is not a technician certificate",
                              hint="issue one with 'edgeops console issue-technician'")
    if leaf.ca:
        raise UntrustedSigner("a CA certificate cannot log in; use a technician certificate")


def verify_answer(challenge: Challenge, answer: str, *, keyring: trust.Keyring,
                  crls: list[bytes], now: float, best_known_time: int) -> Technician:
    """The technician who answered ``challenge``, or a ``TrustError`` saying why not."""
    if now > challenge.expires:
        raise SignerExpired("the challenge expired before it was answered",
                            hint="type 'login key' again for a new challenge")
    certs, sig = decode_answer(answer)
    path = trust.build_path(certs, keyring)
    leaf = path[0]
    check_technician_usage(leaf)
    revoked, _ = trust.revoked_serials(crls, keyring.roots)
    for cert, issuer in itertools.pairwise(path):
        if (issuer.subject.text, cert.serial_number) in revoked:
            raise SignerRevoked(f"technician certificate '{cert.subject}' "
                                f"(serial {cert.serial_number:x}) is revoked")
    for cert in path:
        if not cert.not_before <= best_known_time <= cert.not_after:
            raise SignerExpired(f"certificate '{cert.subject}' is not valid "
                                f"now (valid until {utc_day(cert.not_after)})")
    if len(sig) != 64:
        raise SignatureError(f"signature is {len(sig)} bytes, an Ed25519 signature is 64")
    assert leaf.ed25519_key is not None  # check_technician_usage
    if not ed25519.verify(leaf.ed25519_key, sig, challenge.text().encode()):
        raise SignatureError("the answer's signature does not match this challenge",
                             hint="sign the challenge shown now, not an older one")
    return Technician(leaf.subject.text, leaf.serial_number)
