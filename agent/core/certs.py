"""The X.509 certificates and CRLs of a trust chain (RFC 5280), read without ``cryptography``. Pure.

What ``agent.core.trust`` judges and nothing more: names (compared as DER, shown as RFC 4514),
serials, validity, the subject's key, basic constraints, key usage, extended key usage, and
a CRL's issuer, dates, number and revoked serials. A certificate is parsed whole when it is
loaded, so a damaged one is refused there, never half-read later. Signatures are Ed25519
only — the one algorithm edgeops signs with — checked by ``agent.core.ed25519``; any other
algorithm reads, but verifies nothing. An extension marked critical that is not one of the
above makes the certificate unusable (§4.2: "MUST reject"); a CRL with one (a delta CRL, a
scoped one) reads as ``partial`` with its ``scope``, and ``agent.core.trust`` still revokes
its serials, since refusing it would let a revocation go unseen. The parse is strict DER
(``agent.core.der``) because every byte here is unsigned until its signature has been checked.

Why not ``cryptography.x509``: it is ~10 MiB resident and ~30 ms to import on the install
path (docs/performance.md section 7); host tools that build certificates still use it, and
tests check both read the same fields from every certificate they make.
"""

from __future__ import annotations

import time

from agent.core import der, ed25519
from agent.core.der import DerError, Reader
from agent.core.frozen import Frozen
from agent.core.pem import pem_blocks

ED25519 = der.oid_bytes("1.3.101.112")
BASIC_CONSTRAINTS = der.oid_bytes("2.5.29.19")
KEY_USAGE = der.oid_bytes("2.5.29.15")
EXT_KEY_USAGE = der.oid_bytes("2.5.29.37")
CRL_NUMBER = der.oid_bytes("2.5.29.20")
ISSUING_DISTRIBUTION_POINT = der.oid_bytes("2.5.29.28")
DELTA_CRL = "2.5.29.27"  # deltaCRLIndicator, dotted as in Crl.partial
CODE_SIGNING = "1.3.6.1.5.5.7.3.3"
# Extensions a certificate may mark critical and still be used: the three judged here, and
# ones that only describe (key identifiers, alternative names, policies say nothing we act on
# but the CA's own tools add them).
_KNOWN = {BASIC_CONSTRAINTS, KEY_USAGE, EXT_KEY_USAGE, *(der.oid_bytes(o) for o in (
    "2.5.29.14", "2.5.29.35", "2.5.29.17", "2.5.29.18"))}
_KNOWN_CRL = {CRL_NUMBER, der.oid_bytes("2.5.29.35")}
_KNOWN_CRL_ENTRY = {der.oid_bytes("2.5.29.21"), der.oid_bytes("2.5.29.24")}  # reason, invalidity
DIGITAL_SIGNATURE, KEY_CERT_SIGN = 0, 5  # KeyUsage bit numbers (§4.2.1.3)
MAX_SERIAL_BYTES = 21  # 20 octets (§4.1.2.2) and the sign byte a positive one may need
# RFC 4514 §3 short names, the set cryptography's rfc4514_string() prints (others: dotted)
_SHORT = {der.oid_bytes(o): n for o, n in (
    ("2.5.4.3", "CN"), ("2.5.4.7", "L"), ("2.5.4.8", "ST"), ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"), ("2.5.4.6", "C"), ("2.5.4.9", "STREET"),
    ("0.9.2342.19200300.100.1.25", "DC"), ("0.9.2342.19200300.100.1.1", "UID"))}
# T61String as UTF-8, as cryptography reads it (and refuses one that is not, as here); OpenSSL
# prints its bytes as Latin-1 escapes, which changes only the text: names match as DER
_STRINGS = {der.UTF8_STRING: "utf-8", der.PRINTABLE_STRING: "ascii", der.IA5_STRING: "ascii",
            0x1A: "ascii", der.T61_STRING: "utf-8", der.BMP_STRING: "utf-16-be",
            der.UNIVERSAL_STRING: "utf-32-be"}


class Name(Frozen):
    der: bytes  # the whole Name TLV: two names are the same name when these bytes are
    text: str  # RFC 4514, most significant RDN last, as openssl and cryptography print it

    def __str__(self) -> str:
        return self.text


class Cert(Frozen):
    der: bytes
    tbs: bytes  # what the issuer signed
    signature: bytes
    ed25519_signed: bool  # signatureAlgorithm (both copies) is Ed25519
    serial_number: int
    issuer: Name
    subject: Name
    not_before: int  # seconds since the epoch
    not_after: int
    spki: bytes  # SubjectPublicKeyInfo, DER (root ids hash it)
    key_algorithm: str  # dotted OID
    ed25519_key: bytes | None  # the raw 32-byte key when the subject's key is Ed25519
    ca: bool | None  # basicConstraints cA; None without the extension
    path_length: int | None
    key_usage: int | None  # bit n of KeyUsage is (key_usage >> n) & 1; None without it
    ext_key_usage: tuple[str, ...] | None  # dotted OIDs; None without the extension

    def issued_by(self, issuer: Cert) -> bool:
        """``issuer``'s key made this certificate's signature (names are the caller's check)."""
        return (self.ed25519_signed and issuer.ed25519_key is not None
                and ed25519.verify(issuer.ed25519_key, self.signature, self.tbs))

    def allows(self, bit: int) -> bool:
        """KeyUsage allows ``bit``, or says nothing (§4.2.1.3: absent means unrestricted)."""
        return self.key_usage is None or bool(self.key_usage >> bit & 1)


class Crl(Frozen):
    issuer: Name
    this_update: int
    next_update: int | None
    number: int | None  # cRLNumber
    revoked: tuple[int, ...]  # serials
    # Critical extensions (of the CRL or an entry) not judged here, dotted: e.g. a delta CRL
    # or one scoped by an issuingDistributionPoint. Such a CRL is not complete (§5.2): it
    # neither replaces a complete one nor is replaced by it (agent.core.trust.KeptCrl).
    partial: tuple[str, ...]
    scope: bytes  # the issuingDistributionPoint's value, b"" without one: which CRLs it is one of
    tbs: bytes
    signature: bytes
    ed25519_signed: bool

    def signed_by(self, issuer: Cert) -> bool:
        return (self.ed25519_signed and issuer.ed25519_key is not None
                and ed25519.verify(issuer.ed25519_key, self.signature, self.tbs))


def load_pem_certs(data: bytes) -> list[Cert]:
    """Every certificate of a PEM file; ``DerError`` if there is none or one is damaged."""
    blocks = pem_blocks(data, "CERTIFICATE")
    if not blocks:
        raise DerError("no PEM certificate found")
    return [load_cert(b, f"certificate {i}") for i, b in enumerate(blocks)]


def load_cert(data: bytes | bytearray | memoryview, what: str = "certificate") -> Cert:
    data = bytes(data)
    tbs, alg, sig, unused = _signed(data, what, "tbsCertificate")
    t = Reader(tbs).inner(der.SEQUENCE, f"{what} tbsCertificate")
    version = 0
    if t.optional(0xA0):
        v = t.inner(0xA0, f"{what} version")
        version = v.integer(f"{what} version")
        v.done(f"{what} version")
        if version != 2:  # v1 is encoded by omission (DER), v2 is not something anyone issues
            raise DerError(f"{what}: version {version + 1} is not supported")
    serial = _serial(t, what)
    if _algorithm(t, f"{what} signature") != alg:  # §4.1.1.2: the two must be the same
        raise DerError(f"{what}: its two signature algorithms differ")
    issuer = name(t, f"{what} issuer")
    v = t.inner(der.SEQUENCE, f"{what} validity")
    not_before, not_after = _time(v, f"{what} notBefore"), _time(v, f"{what} notAfter")
    v.done(f"{what} validity")
    subject = name(t, f"{what} subject")
    spki = t.raw(der.SEQUENCE, f"{what} subjectPublicKeyInfo")
    key_alg, key = _public_key(spki, what)
    for tag in (0x81, 0x82):  # issuer/subjectUniqueID (§4.1.2.8): read past, never used
        if t.optional(tag):
            if version != 2:
                raise DerError(f"{what}: unique identifiers need version 3")
            t.tlv(f"{what} unique identifier")
    exts: dict[bytes, tuple[bool, bytes]] = {}
    if t.optional(0xA3):
        if version != 2:
            raise DerError(f"{what}: extensions need version 3")
        x = t.inner(0xA3, f"{what} extensions")
        exts = _extensions(x, f"{what} extensions")
        x.done(f"{what} extensions")
        refused = _unhandled(exts, _KNOWN)
        if refused:  # §4.2: a certificate with a critical extension it cannot process is rejected
            raise DerError(f"{what} extensions: critical extension {refused[0]} is not understood")
    t.done(f"{what} tbsCertificate")
    ca, path_length = _basic_constraints(exts, what)
    return Cert(
        der=data, tbs=tbs, signature=sig, ed25519_signed=alg == (ED25519, b"") and not unused,
        serial_number=serial, issuer=issuer, subject=subject, not_before=not_before,
        not_after=not_after, spki=spki, key_algorithm=der.oid_text(key_alg), ed25519_key=key,
        ca=ca, path_length=path_length, key_usage=_key_usage(exts, what),
        ext_key_usage=_ext_key_usage(exts, what))


def load_crl(data: bytes | bytearray | memoryview, what: str = "CRL") -> Crl:
    """A CRL in DER; ``DerError`` if it is damaged. One with a critical extension not
    judged here reads, with ``partial`` naming it (see ``Crl.partial``)."""
    data = bytes(data)
    tbs, alg, sig, unused = _signed(data, what, "tbsCertList")
    t = Reader(tbs).inner(der.SEQUENCE, f"{what} tbsCertList")
    if t.optional(der.INTEGER) and t.integer(f"{what} version") != 1:
        raise DerError(f"{what}: only version 2 CRLs are supported")
    if _algorithm(t, f"{what} signature") != alg:
        raise DerError(f"{what}: its two signature algorithms differ")
    issuer = name(t, f"{what} issuer")
    this_update = _time(t, f"{what} thisUpdate")
    next_update = _time(t, f"{what} nextUpdate") if t.peek() in (der.UTC_TIME, der.GENERALIZED_TIME) \
        else None
    revoked: list[int] = []
    partial: list[str] = []
    if t.optional(der.SEQUENCE):
        entries = t.inner(der.SEQUENCE, f"{what} revokedCertificates")
        while not entries.at_end():
            e = entries.inner(der.SEQUENCE, f"{what} entry {len(revoked)}")
            revoked.append(e.integer(f"{what} entry serial"))
            _time(e, f"{what} revocationDate")
            if not e.at_end():
                partial += _unhandled(_extensions(e, f"{what} entry extensions"), _KNOWN_CRL_ENTRY)
            e.done(f"{what} entry")
    number = None
    exts: dict[bytes, tuple[bool, bytes]] = {}
    if t.optional(0xA0):
        x = t.inner(0xA0, f"{what} extensions")
        exts = _extensions(x, f"{what} extensions")
        x.done(f"{what} extensions")
        partial += _unhandled(exts, _KNOWN_CRL)
        if CRL_NUMBER in exts:
            n = Reader(exts[CRL_NUMBER][1])
            number = n.integer(f"{what} cRLNumber")
            n.done(f"{what} cRLNumber")
    t.done(f"{what} tbsCertList")
    return Crl(issuer=issuer, this_update=this_update, next_update=next_update, number=number,
               revoked=tuple(revoked), partial=tuple(dict.fromkeys(partial)),
               scope=exts.get(ISSUING_DISTRIBUTION_POINT, (False, b""))[1], tbs=tbs, signature=sig,
               ed25519_signed=alg == (ED25519, b"") and not unused)


def _signed(data: bytes, what: str, body: str) -> tuple[bytes, tuple[bytes, bytes], bytes, int]:
    """X.509's SIGNED wrapper (§4.1.1, §5.1.1): (the signed body's DER, the algorithm, the
    signature, its unused bits); nothing may follow it."""
    outer = Reader(data)
    r = outer.inner(der.SEQUENCE, what)
    outer.done(what)
    tbs = r.raw(der.SEQUENCE, f"{what} {body}")
    alg = _algorithm(r, f"{what} signatureAlgorithm")
    sig, unused = r.bit_string(f"{what} signature")
    r.done(what)
    return tbs, alg, sig, unused


def name(r: Reader, what: str) -> Name:
    """Read a Name (§4.1.2.4): a SEQUENCE of RDNs, each a SET of (type, value)."""
    raw = r.raw(der.SEQUENCE, what)
    seq = Reader(raw).inner(der.SEQUENCE, what)
    rdns = []
    while not seq.at_end():
        rdn = seq.inner(der.SET, f"{what} RDN")
        parts = []
        last = b""
        while not rdn.at_end():
            before = rdn.pos
            atv = rdn.inner(der.SEQUENCE, f"{what} attribute")
            if rdn.data[before:rdn.pos] < last:  # X.690 §11.6: a SET OF is sorted in DER
                raise DerError(f"{what}: the attributes of an RDN are not in DER order")
            last = rdn.data[before:rdn.pos]
            oid = atv.oid(f"{what} attribute type")
            tag, _, vstart, vend = atv.tlv(f"{what} attribute value")
            atv.done(f"{what} attribute")
            parts.append(f"{_SHORT.get(oid) or der.oid_text(oid)}="
                         f"{_value_text(tag, atv.data[vstart:vend])}")
        if not parts:
            raise DerError(f"{what}: an empty RDN")
        rdns.append("+".join(parts))
    return Name(raw, ",".join(reversed(rdns)))


def _value_text(tag: int, value: bytes) -> str:
    codec = _STRINGS.get(tag)
    if codec is None:  # RFC 5280 §4.1.2.4 names hold strings; anything else is damage
        raise DerError(f"a name holds a value of type 0x{tag:02x}, not a string")
    try:
        s = value.decode(codec)
    except UnicodeDecodeError:
        raise DerError("a name holds a string that is not valid for its type") from None
    return _escape(s)


def _escape(s: str) -> str:
    """RFC 4514 §2.4, as cryptography's ``_escape_dn_value`` writes it."""
    if not s:
        return ""
    for c in '\\"+,;<>':
        s = s.replace(c, "\\" + c)
    s = s.replace("\0", "\\00")
    # a lone space is escaped once, as a trailing one ("\\ "), not twice as leading and trailing
    if s[0] == "#" or (s[0] == " " and len(s) > 1):
        s = "\\" + s
    if s[-1] == " ":
        s = s[:-1] + "\\ "
    return s


def _serial(r: Reader, what: str) -> int:
    before = r.pos
    serial = r.integer(f"{what} serialNumber")
    if r.pos - before - 2 > MAX_SERIAL_BYTES:
        raise DerError(f"{what}: serial longer than 20 octets (RFC 5280 §4.1.2.2)")
    return serial


def _algorithm(r: Reader, what: str) -> tuple[bytes, bytes]:
    """(OID, the DER of its parameters or b'')."""
    a = r.inner(der.SEQUENCE, what)
    oid = a.oid(what)
    params = b""
    if not a.at_end():
        _, start, _, end = a.tlv(f"{what} parameters")
        params = a.data[start:end]
    a.done(what)
    return oid, params


def _public_key(spki: bytes, what: str) -> tuple[bytes, bytes | None]:
    r = Reader(spki).inner(der.SEQUENCE, f"{what} subjectPublicKeyInfo")
    alg = _algorithm(r, f"{what} key algorithm")
    key, unused = r.bit_string(f"{what} subjectPublicKey")
    r.done(f"{what} subjectPublicKeyInfo")
    if alg[0] != ED25519:
        return alg[0], None
    if alg[1] or unused or len(key) != 32:  # RFC 8410 §4: no parameters, 32 bytes
        raise DerError(f"{what}: malformed Ed25519 public key")
    return alg[0], key


def _time(r: Reader, what: str) -> int:
    tag, _, start, end = r.tlv(what)
    return der.time(tag, r.data[start:end], what)


def _extensions(r: Reader, what: str) -> dict[bytes, tuple[bool, bytes]]:
    """{OID: (critical, extnValue)}; a duplicate is refused."""
    seq = r.inner(der.SEQUENCE, what)
    out: dict[bytes, tuple[bool, bytes]] = {}
    while not seq.at_end():
        e = seq.inner(der.SEQUENCE, f"{what} {len(out)}")
        oid = e.oid(f"{what} id")
        critical = False
        if e.optional(der.BOOLEAN):
            critical = e.boolean(f"{what} critical")
            if not critical:
                raise DerError(f"{what}: critical FALSE is encoded by omission in DER")
        value = e.value(der.OCTET_STRING, f"{what} value")
        e.done(f"{what} {len(out)}")
        if oid in out:
            raise DerError(f"{what}: {der.oid_text(oid)} appears twice (RFC 5280 §4.2)")
        out[oid] = (critical, value)
    if not out:
        raise DerError(f"{what}: empty (§4.1.2.9: one or more)")
    return out


def _unhandled(exts: dict[bytes, tuple[bool, bytes]], known: set[bytes]) -> list[str]:
    """The critical extensions not in ``known``, dotted."""
    return [der.oid_text(oid) for oid, (critical, _) in exts.items() if critical and oid not in known]


def _basic_constraints(exts: dict[bytes, tuple[bool, bytes]], what: str
                       ) -> tuple[bool | None, int | None]:
    if BASIC_CONSTRAINTS not in exts:
        return None, None
    r = Reader(exts[BASIC_CONSTRAINTS][1])
    b = r.inner(der.SEQUENCE, f"{what} basicConstraints")
    r.done(f"{what} basicConstraints")
    ca = False
    if b.optional(der.BOOLEAN):
        ca = b.boolean(f"{what} cA")
        if not ca:
            raise DerError(f"{what}: cA FALSE is encoded by omission in DER")
    path = None
    if b.optional(der.INTEGER):
        path = b.integer(f"{what} pathLenConstraint")
        if path < 0 or not ca:
            raise DerError(f"{what}: pathLenConstraint {path} on a {'CA' if ca else 'non-CA'}")
    b.done(f"{what} basicConstraints")
    return ca, path


def _key_usage(exts: dict[bytes, tuple[bool, bytes]], what: str) -> int | None:
    if KEY_USAGE not in exts:
        return None
    r = Reader(exts[KEY_USAGE][1])
    bits, unused = r.bit_string(f"{what} keyUsage")
    r.done(f"{what} keyUsage")
    # X.690 §11.2.2: a named bit list ends at its last bit set; §4.2.1.3: one bit is set
    if not bits or not bits[-1] >> unused & 1:
        raise DerError(f"{what}: keyUsage with no bit set or trailing zero bits is not DER")
    # bit 0 is the most significant bit of the first byte (X.690 §8.6.2.1)
    return sum(1 << (8 * i + j) for i, byte in enumerate(bits[:2]) for j in range(8)
               if byte & (0x80 >> j))


def _ext_key_usage(exts: dict[bytes, tuple[bool, bytes]], what: str) -> tuple[str, ...] | None:
    if EXT_KEY_USAGE not in exts:
        return None
    r = Reader(exts[EXT_KEY_USAGE][1])
    seq = r.inner(der.SEQUENCE, f"{what} extKeyUsage")
    r.done(f"{what} extKeyUsage")
    out = []
    while not seq.at_end():
        out.append(der.oid_text(seq.oid(f"{what} keyPurposeId")))
    if not out:
        raise DerError(f"{what}: an empty extKeyUsage")
    return tuple(out)


def utc_day(ts: int) -> str:
    """``YYYY-MM-DD`` of a certificate time, for messages."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


__all__ = ["CODE_SIGNING", "DELTA_CRL", "Cert", "Crl", "DerError", "Name", "load_cert", "load_crl",
           "load_pem_certs", "name", "utc_day"]
