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


@cache
def _messages() -> tuple[Any, Any]:
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError:
        raise ConfigError("remote write needs protobuf", hint="pip install 'edgeops[telemetry]'") from None
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
    pool = descriptor_pool.DescriptorPool()  # our own: never clashes with another prompb
    pool.Add(fdp)
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
    """One POST with the standard library's http.client (urllib.request would add a
    megabyte to the agent's memory for nothing we use)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.scheme == "https":
        import ssl

        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            u.hostname or "", u.port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=timeout)
    try:
        conn.request("POST", (u.path or "/") + (f"?{u.query}" if u.query else ""), body,
                     {**headers, "Content-Length": str(len(body))})
        r = conn.getresponse()
        detail = r.read(1 << 16)
        if 200 <= r.status < 300:
            return Answer(r.status)
        return Answer(r.status, r.getheader("Retry-After"), detail[:512].decode("utf-8", "replace").strip())
    except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, reset, timed out
        return Answer(None, None, str(exc) or type(exc).__name__)
    finally:
        conn.close()


class RemoteWrite:
    """The sender: ``send(series)`` POSTs one WriteRequest to ``url``."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.url, self.timeout = url, timeout
        self.headers = dict(HEADERS)
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def send_body(self, body: bytes) -> Answer:
        return post(self.url, body, self.headers, timeout=self.timeout)
