"""Decide whether a bundle head can be trusted. Pure: bytes and times in, a verdict out.

Order of checks (each raises its own ``TrustError``):
1. the signer chain leads to a root in the keyring, every link signed by its issuer;
2. no certificate in it is expired at the *best-known time*, none is revoked by a root-signed CRL;
3. the manifest signature is valid under the signer's key — only then is the manifest parsed;
4. the signed build time lies inside the signer's validity window;
5. ``compatible`` matches the device and ``security_version`` is not below its floor.

The clock rule (docs/trust.md): ``best_known_time = max(system clock, last trusted
time in the journal)``; the journal's value only ever grows, from the build times
of verified bundles. Expiry is judged at that time, so winding the clock back
cannot revive an expired signer. "Not yet valid" is judged at the signed build
time instead, so a Raspberry Pi that booted in 1970 can still install a bundle
from a freshly issued signer. Build times are capped by the signer's expiry, so
one bundle cannot push a device's idea of time past what its root allowed.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence

from agent.core import ed25519
from agent.core import manifest as manifest_mod
from agent.core.certs import (
    CODE_SIGNING,
    DELTA_CRL,
    DIGITAL_SIGNATURE,
    KEY_CERT_SIGN,
    Cert,
    Crl,
    DerError,
    load_cert,
    load_crl,
    load_pem_certs,
    utc_day,
)
from agent.core.frozen import Frozen
from agent.core.manifest import Manifest
from agent.core.pem import pem_blocks
from agent.errors import (
    IncompatibleBundle,
    RollbackRefused,
    SignatureError,
    SignerExpired,
    SignerRevoked,
    TrustError,
    UntrustedSigner,
)

MAX_CHAIN = 4
MAX_CHAIN_BYTES = 16 * 1024
MAX_CRL_BYTES = 256 * 1024


class Keyring(Frozen):
    roots: tuple[Cert, ...]

    @classmethod
    def from_pem(cls, data: bytes) -> Keyring:
        try:
            certs = tuple(load_pem_certs(data))
        except DerError as exc:
            raise UntrustedSigner(f"keyring is not PEM certificates: {exc}",
                                  hint="pass the root.crt made by 'edgeops keys init-root'") from None
        return cls(certs)


class DeviceFacts(Frozen):
    compatible: str | None  # None: any (for offline 'bundle verify')
    security_floor: int
    best_known_time: int  # seconds since the epoch


class Verdict(Frozen):
    manifest: Manifest
    signer_subject: str
    signer_serial: int
    signer_not_after: int
    crls: tuple[KeptCrl, ...]  # root-verified CRLs worth keeping on the device, newest per root


def best_known_time(system_now: float, journal_trusted: int) -> int:
    return max(int(system_now), journal_trusted)


def parse_chain(chain_pem: bytes) -> list[Cert]:
    """The certificates of a signer chain, each read whole (``agent.core.certs``), or a refusal."""
    if len(chain_pem) > MAX_CHAIN_BYTES:
        raise UntrustedSigner(f"signer chain is {len(chain_pem)} bytes, more than {MAX_CHAIN_BYTES}")
    try:
        blocks = pem_blocks(chain_pem, "CERTIFICATE")
    except DerError as exc:
        raise UntrustedSigner(f"signer chain is not PEM certificates: {exc}") from None
    if not 1 <= len(blocks) <= MAX_CHAIN:
        raise UntrustedSigner(f"signer chain holds {len(blocks)} certificates, expected 1 to {MAX_CHAIN}")
    return [parse_certificate(b, i) for i, b in enumerate(blocks)]


def parse_certificate(blob: bytes, index: int) -> Cert:
    """One certificate of a chain, DER; a damaged one or one with a non-positive serial is refused."""
    try:
        cert = load_cert(blob, f"certificate {index}")
    except DerError as exc:
        raise UntrustedSigner(f"signer chain certificate {index} is malformed: {exc}") from None
    if cert.serial_number <= 0:
        raise UntrustedSigner(f"signer chain certificate {index} has a non-positive serial "
                              f"(RFC 5280 §4.1.2.2)")
    return cert


def _may_issue(ca: Cert, below: int) -> bool:
    """``ca`` may certify a chain with ``below`` intermediate CAs under it (RFC 5280 §4.2.1.9
    pathLenConstraint, §4.2.1.3 keyCertSign)."""
    if not ca.ca or (ca.path_length is not None and below > ca.path_length):
        return False
    return ca.allows(KEY_CERT_SIGN)


def check_signer_usage(leaf: Cert) -> None:
    """Refuse a leaf no device would accept as a bundle signer (also used by 'bundle create')."""
    if leaf.ed25519_key is None:
        raise UntrustedSigner("signer key is not Ed25519")
    if leaf.ca:
        raise UntrustedSigner("signer certificate is a CA certificate; sign with an issued signer")
    if not leaf.allows(DIGITAL_SIGNATURE):
        raise UntrustedSigner("signer certificate does not allow digital signatures")
    if leaf.ext_key_usage is not None and CODE_SIGNING not in leaf.ext_key_usage:
        raise UntrustedSigner("signer certificate is not for code signing")


def build_path(chain: Sequence[Cert], keyring: Keyring) -> list[Cert]:
    """Return [leaf, intermediates..., root], each signed by the next, or raise UntrustedSigner."""
    path = [chain[0]]
    pool = list(chain[1:])
    for _ in range(MAX_CHAIN + 1):
        current = path[-1]
        below = len(path) - 1  # intermediate CAs already in the path
        for root in keyring.roots:
            if current.issuer == root.subject and _may_issue(root, below) and current.issued_by(root):
                return [*path, root]
        step = next((c for c in pool if c.subject == current.issuer
                     and _may_issue(c, below) and current.issued_by(c)), None)
        if step is None:
            break
        pool.remove(step)
        path.append(step)
    raise UntrustedSigner(f"signer '{_cn(chain[0])}' is not certified by a trusted root",
                          hint="sign with a signer issued by a root in the device keyring")


def _cn(cert: Cert) -> str:
    return cert.subject.text


class KeptCrl(Frozen):
    """A root-verified CRL worth keeping: ``root_id`` names the root that signed it."""

    root_id: str  # SHA-256 prefix of the root's public key: names can repeat, keys do not
    rank: tuple[int, float]  # (CRL number, thisUpdate): higher is newer, within one scope
    blob: bytes
    # "" for a complete CRL; for a partial one (certs.Crl.partial) a hash of what it is part
    # of, so each scope keeps its own newest CRL and none displaces another's
    scope: str = ""
    delta: bool = False  # a delta CRL of the complete scope: a complete CRL as new supersedes it

    @property
    def file(self) -> str:
        """Its name in the device's store: one file per root key and scope."""
        return f"{self.root_id}.crl" if not self.scope else f"{self.root_id}-{self.scope}.crl"


def revoked_serials(crl_blobs: Iterable[bytes], roots: Sequence[Cert]
                    ) -> tuple[set[tuple[str, int]], tuple[KeptCrl, ...]]:
    """Serials revoked by CRLs that a trusted root signed; forged or foreign CRLs are ignored.

    Also returns the CRLs worth keeping: the newest (highest CRL number, then latest
    thisUpdate) per root and scope. A root's complete CRL (RFC 5280 §5) covers every
    revocation before it, so the store holds one per root. Every root-signed CRL's serials
    are revoked, partial ones (delta, scoped by an issuing distribution point) included, as
    revoking more fails closed; each scope keeps its own newest, and a delta CRL is dropped
    only once a complete CRL at least as new covers it (§5.2.4). CRL numbers are compared
    within a scope only (§5.2.3), so a complete CRL, however new, never evicts a scoped one.
    Roots are told apart by key, not name: two roots may share a subject (e.g. a rotation).
    """
    revoked: set[tuple[str, int]] = set()
    newest: dict[str, KeptCrl] = {}
    for blob in crl_blobs:
        crl = _load_crl(blob)
        if crl is None:
            continue
        issuer = next((r for r in roots if r.subject == crl.issuer and crl.signed_by(r)), None)
        if issuer is None:
            continue
        revoked.update((crl.issuer.text, serial) for serial in crl.revoked)
        kept = _kept(issuer, crl, blob)
        if kept.file not in newest or kept.rank > newest[kept.file].rank:
            newest[kept.file] = kept
    complete = {k.root_id: k.rank for k in newest.values() if not k.scope}
    return revoked, tuple(k for k in newest.values()
                          if not (k.delta and k.root_id in complete and complete[k.root_id] >= k.rank))


def _kept(issuer: Cert, crl: Crl, blob: bytes) -> KeptCrl:
    rank = (-1 if crl.number is None else crl.number, float(crl.this_update))
    if not crl.partial:
        return KeptCrl(root_id(issuer), rank, blob)
    scope = hashlib.sha256(",".join(crl.partial).encode() + b"\0" + crl.scope).hexdigest()[:16]
    return KeptCrl(root_id(issuer), rank, blob, scope, delta=crl.partial == (DELTA_CRL,) and not crl.scope)


def parses_as_crl(blob: bytes) -> bool:
    return _load_crl(blob) is not None


def _load_crl(blob: bytes) -> Crl | None:
    """A CRL in PEM or DER of at most MAX_CRL_BYTES, or None."""
    if not blob or len(blob) > MAX_CRL_BYTES:
        return None
    try:
        if blob.lstrip().startswith(b"-----"):
            blocks = pem_blocks(blob, "X509 CRL")
            if len(blocks) != 1:
                return None
            blob = blocks[0]
        return load_crl(blob)
    except DerError:
        return None


def root_id(root: Cert) -> str:
    return hashlib.sha256(root.spki).hexdigest()[:16]


def verify_head(
    *,
    manifest_bytes: bytes,
    signature: bytes,
    chain_pem: bytes,
    keyring: Keyring,
    device: DeviceFacts,
    crls: Iterable[bytes] = (),
) -> Verdict:
    chain = parse_chain(chain_pem)
    path = build_path(chain, keyring)
    leaf = path[0]
    check_signer_usage(leaf)

    revoked, kept = revoked_serials(crls, keyring.roots)
    for cert, issuer in itertools.pairwise(path):
        if (issuer.subject.text, cert.serial_number) in revoked:
            raise SignerRevoked(f"signer '{_cn(cert)}' (serial {cert.serial_number:x}) is revoked")

    now = device.best_known_time
    for cert in path:
        if cert.not_after < now:
            raise SignerExpired(
                f"certificate '{_cn(cert)}' expired on {utc_day(cert.not_after)} "
                f"(best-known time {utc_day(now)})"
            )

    if len(signature) != 64:
        raise SignatureError(f"signature is {len(signature)} bytes, an Ed25519 signature is 64")
    assert leaf.ed25519_key is not None  # check_signer_usage
    if not ed25519.verify(leaf.ed25519_key, signature, manifest_bytes):
        raise SignatureError("manifest signature does not verify under the signer's key",
                             hint="the bundle was altered after signing; obtain an intact copy")

    m = manifest_mod.from_bytes(manifest_bytes)

    for cert in path:
        if not cert.not_before <= m.build_time <= cert.not_after:
            raise UntrustedSigner(
                f"bundle build time {m.build_time} lies outside the validity of '{_cn(cert)}'",
                hint="build and sign the bundle while its signer is valid",
            )
    check_policy(m, device)
    return Verdict(
        manifest=m,
        signer_subject=_cn(leaf),
        signer_serial=leaf.serial_number,
        signer_not_after=leaf.not_after,
        crls=kept,
    )


def check_policy(m: Manifest, device: DeviceFacts) -> None:
    if device.compatible is not None and m.compatible != device.compatible:
        raise IncompatibleBundle(
            f"bundle is for '{m.compatible}', this device is '{device.compatible}'"
        )
    if m.security_version < device.security_floor:
        raise RollbackRefused(
            f"bundle security_version {m.security_version} is below the device floor "
            f"{device.security_floor}"
        )


__all__ = [
    "DeviceFacts", "Keyring", "TrustError", "Verdict", "best_known_time", "check_policy",
    "verify_head",
]
