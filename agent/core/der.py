"""Read DER (ITU-T X.690 §10), strictly, for the certificates and CRLs of a trust chain. Pure.

Only what X.509 uses: one-byte tags, definite lengths in their shortest form (§10.1), and
the primitive values certificates carry. Anything else — a long-form tag, an indefinite
or padded length, a value running past its parent, a non-minimal INTEGER, a BOOLEAN other
than 00/FF (§11.1), a BIT STRING with stray unused bits (§11.2) — is a ``DerError``: the
input is unsigned until its signature has been checked, so a parser that guesses is one an
attacker can steer. Every read is bounded by the buffer it was given.
"""

from __future__ import annotations

BOOLEAN, INTEGER, BIT_STRING, OCTET_STRING, NULL, OID = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
UTF8_STRING, PRINTABLE_STRING, T61_STRING, IA5_STRING = 0x0C, 0x13, 0x14, 0x16
UTC_TIME, GENERALIZED_TIME, UNIVERSAL_STRING, BMP_STRING = 0x17, 0x18, 0x1C, 0x1E
SEQUENCE, SET = 0x30, 0x31
MAX_LENGTH = 1 << 24  # no certificate or CRL of ours is near 16 MiB; the callers bound far lower
# The longest registered OIDs are UUID arcs (2.25.<128 bits>, 19 bytes); a bound keeps a
# crafted arc from becoming a number Python refuses to print (int max_str_digits).
MAX_OID, MAX_ARC = 128, 20


class DerError(ValueError):
    """The bytes are not the DER the caller asked for; the message says where and why."""


class Reader:
    """A cursor over ``data[pos:end]`` that reads one TLV at a time."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = bytes(data) if isinstance(data, memoryview) else data
        self.pos = pos
        self.end = len(self.data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def peek(self) -> int | None:
        """The next tag, or None at the end."""
        return None if self.at_end() else self.data[self.pos]

    def tlv(self, what: str) -> tuple[int, int, int, int]:
        """(tag, start of the whole TLV, start of the value, end of the value)."""
        d, p, end = self.data, self.pos, self.end
        if p + 2 > end:
            raise DerError(f"{what}: truncated")
        tag, first = d[p], d[p + 1]
        if tag & 0x1F == 0x1F:
            raise DerError(f"{what}: multi-byte tags are not used in X.509")
        p += 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0:
                raise DerError(f"{what}: indefinite length is not DER")
            if n > 4 or p + n > end:
                raise DerError(f"{what}: length of {n} bytes")
            length = int.from_bytes(d[p:p + n], "big")
            if d[p] == 0 or length < 0x80:
                raise DerError(f"{what}: length not in its shortest form")
            p += n
        if length > MAX_LENGTH or p + length > end:
            raise DerError(f"{what}: {length} bytes run past the end")
        start = self.pos
        self.pos = p + length
        return tag, start, p, p + length

    def expect(self, tag: int, what: str) -> tuple[int, int]:
        """The value's (start, end) of a TLV that must carry ``tag``."""
        got, _, start, end = self.tlv(what)
        if got != tag:
            raise DerError(f"{what}: tag 0x{got:02x}, expected 0x{tag:02x}")
        return start, end

    def raw(self, tag: int, what: str) -> bytes:
        """The whole TLV (tag and length included) of one that must carry ``tag``."""
        before = self.pos
        self.expect(tag, what)
        return self.data[before:self.pos]

    def value(self, tag: int, what: str) -> bytes:
        start, end = self.expect(tag, what)
        return self.data[start:end]

    def inner(self, tag: int, what: str) -> Reader:
        """A reader over the contents of a constructed TLV carrying ``tag``."""
        start, end = self.expect(tag, what)
        return Reader(self.data, start, end)

    def optional(self, tag: int) -> bool:
        return self.peek() == tag

    def done(self, what: str) -> None:
        if not self.at_end():
            raise DerError(f"{what}: {self.end - self.pos} unexpected bytes after its last field")

    def integer(self, what: str) -> int:
        v = self.value(INTEGER, what)
        if not v:
            raise DerError(f"{what}: empty INTEGER")
        if len(v) > 1 and ((v[0] == 0 and v[1] < 0x80) or (v[0] == 0xFF and v[1] >= 0x80)):
            raise DerError(f"{what}: INTEGER not in its shortest form")
        return int.from_bytes(v, "big", signed=True)

    def boolean(self, what: str) -> bool:
        v = self.value(BOOLEAN, what)
        if v not in (b"\x00", b"\xff"):
            raise DerError(f"{what}: BOOLEAN is neither 00 nor FF")
        return v == b"\xff"

    def bit_string(self, what: str) -> tuple[bytes, int]:
        """(the bytes, the count of unused bits in the last one), which must be zero bits."""
        v = self.value(BIT_STRING, what)
        if not v or v[0] > 7 or (len(v) == 1 and v[0]) or (v[0] and v[-1] & ((1 << v[0]) - 1)):
            raise DerError(f"{what}: malformed BIT STRING")
        return v[1:], v[0]

    def oid(self, what: str) -> bytes:
        """The OID's content octets (compare them with ``oid_bytes``), at most MAX_OID bytes
        with arcs of at most MAX_ARC bytes, so ``oid_text`` of any of them is cheap."""
        v = self.value(OID, what)
        if not v or len(v) > MAX_OID or v[-1] & 0x80:
            raise DerError(f"{what}: malformed OBJECT IDENTIFIER")
        run = 0  # bytes of the arc being read
        for b in v:
            if b == 0x80 and run == 0:  # a leading 0x80 pads the arc: not its shortest form
                raise DerError(f"{what}: malformed OBJECT IDENTIFIER")
            run = run + 1 if b & 0x80 else 0
            if run >= MAX_ARC:
                raise DerError(f"{what}: an OBJECT IDENTIFIER arc longer than {MAX_ARC} bytes")
        return v


def oid_bytes(dotted: str) -> bytes:
    """The content octets of an OID written as ``1.2.840...`` (for the constants)."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for n in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [n & 0x7F]
        while n > 0x7F:
            n >>= 7
            chunk.append(0x80 | (n & 0x7F))
        out += bytes(reversed(chunk))
    return bytes(out)


def oid_text(octets: bytes) -> str:
    """The dotted form of an OID's content octets (already checked by ``Reader.oid``)."""
    arcs: list[int] = []
    n = 0
    for b in octets:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(n)
            n = 0
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(a) for a in head + arcs[1:])


def time(tag: int, v: bytes, what: str) -> int:
    """Seconds since the epoch of a UTCTime or GeneralizedTime in RFC 5280's DER form
    (§4.1.2.5: ``YYMMDDHHMMSSZ``, years 50 to 99 being 19xx, or ``YYYYMMDDHHMMSSZ``)."""
    s = v.decode("ascii", "replace")
    if tag == UTC_TIME and len(s) == 13 and s[:12].isdigit():
        yy = int(s[:2])
        year, rest = yy + (1900 if yy >= 50 else 2000), s[2:12]
    elif tag == GENERALIZED_TIME and len(s) == 15 and s[:14].isdigit():
        year, rest = int(s[:4]), s[4:14]
    else:
        raise DerError(f"{what}: not a UTCTime or GeneralizedTime in DER form")
    if s[-1] != "Z":
        raise DerError(f"{what}: time {s!r} is not in UTC")
    if year < 1:
        raise DerError(f"{what}: year 0")
    mo, d, h, mi, sec = (int(rest[i:i + 2]) for i in range(0, 10, 2))
    if not (1 <= mo <= 12 and 1 <= d <= _days_in(year, mo) and h < 24 and mi < 60 and sec < 60):
        raise DerError(f"{what}: impossible time {s!r}")
    days = _days_from_civil(year, mo, d)
    return ((days * 24 + h) * 60 + mi) * 60 + sec


def _days_in(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm; no
    ``datetime`` so years outside its range cannot raise)."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


__all__ = ["DerError", "Reader", "oid_bytes", "oid_text", "time"]
