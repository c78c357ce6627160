"""The manifest codec: strict, bounded, and it raises only ManifestError."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import manifest
from agent.core.manifest import Manifest, Payload
from agent.errors import ManifestError

PAYLOAD = Payload(name="rootfs", slot_class="rootfs", size=1000, sha256="a" * 64, stored_size=1000,
                  compression="none", block_size=65536, blocks_sha256="b" * 64)
GOOD = Manifest(compatible="board-x", version="2.0", security_version=3, build_time=1_700_000_000,
                payloads=(PAYLOAD,))


def doc(**changes: object) -> bytes:
    d = json.loads(manifest.to_bytes(GOOD))
    d.update(changes)
    return json.dumps(d).encode()


def test_round_trip_is_identity() -> None:
    assert manifest.from_bytes(manifest.to_bytes(GOOD)) == GOOD


def test_encoding_is_canonical() -> None:
    data = manifest.to_bytes(GOOD)
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("changes, words", [
    ({"format": 2}, "format 2 is not supported"),
    ({"security_version": -1}, "security_version"),
    ({"security_version": True}, "security_version"),
    ({"security_version": "3"}, "security_version"),
    ({"build_time": 2**41}, "build_time"),
    ({"compatible": ""}, "compatible"),
    ({"version": "../etc"}, "version"),
    ({"payloads": []}, "payloads"),
    ({"payloads": [{}] * 17}, "payloads"),
    ({"extra": 1}, "unknown keys extra"),
    ({"health": [1]}, "'health' must be an object"),
])
def test_refuses_bad_top_level_fields(changes: dict[str, object], words: str) -> None:
    with pytest.raises(ManifestError, match=words):
        manifest.from_bytes(doc(**changes))


@pytest.mark.parametrize("changes, words", [
    ({"name": "../x"}, "name"),
    ({"name": "a/b"}, "name"),
    ({"class": "Root FS"}, "class"),
    ({"compression": "gzip"}, "compression"),
    ({"block_size": 1000}, "block_size"),
    ({"block_size": 3 * 4096}, "power of two"),
    ({"sha256": "A" * 64}, "sha256"),
    ({"stored_size": 999}, "stored_size == size"),
    ({"size": 2**45, "stored_size": 2**45}, "size"),
    ({"compression": "zstd", "stored_size": 10**9}, "implausibly larger"),
    ({"size": 2**40, "stored_size": 2**40, "block_size": 4096}, "more than"),
    ({"meta": {"x": "y" * 9000}}, "meta"),
])
def test_refuses_bad_payload_fields(changes: dict[str, object], words: str) -> None:
    d = json.loads(manifest.to_bytes(GOOD))
    d["payloads"][0].update(changes)
    with pytest.raises(ManifestError, match=words):
        manifest.from_bytes(json.dumps(d).encode())


def test_refuses_duplicate_keys() -> None:
    raw = manifest.to_bytes(GOOD).replace(b'"version":"2.0"', b'"version":"2.0","version":"9.0"')
    with pytest.raises(ManifestError, match="repeats the key"):
        manifest.from_bytes(raw)


def test_refuses_two_payloads_with_one_name() -> None:
    with pytest.raises(ManifestError, match="share a name"):
        manifest.to_bytes(replace(GOOD, payloads=(PAYLOAD, PAYLOAD)))


def test_refuses_oversized_manifest() -> None:
    with pytest.raises(ManifestError, match="more than"):
        manifest.from_bytes(b" " * (manifest.MAX_MANIFEST_BYTES + 1))


def test_refuses_deep_nesting_without_crashing() -> None:
    with pytest.raises(ManifestError):
        manifest.from_bytes(b"[" * 100_000 + b"]" * 100_000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_parse_or_raise_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        manifest.from_bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                       max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(manifest._TOP_KEYS | {"health", "x"})), json_values))
def test_any_json_object_parses_or_raises_manifest_error(d: dict[str, object]) -> None:
    base = json.loads(manifest.to_bytes(GOOD))
    base.update(d)
    try:
        m = manifest.from_bytes(json.dumps(base).encode())
    except ManifestError:
        return
    assert manifest.from_bytes(manifest.to_bytes(m)) == m
