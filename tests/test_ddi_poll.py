"""The idle service's one GET: a strict HTTP/1.1 reader and the DDI base resource on the standard library."""

from __future__ import annotations

import datetime
import io
import ipaddress
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.ddi_poll import BasePoll, HttpError, Redirected, read_response
from agent.core import ddi
from agent.core.fleet_config import DownloadPolicy, FleetConfig
from agent.errors import TransportError
from tests.fakeddi import Action, FakeDdi

TOKEN = "t0k3n"


# --- the HTTP/1.1 reader --------------------------------------------------------------------------
OK_DOC = b'{"config": {"polling": {"sleep": "00:00:30"}}, "_links": {}}'


@pytest.mark.parametrize("raw, status, body, reusable", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nETag: \"1\"\r\n\r\n{}", 200, b"{}", True),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"1\"\r\n\r\n", 304, b"", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", 200, b"{}", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", 200, b"{}", False),
    (b"HTTP/1.1 200 OK\r\n\r\n{}", 200, b"{}", False),  # ends with the connection
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n1;x=y\r\n}\r\n0\r\n\r\n",
     200, b"{}", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcdef", 200, b"abc", True),
])
def test_read_response(raw: bytes, status: int, body: bytes, reusable: bool) -> None:
    resp = read_response(io.BytesIO(raw))
    assert (resp.status, resp.body, resp.reusable) == (status, body, reusable)


@pytest.mark.parametrize("raw", [
    b"",  # nothing at all
    b"HTTP/1.1 200 OK",  # no line end: closed early
    b"HTTP/2 200\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"y" * 9000 + b"\r\n\r\n",
])
def test_read_response_refuses_what_is_not_http(raw: bytes) -> None:
    with pytest.raises(HttpError):
        read_response(io.BytesIO(raw))


def test_an_oversized_answer_is_cut_at_the_document_limit() -> None:
    big = ddi.MAX_DOCUMENT + 10
    for head in (f"Content-Length: {big}".encode(), b"Transfer-Encoding: chunked"):
        body = b"x" * big if b"Length" in head else f"{big:x}\r\n".encode() + b"x" * big + b"\r\n0\r\n\r\n"
        resp = read_response(io.BytesIO(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + body))
        assert len(resp.body) == ddi.MAX_DOCUMENT + 1 and not resp.reusable


# --- the one GET against a DDI server ----------------------------------------------------------------
@pytest.fixture
def fake() -> Iterator[FakeDdi]:
    f = FakeDdi(token=TOKEN, sleep="00:00:30")
    yield f
    f.close()


def fleet(url: str, **kw: Any) -> FleetConfig:
    return FleetConfig(url=url, controller_id="dev1", auth="target", token=TOKEN,
                       download=DownloadPolicy(connect_timeout=2, read_timeout=5), **kw)


def test_base_poll_asks_what_the_full_client_asks(fake: FakeDdi) -> None:
    poll = BasePoll(fleet(fake.url))
    first = poll.poll()
    assert first.base is not None and first.base.sleep == 30 and first.etag == '"0"'
    assert first.base.deployment is None
    assert poll.poll(etag=first.etag) == type(first)(None, first.etag)  # 304: nothing new
    fake.deploy(Action("a1", b"bundle"))
    changed = poll.poll(etag=first.etag)
    assert changed.base is not None and changed.base.deployment is not None
    assert changed.etag != first.etag
    headers = [h for m, p, h in fake.requests]
    assert {h["Authorization"] for h in headers} == {f"TargetToken {TOKEN}"}
    assert headers[1]["If-None-Match"] == '"0"' and "Prefer" not in headers[1]


def test_base_poll_long_polls_until_the_links_change(fake: FakeDdi) -> None:
    import threading

    poll = BasePoll(fleet(fake.url))
    etag = poll.poll().etag
    threading.Timer(0.5, lambda: fake.deploy(Action("a1", b"bundle"))).start()
    t0 = time.monotonic()
    answer = poll.poll(etag=etag, wait=5)
    assert 0.4 < time.monotonic() - t0 < 4 and answer.base is not None and answer.base.deployment
    assert fake.requests[-1][2]["Prefer"] == "wait=5"


def test_base_poll_failures_are_transport_errors(fake: FakeDdi) -> None:
    with pytest.raises(TransportError, match="401"):
        BasePoll(FleetConfig(url=fake.url, controller_id="dev1", auth="target", token="wrong")).poll()
    dead = FleetConfig(url="http://127.0.0.1:9", controller_id="dev1",
                       download=DownloadPolicy(connect_timeout=1))
    with pytest.raises(TransportError):
        BasePoll(dead).poll()


def test_base_poll_hands_a_redirect_to_the_full_client() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Moved(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", "http://elsewhere.invalid/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Moved)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(Redirected):
            BasePoll(FleetConfig(url=f"http://127.0.0.1:{srv.server_address[1]}",
                                 controller_id="dev1")).poll()
    finally:
        srv.shutdown()
        srv.server_close()


def _tls(d: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA and a server context for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(cn: str, pub: Any, *, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")]))
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(cert("test ca", ca_key.public_key(), ca=True).public_bytes(pem))
    (d / "srv.crt").write_bytes(cert("127.0.0.1", key.public_key(), ca=False).public_bytes(pem))
    (d / "srv.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "srv.crt", d / "srv.key")
    return d / "ca.crt", ctx


def test_base_poll_over_tls_trusts_the_configured_ca_only(tmp_path: Path) -> None:
    ca, ctx = _tls(tmp_path)
    fake = FakeDdi(token=TOKEN)
    fake.server.socket = ctx.wrap_socket(fake.server.socket, server_side=True)
    url = f"https://127.0.0.1:{fake.address[1]}"
    try:
        answer = BasePoll(fleet(url, ca_cert=ca)).poll()
        assert answer.base is not None and answer.etag == '"0"'
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            BasePoll(fleet(url)).poll()  # the system store does not know this CA
    finally:
        fake.close()
