"""A read-only file over HTTP that survives bad links: the installer reads it like a file.

``ResumableStream`` is what ``Updater.install`` reads from, so the image goes straight from
the socket into the slot (no temporary copy). Under the hood:

* a dropped, stalled (read timeout) or truncated connection is reopened with
  ``Range: bytes=N-`` (+ ``If-Range`` when the server gave a validator), a bounded number of
  times with a short backoff;
* a bandwidth cap paces reads; a trickle below ``min_rate`` over ``min_rate_window``, or no
  byte at all for ``stall_timeout`` however often the link is reopened, aborts
  (``DownloadTooSlow``), by default on every download (also one without a Content-Length),
  so a slow-loris link cannot hold the device's only install slot;
* ``cancelled`` (a callable the fleet agent passes) is asked between reads: a controller's
  cancel reaches a download that is running (``DownloadCancelled``);
* bytes beyond the declared ``size`` abort at once (``ArtifactMismatch``): the server's
  Content-Length/Content-Range are checked before reading, and the body after reading;
* the artifact's sha256 is checked when the *last* bytes arrive but *before* the installer
  receives them (the final ``tail`` bytes are buffered), so a mismatch fails the write and
  the trial is never armed;
* the pacing and limits are a ``DownloadPolicy`` (agent.core.fleet_config: ``[fleet]`` sets them);
* credentials (Authorization header, client certificate, private CA) go only to the
  controller's own origin. hawkBit's artifact links may point to a CDN
  (https://eclipse.dev/hawkbit/apis/ddi_api/: "_links.download"); redirects are followed
  by hand so each hop is checked, and ``trust_env`` is off so no .netrc leaks in.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from agent.core import logs
from agent.core.fleet_config import DownloadPolicy
from agent.errors import BundleError, SourceNotFound, TransportError

log = logs.get(__name__)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
MAX_REDIRECTS = 5


class DownloadFailed(TransportError):
    pass


class DownloadTooSlow(DownloadFailed):
    hint = "the link is too slow; the download is retried at the next poll"


class DownloadCancelled(DownloadFailed):
    hint = "the controller cancelled the action; nothing was installed"


class ArtifactMismatch(BundleError):
    """The bytes do not match the deployment's declared size or sha256."""

    hint = "the artifact server sent different bytes than the controller declared"


def _origin(url: str) -> tuple[str, str, int]:
    u = urlsplit(url)
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:  # "host:99999" or "host:x" in a link or a redirect
        raise DownloadFailed(f"bad port in URL {redact(url)}") from None
    return u.scheme, (u.hostname or "").lower(), port


def redact(url: str) -> str:
    """A URL fit for logs and error lines: no user:password@, no query (tokens live there)."""
    u = urlsplit(url)
    host = u.hostname or ""
    try:
        port = f":{u.port}" if u.port else ""
    except ValueError:
        port = ""
    return f"{u.scheme}://{host}{port}{u.path}" + ("?…" if u.query else "")


@dataclass(frozen=True)
class Origin:
    """The controller's origin and the credentials that may be sent to it, and only to it."""

    base_url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # never printed
    cert: tuple[str, str] | None = None  # mTLS client certificate + key files
    verify: str | bool = True  # CA bundle for the controller

    def trusted(self, url: str) -> bool:
        return _origin(url) == _origin(self.base_url)

    def request_kwargs(self, url: str) -> dict[str, Any]:
        if self.trusted(url):
            return {"headers": dict(self.headers), "cert": self.cert, "verify": self.verify}
        return {"headers": {}, "cert": None, "verify": True}


def new_session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no .netrc credentials, no surprise proxies: we decide what is sent
    return s


def open_url(session: requests.Session, origin: Origin, url: str, headers: Mapping[str, str],
             timeout: tuple[float, float]) -> requests.Response:
    """GET with redirects followed by hand, credentials recomputed for every hop."""
    for _ in range(MAX_REDIRECTS + 1):
        kw = origin.request_kwargs(url)
        resp = session.get(url, headers={**kw["headers"], **headers}, cert=kw["cert"],
                           verify=kw["verify"], timeout=timeout, stream=True,
                           allow_redirects=False)
        if resp.status_code not in (301, 302, 303, 307, 308):
            return resp
        location = resp.headers.get("Location", "")
        resp.close()
        if not location:
            raise DownloadFailed("redirect without a Location")
        url = urljoin(url, location)
    raise DownloadFailed(f"more than {MAX_REDIRECTS} redirects")


class _Meter:
    """When a download gives up: a trickle below ``min_rate`` over a window, or a stall."""

    def __init__(self, policy: DownloadPolicy, clock: Callable[[], float],
                 cancelled: Callable[[], bool] | None = None) -> None:
        self.policy, self.clock, self.cancelled = policy, clock, cancelled
        now = clock()
        self.total = 0
        self._window = (now, 0)
        self._last_byte = now

    def got(self, n: int) -> None:
        self.total += n
        if n:
            self._last_byte = self.clock()
        self.check()

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise DownloadCancelled(f"download cancelled after {self.total} bytes")
        p, now = self.policy, self.clock()
        if now - self._last_byte > p.stall_timeout:
            raise DownloadTooSlow(f"download stalled: no byte for {now - self._last_byte:.0f} s "
                                  f"(stall timeout {p.stall_timeout:g} s)")
        t0, b0 = self._window
        if not p.min_rate or now - t0 < p.min_rate_window:
            return
        rate = (self.total - b0) / (now - t0)
        if rate < p.min_rate:
            raise DownloadTooSlow(f"download ran at {rate:.0f} B/s over {now - t0:.0f} s, below "
                                  f"the minimum {p.min_rate:.0f} B/s")
        self._window = (now, self.total)


class ResumableStream(io.RawIOBase):
    def __init__(self, session: requests.Session, origin: Origin, url: str, *, size: int,
                 sha256: str | None, policy: DownloadPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 response: requests.Response | None = None,
                 cancelled: Callable[[], bool] | None = None) -> None:
        """``response``: a first GET already open on ``url`` (checked here like any other).
        ``cancelled``: asked between reads; True stops the download (``DownloadCancelled``)."""
        super().__init__()
        self.session, self.origin, self.url = session, origin, url
        self.size, self.sha256 = size, sha256
        self.policy = policy or DownloadPolicy()
        self.clock, self.sleep = clock, sleep
        self._meter = _Meter(self.policy, clock, cancelled)
        self.pos = 0  # bytes received and hashed
        self.served = 0  # bytes handed to the reader
        self.resumes = 0
        self._hash = hashlib.sha256()
        self._resp: requests.Response | None = None
        self._validator: str | None = None
        self._tail: bytes | None = None
        self._started = clock()
        if response is not None:
            try:
                self._accept(response)
            except BaseException:
                response.close()
                raise
            self._resp = response

    # --- io.RawIOBase ----------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self.served >= self.size or not len(view):
            return 0
        if self.size - self.pos <= self.policy.tail and self._tail is None:
            self._tail = self._slurp_tail()
        if self._tail is not None:
            start = self.served - (self.size - len(self._tail))
            n = min(len(view), len(self._tail) - start)
            view[:n] = self._tail[start:start + n]
        else:
            data = self._fill(min(len(view), self.size - self.pos - self.policy.tail))
            n = len(data)
            view[:n] = data
        self.served += n
        return n

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        super().close()

    # --- internals -------------------------------------------------------------------------
    def _slurp_tail(self) -> bytes:
        start = self.pos
        parts = []
        while self.pos < self.size:
            parts.append(self._fill(self.size - self.pos))
        self._check_no_more()
        digest = self._hash.hexdigest()
        if self.sha256 is not None and digest != self.sha256:
            raise ArtifactMismatch(f"artifact sha256 is {digest[:16]}…, the deployment says "
                                   f"{self.sha256[:16]}…")
        tail = b"".join(parts)
        assert len(tail) == self.size - start
        return tail

    def _check_no_more(self) -> None:
        if self._resp is None:
            return
        try:
            extra = self._resp.raw.read1(1)
        except (urllib3.exceptions.HTTPError, OSError):
            extra = b""  # the link died at the very end: we have every byte we wanted
        if extra:
            raise ArtifactMismatch(f"the server sends more than the declared {self.size} bytes")
        self._resp.close()
        self._resp = None

    def _fill(self, want: int) -> bytes:
        """At least one byte (up to ``want``), resuming the connection as often as allowed."""
        want = max(1, min(want, self.policy.read_size))
        while True:
            try:
                resp = self._resp or self._open()
                data = resp.raw.read1(want)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                self._drop(f"{type(exc).__name__}")
                continue
            if not data:
                self._drop("connection closed early")
                continue
            self._hash.update(data)
            self.pos += len(data)
            self._pace(len(data))
            return data

    def _drop(self, why: str) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        self.resumes += 1
        if self.resumes > self.policy.max_resumes:
            raise DownloadFailed(f"download stopped at byte {self.pos} of {self.size} after "
                                 f"{self.policy.max_resumes} resumes ({why})")
        log.info("download interrupted at byte %d (%s); resuming", self.pos, why)
        self.sleep(min(5.0, self.policy.backoff * 2 ** (self.resumes - 1)))
        self._meter.check()

    def _open(self) -> requests.Response:
        headers = {"Accept-Encoding": "identity"}  # Range offsets must be raw bytes
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
            if self._validator:
                headers["If-Range"] = self._validator
        timeout = (self.policy.connect_timeout, self.policy.read_timeout)
        resp = open_url(self.session, self.origin, self.url, headers, timeout)
        try:
            self._accept(resp)
        except BaseException:
            resp.close()
            raise
        self._resp = resp
        return resp

    def _accept(self, resp: requests.Response) -> None:
        code = resp.status_code
        if code >= 500 or code in (408, 429):
            raise requests.ConnectionError(f"HTTP {code}")  # retryable: counts as a resume
        if code == 206 and self.pos:
            self._check_range(resp.headers.get("Content-Range", ""))
        elif code == 200:
            self._check_length(resp.headers.get("Content-Length"), self.size)
            if self.pos:  # the server ignored Range: skip what we already have
                self._skip(resp, self.pos)
        else:
            raise DownloadFailed(f"artifact download answered HTTP {code}")
        etag = resp.headers.get("ETag")
        if etag and not etag.startswith("W/"):
            self._validator = etag
        elif resp.headers.get("Last-Modified"):
            self._validator = resp.headers["Last-Modified"]

    def _check_range(self, header: str) -> None:
        m = _CONTENT_RANGE.match(header.strip())
        if m is None or int(m.group(1)) != self.pos:
            raise DownloadFailed(f"server answered Range {self.pos}- with {header[:60]!r}")
        if m.group(3) != "*" and int(m.group(3)) != self.size:
            raise ArtifactMismatch(f"server says the artifact has {m.group(3)} bytes, "
                                   f"the deployment says {self.size}")

    def _check_length(self, header: str | None, expected: int) -> None:
        if header is not None and header.isdigit() and int(header) != expected:
            raise ArtifactMismatch(f"server sends {header} bytes, the deployment says {expected}")

    def _skip(self, resp: requests.Response, n: int) -> None:
        while n:
            got = resp.raw.read1(min(n, self.policy.read_size))
            if not got:
                raise requests.ConnectionError("closed while skipping")
            n -= len(got)

    def _pace(self, n: int) -> None:
        cap = self.policy.bandwidth
        if cap:
            due = self._started + self.pos / cap
            now = self.clock()
            if due > now:
                self.sleep(due - now)
        self._meter.got(n)


def open_stream(url: str, policy: DownloadPolicy | None = None) -> tuple[io.RawIOBase, int]:
    """``edgeops install URL``: a stream that resumes when the server states the size.

    No credentials are sent (the bundle's signature is what makes it trustworthy). When the
    server gives no Content-Length the body is read as sent, and a dropped link becomes a
    ``DownloadFailed`` instead of an urllib3 exception.
    """
    session = new_session()
    origin = Origin(url)
    policy = policy or DownloadPolicy()
    timeout = (policy.connect_timeout, policy.read_timeout)
    try:
        resp = open_url(session, origin, url, {"Accept-Encoding": "identity"}, timeout)
    except requests.RequestException as exc:
        raise DownloadFailed(f"download of {redact(url)} failed: {type(exc).__name__}") from None
    if resp.status_code != 200:  # 404/410: a wrong URL, not a network problem, not "retry later"
        resp.close()
        gone = resp.status_code in (404, 410)
        raise (SourceNotFound if gone else DownloadFailed)(
            f"download of {redact(url)} answered HTTP {resp.status_code}")
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and "Content-Encoding" not in resp.headers:
        stream = ResumableStream(session, origin, resp.url or url, size=int(length), sha256=None,
                                 policy=policy, response=resp)
        return stream, int(length)
    return _Guarded(resp, url, _Meter(policy, time.monotonic)), 0


class _Guarded(io.RawIOBase):
    """A response body whose link errors surface as ``DownloadFailed``, with the same
    trickle and stall limits as a resumable download (it just cannot resume)."""

    def __init__(self, resp: requests.Response, url: str, meter: _Meter) -> None:
        super().__init__()
        self.resp, self.url, self.meter = resp, url, meter
        resp.raw.decode_content = True

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        try:
            data = self.resp.raw.read1(len(view))
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            raise DownloadFailed(f"download of {redact(self.url)} broke off: "
                                 f"{type(exc).__name__}") from None
        view[:len(data)] = data
        self.meter.got(len(data))
        return len(data)

    def close(self) -> None:
        self.resp.close()
        super().close()


__all__ = ["MAX_REDIRECTS", "ArtifactMismatch", "DownloadCancelled", "DownloadFailed", "DownloadPolicy",
           "DownloadTooSlow", "Origin", "ResumableStream", "new_session", "open_stream", "open_url",
           "redact"]
