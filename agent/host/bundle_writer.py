"""Write a bundle (host side): payloads hashed per block, a signed manifest, one ustar stream.

The layout is the one agent.adapters.bundle reads (docs/bundle-format.md). Members are
written in the reader's fixed order, with deterministic headers (agent.core.tarstream), so
the same inputs and build time give the same bytes. The output appears atomically: a
half-written bundle is never left under its final name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from agent.adapters.bundle import (
    CHAIN_NAME,
    CRL_NAME,
    MANIFEST_NAME,
    READ_SIZE,
    SIG_NAME,
    ZSTD_LEVEL,
    ZSTD_WINDOW_LOG,
)
from agent.adapters.fsutil import atomic_file
from agent.core import manifest as manifest_mod
from agent.core import tarstream
from agent.core.manifest import DEFAULT_BLOCK_SIZE, Manifest, Payload
from agent.errors import ManifestError
from agent.host import keys


@dataclass
class PayloadSource:
    name: str
    slot_class: str
    path: Path
    compress: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE
    meta: dict[str, Any] = field(default_factory=dict)
    # already-stored zstd bytes (a delta-capable payload, agent.host.delta_writer) and what
    # they install: size and SHA-256 of the image
    stored: Path | None = None
    installed: tuple[int, str] | None = None


@dataclass
class _Prepared:
    payload: Payload
    stored: Path
    blocks: bytes
    temp: bool


def _prepare(src: PayloadSource, workdir: Path) -> _Prepared:
    size, installed = 0, hashlib.sha256()
    stored_path, temp, sha = src.path, False, ""
    compressed = src.compress or src.stored is not None
    if src.stored is not None and src.installed is not None:
        stored_path = src.stored
        size, sha = src.installed
    elif src.compress:
        with keys.writing("the bundle's scratch file in", workdir):
            fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".payload-")
        stored_path, temp = Path(tmp), True
        params = zstandard.ZstdCompressionParameters.from_level(
            ZSTD_LEVEL, window_log=ZSTD_WINDOW_LOG, write_checksum=1)
        cctx = zstandard.ZstdCompressor(compression_params=params)
        with open(src.path, "rb") as fin, os.fdopen(fd, "wb") as fout, \
                cctx.stream_writer(fout, closefd=False) as z:
            while chunk := fin.read(READ_SIZE):
                size += len(chunk)
                installed.update(chunk)
                z.write(chunk)
    stored_size, blocks = 0, bytearray()
    with open(stored_path, "rb") as f:
        while chunk := f.read(src.block_size):
            stored_size += len(chunk)
            blocks += hashlib.sha256(chunk).digest()
            if not compressed:
                size += len(chunk)
                installed.update(chunk)
    payload = Payload(
        name=src.name, slot_class=src.slot_class, size=size,
        sha256=sha if src.stored is not None else installed.hexdigest(),
        stored_size=stored_size, compression="zstd" if compressed else "none",
        block_size=src.block_size, blocks_sha256=hashlib.sha256(blocks).hexdigest(), meta=src.meta,
    )
    return _Prepared(payload, stored_path, bytes(blocks), temp)


def create(
    out: Path,
    *,
    sign: Any,  # callable: bytes -> 64-byte signature
    chain_pem: bytes,
    compatible: str,
    version: str,
    security_version: int,
    build_time: int,
    sources: list[PayloadSource],
    health: dict[str, Any] | None = None,
    description: str = "",
    crl: bytes | None = None,
) -> Manifest:
    workdir = out.resolve().parent
    prepared: list[_Prepared] = []
    try:
        for src in sources:
            prepared.append(_prepare(src, workdir))
        m = Manifest(compatible=compatible, version=version, security_version=security_version,
                     build_time=build_time, payloads=tuple(p.payload for p in prepared),
                     health=health, description=description)
        try:
            mbytes = manifest_mod.to_bytes(m)
        except ManifestError as exc:
            raise ManifestError(f"cannot build manifest: {exc}", hint="fix the bundle options") from None
        signature = sign(mbytes)
        with keys.writing("the bundle", out), atomic_file(out) as f:
            def member(name: str, data: bytes) -> None:
                f.write(tarstream.header(name, len(data), build_time))
                f.write(data)
                f.write(bytes(tarstream.padding(len(data))))

            member(CHAIN_NAME, chain_pem)
            member(SIG_NAME, signature)
            member(MANIFEST_NAME, mbytes)
            if crl:
                member(CRL_NAME, crl)
            for prep in prepared:
                member(f"{prep.payload.name}.blocks", prep.blocks)
                f.write(tarstream.header(prep.payload.name, prep.payload.stored_size, build_time))
                with open(prep.stored, "rb") as src_f:
                    while chunk := src_f.read(READ_SIZE):
                        f.write(chunk)
                f.write(bytes(tarstream.padding(prep.payload.stored_size)))
            f.write(tarstream.END)
        return m
    finally:
        for prep in prepared:
            if prep.temp:
                prep.stored.unlink(missing_ok=True)
