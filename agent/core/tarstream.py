"""A strict, bounded reader and a deterministic writer for the ustar subset bundles use.

Hand-written on purpose: ``tarfile`` reads pax headers of any declared size into
memory and follows a dozen member kinds we must refuse. Here every header is
512 bytes, checksummed, and must describe a regular file; anything else is
refused with a message that names the member.
Format: POSIX.1-1988 ustar (as in GNU tar's documentation "Basic Tar Format"),
with GNU's base-256 size field for members of 8 GiB and more.
"""

from __future__ import annotations

import posixpath
from typing import BinaryIO

from agent.core.frozen import Frozen
from agent.errors import BundleError, TruncatedBundle, UnsafeMember

BLOCK = 512
MAX_MEMBER_SIZE = 1 << 44

_KINDS = {
    b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device node",
    b"4": "a block device node", b"5": "a directory", b"6": "a FIFO", b"7": "a contiguous file",
    b"x": "a pax extended header", b"g": "a pax global header", b"L": "a GNU long-name header",
    b"K": "a GNU long-link header", b"S": "a GNU sparse file", b"V": "a volume label",
}


class Member(Frozen):
    name: str
    size: int


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field[1:], "big") | ((field[0] & 0x3F) << (8 * (len(field) - 1)))
        if field[0] & 0x40:
            raise BundleError(f"tar header has a negative {what}")
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    # digits 0-7 only: int(x, 8) also takes '-1', '+7', '0o7', '1_0' and whitespace, and a
    # negative size would make the reader read to the end of the stream
    if text.strip(b"01234567"):
        raise BundleError(f"tar header has a malformed {what} field")
    return int(text, 8)


def parse_header(block: bytes) -> Member | None:
    """Return the member a 512-byte header describes, None for the end-of-archive block."""
    if len(block) != BLOCK:
        raise TruncatedBundle("bundle ends inside a tar header")
    if block == bytes(BLOCK):
        return None
    stored = _octal(block[148:156], "checksum")
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise BundleError("tar header checksum mismatch (not a bundle, or corrupted)")
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeMember("tar member name is not UTF-8") from None
    kind = block[156:157]
    if kind in _KINDS:
        raise UnsafeMember(f"bundle member '{text}' is {_KINDS[kind]}; only regular files are allowed")
    if kind not in (b"0", b"\0"):
        raise UnsafeMember(f"bundle member '{text}' has unknown type {kind!r}")
    if text.startswith("/") or ".." in text.split("/"):
        raise UnsafeMember(f"bundle member '{text}' has an absolute or '..' path")
    if posixpath.normpath(text) != text or "\\" in text:
        raise UnsafeMember(f"bundle member '{text}' has a non-canonical path")
    size = _octal(block[124:136], "size")
    if size > MAX_MEMBER_SIZE:
        raise BundleError(f"bundle member '{text}' declares {size} bytes, beyond any limit")
    return Member(text, size)


def padding(size: int) -> int:
    return -size % BLOCK


class TarReader:
    """Reads members strictly in sequence from a non-seekable stream."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.offset = 0

    def read_exact(self, n: int) -> bytes:
        if n < 0:
            raise BundleError(f"negative read of {n} bytes")  # never read(-1): to the end
        buf = self._stream.read(n)
        if len(buf) == n:
            self.offset += n
            return buf
        parts = [buf]
        got = len(buf)
        while got < n:
            more = self._stream.read(n - got)
            if not more:
                raise self._ended(got)
            parts.append(more)
            got += len(more)
        self.offset += n
        return b"".join(parts)

    def readinto_exact(self, view: memoryview) -> None:
        got = 0
        readinto = getattr(self._stream, "readinto", None)
        while got < len(view):
            if readinto is not None:
                n = readinto(view[got:])
            else:
                chunk = self._stream.read(len(view) - got)
                n = len(chunk)
                view[got:got + n] = chunk
            if not n:
                raise self._ended(got)
            got += n
        self.offset += got

    def _ended(self, got: int) -> TruncatedBundle:
        end = self.offset + got
        if self.offset == 0:  # not even one tar header: a stub, an error page, the wrong file
            return TruncatedBundle(f"{end} bytes is too short to be an edgeops bundle",
                                   hint="check that this is the .bundle file, and that it "
                                        "downloaded completely")
        return TruncatedBundle(f"bundle ends early, at byte {end}")

    def next_member(self) -> Member | None:
        return parse_header(self.read_exact(BLOCK))

    def skip_padding(self, size: int) -> None:
        pad = padding(size)
        if pad:
            self.read_exact(pad)


def header(name: str, size: int, mtime: int) -> bytes:
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"member name too long: {name}")
    block = bytearray(BLOCK)
    block[0:len(raw)] = raw
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    if size < 8**11:
        block[124:136] = b"%011o\0" % size
    else:
        block[124:136] = (size | (0x80 << 88)).to_bytes(12, "big")
    block[136:148] = b"%011o\0" % mtime
    block[148:156] = b" " * 8
    block[156:157] = b"0"
    block[257:265] = b"ustar\x0000"
    block[265:269] = b"root"
    block[297:301] = b"root"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


END = bytes(2 * BLOCK)
