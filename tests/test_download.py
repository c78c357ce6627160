"""agent.adapters.download over real loopback HTTP, with faults injected by tests/faultproxy.py."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agent.adapters.download import (
    ArtifactMismatch,
    DownloadFailed,
    DownloadPolicy,
    DownloadTooSlow,
    Origin,
    ResumableStream,
    new_session,
    redact,
)
from tests.fakeddi import FakeDdi
from tests.faultproxy import Fault, FaultProxy

BLOB = os.urandom(600_000)
SHA = hashlib.sha256(BLOB).hexdigest()
FAST = DownloadPolicy(read_timeout=1.0, backoff=0.01, tail=64 * 1024)


@pytest.fixture
def server() -> Iterator[FakeDdi]:
    s = FakeDdi()
    s.blobs["a.bundle"] = BLOB
    yield s
    s.close()


def stream(url: str, *, origin: Origin | None = None, policy: DownloadPolicy = FAST,
           size: int = len(BLOB), sha: str | None = SHA) -> ResumableStream:
    return ResumableStream(new_session(), origin or Origin(url), f"{url}/artifacts/a.bundle",
                           size=size, sha256=sha, policy=policy)


def read_all(s: ResumableStream, size: int = 10_000) -> bytes:
    out = bytearray()
    while chunk := s.read(size):
        out += chunk
    return bytes(out)


def test_clean_download(server: FakeDdi) -> None:
    with stream(server.url) as s:
        assert read_all(s) == BLOB
        assert s.resumes == 0


@pytest.mark.parametrize("faults", [
    [Fault("drop", after=150_000)],
    [Fault("truncate", after=50_000), Fault("drop", after=10_000), Fault("truncate", after=1)],
    [Fault("http503"), Fault("drop", after=300_000)],
    [Fault("stall", after=200_000, seconds=3)],
])
def test_resumes_with_range_after_faults(server: FakeDdi, faults: list[Fault]) -> None:
    proxy = FaultProxy(server.address, list(faults), match=b"/artifacts/")
    try:
        with stream(proxy.url) as s:
            assert read_all(s) == BLOB
        assert s.resumes == len(faults)
        assert proxy.applied == [f.kind for f in faults]
        ranges = [h.get("Range") for m, p, h in server.requests if p.startswith("/artifacts/")]
        assert ranges[0] is None and any(r and r.startswith("bytes=") for r in ranges[1:])
    finally:
        proxy.close()


def test_gives_up_after_bounded_resumes(server: FakeDdi) -> None:
    proxy = FaultProxy(server.address, [Fault("drop", after=1000)] * 10,
                       match=b"/artifacts/")
    try:
        with pytest.raises(DownloadFailed, match="resumes"), stream(
                proxy.url, policy=DownloadPolicy(backoff=0.01, max_resumes=3)) as s:
            read_all(s)
    finally:
        proxy.close()


def test_trickle_below_min_rate_aborts(server: FakeDdi) -> None:
    proxy = FaultProxy(server.address,
                       [Fault("trickle", after=20_000, rate=2000, seconds=8)], match=b"/artifacts/")
    policy = DownloadPolicy(read_timeout=5, min_rate=50_000, min_rate_window=0.5, tail=1024)
    t0 = time.monotonic()
    try:
        with pytest.raises(DownloadTooSlow), stream(proxy.url, policy=policy) as s:
            read_all(s)
        assert time.monotonic() - t0 < 3
    finally:
        proxy.close()


def test_bandwidth_cap_paces_reads(server: FakeDdi) -> None:
    t0 = time.monotonic()
    with stream(server.url, policy=DownloadPolicy(bandwidth=1_500_000)) as s:
        assert read_all(s) == BLOB
    assert time.monotonic() - t0 >= 0.35  # 600 kB at 1.5 MB/s is 0.4 s


def test_declared_size_smaller_than_served_aborts(server: FakeDdi) -> None:
    with pytest.raises(ArtifactMismatch, match="sends"), stream(server.url, size=1000) as s:
        read_all(s)


def test_sha256_mismatch_is_raised_before_the_last_bytes_are_served(server: FakeDdi) -> None:
    with stream(server.url, sha="0" * 64) as s:
        got = bytearray()
        with pytest.raises(ArtifactMismatch, match="sha256"):
            while chunk := s.read(10_000):
                got += chunk
        assert len(got) < len(BLOB) - FAST.tail + 10_000
        assert s.served < s.size


class _Endless(BaseHTTPRequestHandler):
    """No Content-Length, connection-delimited body that never ends (bounded for the test)."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(2000):
                self.wfile.write(b"x" * 4096)
        except OSError:
            pass


def test_endless_body_aborts_at_declared_size() -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        with pytest.raises(ArtifactMismatch, match="more than"), stream(url, size=100_000,
                                                                        sha=None) as s:
            read_all(s)
    finally:
        srv.shutdown()
        srv.server_close()


def test_credentials_never_reach_another_host(server: FakeDdi) -> None:
    cdn = FakeDdi()
    cdn.blobs["a.bundle"] = BLOB
    # The controller redirects its artifact link to the CDN, as hawkBit deployments may.
    server.redirects["a.bundle"] = f"{cdn.url}/artifacts/a.bundle"
    origin = Origin(server.url, {"Authorization": "TargetToken s3cret"})
    try:
        with stream(server.url, origin=origin) as s:
            assert read_all(s) == BLOB
        ctl = [h for m, p, h in server.requests if p.startswith("/artifacts/")]
        assert ctl and all(h.get("Authorization") == "TargetToken s3cret" for h in ctl)
        seen = [h for m, p, h in cdn.requests]
        assert seen and all("Authorization" not in h for h in seen)
    finally:
        cdn.close()


def test_origin_matching() -> None:
    o = Origin("https://ddi.example:443", {"Authorization": "x"})
    assert o.trusted("https://ddi.example/a") and not o.trusted("http://ddi.example/a")
    assert not o.trusted("https://cdn.example/a") and not o.trusted("https://ddi.example:8443/")
    assert o.request_kwargs("https://cdn.example/a")["headers"] == {}
    with pytest.raises(DownloadFailed, match="bad port"):  # a redirect to a nonsense port
        o.trusted("https://ddi.example:99999/a")


def test_redacted_urls_hold_no_credentials() -> None:
    shown = redact("https://user:s3cret@cdn.example:8443/a/b.bundle?X-Amz-Signature=abc")
    assert "s3cret" not in shown and "abc" not in shown and "user" not in shown
    assert shown.startswith("https://cdn.example:8443/a/b.bundle")


def test_server_ignoring_range_is_skipped_not_duplicated(server: FakeDdi) -> None:
    server.ignore_range = True
    proxy = FaultProxy(server.address, [Fault("drop", after=200_000)], match=b"/artifacts/")
    try:
        with stream(proxy.url) as s:
            assert read_all(s) == BLOB  # the first pos bytes of the 200 were discarded
        assert s.resumes == 1
    finally:
        proxy.close()
