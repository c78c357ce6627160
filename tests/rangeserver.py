"""A real HTTP/1.1 server on 127.0.0.1 that serves files with Range (single or multi-range).

Python's http.server has no Range support. This one answers ``bytes=a-b[,c-d...]`` as RFC 9110
§14 says (206, multipart/byteranges for several ranges), can be told to answer multi-range
requests with their first range only (as many CDNs do) or to ignore Range, and can drop the
connection after a number of body bytes (a dropped link). It counts requests and body bytes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Served:
    files: dict[str, Path]
    multi: bool = True
    ranges: bool = True
    drop_after: int | None = None  # close the connection once this many body bytes went out (once)
    requests: int = 0
    body_bytes: int = 0
    log: list[str] = field(default_factory=list)


class _File:
    """A file sliced like bytes, read only where sliced (bundles can be large)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __len__(self) -> int:
        return self.path.stat().st_size

    def __getitem__(self, s: slice) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(s.start or 0)
            return f.read((s.stop if s.stop is not None else len(self)) - (s.start or 0))


def _handler(state: Served) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def _send(self, data: bytes) -> bool:
            if state.drop_after is not None and state.body_bytes + len(data) > state.drop_after:
                keep = max(0, state.drop_after - state.body_bytes)
                self.wfile.write(data[:keep])
                state.body_bytes += keep
                state.drop_after = None
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return False
            self.wfile.write(data)
            state.body_bytes += len(data)
            return True

        def do_GET(self) -> None:
            state.requests += 1
            path = state.files.get(self.path.split("?")[0])
            if path is None:
                self.send_error(404)
                return
            data = _File(path)
            size = len(data)
            spec = self.headers.get("Range")
            state.log.append(spec or "")
            if not spec or not state.ranges:
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.send_header("ETag", '"e1"')
                self.end_headers()
                self._send(data[0:size])
                return
            m = re.fullmatch(r"bytes=([0-9,\- ]+)", spec)
            ranges = []
            for part in (m.group(1).split(",") if m else []):
                a, _, b = part.strip().partition("-")
                start = int(a) if a else size - int(b)
                end = min(size - 1, int(b)) if a and b else size - 1
                ranges.append((start, end))
            if not ranges or any(a > b or a >= size for a, b in ranges):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if len(ranges) == 1 or not state.multi:
                a, b = ranges[0]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                self.send_header("Content-Length", str(b - a + 1))
                self.send_header("ETag", '"e1"')
                self.end_headers()
                self._send(data[a:b + 1])
                return
            body = bytearray()
            for a, b in ranges:
                body += (f"\r\n--SEP\r\nContent-Type: application/octet-stream\r\n"
                         f"Content-Range: bytes {a}-{b}/{size}\r\n\r\n").encode()
                body += data[a:b + 1]
            body += b"\r\n--SEP--\r\n"
            self.send_response(206)
            self.send_header("Content-Type", "multipart/byteranges; boundary=SEP")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"e1"')
            self.end_headers()
            self._send(bytes(body))

    return H


@contextmanager
def serve(state: Served) -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
