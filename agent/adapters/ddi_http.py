"""The device side of Eclipse hawkBit's DDI API v1 as HTTP requests: GET documents, send reports.

Protocol references (cited where each shape is used):
  * https://eclipse.dev/hawkbit/apis/ddi_api/ — base poll resource, deploymentBase,
    cancelAction, feedback execution/result mapping, configData, authentication
    (``Authorization: TargetToken <token>`` / ``GatewayToken <token>``, or client certificates).
  * https://eclipse.dev/hawkbit/rest-api/ddi/ — the OpenAPI of the same resources.

Bytes only: the documents are parsed by ``agent.core.ddi``, what to do with them is decided by
``agent.device.fleet.FleetAgent``. The interface is deliberately small so another transport (a
standard-library poller for an idle agent, say) can stand in for it:

  ``cfg``                        the ``FleetConfig`` it talks with
  ``poll(etag=, wait=)``         the base resource (``PollAnswer``; ``base`` None on 304)
  ``deployment(href)``, ``cancel(href)``   the documents the base resource links to
  ``send(report)``               deliver one outbox ``Report`` (raises ``Rejected`` / ``TransportError``)
  ``post_json(path, body)``      an edgeops exchange (attestation): ``(status, JSON object)``
  ``open_artifact(artifact)``    a ``ResumableStream`` the updater reads the bundle from
  ``session``                    the requests session, for ``FleetIdentity.attach`` (mTLS)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from agent.adapters.download import Origin, ResumableStream, new_session, open_url
from agent.adapters.tls import http_failure, transport_failure
from agent.core import ddi
from agent.core.fleet_config import FleetConfig
from agent.core.outbox import Rejected, Report, retry_after
from agent.errors import ConfigError, Throttled, TransportError


@dataclass(frozen=True)
class PollAnswer:
    base: ddi.BaseResource | None  # None: 304 Not Modified (nothing new)
    etag: str | None


class DdiClient:
    """HTTP to one controller for one device; credentials go only to the controller's origin."""

    def __init__(self, cfg: FleetConfig, session: requests.Session | None = None) -> None:
        if cfg.auth != "none" and not cfg.token:
            # a FleetConfig parsed from a table whose token_file nobody read (fleet_files does)
            raise ConfigError(f"[fleet] auth = {cfg.auth!r} needs its token; "
                              f"token_file {cfg.token_file} was not read")
        self.cfg = cfg
        self.session = session or new_session()
        headers = {"Accept": "application/hal+json, application/json"}
        if cfg.auth == "target":
            headers["Authorization"] = f"TargetToken {cfg.token}"
        elif cfg.auth == "gateway":
            headers["Authorization"] = f"GatewayToken {cfg.token}"
        cert = ((str(cfg.client_cert), str(cfg.client_key or cfg.client_cert))
                if cfg.client_cert else None)
        self.origin = Origin(cfg.url, headers, cert, str(cfg.ca_cert) if cfg.ca_cert else True)
        self.timeout = (cfg.download.connect_timeout, cfg.download.read_timeout)

    def url(self, path: str = "") -> str:
        return f"{self.cfg.base_url}/{path}" if path else self.cfg.base_url

    def _get_json(self, url: str, headers: dict[str, str] | None = None,
                  timeout: tuple[float, float] | None = None) -> tuple[int, bytes, dict[str, str]]:
        try:
            code, body, hdrs = _answer(open_url(self.session, self.origin, url, headers or {},
                                                timeout or self.timeout))
        except (requests.RequestException, OSError) as exc:
            # says so when the controller refused our certificate at the handshake
            raise transport_failure(f"GET {redact(url)}", exc) from None
        _throttled(f"GET {redact(url)}", code, hdrs)
        if code >= 400:
            raise http_failure(f"GET {redact(url)}", code, body)  # names an mTLS refusal
        return code, body, hdrs

    def poll(self, *, etag: str | None = None, wait: float = 0) -> PollAnswer:
        """GET the base resource. ``wait`` > 0 asks a long-poll capable controller to hold the
        request (RFC 7240 ``Prefer: wait``) until something changes; see agent.device.push."""
        headers = {}
        if etag:
            headers["If-None-Match"] = etag  # the base resource supports ETags (DDI guide)
        if wait > 0:
            headers["Prefer"] = f"wait={int(wait)}"
        timeout = (self.timeout[0], self.timeout[1] + wait)
        code, body, hdrs = self._get_json(self.url(), headers, timeout)
        new_etag = hdrs.get("ETag") or hdrs.get("Etag")
        if code == 304:
            return PollAnswer(None, etag)
        return PollAnswer(ddi.parse_base(body), new_etag)

    def deployment(self, href: str) -> ddi.Deployment:
        return ddi.parse_deployment(self._get_json(href)[1])

    def cancel(self, href: str) -> ddi.Cancel:
        return ddi.parse_cancel(self._get_json(href)[1])

    def send(self, report: Report) -> None:
        """Deliver one queued report (Sync's Send). 2xx = delivered."""
        url = self.url(report.path)
        kw = self.origin.request_kwargs(url)
        headers = {**kw["headers"], "Idempotency-Key": report.key}
        try:
            resp = self.session.request(report.method, url, json=report.body, headers=headers,
                                        cert=kw["cert"], verify=kw["verify"],
                                        timeout=self.timeout, allow_redirects=False)
            resp.close()
        except (requests.RequestException, OSError) as exc:
            raise transport_failure(f"{report.method} {report.path}", exc) from None
        code = resp.status_code
        if 200 <= code < 300:
            return
        _throttled(f"{report.method} {report.path}", code, dict(resp.headers))
        if code in (409, 410) and report.path.endswith("/feedback"):
            return  # the action is already closed on the server: nothing left to tell it
        if 400 <= code < 500 and code not in (401, 403, 408, 429):
            raise Rejected(f"{report.method} {report.path} answered HTTP {code}")
        raise TransportError(f"{report.method} {report.path} answered HTTP {code}")

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST a JSON object under the device's DDI base; the answer's status and JSON object
        (``{}`` if it is not one). 2xx and 4xx other than auth, 408 and 429 come back; the rest
        raise ``TransportError`` (``Throttled`` for 429)."""
        url = self.url(path)
        kw = self.origin.request_kwargs(url)
        try:
            code, data, hdrs = _answer(self.session.post(
                url, json=body, headers=kw["headers"], cert=kw["cert"], verify=kw["verify"],
                timeout=self.timeout, allow_redirects=False, stream=True))
        except (requests.RequestException, OSError) as exc:
            raise transport_failure(f"POST {path}", exc) from None
        _throttled(f"POST {path}", code, hdrs)
        if code >= 500 or code in (401, 403, 408):
            raise http_failure(f"POST {path}", code, data)
        try:
            doc = json.loads(data[:ddi.MAX_DOCUMENT])
        except ValueError:
            doc = None
        return code, doc if isinstance(doc, dict) else {}

    def open_artifact(self, artifact: ddi.Artifact, *, sleep: Callable[[float], None] = time.sleep,
                      cancelled: Callable[[], bool] | None = None) -> ResumableStream:
        return ResumableStream(self.session, self.origin, artifact.url, size=artifact.size,
                               sha256=artifact.sha256, policy=self.cfg.download, sleep=sleep,
                               cancelled=cancelled)


def _answer(resp: requests.Response) -> tuple[int, bytes, dict[str, str]]:
    """A streamed response's status, body (at most one document and a byte: the parser refuses
    more) and headers; the connection goes back to the pool."""
    with resp:
        body = resp.raw.read(ddi.MAX_DOCUMENT + 1, decode_content=True) or b""
        return resp.status_code, body, dict(resp.headers)


def _throttled(what: str, code: int, headers: dict[str, str]) -> None:
    """429, or 503 with a Retry-After: ``Throttled``, so the caller waits as long as it was told."""
    delay = retry_after(next((v for k, v in headers.items() if k.lower() == "retry-after"), None))
    if code == 429 or (code == 503 and delay is not None):
        raise Throttled(f"{what} answered HTTP {code} (retry after {delay or 0:g} s)",
                        retry_after=delay or 0.0)


def redact(url: str) -> str:
    """The URL without its query string: signed artifact URLs carry their secrets there."""
    return url.split("?", 1)[0]


__all__ = ["DdiClient", "PollAnswer", "redact"]
