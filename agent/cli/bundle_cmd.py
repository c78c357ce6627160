"""edgeops bundle: create (host side, optionally delta-capable), info, verify, delta-info.

The bundle reader, ``trust`` and the host's keys (``cryptography``, ``zstandard``) are
imported by the handlers, so registering these commands costs nothing."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.cli.common import command
from agent.core.manifest import DEFAULT_BLOCK_SIZE
from agent.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from agent.host import bundle_writer


def register(sub: Any) -> None:
    p = command(sub, "bundle", "create, inspect and verify bundles",
                "edgeops bundle verify update.bundle --keyring pki/root/root.crt")
    bs = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    c = command(bs, "create", "build and sign a bundle",
                "edgeops bundle create --key pki/signer/signer.key --cert pki/signer/signer.crt \\\n"
                "    --compatible gateway-v1 --version 2.1 --security-version 3 \\\n"
                "    --payload rootfs=rootfs.img --compress zstd -o gateway-2.1.bundle")
    c.add_argument("--key", type=Path, required=True, help="the signing key (signer.key)")
    c.add_argument("--cert", type=Path, required=True,
                   help="its certificate (signer.crt, and any intermediates)")
    c.add_argument("--compatible", required=True, help="the board family string the bundle is for")
    c.add_argument("--version", required=True, help="the release's version, e.g. 2.1")
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
    c.add_argument("--description", default="", help="free text stored in the manifest")
    c.add_argument("-o", "--output", type=Path, required=True, help="the bundle file to write")
    c.add_argument("--delta", action="store_true",
                   help="make payloads delta-capable: chunk index + zstd per chunk (docs/delta.md)")
    c.add_argument("--base", action="append", default=[], metavar="BUNDLE|VERSION=IMAGE",
                   help="an earlier release to carry patches against (implies --delta; repeatable)")
    c.add_argument("--chunk-size", type=int, default=0, help="average delta chunk bytes (default 128 KiB)")
    c.set_defaults(func=_create)

    di = command(bs, "delta-info", "bytes a device holding IMAGE would download (unverified)",
                 "edgeops bundle delta-info gateway-2.1.bundle --against rootfs-2.0.img")
    di.add_argument("bundle", type=Path, help="a delta-capable bundle ('bundle create --delta')")
    di.add_argument("--against", type=Path, required=True, metavar="IMAGE",
                    help="the image the device's active slot holds")
    di.add_argument("--json", action="store_true", help="machine-readable output")
    di.set_defaults(func=_delta_info)

    i = command(bs, "info", "show a bundle's manifest, health overrides and carried CRL "
                            "(unverified)", "edgeops bundle info update.bundle",
                description="Show a bundle's manifest, signer, health overrides and carried "
                            "revocation list, without verifying anything.")
    i.add_argument("bundle", help="the bundle file, or '-' for stdin")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_info)

    v = command(bs, "verify", "verify signature, chain and every payload block; writes nothing",
                "edgeops bundle verify update.bundle --keyring root/root.crt",
                description="Verify a bundle as a device would: signature, signer chain, "
                            "revocation and every payload block. Writes nothing.")
    v.add_argument("bundle", help="the bundle file, or '-' for stdin")
    v.add_argument("--keyring", type=Path, required=True, help="trusted root certificate(s), PEM")
    v.add_argument("--compatible", help="also require this compatible string")
    v.add_argument("--crl", type=Path, action="append", default=None,
                   help="a revocation list to apply (repeatable; default: every *.crl beside "
                        "--keyring, as 'keys revoke' writes ROOT/revoked.crl); the bundle's own "
                        "carried CRL always applies")
    v.add_argument("--json", action="store_true", help="machine-readable output")
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
    if a.delta or a.base:
        return _create_delta(a, sources, signing_key, chain_pem)
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


def _create_delta(a: argparse.Namespace, sources: list[bundle_writer.PayloadSource],
                  signing_key: Any, chain_pem: bytes) -> int:
    """``create --delta``: each payload (but models, whose meta is their own) stored as a delta
    payload against the ``--base`` releases (agent.host.delta_writer)."""
    import shutil
    import tempfile

    from agent.host import bundle_writer, delta_writer

    work = Path(tempfile.mkdtemp(dir=a.output.resolve().parent, prefix=".delta-"))
    try:
        bases = [delta_writer.base_from_arg(spec, work) for spec in a.base]
        lines = []
        for i, s in enumerate(sources):
            if s.slot_class == "model":
                continue
            built = delta_writer.build(s.path, bases, work / f"stored-{i}",
                                       avg=a.chunk_size or delta_writer.AVG_CHUNK)
            s.stored, s.installed = built.stored, (built.size, built.sha256)
            s.meta = {**s.meta, **delta_writer.meta_for(built)}
            lines.append(f"  {s.name}: {built.chunks} chunks, index {built.index_bytes} bytes; "
                         + ", ".join(f"base {v}: {built.copies[v]} copies, {built.patches[v]} "
                                     f"patches ({built.patch_bytes[v]} bytes)" for v in built.copies))
        m = bundle_writer.create(
            a.output, sign=signing_key.sign, chain_pem=chain_pem, compatible=a.compatible,
            version=a.version, security_version=a.security_version,
            build_time=a.build_time if a.build_time is not None else int(time.time()),
            sources=sources, health=_load_health(a.health), description=a.description,
            crl=a.crl.read_bytes() if a.crl else None,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{a.output}: version {m.version} for '{m.compatible}', security_version "
          f"{m.security_version}, {len(m.payloads)} payload(s), {a.output.stat().st_size} bytes, "
          f"delta-capable")
    for line in lines:
        print(line)
    return 0


def _delta_info(a: argparse.Namespace) -> int:
    from agent.host import delta_writer

    for path in (a.bundle, a.against):
        if not path.is_file():
            raise UsageError(f"{path} does not exist")
    info = delta_writer.delta_info(a.bundle, a.against)
    if a.json:
        print(json.dumps(info.as_dict()))
        return 0
    frac = info.download_bytes / info.bundle_bytes if info.bundle_bytes else 1.0
    print(f"a device holding {a.against} downloads {info.download_bytes} of {info.bundle_bytes} "
          f"bytes ({frac:.3f}); base {info.base or 'none (full download)'}; requests "
          f"{info.requests_multi} (multi-range) or {info.requests_single} (single ranges); "
          f"chunks {info.chunks}: {info.copied} copied, {info.patched} patched, {info.fetched} fetched")
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
    import datetime as dt

    from agent.adapters import bundle
    from agent.core import manifest, trust

    with _open(a.bundle) as f:
        head = bundle.BundleReader(f).read_head()
    m = manifest.from_bytes(head.manifest_bytes)
    chain = trust.parse_chain(head.chain_pem)
    doc = json.loads(head.manifest_bytes)
    doc["signer"] = {"subject": chain[0].subject.text,
                     "serial": openssl_serial(chain[0].serial_number),
                     "not_after": dt.datetime.fromtimestamp(chain[0].not_after, dt.UTC).isoformat()}
    doc["crl"] = _crl_summary(head.crl) if head.crl else None
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
    _print_health(m.health)
    crl = doc["crl"]
    if crl is None:
        print("crl               none carried")
    elif "error" in crl:
        print(f"crl               {crl['error']}")
    else:
        print(f"crl               by {crl['issuer']}, number {crl['number']}, {crl['this_update']} "
              f"to {crl['next_update']}; revokes {', '.join(crl['revoked']) or 'nothing'}")
    print("(not verified: use 'edgeops bundle verify --keyring ROOT.crt')")
    return 0


def openssl_serial(n: int) -> str:
    """A certificate serial as 'openssl x509 -serial' prints it: upper-case hex, whole bytes."""
    h = f"{n:X}"
    return h if len(h) % 2 == 0 else "0" + h


def _print_health(h: dict[str, Any] | None) -> None:
    if not h:
        print("health            the device's own checks (no overrides)")
        return
    limits = ", ".join(f"{k} {h[k]}" for k in ("deadline", "interval", "retries") if k in h)
    print(f"health            {limits or 'the device limits'}; adds {len(h.get('probe', []))} probe(s)")
    for p in h.get("probe", []):
        keys = ", ".join(f"{k}={v!r}" for k, v in p.items() if k not in ("type", "name"))
        print(f"  probe {p.get('type')}{' ' + repr(p['name']) if 'name' in p else ''}: {keys}")


def _crl_summary(blob: bytes) -> dict[str, Any]:
    """What a carried CRL says (unverified): issuer, number, dates and revoked serials."""
    from cryptography import x509

    try:
        crl = (x509.load_pem_x509_crl(blob) if blob.lstrip().startswith(b"-----")
               else x509.load_der_x509_crl(blob))
    except ValueError:
        return {"error": f"carries {len(blob)} bytes that are not a CRL"}
    try:
        number: int | None = int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        number = None
    nxt = crl.next_update_utc
    return {"issuer": crl.issuer.rfc4514_string(), "number": number,
            "this_update": crl.last_update_utc.isoformat(),
            "next_update": nxt.isoformat() if nxt else None,
            "revoked": [openssl_serial(r.serial_number) for r in crl]}


def _verify(a: argparse.Namespace) -> int:
    from agent.adapters import bundle
    from agent.core import trust

    keyring = trust.Keyring.from_pem(_read(a.keyring, "keyring"))
    with _open(a.bundle) as f:
        reader = bundle.BundleReader(f)
        head = reader.read_head()
        facts = trust.DeviceFacts(compatible=a.compatible, security_floor=0,
                                  best_known_time=int(time.time()))
        crl_files = a.crl if a.crl is not None else sorted(a.keyring.resolve().parent.glob("*.crl"))
        crls = [_read(c, "CRL") for c in crl_files] + ([head.crl] if head.crl else [])
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
        names = [str(c) for c in crl_files] + (["the bundle's own"] if head.crl else [])
        print(f"revocation checked against: {', '.join(names) or 'no CRL (none beside the keyring)'}")
    return 0
