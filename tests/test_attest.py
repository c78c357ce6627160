"""The pure quote verifier: tables of tampering, a fuzz invariant, and the keystore's quotes."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.rot.keystore import KeystoreRoot
from agent.core import attest, eventlog

NONCE = b"fresh-nonce-1234"
EVENTS = (attest.Event(15, "install:rootfs:b", hashlib.sha256(b"img").digest()),
          attest.Event(15, "boot:slot", b"b"))


def _ak() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem


def _quote(key: ec.EllipticCurvePrivateKey, *, nonce: bytes = NONCE, body: bytes | None = None
           ) -> tuple[bytes, bytes]:
    data = body if body is not None else attest.encode_attest(
        nonce=nonce, pcrs=[15], digest=attest.expected_digest(EVENTS, [15]))
    return data, key.sign(data, ec.ECDSA(hashes.SHA256()))


def _verify(pem: bytes, data: bytes, sig: bytes, nonce: bytes = NONCE,
            events: tuple[attest.Event, ...] = EVENTS) -> attest.QuoteFacts:
    return attest.verify_quote(ak_public_pem=pem, attest=data, signature=sig, nonce=nonce,
                               expected_pcrs=[15], expected_pcr_digest=attest.expected_digest(events, [15]))


def test_replay_matches_a_tpm_extend_chain() -> None:
    # PCR_new = SHA256(PCR_old || value), from 32 zero bytes
    v1 = EVENTS[0].extend_value()
    step1 = hashlib.sha256(bytes(32) + v1).digest()
    step2 = hashlib.sha256(step1 + EVENTS[1].extend_value()).digest()
    assert attest.replay(EVENTS, 15) == step2
    assert attest.replay(EVENTS, 14) == bytes(32)
    assert EVENTS[0].extend_value() != attest.Event(15, "boot:slot", EVENTS[0].digest).extend_value()


def test_good_quote_verifies() -> None:
    key, pem = _ak()
    facts = _verify(pem, *_quote(key))
    assert facts.nonce == NONCE and facts.pcrs == (15,)


@pytest.mark.parametrize("case", ["replayed", "other_key", "altered", "wrong_pcrs", "bad_magic",
                                  "not_a_quote", "trailing", "short_nonce", "other_pcr_selected",
                                  "extra_pcr_selected"])
def test_refused(case: str) -> None:
    key, pem = _ak()
    data, sig = _quote(key)
    nonce = NONCE
    events: tuple[attest.Event, ...] = EVENTS
    if case == "replayed":
        nonce = b"the-next-nonce!!"
    elif case == "other_key":
        _, pem = _ak()
    elif case == "altered":
        data = data[:-1] + bytes([data[-1] ^ 0x80])
    elif case == "wrong_pcrs":
        events = (EVENTS[0],)
    elif case == "bad_magic":
        data, sig = _quote(key, body=b"\x00" + data[1:])
    elif case == "not_a_quote":
        data, sig = _quote(key, body=data[:4] + struct.pack(">H", 0x8017) + data[6:])
    elif case == "trailing":
        data, sig = _quote(key, body=data + b"\x00")
    elif case == "short_nonce":
        nonce = b"abc"
    elif case == "other_pcr_selected":  # the log's events, replayed into a PCR the device controls
        moved = tuple(attest.Event(16, e.label, e.digest) for e in EVENTS)
        data, sig = _quote(key, body=attest.encode_attest(
            nonce=NONCE, pcrs=[16], digest=attest.expected_digest(moved, [16])))
    elif case == "extra_pcr_selected":
        data, sig = _quote(key, body=attest.encode_attest(
            nonce=NONCE, pcrs=[15, 16], digest=attest.expected_digest(EVENTS, [15, 16])))
    with pytest.raises(attest.QuoteRefused):
        _verify(pem, data, sig, nonce, events)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_raises_only_quote_refused(data: bytes) -> None:
    with contextlib.suppress(attest.QuoteRefused):  # anything else fails the test
        attest.parse_attest(data)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_refused(pos: int, flip: int) -> None:
    key, pem = _ak()
    data, sig = _quote(key)
    pos %= len(data)
    changed = data[:pos] + bytes([data[pos] ^ (flip or 1)]) + data[pos + 1:]
    with pytest.raises(attest.QuoteRefused):
        _verify(pem, changed, sig)


def test_keystore_quote_uses_the_same_verifier(tmp_path: Path) -> None:
    ks = KeystoreRoot(tmp_path, reason="test")
    for e in EVENTS:
        ks.measure(e.label, e.digest)
    q = ks.quote(NONCE)
    assert q.kind == "keystore"
    _verify(q.ak_public_pem, q.attest, q.signature)
    with pytest.raises(attest.QuoteRefused):
        _verify(q.ak_public_pem, q.attest, q.signature, nonce=b"x" * 16)


def test_event_log_line_torn_by_a_power_cut_is_dropped(tmp_path: Path) -> None:
    from agent.adapters.rot.eventlog import EventLog

    log = EventLog(tmp_path / "events.jsonl")
    for e in EVENTS:
        log.append(e)
    whole = log.path.read_bytes()
    log.path.write_bytes(whole + whole.splitlines(keepends=True)[0][:17])  # cut mid-line
    assert log.events() == list(EVENTS)
    extra = attest.Event(15, "boot:slot", b"\x07" * 32)
    log.append(extra)
    assert log.events() == [*EVENTS, extra]


_events = st.lists(st.builds(attest.Event, st.integers(min_value=0, max_value=23), st.text(max_size=30),
                             st.binary(max_size=40)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(_events, st.integers(min_value=0))
def test_event_log_codec_round_trips_and_drops_only_a_torn_tail(events: list[attest.Event],
                                                                cut: int) -> None:
    data = b"".join(eventlog.encode(e) for e in events)
    assert eventlog.decode(data) == events
    prefix = data[:cut % (len(data) + 1)]  # power cut at any byte
    decoded = eventlog.decode(prefix)
    assert decoded == events[:len(decoded)]
    assert eventlog.complete_length(prefix) == len(b"".join(eventlog.encode(e) for e in decoded))


@pytest.mark.parametrize("line", [b"not json\n", b"[]\n", b'{"pcr": 15, "label": "x"}\n',
                                  b'{"pcr": 15, "label": "x", "digest": "zz"}\n'])
def test_event_log_codec_refuses_a_complete_bad_line(line: bytes) -> None:
    with pytest.raises(eventlog.CorruptLog):
        eventlog.decode(eventlog.encode(EVENTS[0]) + line)
