"""The ``[fleet]`` section parsed into frozen dataclasses: the controller, credentials, pacing, downloads.

Pure: a TOML table in, ``FleetConfig`` out. The one thing the section names that is not in it,
``token_file``, is read by the caller (``agent.device.fleet_files``: file I/O stays out of the
core) and handed to ``FleetConfig.with_token``; until then ``token`` is empty and ``token_file``
says where it is. Likewise ``controller_id_file`` (the device's id read from the hardware, e.g.
the board's serial in ``/sys/class/dmi/id/product_serial``, so one image serves every device):
``FleetConfig.with_controller_id`` checks what was read; until then ``controller_id`` is empty.
Paths are relative to the directory of the file the table came from.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

MAX_CONFIG_ATTRIBUTES = 16  # [fleet] attributes; with ours and the model reports' within ddi's 64
AUTH_KINDS = ("none", "target", "gateway")  # no credential, TargetToken, GatewayToken
PUSH_KINDS = ("longpoll", "none")


MAX_CONTROLLER_ID = 64  # characters; hawkBit's controllerId is at most 256, a serial far less
CONTROLLER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")  # one URL path segment, no escaping


DEFAULT_MIN_RATE = 1024.0  # bytes/s: 3.6 MB an hour; a 1 byte/s trickle is given up within a window
DEFAULT_STALL_TIMEOUT = 120.0  # seconds without one byte, across reconnects


@dataclass(frozen=True)
class DownloadPolicy:
    """How an artifact download paces itself and when it gives up (agent.adapters.download).

    Every download gives up on a trickle (below ``min_rate`` over ``min_rate_window``) and
    on a stall (no byte for ``stall_timeout``, however often it reconnects), so a slow or
    hostile server cannot hold the device's install lock. ``min_rate = 0`` switches off only
    the first (a known-slow satellite link); the stall timeout always holds."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # a stall this long drops the connection, then we resume
    max_resumes: int = 8
    bandwidth: float | None = None  # bytes/s cap; None = unlimited
    min_rate: float = DEFAULT_MIN_RATE  # bytes/s; 0 disables trickle detection
    min_rate_window: float = 60.0
    read_size: int = 64 * 1024
    tail: int = 256 * 1024  # the last bytes, buffered until the sha256 is checked
    backoff: float = 0.2  # first resume delay, doubled per resume, capped at 5 s
    stall_timeout: float = DEFAULT_STALL_TIMEOUT

    def __post_init__(self) -> None:
        if not 0 < self.stall_timeout <= 86400 or not self.min_rate_window > 0 or self.min_rate < 0:
            raise ValueError("stall_timeout and min_rate_window must be positive, min_rate not negative")
        if self.bandwidth is not None and self.bandwidth < self.min_rate:
            if self.min_rate != DEFAULT_MIN_RATE:
                raise ValueError("bandwidth cap is below the minimum rate: every download would abort")
            # a cap set below the default minimum (a metered link): the default follows it
            object.__setattr__(self, "min_rate", self.bandwidth / 2)


@dataclass(frozen=True)
class FleetConfig:
    url: str  # controller origin, e.g. https://ddi.example.com
    controller_id: str
    tenant: str = "DEFAULT"
    auth: str = "none"  # none | target | gateway
    token: str = field(default="", repr=False)  # never printed, never logged
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_cert: Path | None = None
    identity: bool = False  # mTLS with the device identity (TPM-sealed key), renewed by the agent
    # Quote the measurements to the controller (agent.device.attestation) every this many
    # seconds and at the agent's first poll; 0: never. Only where the device has a root of trust.
    attest_interval: float = 21600.0
    poll_interval: float = 300.0  # used when the server gives no config.polling.sleep
    min_sleep: float = 1.0
    max_sleep: float = 86400.0
    push: str = "longpoll"  # longpoll | none
    longpoll_wait: float = 60.0
    max_attempts: int = 5
    download: DownloadPolicy = field(default_factory=DownloadPolicy)
    attributes: dict[str, str] = field(default_factory=dict)
    token_file: Path | None = None  # where the token is, when it is not in the table itself
    controller_id_file: Path | None = None  # where the id is (hardware serial), when not in the table

    @property
    def base_url(self) -> str:
        return f"{self.url.rstrip('/')}/{self.tenant}/controller/v1/{self.controller_id}"

    def with_token(self, text: str, where: str = "[fleet]") -> FleetConfig:
        """This configuration with the token read from ``token_file`` (surrounding whitespace
        dropped); an empty token is refused when ``auth`` needs one."""
        token = text.strip()
        if self.auth != "none" and not token:
            raise ConfigError(f"{where}: auth = {self.auth!r} needs token or token_file")
        return dataclasses.replace(self, token=token)

    def with_controller_id(self, text: str, where: str = "[fleet]") -> FleetConfig:
        """This configuration with the controller id read from ``controller_id_file`` (surrounding
        whitespace and NULs dropped, as sysfs and device-tree files end). Refused unless it is
        one URL path segment of at most MAX_CONTROLLER_ID characters: a serial the firmware
        left empty or unset ("To Be Filled By O.E.M.") must not become a shared identity."""
        cid = text.strip().strip("\0").strip()
        if not CONTROLLER_ID.fullmatch(cid) or len(cid) > MAX_CONTROLLER_ID:
            raise ConfigError(f"{where}: controller_id_file {self.controller_id_file} holds "
                              f"{cid[:40]!r}, not a device id (letters, digits, . _ : -; at most "
                              f"{MAX_CONTROLLER_ID}); set the board's serial or controller_id")
        return dataclasses.replace(self, controller_id=cid)


def parse_fleet(table: dict[str, Any], base: Path, where: str = "[fleet]") -> FleetConfig:
    """``[fleet]`` as a ``FleetConfig``; ``base`` is the directory relative paths start from."""
    def path(key: str) -> Path | None:
        v = table.get(key)
        return base / str(v) if v else None

    try:
        url = str(table["url"])
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: url must be http(s)://host[:port]")
        auth = str(table.get("auth", "none"))
        if auth not in AUTH_KINDS:
            raise ConfigError(f"{where}: auth must be none, target or gateway")
        token = str(table.get("token", ""))
        token_file = path("token_file")
        id_file = path("controller_id_file")
        if ("controller_id" in table) == (id_file is not None):
            raise ConfigError(f"{where}: give exactly one of controller_id and controller_id_file")
        if auth != "none" and not token and token_file is None:
            raise ConfigError(f"{where}: auth = {auth!r} needs token or token_file")
        push = str(table.get("push", "longpoll"))
        if push not in PUSH_KINDS:
            raise ConfigError(f"{where}: push must be longpoll or none")
        identity = table.get("identity", False)
        if not isinstance(identity, bool):
            raise ConfigError(f"{where}: identity must be true or false")
        if identity and (not table.get("ca_cert") or table.get("client_cert")):
            raise ConfigError(f"{where}: identity = true needs ca_cert and no client_cert/client_key "
                              "(the key is the device's sealed identity key; docs/tpm.md)")
        attest = table.get("attest_interval", 21600)
        if isinstance(attest, bool) or not isinstance(attest, (int, float)) or \
                not (attest == 0 or 60 <= attest <= 30 * 86400):
            raise ConfigError(f"{where}: attest_interval must be 0 (never) or 60 to 2592000 seconds")
        return FleetConfig(
            url=url, controller_id="" if id_file is not None else str(table["controller_id"]),
            tenant=str(table.get("tenant", "DEFAULT")), auth=auth,
            token="" if token_file is not None else token,
            client_cert=path("client_cert"), client_key=path("client_key"),
            ca_cert=path("ca_cert"), identity=identity, attest_interval=float(attest),
            poll_interval=float(table.get("poll_interval", 300)),
            min_sleep=float(table.get("min_sleep", 1)),
            max_sleep=float(table.get("max_sleep", 86400)),
            push=push, longpoll_wait=float(table.get("longpoll_wait", 60)),
            max_attempts=int(table.get("max_attempts", 5)), download=_download(table),
            attributes=_attributes(table, where), token_file=token_file,
            controller_id_file=id_file)
    except KeyError as exc:
        raise ConfigError(f"{where}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _download(table: dict[str, Any]) -> DownloadPolicy:
    return DownloadPolicy(
        connect_timeout=float(table.get("connect_timeout", 10)),
        read_timeout=float(table.get("read_timeout", 30)),
        max_resumes=int(table.get("max_resumes", 8)),
        bandwidth=float(table["bandwidth"]) if table.get("bandwidth") else None,
        min_rate=float(table.get("min_rate", DEFAULT_MIN_RATE)),
        min_rate_window=float(table.get("min_rate_window", 60)),
        stall_timeout=float(table.get("stall_timeout", DEFAULT_STALL_TIMEOUT)))


def _attributes(table: dict[str, Any], where: str) -> dict[str, str]:
    attrs = table.get("attributes", {})
    if not isinstance(attrs, dict):
        raise ConfigError(f"{where}: attributes must be a table")
    if len(attrs) > MAX_CONFIG_ATTRIBUTES:
        raise ConfigError(f"{where}: at most {MAX_CONFIG_ATTRIBUTES} attributes")
    return {str(k): str(v) for k, v in attrs.items()}


__all__ = ["AUTH_KINDS", "CONTROLLER_ID", "DEFAULT_MIN_RATE", "DEFAULT_STALL_TIMEOUT",
           "MAX_CONFIG_ATTRIBUTES", "MAX_CONTROLLER_ID",
           "PUSH_KINDS", "DownloadPolicy", "FleetConfig", "parse_fleet"]
