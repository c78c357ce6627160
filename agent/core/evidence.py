"""Remote attestation over DDI: the evidence document and the verifier's judgement of it. Pure.

The device asks its controller for a nonce (``POST …/{controllerId}/attestation/challenge``),
quotes its measurement PCR with it and sends the quote with its event log
(``POST …/attestation/quote``, the document ``edgeops tpm quote`` prints). The controller
judges it here: the document's shape and bounds, then ``attest.verify_quote`` under the
attestation key it bound for this device (at enrolment, or at the device's first quote),
the nonce it issued, and *its own* PCR policy; then what the replayed log says (which slot
booted, what was installed since the TPM's last reset).

The same nonce-then-quote exchange as a TPM remote attestation in Keylime or the TCG's
"Attestation Framework" (TPM2_Quote over a verifier-chosen qualifyingData), over the device's
DDI session so it needs no port or credential of its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.core import attest
from agent.core.attest import Event, QuoteFacts, QuoteRefused

CHALLENGE_PATH = "attestation/challenge"  # under the device's DDI base URL
QUOTE_PATH = "attestation/quote"
NONCE_BYTES = 32
NONCE_LIFETIME = 300  # seconds a challenge stays answerable; one outstanding per device
MAX_EVENTS = 1024  # a boot measures one slot; an install one event per payload
MAX_LABEL = 256
MAX_DIGEST = 64
MAX_PEM = 4096
KINDS = ("tpm", "keystore")


@dataclass(frozen=True)
class Evidence:
    """A quote document as sent, shape-checked, not yet verified."""

    kind: str  # what the device says it is; the bound AK decides what that is worth
    attest: bytes
    signature: bytes
    ak_public_pem: bytes
    events: tuple[Event, ...]


@dataclass(frozen=True)
class Judgement:
    """What a verified quote shows."""

    facts: QuoteFacts
    boot_slot: str | None  # the last 'boot:slot' event, as the device measured it
    installs: tuple[tuple[str, str], ...]  # (label, payload SHA-256 hex), in measuring order


def _b64(doc: Mapping[str, Any], key: str, limit: int) -> bytes:
    v = doc.get(key)
    if not isinstance(v, str) or len(v) > limit * 4 // 3 + 4:
        raise QuoteRefused(f"quote document: '{key}' must be base64 of at most {limit} bytes")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise QuoteRefused(f"quote document: '{key}' is not base64") from None


def _event(e: Any) -> Event:
    if not isinstance(e, dict):
        raise QuoteRefused("quote document: each event is an object {pcr, label, digest}")
    pcr, label, digest = e.get("pcr"), e.get("label"), e.get("digest")
    if not isinstance(pcr, int) or isinstance(pcr, bool) or not 0 <= pcr <= 23:
        raise QuoteRefused("quote document: an event's 'pcr' is not 0-23")
    if not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL or not label.isprintable():
        raise QuoteRefused(f"quote document: an event's 'label' is not 1-{MAX_LABEL} printable characters")
    if not isinstance(digest, str) or len(digest) > 2 * MAX_DIGEST:
        raise QuoteRefused(f"quote document: an event's 'digest' is not hex of at most {MAX_DIGEST} bytes")
    try:
        return Event(pcr, label, bytes.fromhex(digest))
    except ValueError:
        raise QuoteRefused("quote document: an event's 'digest' is not hex") from None


def parse_evidence(doc: Mapping[str, Any]) -> Evidence:
    """Shape and bounds of a quote document; ``QuoteRefused`` naming the first thing wrong."""
    kind = doc.get("kind")
    if kind not in KINDS:
        raise QuoteRefused(f"quote document: 'kind' must be one of {', '.join(KINDS)}")
    pem = doc.get("ak_public_pem")
    if not isinstance(pem, str) or not 0 < len(pem) <= MAX_PEM:
        raise QuoteRefused(f"quote document: 'ak_public_pem' must be a PEM of at most {MAX_PEM} characters")
    events = doc.get("events")
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise QuoteRefused(f"quote document: 'events' must be a list of at most {MAX_EVENTS}")
    return Evidence(str(kind), _b64(doc, "attest", attest.MAX_ATTEST), _b64(doc, "signature", 256),
                    pem.encode(), tuple(_event(e) for e in events))


def key_digest(pem: bytes) -> str:
    """SHA-256 (hex) of a PEM public key's DER SubjectPublicKeyInfo: the key, not its text."""
    from cryptography.hazmat.primitives import serialization

    der = attest.load_ak(pem).public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def same_key(a_pem: bytes, b_pem: bytes) -> bool:
    """Whether two PEM public keys are the same key."""
    return key_digest(a_pem) == key_digest(b_pem)


def judge(ev: Evidence, *, bound_ak_pem: bytes, nonce: bytes, pcr: int) -> Judgement:
    """Verify ``ev`` against the bound AK, the issued nonce and the verifier's PCR.

    Every event must be on ``pcr``: the quote covers that PCR only, so an event elsewhere is a
    claim nothing signed. The AK the document carries must be the bound one (the signature is
    checked under the bound key, never under the document's)."""
    if not same_key(ev.ak_public_pem, bound_ak_pem):
        raise QuoteRefused("quote is signed by another attestation key than this device's",
                           hint="a replaced TPM or a cloned device: the operator re-binds it "
                                "('DELETE /api/v1/devices/ID/attestation') after checking it")
    stray = sorted({e.pcr for e in ev.events if e.pcr != pcr})
    if stray:
        raise QuoteRefused(f"event log has events for PCR {stray}, the verifier quotes PCR {pcr} only")
    facts = attest.verify_quote(ak_public_pem=bound_ak_pem, attest=ev.attest, signature=ev.signature,
                                nonce=nonce, expected_pcrs=[pcr],
                                expected_pcr_digest=attest.expected_digest(ev.events, [pcr]))
    boots = [e for e in ev.events if e.label == "boot:slot"]
    slot = boots[-1].digest.decode("ascii", "replace") if boots else None
    installs = tuple((e.label, e.digest.hex()) for e in ev.events if e.label.startswith("install:"))
    return Judgement(facts, slot, installs)


__all__ = ["CHALLENGE_PATH", "NONCE_BYTES", "NONCE_LIFETIME", "QUOTE_PATH", "Evidence", "Judgement",
           "judge", "key_digest", "parse_evidence", "same_key"]
