"""Fetch byte ranges of one HTTP artifact: single ranges, or many in one multi-range request.

RFC 9110 §14 (Range requests): a server that supports several ranges in one request answers
``206`` with ``multipart/byteranges``, one part per range, each with its own
``Content-Range``; one that does not may answer with the first range only, a ``200`` with
the whole body, or ``416``. The first multi-range answer that is not exactly what was asked
switches this fetcher to single ranges for good. A ``200`` to any Range request means the
server has no Range support at all (``RangeUnsupported``): the caller installs the whole
bundle instead. No policy here: which ranges, and what a failure means, is the caller's.
Every body byte received is counted (``received``), multipart framing included, as is
every request (``requests``). Credentials and redirects: ``adapters.download``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from typing import Any

import requests
import urllib3

from agent.adapters.download import (
    ArtifactMismatch,
    DownloadFailed,
    DownloadPolicy,
    Origin,
    ResumableStream,
    _Meter,
    open_url,
    redact,
)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')
MAX_PARTS = 128  # ranges per request: keeps the Range header under 4 KiB
MAX_HEADER_LINE = 1024


class RangeUnsupported(DownloadFailed):
    hint = "the server ignores HTTP Range; the whole bundle is downloaded instead"

    def __init__(self, message: str, *, response: requests.Response | None = None) -> None:
        super().__init__(message)
        self.response = response  # the 200 answer, still unread: the full download can use it


class RangeFetcher:
    def __init__(self, session: requests.Session, origin: Origin, url: str, *, size: int,
                 policy: DownloadPolicy | None = None,
                 cancelled: Callable[[], bool] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.session, self.origin, self.url, self.size = session, origin, url, size
        self.policy = policy or DownloadPolicy()
        self.multi: bool | None = None  # unknown until the first multi-range answer
        self.requests = 0
        self.received = 0
        self._meter = _Meter(self.policy, clock or time.monotonic, cancelled)
        self._validator: str | None = None
        self._pushback: tuple[requests.Response, bytes] | None = None  # read past a framing line

    # --- one request ---------------------------------------------------------------------
    def _get(self, ranges: list[tuple[int, int]], *, keep_200: bool = False) -> requests.Response:
        spec = ",".join(f"{a}-{b - 1}" for a, b in ranges)
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={spec}"}
        if self._validator:
            headers["If-Range"] = self._validator
        timeout = (self.policy.connect_timeout, self.policy.read_timeout)
        self.requests += 1
        try:
            resp = open_url(self.session, self.origin, self.url, headers, timeout)
        except requests.RequestException as exc:
            raise DownloadFailed(f"range request to {redact(self.url)} failed: "
                                 f"{type(exc).__name__}") from None
        code = resp.status_code
        if code == 200:
            msg = f"{redact(self.url)} answered a Range request with the whole body"
            if keep_200:
                raise RangeUnsupported(msg, response=resp)
            resp.close()
            raise RangeUnsupported(msg)
        if code >= 500 or code in (408, 429):
            resp.close()
            raise DownloadFailed(f"range request answered HTTP {code}")
        if code not in (206, 416):
            resp.close()
            raise DownloadFailed(f"range request answered HTTP {code}")
        etag = resp.headers.get("ETag")
        if etag and not etag.startswith("W/"):
            self._validator = self._validator or etag
        return resp

    def _read(self, resp: requests.Response, n: int) -> bytes:
        parts, got = [], 0
        if self._pushback and self._pushback[0] is resp:  # what a header line read past
            held = self._pushback[1]
            parts.append(held[:n])
            got = len(parts[0])
            self._pushback = (resp, held[got:]) if len(held) > got else None
        while got < n:
            try:
                data = resp.raw.read(min(n - got, 1 << 20))
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                raise DownloadFailed(f"range download broke off: {type(exc).__name__}") from None
            if not data:
                raise DownloadFailed("range download ended early")
            parts.append(data)
            got += len(data)
            self.received += len(data)
            self._meter.got(len(data))
        return b"".join(parts)

    def _line(self, resp: requests.Response, ahead: int) -> bytes:
        """One line of multipart framing, read up to 128 bytes at a time (a byte at a time cost
        ~100 reads per part); what follows the line is kept for the next read. ``ahead`` is the
        length of the part body still to come after this line, so no read asks for bytes the
        server will not send."""
        out = bytearray()
        while (nl := out.find(b"\n")) < 0:
            if len(out) > MAX_HEADER_LINE:
                raise DownloadFailed("multipart header line too long")
            held = self._pushback[1] if self._pushback and self._pushback[0] is resp else b""
            out += self._read(resp, len(held) or max(1, min(128, ahead)))
        if nl + 1 < len(out):
            held = self._pushback[1] if self._pushback and self._pushback[0] is resp else b""
            self._pushback = (resp, bytes(out[nl + 1:]) + held)
        return bytes(out[:nl + 1])

    def _check_part(self, header: str, want: tuple[int, int]) -> None:
        m = _CONTENT_RANGE.match(header.strip())
        if m is None or (int(m.group(1)), int(m.group(2)) + 1) != want:
            raise _Mismatch(f"asked for {want[0]}-{want[1] - 1}, got {header[:60]!r}")
        if m.group(3) != "*" and int(m.group(3)) != self.size:
            raise ArtifactMismatch(f"server says the artifact has {m.group(3)} bytes, "
                                   f"expected {self.size}")

    # --- public ----------------------------------------------------------------------------
    def read_range(self, start: int, end: int, *, keep_200: bool = False) -> bytes:
        """Bytes [start, end) of the artifact, in one single-range request. ``keep_200``: a
        server without Range support leaves its open answer in ``RangeUnsupported.response``."""
        resp = self._get([(start, end)], keep_200=keep_200)
        try:
            if resp.status_code == 416:
                raise DownloadFailed(f"server refused range {start}-{end - 1} (416)")
            self._check_part(resp.headers.get("Content-Range", ""), (start, end))
            return self._read(resp, end - start)
        except _Mismatch as exc:
            raise DownloadFailed(f"server answered a range wrongly: {exc}") from None
        finally:
            resp.close()

    def fetch(self, batch: list[tuple[int, int]]) -> Iterator[Part]:
        """Each range of ``batch`` (sorted, disjoint) as a ``Part`` to read in order, straight
        from the socket (memory stays bounded by what the caller reads at once). One
        multi-range request while the server honours them, else one request per range. A
        part left unread is drained when the next one is asked for."""
        if len(batch) > 1 and self.multi is not False:
            resp = self._get(batch)
            try:
                ctype = resp.headers.get("Content-Type", "")
                bm = _BOUNDARY.search(ctype)
                if resp.status_code != 206 or not ctype.startswith("multipart/byteranges") or not bm:
                    self.multi = False
                else:
                    self.multi = True
                    yield from self._multipart(resp, bm.group(1).encode(), batch)
                    return
            finally:
                resp.close()
        for a, b in batch:
            resp = self._get([(a, b)])
            try:
                if resp.status_code == 416:
                    raise DownloadFailed(f"server refused range {a}-{b - 1} (416)")
                try:
                    self._check_part(resp.headers.get("Content-Range", ""), (a, b))
                except _Mismatch as exc:
                    raise DownloadFailed(f"server answered a range wrongly: {exc}") from None
                part = Part(self, resp, a, b)
                yield part
                part.drain()
            finally:
                resp.close()

    def _multipart(self, resp: requests.Response, boundary: bytes, batch: list[tuple[int, int]]
                   ) -> Iterator[Part]:
        delim = b"--" + boundary
        for want in batch:
            ahead = want[1] - want[0]
            line = self._line(resp, ahead)
            while line.strip() == b"":  # the CRLF that ends the previous part, or a preamble
                line = self._line(resp, ahead)
            if line.strip() != delim:
                raise DownloadFailed("multipart answer lacks its boundary")
            content_range = ""
            while (line := self._line(resp, ahead)).strip():
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-range":
                    content_range = value.strip()
            try:
                self._check_part(content_range, want)
            except _Mismatch as exc:
                raise DownloadFailed(f"multipart answer out of order: {exc}") from None
            part = Part(self, resp, *want)
            yield part
            part.drain()

    def stream_from(self, start: int, *, sha256: str | None = None) -> ResumableStream:
        """A resumable sequential stream of the artifact from ``start`` to its end."""
        s = ResumableStream(self.session, self.origin, self.url, size=self.size, sha256=sha256,
                            policy=self.policy)
        s.pos = s.served = start  # resumes with Range: bytes=start- (checked by the stream)
        self.requests += 1
        return s


class _Mismatch(Exception):
    pass


class Part:
    """One range of an answer, read in order: ``read(n)`` returns exactly n bytes."""

    def __init__(self, fetcher: RangeFetcher, resp: requests.Response, start: int, end: int) -> None:
        self.fetcher, self.resp, self.start, self.end = fetcher, resp, start, end
        self.pos = start

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ValueError("read past the end of a range")
        data = self.fetcher._read(self.resp, n)
        self.pos += n
        return data

    def skip_to(self, pos: int) -> None:
        while self.pos < pos:
            self.read(min(pos - self.pos, 1 << 20))

    def drain(self) -> None:
        self.skip_to(self.end)


class HeadStream(io.RawIOBase):
    """The bundle's first bytes for the reader of its signed head, fetched by Range windows;
    ``sequential()`` turns it into an ordinary resumable stream from where it stands."""

    def __init__(self, fetcher: RangeFetcher, first: int = 32 * 1024) -> None:
        super().__init__()
        self.fetcher = fetcher
        self.pos = 0
        self._buf = b""
        self._buf_start = 0
        self._window = first
        self._seq: ResumableStream | None = None

    def readable(self) -> bool:
        return True

    def first(self) -> None:
        """Fetch the first window now; ``RangeUnsupported`` (with the server's open 200
        answer) when the server ignores Range."""
        end = min(self.fetcher.size, self._window)
        self._buf, self._buf_start = self.fetcher.read_range(0, end, keep_200=True), 0
        self._window *= 2

    def window(self, start: int, end: int) -> bytes:
        """What the last window holds of [start, end), from ``start`` on (may be empty)."""
        rel = start - self._buf_start
        if not 0 <= rel < len(self._buf):
            return b""
        return self._buf[rel:rel + (end - start)]

    def sequential(self) -> None:
        if self._seq is None:
            if not 0 <= self.pos - self._buf_start < len(self._buf):
                self._buf, self._buf_start = b"", self.pos
            self._seq = self.fetcher.stream_from(self._buf_start + len(self._buf))

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self.pos >= self.fetcher.size or not len(view):
            return 0
        rel = self.pos - self._buf_start
        if not 0 <= rel < len(self._buf):
            if self._seq is not None:
                n = self._seq.readinto(view)
                self.pos += n
                self.fetcher.received += n
                return n
            end = min(self.fetcher.size, self.pos + max(self._window, len(view)))
            self._buf, self._buf_start = self.fetcher.read_range(self.pos, end), self.pos
            self._window *= 2
            rel = 0
        n = min(len(view), len(self._buf) - rel)
        view[:n] = self._buf[rel:rel + n]
        self.pos += n
        return n

    def close(self) -> None:
        if self._seq is not None:
            self._seq.close()
        super().close()


__all__ = ["MAX_PARTS", "HeadStream", "Part", "RangeFetcher", "RangeUnsupported"]
