"""The bundle manifest: a strict, bounded JSON record.

``from_bytes`` is only ever called on bytes whose signature has been checked
(see ``agent.core.trust``), yet it still bounds every size and count and raises only
``ManifestError``: a leaked signer must not be able to crash the agent.
The encoding is documented in docs/bundle-format.md.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.core.frozen import Frozen, field
from agent.errors import ManifestError

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024
MAX_PAYLOADS = 16
MAX_PAYLOAD_SIZE = 1 << 44  # 16 TiB: far above any slot, far below overflow trouble
MAX_META_BYTES = 8 * 1024
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 16 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 64 * 1024
MAX_BLOCKS = 1 << 20  # the block list (32 bytes a block) stays under 32 MiB
COMPRESSIONS = ("none", "zstd")
DELTA_META_KEY = "delta_index_bytes"  # meta of a delta-capable payload (agent.core.delta_index)
DELTA_MAX_BASES = 8

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_CLASS_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}")
_COMPATIBLE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:/-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


class Payload(Frozen):
    name: str
    slot_class: str
    size: int  # bytes as installed (after decompression)
    sha256: str  # of the installed bytes
    stored_size: int  # bytes in the bundle
    compression: str
    block_size: int
    blocks_sha256: str  # SHA-256 of the block list (one SHA-256 per stored block)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def block_count(self) -> int:
        return -(-self.stored_size // self.block_size)

    @property
    def blocks_size(self) -> int:
        return self.block_count * 32


class Manifest(Frozen):
    compatible: str
    version: str
    security_version: int
    build_time: int  # seconds since the epoch, as attested by the signer
    payloads: tuple[Payload, ...]
    health: dict[str, Any] | None = None
    description: str = ""
    format: int = FORMAT_VERSION

    def payload(self, name: str) -> Payload:
        for p in self.payloads:
            if p.name == name:
                return p
        raise KeyError(name)


def to_bytes(m: Manifest) -> bytes:
    """Canonical encoding: sorted keys, no spaces, ASCII. The signature covers these bytes."""
    doc: dict[str, Any] = {
        "format": m.format,
        "compatible": m.compatible,
        "version": m.version,
        "security_version": m.security_version,
        "build_time": m.build_time,
        "payloads": [
            {
                "name": p.name,
                "class": p.slot_class,
                "size": p.size,
                "sha256": p.sha256,
                "stored_size": p.stored_size,
                "compression": p.compression,
                "block_size": p.block_size,
                "blocks_sha256": p.blocks_sha256,
                **({"meta": p.meta} if p.meta else {}),
            }
            for p in m.payloads
        ],
    }
    if m.health is not None:
        doc["health"] = m.health
    if m.description:
        doc["description"] = m.description
    data = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    # Parse our own output so a writer can never produce what a reader refuses.
    from_bytes(data)
    return data


def from_bytes(data: bytes) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ManifestError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    return _manifest(doc)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError(f"manifest repeats the key {k!r}")
        out[k] = v
    return out


_TOP_KEYS = {"format", "compatible", "version", "security_version", "build_time", "payloads"}
_PAYLOAD_KEYS = {
    "name", "class", "size", "sha256", "stored_size", "compression", "block_size", "blocks_sha256",
}


def _manifest(doc: Any) -> Manifest:
    obj = _object(doc, "manifest", required=_TOP_KEYS, optional={"health", "description"})
    fmt = _int(obj["format"], "format", 1, 1_000)
    if fmt != FORMAT_VERSION:
        raise ManifestError(f"manifest format {fmt} is not supported (this agent reads {FORMAT_VERSION})")
    payload_docs = obj["payloads"]
    if not isinstance(payload_docs, list) or not 1 <= len(payload_docs) <= MAX_PAYLOADS:
        raise ManifestError(f"'payloads' must be a list of 1 to {MAX_PAYLOADS} entries")
    payloads = tuple(_payload(p, i) for i, p in enumerate(payload_docs))
    names = [p.name for p in payloads]
    if len(set(names)) != len(names):
        raise ManifestError("two payloads share a name")
    health = obj.get("health")
    if health is not None and not isinstance(health, dict):
        raise ManifestError("'health' must be an object")
    description = obj.get("description", "")
    if not isinstance(description, str) or len(description) > 1024:
        raise ManifestError("'description' must be a string of at most 1024 characters")
    return Manifest(
        compatible=_match(obj["compatible"], "compatible", _COMPATIBLE_RE),
        version=_match(obj["version"], "version", _VERSION_RE),
        security_version=_int(obj["security_version"], "security_version", 0, 2**32 - 1),
        build_time=_int(obj["build_time"], "build_time", 0, 2**40),
        payloads=payloads,
        health=health,
        description=description,
        format=fmt,
    )


def _payload(doc: Any, index: int) -> Payload:
    where = f"payloads[{index}]"
    obj = _object(doc, where, required=_PAYLOAD_KEYS, optional={"meta"})
    compression = obj["compression"]
    if compression not in COMPRESSIONS:
        raise ManifestError(f"{where}.compression must be one of {', '.join(COMPRESSIONS)}")
    block_size = _int(obj["block_size"], f"{where}.block_size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
    if block_size & (block_size - 1):
        raise ManifestError(f"{where}.block_size must be a power of two")
    size = _int(obj["size"], f"{where}.size", 0, MAX_PAYLOAD_SIZE)
    stored = _int(obj["stored_size"], f"{where}.stored_size", 0, MAX_PAYLOAD_SIZE)
    if compression == "none" and stored != size:
        raise ManifestError(f"{where}: an uncompressed payload must have stored_size == size")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict) or len(json.dumps(meta)) > MAX_META_BYTES:
        raise ManifestError(f"{where}.meta must be an object of at most {MAX_META_BYTES} bytes")
    bound = size + size // 64 + 4096  # zstd never expands more than this
    if DELTA_META_KEY in meta:  # a delta payload also carries its index and patches for up to
        bound = bound * (1 + DELTA_MAX_BASES) + (64 << 20)  # 8 bases (docs/delta.md)
    if stored > bound:
        raise ManifestError(f"{where}.stored_size is implausibly larger than its size")
    if -(-stored // block_size) > MAX_BLOCKS:
        raise ManifestError(f"{where} has more than {MAX_BLOCKS} blocks; use a larger block_size")
    return Payload(
        name=_match(obj["name"], f"{where}.name", _NAME_RE),
        slot_class=_match(obj["class"], f"{where}.class", _CLASS_RE),
        size=size,
        sha256=_match(obj["sha256"], f"{where}.sha256", _HEX64_RE),
        stored_size=stored,
        compression=compression,
        block_size=block_size,
        blocks_sha256=_match(obj["blocks_sha256"], f"{where}.blocks_sha256", _HEX64_RE),
        meta=meta,
    )


def _object(doc: Any, where: str, *, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where} must be a JSON object")
    missing = required - doc.keys()
    if missing:
        raise ManifestError(f"{where} lacks {', '.join(sorted(missing))}")
    unknown = doc.keys() - required - optional
    if unknown:
        raise ManifestError(f"{where} has unknown keys {', '.join(sorted(unknown))}")
    return doc


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ManifestError(f"{where} must be an integer from {lo} to {hi}")
    return value


def _match(value: Any, where: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ManifestError(f"{where} is malformed (expected {pattern.pattern})")
    return value
