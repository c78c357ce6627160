"""TLS for requests: one SSLContext per origin, and HTTP/TLS failures mapped to edgeops errors.

Two jobs that every HTTPS caller on the device needs and that belong to neither the fleet client
nor the identity: ``mount_context`` is how an in-memory client key (the device identity's
``client_context``) reaches requests, which otherwise takes key *files* only; ``http_failure`` and
``transport_failure`` turn a refused request into a ``TransportError`` that says why, and into
``CertificateRefused`` when the controller refused the device's certificate, so the fleet agent
knows to renew instead of merely backing off.
"""

from __future__ import annotations

import json
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from agent.errors import CertificateRefused, TransportError

_ALERT = re.compile(r"alert ([a-z ]+?)\s*(?:\(|$|'|\"|\))", re.IGNORECASE)
# The error names an edgeops controller answers with when it refuses a device's certificate.
_REFUSALS = ("CertificateExpired", "CertificateRequired", "DeviceRevoked", "WrongDevice",
             "EnrolmentMismatch", "IdentityError")


def tls_alert(exc: BaseException) -> str | None:
    """The TLS alert an exception reports (e.g. 'certificate expired'), if any."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # requests wraps urllib3 wraps ssl
        seen.add(id(e))
        m = _ALERT.search(str(e))
        if m:
            return m.group(1).strip().lower()
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                m = _ALERT.search(str(arg))
                if m:
                    return m.group(1).strip().lower()
        e = e.__cause__ or e.__context__
    return None


def http_failure(what: str, code: int, body: bytes) -> TransportError:
    """A clear TransportError for an HTTP error answer; ``CertificateRefused`` when an edgeops
    controller refused the device's certificate (its JSON error names the reason)."""
    error = message = ""
    if code in (401, 403):
        try:
            doc = json.loads(body[:4096])
            error, message = str(doc.get("error", "")), str(doc.get("message", ""))
        except (ValueError, AttributeError):
            pass
    if error in _REFUSALS:
        return CertificateRefused(f"{what} answered HTTP {code}: {error}: {message}")
    return TransportError(f"{what} answered HTTP {code}" + (f": {error}" if error else ""))


def transport_failure(what: str, exc: BaseException) -> TransportError:
    """A clear TransportError for a failed request: says so when the controller refused our
    certificate at the TLS handshake (alerts: certificate expired, certificate revoked, ...)."""
    alert = tls_alert(exc)
    if alert is not None and ("certificate" in alert or alert in ("unknown ca", "bad certificate")):
        return CertificateRefused(f"{what} failed: the controller refused this device's certificate "
                                  f"(TLS alert: {alert})")
    detail = f" (TLS alert: {alert})" if alert else ""
    return TransportError(f"{what} failed: {type(exc).__name__}{detail}")


class ContextAdapter(HTTPAdapter):
    """A requests adapter whose connections use one SSLContext: how the in-memory identity key
    (``client_context``) reaches requests, which otherwise takes key *files* only."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, ssl_context=self.ctx, **pool_kwargs)


def mount_context(session: requests.Session, url: str, ctx: ssl.SSLContext) -> None:
    """Use ``ctx`` for every request to ``url``'s origin, closing the previous adapter's pooled
    connections so no request keeps using an older certificate."""
    parts = urlsplit(url)
    prefix = f"{parts.scheme}://{parts.netloc}/"
    old = session.adapters.get(prefix)
    session.mount(prefix, ContextAdapter(ctx))
    if old is not None:
        old.close()


__all__ = ["ContextAdapter", "http_failure", "mount_context", "tls_alert", "transport_failure"]
