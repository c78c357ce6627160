"""OTLP/HTTP traces: spans into an ExportTraceServiceRequest (protobuf, gzip), and one POST.

Follows the OTLP specification (https://opentelemetry.io/docs/specs/otlp/#otlphttp):
``POST {endpoint}/v1/traces`` with ``Content-Type: application/x-protobuf`` and
``Content-Encoding: gzip``; a 2xx is a full or partial success, 429/502/503/504 are retryable
(honouring ``Retry-After``), other 4xx are not. The messages are the official
``opentelemetry-proto`` ones (the [telemetry] extra). No policy here.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from typing import Any

from agent.adapters.remote_write import Answer, post
from agent.core.telemetry_policy import Span
from agent.errors import ConfigError, EdgeopsError

MAX_BODY = 4 << 20  # decompressed bytes of one export a relay of ours accepts
HEADERS = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip",
           "User-Agent": "edgeops-telemetry"}


class BadExport(EdgeopsError):
    """An OTLP body that does not decode."""


def _pb() -> Any:
    try:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    except ImportError:
        raise ConfigError("OTLP export needs opentelemetry-proto",
                          hint="pip install 'edgeops[telemetry]'") from None
    return trace_service_pb2


def encode(spans: Sequence[Span], resource: dict[str, str]) -> bytes:
    """One gzip-compressed ExportTraceServiceRequest holding ``spans``."""
    pb = _pb()
    req = pb.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for k, v in sorted(resource.items()):
        rs.resource.attributes.add(key=k).value.string_value = v
    ss = rs.scope_spans.add()
    ss.scope.name = "edgeops.update"
    for s in spans:
        out = ss.spans.add(trace_id=bytes.fromhex(s.trace_id), span_id=bytes.fromhex(s.span_id),
                           name=s.name, start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns,
                           kind=1)  # SPAN_KIND_INTERNAL
        if s.parent_id:
            out.parent_span_id = bytes.fromhex(s.parent_id)
        for k, v in sorted(s.attrs.items()):
            out.attributes.add(key=k).value.string_value = v
        out.status.code = 1 if s.ok else 2  # STATUS_CODE_OK / STATUS_CODE_ERROR
    return gzip.compress(req.SerializeToString(), mtime=0)


def decode(body: bytes, *, gzipped: bool = True, limit: int = MAX_BODY) -> Any:
    """An ExportTraceServiceRequest from a body; refuses one that inflates past ``limit``."""
    raw = body
    if gzipped:
        d = zlib.decompressobj(wbits=31)
        try:
            raw = d.decompress(body, limit + 1)
        except zlib.error as exc:
            raise BadExport(f"not gzip: {exc}") from None
        if len(raw) > limit:
            raise BadExport(f"an export larger than {limit} bytes")
    req = _pb().ExportTraceServiceRequest()
    try:
        req.ParseFromString(raw)
    except Exception as exc:  # google.protobuf.message.DecodeError
        raise BadExport(f"not an ExportTraceServiceRequest: {exc}") from None
    return req


class OtlpTraces:
    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1/traces") else "/v1/traces")
        self.timeout = timeout
        self.headers = dict(HEADERS)
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def send_body(self, body: bytes) -> Answer:
        return post(self.url, body, self.headers, timeout=self.timeout)
