"""Bundle intake: stream an upload to disk while hashing it, verify it as a device would, keep it by SHA-256.

The controller refuses what its devices would refuse: the signature, the chain to the
fleet's roots and every payload block are checked (any ``compatible``) before the file
takes its final name, ``artifacts/<sha256>``, so the artifact directory only ever holds
verified bundles. Recording the bundle in the database is ``Fleet.upload_bundle``'s job.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from agent.adapters.fsutil import replace_durably


@dataclass(frozen=True)
class BundleInfo:
    id: int
    version: str
    compatible: str
    sha256: str
    sha1: str
    md5: str
    size: int
    filename: str
    signer: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Stored:
    """A verified bundle in the artifact directory, not yet recorded."""

    sha256: str
    sha1: str
    md5: str
    size: int
    signer: str
    version: str
    compatible: str


def store(stream: BinaryIO, artifacts: Path, keyring_pem: bytes, now: float) -> Stored:
    """Copy ``stream`` into ``artifacts``, verified; a bundle that fails leaves nothing behind."""
    # The final name is the content's hash, known only at the end: stream to a temporary
    # file beside it, verify that, then rename it into place (durably: the database will
    # name this file next, so the rename must be on disk first).
    fd, tmp_name = tempfile.mkstemp(dir=artifacts, prefix=".upload-")
    tmp = Path(tmp_name)
    try:
        hashes = _copy_hashing(stream, fd)
        signer, version, compatible = _verify_bundle(tmp, keyring_pem, now)
        final = artifacts / hashes["sha256"]
        replace_durably(tmp, final)
        return Stored(hashes["sha256"], hashes["sha1"], hashes["md5"], final.stat().st_size,
                      signer, version, compatible)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_hashing(stream: BinaryIO, fd: int) -> dict[str, str]:
    hs = {"sha256": hashlib.sha256(), "sha1": hashlib.sha1(), "md5": hashlib.md5()}
    with os.fdopen(fd, "wb") as out:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
            for h in hs.values():
                h.update(chunk)
        out.flush()
        os.fsync(out.fileno())
    return {k: h.hexdigest() for k, h in hs.items()}


def _verify_bundle(path: Path, keyring_pem: bytes, now: float) -> tuple[str, str, str]:
    """Signature, chain and every payload block, as a device would check them (any compatible)."""
    from agent.adapters.bundle import BundleReader
    from agent.core import trust

    with open(path, "rb") as f:
        reader = BundleReader(f)
        head = reader.read_head()
        verdict = trust.verify_head(
            manifest_bytes=head.manifest_bytes, signature=head.signature, chain_pem=head.chain_pem,
            keyring=trust.Keyring.from_pem(keyring_pem),
            device=trust.DeviceFacts(compatible=None, security_floor=0, best_known_time=int(now)),
            crls=[head.crl] if head.crl else [])
        for payload in reader.payloads(verdict.manifest):
            payload.drain()
    return verdict.signer_subject, verdict.manifest.version, verdict.manifest.compatible
