"""hawkBit DDI documents as data. Pure: bytes in, dataclasses out; dicts for request bodies.

The shapes follow Eclipse hawkBit's Direct Device Integration API v1:
  * https://eclipse.dev/hawkbit/apis/ddi_api/ (state machine mapping, feedback semantics)
  * https://eclipse.dev/hawkbit/rest-api/ddi/ (OpenAPI: DdiControllerBase, DdiDeploymentBase,
    DdiCancel, DdiActionFeedback, DdiConfigData)
  * eclipse/hawkbit DDIA.md and the "Root Controller" REST guide (example documents, stored
    under tests/fixtures/ddi/).

Every parser raises only ``DdiProtocolError`` on any input (a fuzz invariant, as h11's
parser does): a controller that sends nonsense is a transport problem, retried later, never
a crash. Every list and string is bounded so a hostile document cannot exhaust memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.errors import TransportError

MAX_DOCUMENT = 1 << 20  # bytes of JSON we are willing to parse
MAX_CHUNKS = 32
MAX_ARTIFACTS = 32
MAX_STR = 2048
MAX_DETAILS = 16
MAX_ATTRIBUTES = 64

Handling = Literal["skip", "attempt", "forced"]
Execution = Literal["closed", "proceeding", "canceled", "scheduled", "rejected", "resumed",
                    "downloaded", "download"]
Finished = Literal["success", "failure", "none"]
_HANDLING = ("skip", "attempt", "forced")
_SLEEP = re.compile(r"^(\d{1,3}):([0-5]\d):([0-5]\d)$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class DdiProtocolError(TransportError):
    """The controller sent a document this agent cannot use. Retryable: servers get fixed."""

    hint = "check the controller URL and that it speaks hawkBit DDI v1"


@dataclass(frozen=True)
class BaseResource:
    """GET /{tenant}/controller/v1/{controllerId}: what the server wants from us now."""

    sleep: float | None  # config.polling.sleep in seconds
    deployment: str | None  # _links.deploymentBase.href
    cancel: str | None  # _links.cancelAction.href
    config_data: str | None  # _links.configData.href: the server asks for attributes
    installed: str | None = None  # _links.installedBase.href


@dataclass(frozen=True)
class Artifact:
    filename: str
    size: int
    sha256: str | None
    sha1: str | None
    md5: str | None
    url: str  # "download" (https) preferred over "download-http"


@dataclass(frozen=True)
class Chunk:
    part: str
    version: str
    name: str
    artifacts: tuple[Artifact, ...]


@dataclass(frozen=True)
class Deployment:
    action_id: str
    download: Handling
    update: Handling
    maintenance_window: str | None  # "available" | "unavailable" | None (no window)
    chunks: tuple[Chunk, ...]

    @property
    def may_install_now(self) -> bool:
        """Download and install are one streamed step here (no temporary copy), so both must
        be allowed and any maintenance window open (DDI: 'unavailable' means wait)."""
        return (self.download != "skip" and self.update != "skip"
                and self.maintenance_window in (None, "available"))

    def artifacts(self) -> list[Artifact]:
        return [a for c in self.chunks for a in c.artifacts]


@dataclass(frozen=True)
class Cancel:
    action_id: str
    stop_id: str


# --- parsing -------------------------------------------------------------------------------
def _load(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_DOCUMENT:
        raise DdiProtocolError(f"{what}: document of {len(raw)} bytes exceeds {MAX_DOCUMENT}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise DdiProtocolError(f"{what}: not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise DdiProtocolError(f"{what}: expected a JSON object")
    return doc


def _obj(d: dict[str, Any], key: str, what: str, *, required: bool = False) -> dict[str, Any]:
    v = d.get(key)
    if v is None and not required:
        return {}
    if not isinstance(v, dict):
        raise DdiProtocolError(f"{what}: '{key}' must be an object")
    return v


def _str(d: dict[str, Any], key: str, what: str, *, required: bool = True,
         default: str = "") -> str:
    v = d.get(key)
    if v is None and not required:
        return default
    if isinstance(v, int) and not isinstance(v, bool):  # ids are numbers in some examples
        v = str(v)
    if not isinstance(v, str) or len(v) > MAX_STR or (required and not v):
        raise DdiProtocolError(f"{what}: '{key}' must be a string of 1..{MAX_STR} characters")
    return v


def _href(links: dict[str, Any], name: str, what: str) -> str | None:
    link = links.get(name)
    if link is None:
        return None
    if not isinstance(link, dict):
        raise DdiProtocolError(f"{what}: _links.{name} must be an object")
    href = _str(link, "href", f"{what} _links.{name}")
    if not href.startswith(("http://", "https://")):
        raise DdiProtocolError(f"{what}: _links.{name}.href is not an http(s) URL")
    return href


def parse_sleep(text: str) -> float:
    """config.polling.sleep is 'HH:MM:SS' (DDI root controller guide)."""
    m = _SLEEP.match(text)
    if m is None:
        raise DdiProtocolError(f"polling sleep {text[:40]!r} is not HH:MM:SS")
    h, mi, s = (int(g) for g in m.groups())
    return float(h * 3600 + mi * 60 + s)


def parse_base(raw: bytes) -> BaseResource:
    what = "base resource"
    doc = _load(raw, what)
    polling = _obj(_obj(doc, "config", what), "polling", what)
    sleep = polling.get("sleep")
    if sleep is not None and not isinstance(sleep, str):
        raise DdiProtocolError(f"{what}: config.polling.sleep must be a string")
    links = _obj(doc, "_links", what)
    return BaseResource(
        sleep=parse_sleep(sleep) if sleep is not None else None,
        deployment=_href(links, "deploymentBase", what),
        cancel=_href(links, "cancelAction", what),
        config_data=_href(links, "configData", what),
        installed=_href(links, "installedBase", what),
    )


def _handling(d: dict[str, Any], key: str, what: str) -> Handling:
    v = d.get(key, "forced")
    if v not in _HANDLING:
        raise DdiProtocolError(f"{what}: '{key}' must be one of {', '.join(_HANDLING)}")
    return v  # type: ignore[no-any-return]


def _artifact(a: Any, what: str) -> Artifact:
    if not isinstance(a, dict):
        raise DdiProtocolError(f"{what}: an artifact must be an object")
    size = a.get("size")
    if type(size) is not int or size < 0 or size > 1 << 44:
        raise DdiProtocolError(f"{what}: artifact size must be a non-negative integer")
    hashes = _obj(a, "hashes", what)
    sha256 = hashes.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _HEX64.match(sha256)):
        raise DdiProtocolError(f"{what}: hashes.sha256 must be 64 hex digits")
    links = _obj(a, "_links", what)
    url = _href(links, "download", what) or _href(links, "download-http", what)
    if url is None:
        raise DdiProtocolError(f"{what}: artifact has no download link")
    return Artifact(
        filename=_str(a, "filename", what), size=size,
        sha256=sha256.lower() if sha256 else None,
        sha1=_opt_str(hashes, "sha1", what), md5=_opt_str(hashes, "md5", what), url=url)


def _opt_str(d: dict[str, Any], key: str, what: str) -> str | None:
    v = _str(d, key, what, required=False)
    return v or None


def _chunk(c: Any, what: str) -> Chunk:
    if not isinstance(c, dict):
        raise DdiProtocolError(f"{what}: a chunk must be an object")
    arts = c.get("artifacts", [])
    if not isinstance(arts, list) or len(arts) > MAX_ARTIFACTS:
        raise DdiProtocolError(f"{what}: artifacts must be a list of at most {MAX_ARTIFACTS}")
    return Chunk(part=_str(c, "part", what, required=False),
                 version=_str(c, "version", what, required=False),
                 name=_str(c, "name", what, required=False),
                 artifacts=tuple(_artifact(a, what) for a in arts))


def parse_deployment(raw: bytes) -> Deployment:
    what = "deploymentBase"
    doc = _load(raw, what)
    dep = _obj(doc, "deployment", what, required=True)
    chunks = dep.get("chunks", [])
    if not isinstance(chunks, list) or len(chunks) > MAX_CHUNKS:
        raise DdiProtocolError(f"{what}: chunks must be a list of at most {MAX_CHUNKS}")
    window = dep.get("maintenanceWindow")
    if window not in (None, "available", "unavailable"):
        raise DdiProtocolError(f"{what}: maintenanceWindow must be available or unavailable")
    return Deployment(action_id=_str(doc, "id", what),
                      download=_handling(dep, "download", what),
                      update=_handling(dep, "update", what),
                      maintenance_window=window,
                      chunks=tuple(_chunk(c, what) for c in chunks))


def parse_cancel(raw: bytes) -> Cancel:
    what = "cancelAction"
    doc = _load(raw, what)
    body = _obj(doc, "cancelAction", what, required=True)
    return Cancel(action_id=_str(doc, "id", what), stop_id=_str(body, "stopId", what))


def action_id_from_href(href: str) -> str:
    """deploymentBase/{id}?c=... and cancelAction/{id}: the id without fetching the resource."""
    m = re.search(r"/(?:deploymentBase|cancelAction)/([^/?#]{1,64})", href)
    if m is None:
        raise DdiProtocolError("action link has no action id")
    return m.group(1)


# --- request bodies ------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    cnt: int
    of: int


@dataclass(frozen=True)
class Feedback:
    """DdiActionFeedback. ``time`` is when the event happened on the device, not when the
    report finally got through (reports may wait offline in the outbox)."""

    execution: Execution
    finished: Finished = "none"
    details: tuple[str, ...] = ()
    progress: Progress | None = None
    time: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        result: dict[str, Any] = {"finished": self.finished}
        if self.progress is not None:
            result["progress"] = {"cnt": self.progress.cnt, "of": self.progress.of}
        status: dict[str, Any] = {"execution": self.execution, "result": result}
        if self.details:
            status["details"] = [d[:MAX_STR] for d in self.details[:MAX_DETAILS]]
        out: dict[str, Any] = {"status": status, **self.extra}
        if self.time is not None:
            out["time"] = self.time
        return out


def ddi_time(now: float) -> str:
    """The compact form used in the DDI examples ("20140511T121314"), UTC."""
    import time as _time

    return _time.strftime("%Y%m%dT%H%M%S", _time.gmtime(now))


def config_data_body(attributes: dict[str, str], mode: str = "merge") -> dict[str, Any]:
    """PUT .../configData (DdiConfigData): {"mode": "merge", "data": {...}}."""
    if mode not in ("merge", "replace", "remove"):
        raise ValueError(f"configData mode {mode!r}")
    if len(attributes) > MAX_ATTRIBUTES:
        raise ValueError(f"at most {MAX_ATTRIBUTES} attributes")
    data = {str(k)[:128]: str(v)[:MAX_STR] for k, v in attributes.items()}
    return {"mode": mode, "data": data}
