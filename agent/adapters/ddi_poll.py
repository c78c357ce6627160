"""The one GET of the idle agent: the DDI base resource over the standard library (socket, ssl).

Why a second DDI transport beside ``agent.adapters.ddi_http.DdiClient``: the idle agent asks
the controller "anything for me?" every poll interval for weeks, and gets "no" nearly every
time. ``DdiClient`` is built on requests (urllib3, charset detection, idna) and is always used
with the downloader and the trust chain (cryptography, zstandard); loaded, those hold some
20 MiB in a process that is idle almost all of its life. This module does only that question
— GET the base resource, with ``If-None-Match`` and ``Prefer: wait`` for a long-poll — so the
idle service (``agent.device.service.serve``) can keep asking on the standard library and
start a worker with the full client only when the answer says there is work. Everything
else (deployments, cancels, reports, downloads, redirects, mTLS with the sealed identity
key, the controller's certificate-refusal answers) stays in ``DdiClient``; the document is
parsed by ``agent.core.ddi`` for both.

Why not ``http.client``: it imports the ``email`` package to parse headers, 2.3 MiB resident
— a tenth of the idle agent's budget — for one bounded GET. The exchange here is HTTP/1.1
as RFC 9112 gives it, strict and bounded: a status line, at most ``MAX_HEADERS`` header lines
(no obsolete line folding), a body by Content-Length, chunked, or up to the close, never more
than ``ddi.MAX_DOCUMENT`` bytes; anything else is a ``TransportError``.

Same credentials and trust as ``DdiClient``: the token header, the client certificate files,
and the configured CA (the system store when none is named); no proxies from the
environment. One keep-alive connection is reused between polls and dropped on any failure.
"""

from __future__ import annotations

import select
import socket
import ssl
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

from agent.core import ddi
from agent.core.fleet_config import FleetConfig
from agent.errors import ConfigError, Throttled, TransportError

MAX_LINE = 8192  # bytes of a status, header or chunk-size line
MAX_HEADERS = 100
NO_BODY = (204, 304)  # and every 1xx; a GET's answers


@dataclass(frozen=True)
class BaseAnswer:
    """What the base resource said: ``base`` None on 304 Not Modified (nothing new)."""

    base: ddi.BaseResource | None
    etag: str | None


class Redirected(TransportError):
    """The controller redirected the base resource: the full client follows redirects (and
    recomputes credentials for every hop); this one does not."""


class HttpError(TransportError):
    """The controller's answer is not HTTP/1.1 as this reader accepts it."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names lower-case; a repeated header's last value
    body: bytes
    reusable: bool  # the connection may carry the next request


class BasePoll:
    """GET ``{url}/{tenant}/controller/v1/{controllerId}`` for one device, nothing else."""

    def __init__(self, cfg: FleetConfig) -> None:
        if cfg.auth != "none" and not cfg.token:
            raise ConfigError(f"[fleet] auth = {cfg.auth!r} needs its token; "
                              f"token_file {cfg.token_file} was not read")
        self.cfg = cfg
        url = urlsplit(cfg.base_url)
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.https else 80)
        self.path = url.path or "/"
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if self.https else 80)
        self.headers = {"Host": netloc if default else f"{netloc}:{self.port}",
                        "Accept": "application/hal+json, application/json"}
        if cfg.auth in ("target", "gateway"):
            kind = "TargetToken" if cfg.auth == "target" else "GatewayToken"
            self.headers["Authorization"] = f"{kind} {cfg.token}"
        if not all(_safe(v) for v in self.headers.values()):
            raise ConfigError("[fleet] the token or url holds characters a header cannot carry")
        self._ctx: ssl.SSLContext | None = None
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None

    def poll(self, *, etag: str | None = None, wait: float = 0) -> BaseAnswer:
        """The base resource; ``wait`` > 0 asks a long-poll capable controller to hold the
        request until the links change (see agent.device.push). Raises ``TransportError``."""
        headers = dict(self.headers)
        if etag and _safe(etag):
            headers["If-None-Match"] = etag
        if wait > 0:
            headers["Prefer"] = f"wait={int(wait)}"
        what = f"GET {self.cfg.base_url}"
        try:
            resp = self._get(headers, self.cfg.download.read_timeout + wait)
        except HttpError as exc:
            self.close()
            raise HttpError(f"{what}: {exc}") from None
        except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
            self.close()  # a half-read answer must not be taken for the next one
            raise TransportError(f"{what} failed: {type(exc).__name__}: {exc}") from None
        except BaseException:
            self.close()  # e.g. SIGTERM out of a held long-poll: its answer may still come
            raise
        if not resp.reusable:
            self.close()
        if resp.status == 304:
            return BaseAnswer(None, etag)
        delay = _retry_after(resp.headers.get("retry-after"))
        if resp.status == 429 or (resp.status == 503 and delay is not None):
            raise Throttled(f"{what} answered HTTP {resp.status} (retry after {delay or 0:g} s)",
                            retry_after=delay or 0.0)
        if resp.status in (301, 302, 303, 307, 308):
            raise Redirected(f"{what} answered HTTP {resp.status} (redirect)")
        if resp.status != 200:
            raise TransportError(f"{what} answered HTTP {resp.status}")
        return BaseAnswer(ddi.parse_base(resp.body), resp.headers.get("etag"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._file = None

    def _get(self, headers: dict[str, str], read_timeout: float) -> Response:
        if self._sock is not None and _dropped(self._sock):
            self.close()  # the server ended the keep-alive while we slept (as urllib3 checks)
        if self._sock is None:
            self._connect()
        assert self._sock is not None and self._file is not None
        self._sock.settimeout(read_timeout)  # a long-poll's hold counts as reading
        lines = [f"GET {self.path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        self._sock.sendall("\r\n".join(lines).encode("latin-1"))
        return read_response(self._file)

    def _connect(self) -> None:
        # An ASCII name as bytes: for a str, getaddrinfo and ssl load the idna codec, and with
        # it stringprep and unicodedata (0.3 MiB), to encode what needs no encoding.
        name: str | bytes = self.host.encode() if self.host.isascii() else self.host
        sock = _open_tcp(name, self.port, self.cfg.download.connect_timeout)
        try:
            if self.https:
                if self._ctx is None:  # an unreadable CA or key fails each poll, as with requests
                    self._ctx = _context(self.cfg)
                sock = self._ctx.wrap_socket(sock, server_hostname=name)
        except BaseException:
            sock.close()
            raise
        self._sock, self._file = sock, sock.makefile("rb")


def _open_tcp(host: str | bytes, port: int, timeout: float) -> socket.socket:
    """socket.create_connection, for a host name given as bytes too."""
    error: OSError = OSError(f"no address for {host!r}")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def read_response(f: BinaryIO) -> Response:
    """One HTTP/1.1 response to a GET from ``f``; interim (1xx) answers are skipped."""
    while True:
        status, version = _status_line(_line(f))
        headers = _headers(f)
        if not 100 <= status < 200:
            break
    close = "close" in headers.get("connection", "").lower() or version == "HTTP/1.0"
    if status in NO_BODY:
        return Response(status, headers, b"", not close)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, complete = _chunked(f)
        return Response(status, headers, body, complete and not close)
    length = headers.get("content-length")
    if length is None:  # delimited by the close of the connection
        return Response(status, headers, f.read(ddi.MAX_DOCUMENT + 1), False)
    if not length.isdigit():
        raise HttpError(f"bad Content-Length {length[:40]!r}")
    n = int(length)
    body = f.read(min(n, ddi.MAX_DOCUMENT + 1))  # more than the limit: parse_base refuses it
    if len(body) < min(n, ddi.MAX_DOCUMENT + 1):
        raise HttpError("connection closed inside the body")
    return Response(status, headers, body, n == len(body) and not close)


def _line(f: BinaryIO) -> bytes:
    line = f.readline(MAX_LINE + 1)
    if not line.endswith(b"\n"):
        raise HttpError("line too long" if len(line) > MAX_LINE else "connection closed early")
    return line.rstrip(b"\r\n")


def _status_line(line: bytes) -> tuple[int, str]:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit() \
            or len(parts[1]) != 3:
        raise HttpError(f"bad status line {line[:60]!r}")
    return int(parts[1]), parts[0].decode()


def _headers(f: BinaryIO) -> dict[str, str]:
    out: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = _line(f)
        if not line:
            return out
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise HttpError(f"bad header line {line[:60]!r}")
        out[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    raise HttpError(f"more than {MAX_HEADERS} header lines")


def _chunked(f: BinaryIO) -> tuple[bytes, bool]:
    """The body and whether it was read to its end (False: cut at the document limit)."""
    body = bytearray()
    while True:
        size = _line(f).split(b";", 1)[0].strip()
        try:
            n = int(size, 16)
        except ValueError:
            raise HttpError(f"bad chunk size {size[:20]!r}") from None
        if n == 0:
            _headers(f)  # trailer fields, then the final empty line
            return bytes(body), True
        if len(body) + n > ddi.MAX_DOCUMENT:
            body += f.read(ddi.MAX_DOCUMENT + 1 - len(body))
            return bytes(body), False  # parse_base refuses it; the connection is dropped
        chunk = f.read(n)
        if len(chunk) < n:
            raise HttpError("connection closed inside a chunk")
        if _line(f):
            raise HttpError("chunk longer than its size")
        body += chunk


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in delay-seconds, bounded (as ``agent.core.outbox.retry_after``, which
    this module does not import: it keeps the idle agent's imports to the standard library)."""
    text = (value or "").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        return None
    return min(float(int(text)), 3600.0)


def _safe(value: str) -> bool:
    """A value that may go into a header line as it is (the ETag comes from the server)."""
    return value.isprintable() and value.isascii()


def _context(cfg: FleetConfig) -> ssl.SSLContext:
    """Verify the controller as requests does (the named CA, else the system store) and
    present the client certificate files when configured."""
    ctx = ssl.create_default_context(cafile=str(cfg.ca_cert) if cfg.ca_cert else None)
    if cfg.client_cert:
        ctx.load_cert_chain(str(cfg.client_cert), str(cfg.client_key or cfg.client_cert))
    return ctx


def _dropped(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has been closed (or spoken on) by the server."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


__all__ = ["BaseAnswer", "BasePoll", "HttpError", "Redirected", "Response", "read_response"]
