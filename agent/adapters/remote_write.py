"""Prometheus remote write 1.0: WriteRequest bytes (protobuf, snappy) both ways, and one POST.

The messages are those of the spec (https://prometheus.io/docs/specs/remote_write_spec/,
"Protocol"), from prometheus/prompb/types.proto and remote.proto:

    message WriteRequest { repeated TimeSeries timeseries = 1; reserved 2;
                           repeated MetricMetadata metadata = 3; }
    message TimeSeries { repeated Label labels = 1; repeated Sample samples = 2; ... }
    message Label  { string name = 1; string value = 2; }
    message Sample { double value = 1; int64 timestamp = 2; }  // ms since the epoch

No official Python package ships them, so the descriptor is assembled here with the
protobuf library (fields we never send — metadata, exemplars, histograms — are left out; a
decoder keeps them as unknown fields). The body is snappy's *block* format (not framed), as
the spec requires, through cramjam. Headers: ``Content-Encoding: snappy``, ``Content-Type:
application/x-protobuf``, ``X-Prometheus-Remote-Write-Version: 0.1.0``. Labels are sorted by
name and samples of a series in timestamp order (the spec's MUSTs). Needs the [telemetry]
extra; no policy here (agent.core.telemetry_policy decides what to do with an answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from agent.errors import ConfigError, EdgeopsError

Labels = tuple[tuple[str, str], ...]
Series = tuple[Labels, Sequence[tuple[int, float]]]  # labels, [(ts_ms, value)]
MAX_BODY = 8 << 20  # decompressed bytes of one WriteRequest a receiver of ours accepts
HEADERS = {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
           "X-Prometheus-Remote-Write-Version": "0.1.0", "User-Agent": "edgeops-telemetry"}


class BadWrite(EdgeopsError):
    """A remote-write body that does not decode (wrong compression, not a WriteRequest)."""


def file_descriptor() -> Any:
    """The prompb messages above as a FileDescriptorProto, assembled with the protobuf library
    (``FILE_DESCRIPTOR`` is its serialization, so the agent need not load descriptor_pb2;
    tests/test_telemetry_policy.py checks the two agree)."""
    from google.protobuf import descriptor_pb2

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="edgeops/prompb.proto", package="prometheus",
                                             syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("Label", ("name", 1, F.TYPE_STRING, opt, ""), ("value", 2, F.TYPE_STRING, opt, ""))
    message("Sample", ("value", 1, F.TYPE_DOUBLE, opt, ""), ("timestamp", 2, F.TYPE_INT64, opt, ""))
    message("TimeSeries", ("labels", 1, F.TYPE_MESSAGE, rep, ".prometheus.Label"),
            ("samples", 2, F.TYPE_MESSAGE, rep, ".prometheus.Sample"))
    message("WriteRequest", ("timeseries", 1, F.TYPE_MESSAGE, rep, ".prometheus.TimeSeries"))
    return fdp


FILE_DESCRIPTOR = bytes.fromhex(
    "0a14656467656f70732f70726f6d70622e70726f746f120a70726f6d65746865757322240a054c6162656c120c"
    "0a046e616d65180120012809120d0a0576616c7565180220012809222a0a0653616d706c65120d0a0576616c75"
    "6518012001280112110a0974696d657374616d7018022001280322540a0a54696d6553657269657312210a066c"
    "6162656c7318012003280b32112e70726f6d6574686575732e4c6162656c12230a0773616d706c657318022003"
    "280b32122e70726f6d6574686575732e53616d706c65223a0a0c577269746552657175657374122a0a0a74696d"
    "6573657269657318012003280b32162e70726f6d6574686575732e54696d65536572696573620670726f746f33")


@cache
def _messages() -> tuple[Any, Any]:
    try:
        from google.protobuf import descriptor_pool, message_factory
    except ImportError:
        raise ConfigError("remote write needs protobuf", hint="pip install 'edgeops[telemetry]'") from None
    pool = descriptor_pool.DescriptorPool()  # our own: never clashes with another prompb
    pool.AddSerializedFile(FILE_DESCRIPTOR)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("prometheus.WriteRequest")),
            get(pool.FindMessageTypeByName("prometheus.TimeSeries")))


def _snappy() -> Any:
    try:
        import cramjam
    except ImportError:
        raise ConfigError("remote write needs snappy (cramjam)",
                          hint="pip install 'edgeops[telemetry]'") from None
    return cramjam.snappy


def encode(series: Sequence[Series]) -> bytes:
    """A snappy-compressed WriteRequest: labels sorted, samples in timestamp order."""
    WriteRequest, _ = _messages()
    req = WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for name, value in sorted(labels):
            ts.labels.add(name=name, value=value)
        for t, v in sorted(samples):
            ts.samples.add(value=v, timestamp=t)
    return bytes(_snappy().compress_raw(req.SerializeToString()))


def _uvarint(data: bytes) -> int:
    n = shift = 0
    for i, b in enumerate(data[:10]):
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n
        shift += 7
        if i == 9:
            break
    raise BadWrite("not a snappy block: no length preamble")


def decode(body: bytes, *, limit: int = MAX_BODY) -> list[Series]:
    """The series of a remote-write body; refuses one that would inflate past ``limit``."""
    if _uvarint(body) > limit:  # snappy's block preamble: the decompressed length, first
        raise BadWrite(f"a WriteRequest larger than {limit} bytes")
    try:
        raw = bytes(_snappy().decompress_raw(body))
    except Exception as exc:  # cramjam raises its own DecompressionError
        raise BadWrite(f"not a snappy block: {exc}") from None
    WriteRequest, _ = _messages()
    req = WriteRequest()
    try:
        req.ParseFromString(raw)
    except Exception as exc:  # google.protobuf.message.DecodeError
        raise BadWrite(f"not a WriteRequest: {exc}") from None
    return [(tuple((lb.name, lb.value) for lb in ts.labels),
             [(s.timestamp, s.value) for s in ts.samples]) for ts in req.timeseries]


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (refused, reset, timed out)
    retry_after: str | None = None
    detail: str = ""


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float = 30.0) -> Answer:
    """One HTTP/1.1 POST on a socket of its own (``Connection: close``). The standard library's
    http.client would add nearly 2 MiB to the agent for a status line and one header."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host = u.hostname or ""
    port = u.port or (443 if u.scheme == "https" else 80)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    head = [f"POST {path} HTTP/1.1", f"Host: {u.netloc.rsplit('@', 1)[-1]}",
            f"Content-Length: {len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items())]
    try:
        # an ASCII name as bytes (getaddrinfo takes them): a str is IDNA-encoded first, which
        # loads unicodedata; typeshed only knows str
        addr: Any = (host.encode() if host.isascii() else host, port)
        sock = socket.create_connection(addr, timeout=timeout)
        if u.scheme == "https":
            import ssl

            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        with sock, sock.makefile("rb") as f:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            parts = f.readline(1024).split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                return Answer(None, None, "no HTTP answer")
            status = int(parts[1])
            fields: dict[str, str] = {}
            for _ in range(100):
                line = f.readline(8192)
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                fields[k.strip().lower()] = v.strip()
            if 200 <= status < 300:
                return Answer(status)
            detail = f.read(512).decode("utf-8", "replace").strip()
            return Answer(status, fields.get("retry-after"), detail)
    except (OSError, ValueError) as exc:  # refused, reset, timed out, a bad certificate
        return Answer(None, None, str(exc) or type(exc).__name__)


class RemoteWrite:
    """The sender: ``send(series)`` POSTs one WriteRequest to ``url``."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.url, self.timeout = url, timeout
        self.headers = dict(HEADERS)
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def send_body(self, body: bytes) -> Answer:
        return post(self.url, body, self.headers, timeout=self.timeout)
