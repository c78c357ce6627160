"""A minimal hawkBit DDI server for the agent's own tests (the real one is agent/controller/).

Serves one device's base resource (with ETag and ``Prefer: wait`` long-poll), deploymentBase,
cancelAction, feedback (deduplicated by Idempotency-Key, as the sync contract requires),
configData, and artifacts with Range (206). Records every request's method, path and headers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Action:
    id: str
    blob: bytes
    filename: str = "release.bundle"
    download: str = "forced"
    update: str = "forced"
    window: str | None = None
    artifact_url: str | None = None  # e.g. a CDN; default: served here
    sha256: str | None = None  # override the declared hash
    size: int | None = None  # override the declared size
    closed: str | None = None  # finished value of the closing feedback
    canceled: bool = False


@dataclass
class FakeDdi:
    tenant: str = "DEFAULT"
    controller_id: str = "dev1"
    token: str | None = None
    sleep: str = "00:00:01"
    actions: list[Action] = field(default_factory=list)
    feedback: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    duplicates: int = 0
    config_data: dict[str, Any] | None = None
    want_config: bool = False
    cancel_pending: str | None = None
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    fail_feedback: int = 0  # answer the next N feedback POSTs with 503
    public_url: str | None = None  # what links point to, e.g. a fault proxy in front
    longpoll: bool = True  # honour Prefer: wait (False: behave like stock hawkBit)
    ignore_range: bool = False  # answer Range requests with the whole body (200)
    redirects: dict[str, str] = field(default_factory=dict)  # artifact name -> Location

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self.generation = 0
        self._keys: set[str] = set()
        self.blobs: dict[str, bytes] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # --- test API --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.address[1]}"

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def changed(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def deploy(self, action: Action) -> None:
        self.blobs[action.filename] = action.blob
        self.actions.append(action)
        self.changed()

    def cancel(self, action_id: str) -> None:
        self.cancel_pending = action_id
        self.changed()

    def executions(self, action_id: str) -> list[str]:
        return [f"{b['status']['execution']}/{b['status']['result']['finished']}"
                for p, b in self.feedback if f"/{action_id}/" in p]

    def open_action(self) -> Action | None:
        return next((a for a in self.actions if a.closed is None and not a.canceled), None)

    # --- HTTP ------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append((method, path, dict(h.headers)))
        if path.startswith("/artifacts/"):
            return self._artifact(h, path.removeprefix("/artifacts/"))
        prefix = f"/{self.tenant}/controller/v1/{self.controller_id}"
        if not path.startswith(prefix):
            return _send(h, 404)
        if self.token and h.headers.get("Authorization") != f"TargetToken {self.token}":
            return _send(h, 401)
        rest = path.removeprefix(prefix)
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        if method == "GET" and rest == "":
            return self._base(h)
        if m := re.fullmatch(r"/deploymentBase/([^/]+)", rest):
            return self._deployment(h, m.group(1))
        if m := re.fullmatch(r"/cancelAction/([^/]+)", rest):
            return _send(h, 200, {"id": m.group(1), "cancelAction": {"stopId": m.group(1)}})
        if method == "POST" and rest.endswith("/feedback"):
            return self._feedback(h, rest, body)
        if method == "PUT" and rest == "/configData":
            self.config_data = body
            self.want_config = False
            self.changed()
            return _send(h, 200)
        return _send(h, 404)

    def _links(self) -> dict[str, Any]:
        base = f"{self.public_url or self.url}/{self.tenant}/controller/v1/{self.controller_id}"
        links: dict[str, Any] = {}
        if self.cancel_pending:
            links["cancelAction"] = {"href": f"{base}/cancelAction/{self.cancel_pending}"}
        elif (a := self.open_action()) is not None:
            links["deploymentBase"] = {"href": f"{base}/deploymentBase/{a.id}?c=-1"}
        if self.want_config:
            links["configData"] = {"href": f"{base}/configData"}
        return links

    def _base(self, h: BaseHTTPRequestHandler) -> None:
        wait = re.match(r"wait=(\d+)", h.headers.get("Prefer", ""))
        inm = h.headers.get("If-None-Match")
        with self.cond:
            if wait and self.longpoll and inm == f'"{self.generation}"':
                self.cond.wait_for(lambda: inm != f'"{self.generation}"', min(int(wait[1]), 10))
            etag = f'"{self.generation}"'
            doc = {"config": {"polling": {"sleep": self.sleep}}, "_links": self._links()}
        if inm == etag:
            return _send(h, 304, headers={"ETag": etag})
        _send(h, 200, doc, headers={"ETag": etag})

    def _deployment(self, h: BaseHTTPRequestHandler, aid: str) -> None:
        a = next((x for x in self.actions if x.id == aid), None)
        if a is None:
            return _send(h, 404)
        dep: dict[str, Any] = {"download": a.download, "update": a.update, "chunks": [{
            "part": "os", "version": aid, "name": "edgeops", "artifacts": [{
                "filename": a.filename,
                "hashes": {"sha256": a.sha256 or hashlib.sha256(a.blob).hexdigest()},
                "size": a.size if a.size is not None else len(a.blob),
                "_links": {"download-http": {
                    "href": a.artifact_url or f"{self.public_url or self.url}/artifacts/{a.filename}"}}}]}]}
        if a.window:
            dep["maintenanceWindow"] = a.window
        _send(h, 200, {"id": aid, "deployment": dep})

    def _feedback(self, h: BaseHTTPRequestHandler, rest: str, body: Any) -> None:
        if self.fail_feedback > 0:
            self.fail_feedback -= 1
            return _send(h, 503)
        key = h.headers.get("Idempotency-Key", "")
        if key in self._keys:
            self.duplicates += 1
            return _send(h, 200)
        self._keys.add(key)
        self.feedback.append((rest, body))
        status = body["status"]
        aid = rest.split("/")[2]
        if rest.startswith("/cancelAction/") and status["execution"] == "closed":
            self.cancel_pending = None
            for a in self.actions:
                if a.id == aid:
                    a.canceled = True
        elif rest.startswith("/cancelAction/"):
            self.cancel_pending = None
        elif status["execution"] == "closed":
            for a in self.actions:
                if a.id == aid:
                    a.closed = status["result"]["finished"]
        self.changed()
        _send(h, 200)

    def _artifact(self, h: BaseHTTPRequestHandler, name: str) -> None:
        if name in self.redirects:
            return _send(h, 302, headers={"Location": self.redirects[name]})
        blob = self.blobs.get(name)
        if blob is None:
            return _send(h, 404)
        rng = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if self.ignore_range:
            rng = None
        start = int(rng.group(1)) if rng else 0
        h.send_response(206 if rng else 200)
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
        h.send_header("Content-Length", str(len(blob) - start))
        h.send_header("ETag", '"' + hashlib.sha256(blob).hexdigest()[:16] + '"')
        h.end_headers()
        with contextlib.suppress(OSError):  # the fault proxy cut the client off
            h.wfile.write(blob[start:])


def _send(h: BaseHTTPRequestHandler, code: int, doc: Any = None,
          headers: dict[str, str] | None = None) -> None:
    data = json.dumps(doc).encode() if doc is not None else b""
    h.send_response(code)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    if data:
        h.send_header("Content-Type", "application/hal+json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if data:
        h.wfile.write(data)
