"""edgeops bundle: create (host side), info, verify.

The bundle reader, ``trust`` and the host's keys (``cryptography``, ``zstandard``) are
imported by the handlers, so registering these commands costs nothing."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.core.manifest import DEFAULT_BLOCK_SIZE
from agent.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from agent.host import bundle_writer


def register(sub: Any) -> None:
    p = sub.add_parser("bundle", help="create, inspect and verify bundles")
    bs = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    c = bs.add_parser("create", help="build and sign a bundle")
    c.add_argument("--key", type=Path, required=True, help="signer.key")
    c.add_argument("--cert", type=Path, required=True, help="signer.crt (and any intermediates)")
    c.add_argument("--compatible", required=True, help="board family string the bundle is for")
    c.add_argument("--version", required=True)
    c.add_argument("--security-version", type=int, required=True,
                   help="anti-rollback level: devices refuse bundles below their floor")
    c.add_argument("--payload", action="append", required=True, metavar="CLASS=FILE",
                   help="payload for a slot class (rootfs, app, …); NAME:CLASS=FILE names it")
    c.add_argument("--compress", choices=["zstd", "none"], default="none",
                   help="store payloads zstd-compressed (decompressed while installing)")
    c.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="bytes per verified block (default 64 KiB)")
    c.add_argument("--health", type=Path, help="TOML or JSON health-check overrides ([health] form)")
    c.add_argument("--crl", type=Path, help="root-signed revocation list to carry to devices")
    c.add_argument("--build-time", type=int, help="seconds since the epoch (default: now)")
    c.add_argument("--description", default="")
    c.add_argument("-o", "--output", type=Path, required=True)
    c.set_defaults(func=_create)

    i = bs.add_parser("info", help="show a bundle's manifest (unverified)")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)

    v = bs.add_parser("verify", help="verify signature, chain and every payload block; writes nothing")
    v.add_argument("bundle")
    v.add_argument("--keyring", type=Path, required=True, help="trusted root certificate(s)")
    v.add_argument("--compatible", help="also require this compatible string")
    v.add_argument("--crl", type=Path, action="append", default=[])
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_verify)


def _parse_payload(spec: str, compress: bool, block_size: int) -> bundle_writer.PayloadSource:
    from agent.host import bundle_writer

    left, sep, file = spec.partition("=")
    if not sep or not left or not file:
        raise UsageError(f"--payload {spec!r} is not CLASS=FILE")
    name, _, cls = left.rpartition(":")
    return bundle_writer.PayloadSource(name=name or cls, slot_class=cls, path=Path(file),
                                compress=compress, block_size=block_size)


def _load_health(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    import tomllib

    try:
        text = path.read_text()
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read health overrides {path}: {exc}") from None
    doc = doc.get("health", doc)
    from agent.core import health

    health.parse_policy(doc, base=health.HealthPolicy())  # refuse bad overrides at build time
    return dict(doc)


def _create(a: argparse.Namespace) -> int:
    from agent.host import bundle_writer, keys

    signing_key = keys.load_signing_key(a.key)
    chain_pem = _read(a.cert, "signer certificate")
    keys.check_signer(signing_key, chain_pem)
    sources = [_parse_payload(s, a.compress == "zstd", a.block_size) for s in a.payload]
    for s in sources:
        if not s.path.is_file():
            raise UsageError(f"payload file {s.path} does not exist")
    m = bundle_writer.create(
        a.output, sign=signing_key.sign, chain_pem=chain_pem, compatible=a.compatible,
        version=a.version, security_version=a.security_version,
        build_time=a.build_time if a.build_time is not None else int(time.time()),
        sources=sources, health=_load_health(a.health), description=a.description,
        crl=a.crl.read_bytes() if a.crl else None,
    )
    size = a.output.stat().st_size
    print(f"{a.output}: version {m.version} for '{m.compatible}', security_version "
          f"{m.security_version}, {len(m.payloads)} payload(s), {size} bytes")
    return 0


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _open(path: str) -> BinaryIO:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot open bundle {path}: {exc.strerror}") from None


def _info(a: argparse.Namespace) -> int:
    from agent.adapters import bundle
    from agent.core import manifest, trust

    with _open(a.bundle) as f:
        head = bundle.BundleReader(f).read_head()
    m = manifest.from_bytes(head.manifest_bytes)
    chain = trust.parse_chain(head.chain_pem)
    doc = json.loads(head.manifest_bytes)
    doc["signer"] = {"subject": chain[0].subject.rfc4514_string(),
                     "serial": f"{chain[0].serial_number:x}",
                     "not_after": chain[0].not_valid_after_utc.isoformat()}
    doc["verified"] = False
    if a.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"version           {m.version}")
    print(f"compatible        {m.compatible}")
    print(f"security_version  {m.security_version}")
    print(f"build_time        {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(m.build_time))}")
    print(f"signer            {doc['signer']['subject']} (serial {doc['signer']['serial']}, "
          f"until {doc['signer']['not_after']})")
    for p in m.payloads:
        print(f"payload {p.name:<10} class={p.slot_class} size={p.size} stored={p.stored_size} "
              f"({p.compression}) sha256={p.sha256[:16]}… blocks={p.block_count}x{p.block_size}")
    print("(not verified: use 'edgeops bundle verify --keyring ROOT.crt')")
    return 0


def _verify(a: argparse.Namespace) -> int:
    from agent.adapters import bundle
    from agent.core import trust

    keyring = trust.Keyring.from_pem(a.keyring.read_bytes())
    with _open(a.bundle) as f:
        reader = bundle.BundleReader(f)
        head = reader.read_head()
        facts = trust.DeviceFacts(compatible=a.compatible, security_floor=0,
                                  best_known_time=int(time.time()))
        crls = [c.read_bytes() for c in a.crl] + ([head.crl] if head.crl else [])
        verdict = trust.verify_head(manifest_bytes=head.manifest_bytes, signature=head.signature,
                                    chain_pem=head.chain_pem, keyring=keyring, device=facts,
                                    crls=crls)
        for pr in reader.payloads(verdict.manifest):
            for _ in pr.installed_chunks(whole_hash=True):
                pass
    m = verdict.manifest
    if a.json:
        print(json.dumps({"verified": True, "version": m.version, "compatible": m.compatible,
                          "security_version": m.security_version, "signer": verdict.signer_subject}))
    else:
        print(f"OK: {a.bundle} version {m.version} for '{m.compatible}' signed by "
              f"{verdict.signer_subject}; all {sum(p.block_count for p in m.payloads)} blocks verified")
    return 0
