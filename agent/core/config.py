"""Agent configuration: ``agent.toml`` text in, frozen dataclasses out. Only ``load`` reads (the file).

Paths in the file are relative to the file's own directory, so a device
folder (the sim board's, or an image staging tree) can be moved as a whole.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core.console_policy import ConsoleSettings, parse_console
from agent.core.fixups import Fixup, parse_fixups
from agent.core.fleet_config import FleetConfig, parse_fleet
from agent.core.health import HealthPolicy, parse_policy
from agent.errors import ConfigError

if TYPE_CHECKING:  # parsed only where [telemetry] exists: status and the idle agent skip it
    from agent.core.telemetry_policy import SeriesRule

DEFAULT_CONFIG = Path("/etc/edgeops/agent.toml")
_SECTIONS = {"device", "bootloader", "slots", "health", "runtime", "agent", "tpm", "models",
             "fleet", "telemetry", "console", "fixups"}
# [models] is kept raw for agent.device.models; [fleet] is parsed here (agent.core.fleet_config), its
# token_file and a fleet.toml beside the file are read by agent.device.fleet_files

# [tpm] (or tpm_* keys of [device]): which root of trust agent.adapters.rot opens.
DEVICE_TCTI = "device:/dev/tpmrm0"  # the kernel resource manager, what a board with a TPM uses
ANCHOR_INDEX = 0x01000E00  # NV index of the write-locked keyring anchor (docs/tpm.md)
COUNTER_INDEX = 0x01000E01  # NV counter behind the rollback floor
DEFAULT_PCR = 15


@dataclass(frozen=True)
class TpmSettings:
    """The [tpm] section: where the TPM is and whether the board may run without one."""

    tcti: str | None = None  # None: no TPM, the software keystore if anything
    required: bool = False
    pcr: int = DEFAULT_PCR
    anchor_index: int = ANCHOR_INDEX
    counter_index: int = COUNTER_INDEX


@dataclass(frozen=True)
class TelemetrySettings:
    """The [telemetry] section (docs/telemetry.md): what is collected, buffered and sent where."""

    enabled: bool = True
    interval: float = 10.0  # seconds between collections
    buffer: Path | None = None  # default STATE/telemetry.db
    budget_bytes: int = 16 << 20
    full_resolution: float = 3600.0  # seconds kept at full resolution under budget pressure
    downsample_step: float = 60.0
    remote_write_url: str | None = None
    otlp_url: str | None = None  # OTLP/HTTP base (…/v1/traces is added)
    credentials_file: Path | None = None  # a bearer token, read when sending; never logged
    bytes_per_second: int = 64 << 10
    batch_samples: int = 2000
    targets: tuple[str, ...] = ()  # QoE: "host:port" (TCP connect) or "http(s)://…" (HTTP timing)
    probe_count: int = 5
    probe_timeout: float = 2.0
    listen: str | None = None  # "127.0.0.1:9108": the local Prometheus endpoint, off by default
    rules: tuple[SeriesRule, ...] = ()
    traces: str = "upstream"  # update traces' scope: upstream, regional (the site's controller) or local


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    board: str
    compatible: str
    state_dir: Path
    keyring: Path
    crl_dir: Path | None
    bootloader: str
    bootloader_settings: dict[str, Any]
    slots: dict[str, dict[str, Path]]  # slot name -> payload class -> device or file
    health: dict[str, Any] = field(default_factory=dict)
    runtime: str = "linux"  # "linux" (/proc, systemctl) or "sim"
    runtime_dir: Path | None = None
    poll_interval: float = 60.0
    metrics_file: Path | None = None  # Prometheus node_exporter textfile (needs the [metrics] extra)
    tpm: TpmSettings = TpmSettings()
    fleet: FleetConfig | None = None  # this file's [fleet], token_file not read yet
    models: dict[str, Any] = field(default_factory=dict)  # [models], read by agent.device.models
    # the journal's witness (agent.core.witness); on another partition it survives the loss
    # of the whole state directory. Default: STATE/witness.json
    witness: Path | None = None
    telemetry: TelemetrySettings | None = None  # [telemetry]; None: nothing collected or written
    console: ConsoleSettings = field(default_factory=ConsoleSettings)  # [console] (agent.core.console_policy)
    fixups: tuple[Fixup, ...] = ()  # [[fixups]]: per-slot boot-file fix-ups (agent.core.fixups)
    # [health] parsed once, here: a bad table fails at load, and no health run parses it again
    health_policy: HealthPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "health_policy", parse_policy(self.health))

    @property
    def base(self) -> Path:
        return self.path.parent

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.db"

    @property
    def telemetry_path(self) -> Path:
        t = self.telemetry
        return t.buffer if t is not None and t.buffer is not None else self.state_dir / "telemetry.db"

    @property
    def witness_path(self) -> Path:
        return self.witness if self.witness is not None else self.state_dir / "witness.json"

    def other_slot(self, slot: str) -> str:
        others = [s for s in self.slots if s != slot]
        if len(others) != 1:
            raise ConfigError(f"cannot choose the inactive slot: slots are {', '.join(self.slots)}")
        return others[0]


def toml_doc(text: str, where: object, sections: set[str] | None = None) -> dict[str, Any]:
    """A TOML document with only the known top-level ``sections`` (when given): the one
    reading of TOML that agent.toml and board files share, with the same one-line refusals."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    unknown = set(doc) - sections if sections is not None else set()
    if unknown:
        raise ConfigError(f"{where}: unknown sections {', '.join(sorted(unknown))}")
    return doc


def parse(text: str, path: Path) -> AgentConfig:
    doc = toml_doc(text, path, _SECTIONS)
    base = path.parent
    dev = _table(doc, "device", path)
    boot = _table(doc, "bootloader", path)
    slots_doc = _table(doc, "slots", path)
    runtime = _table(doc, "runtime", path, required=False)
    agent = _table(doc, "agent", path, required=False)

    def rel(value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: {key} must be a path")
        return base / value

    slots: dict[str, dict[str, Path]] = {}
    for name, classes in slots_doc.items():
        if not isinstance(classes, dict) or "rootfs" not in classes:
            raise ConfigError(f"{path}: [slots.{name}] must map payload classes to devices, "
                              f"including rootfs")
        slots[name] = {cls: rel(dev_path, f"slots.{name}.{cls}") for cls, dev_path in classes.items()}
    if len(slots) != 2:
        raise ConfigError(f"{path}: an A/B board has exactly two slots, found {len(slots)}")
    classes = {frozenset(c) for c in slots.values()}
    if len(classes) != 1:
        raise ConfigError(f"{path}: both slots must carry the same payload classes")
    crl = dev.get("crl_dir")
    health = doc.get("health", {})
    if not isinstance(health, dict):
        raise ConfigError(f"{path}: [health] must be a table")
    models = doc.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: [models] must be a table")
    kind = runtime.get("kind", "linux")
    if kind not in ("linux", "sim"):
        raise ConfigError(f"{path}: runtime.kind must be 'linux' or 'sim'")
    try:
        return AgentConfig(
            path=path,
            board=str(dev.get("board", "generic")),
            compatible=_str(dev, "compatible", path),
            state_dir=rel(dev.get("state_dir", "/var/lib/edgeops"), "device.state_dir"),
            keyring=rel(dev.get("keyring"), "device.keyring"),
            crl_dir=rel(crl, "device.crl_dir") if crl else None,
            bootloader=_str(boot, "backend", path),
            bootloader_settings={k: v for k, v in boot.items() if k != "backend"},
            slots=slots,
            health=health,
            runtime=kind,
            runtime_dir=rel(runtime["dir"], "runtime.dir") if "dir" in runtime else None,
            poll_interval=float(agent.get("poll_interval", 60.0)),
            metrics_file=(rel(agent["metrics_file"], "agent.metrics_file")
                          if "metrics_file" in agent else None),
            tpm=_tpm(doc, path),
            fleet=_fleet(doc, path),
            models=models,
            witness=rel(dev["witness"], "device.witness") if "witness" in dev else None,
            telemetry=_telemetry(doc, path),
            console=parse_console(doc.get("console"), str(path)),
            fixups=parse_fixups(doc.get("fixups"), str(path), slots=sorted(slots),
                                classes=next(iter(classes))),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def tpm_settings_from_toml(text: str, path: Path) -> TpmSettings:
    """Only the root-of-trust settings of an agent.toml text (which need not be a whole config)."""
    return _tpm(toml_doc(text, path), path)


def _tpm(doc: dict[str, Any], path: Path) -> TpmSettings:
    """A ``[tpm]`` key wins over the older ``tpm_<key>`` spelling in ``[device]``."""
    dev, tbl = doc.get("device", {}), doc.get("tpm", {})
    if not isinstance(dev, dict) or not isinstance(tbl, dict):
        raise ConfigError(f"{path}: [device] and [tpm] must be tables")

    def get(key: str, default: Any) -> Any:
        return tbl.get(key, dev.get(f"tpm_{key}", default))

    tcti, required, pcr = get("tcti", None), get("required", False), get("pcr", DEFAULT_PCR)
    if tcti is not None and (not isinstance(tcti, str) or not tcti):
        raise ConfigError(f"{path}: tpm_tcti must be a TCTI string such as '{DEVICE_TCTI}'")
    if not isinstance(required, bool):
        raise ConfigError(f"{path}: tpm_required must be true or false")
    if not isinstance(pcr, int) or isinstance(pcr, bool) or not 0 <= pcr <= 22 or pcr == 16:
        raise ConfigError(f"{path}: tpm_pcr must be a non-resettable PCR (0-15, 17-22)")
    indices = {key: get(key, default) for key, default in
               (("anchor_index", ANCHOR_INDEX), ("counter_index", COUNTER_INDEX))}
    for key, value in indices.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
            raise ConfigError(f"{path}: tpm_{key} must be a TPM NV index such as {ANCHOR_INDEX:#x}")
    return TpmSettings(tcti=tcti or None, required=required, pcr=pcr, **indices)


_TELEMETRY_KEYS = {"enabled", "interval", "buffer", "budget_bytes", "full_resolution",
                   "downsample_step", "remote_write_url", "otlp_url", "credentials_file",
                   "bytes_per_second", "batch_samples", "targets", "probe_count", "probe_timeout",
                   "listen", "policy", "traces"}


def _telemetry(doc: dict[str, Any], path: Path) -> TelemetrySettings | None:
    t = doc.get("telemetry")
    if t is None:
        return None
    where = f"{path} [telemetry]"
    from agent.core.telemetry_policy import SCOPES, parse_rules

    if not isinstance(t, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(t) - _TELEMETRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")

    def num(key: str, default: float, lo: float, hi: float) -> float:
        v = t.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ConfigError(f"{where}: {key} must be a number from {_num(lo)} to {_num(hi)}")
        return float(v)

    def url(key: str) -> str | None:
        v = t.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: {key} must be an http:// or https:// URL")
        return v

    targets = t.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(x, str) and x for x in targets):
        raise ConfigError(f"{where}: targets must be a list of 'host:port' or URLs")
    listen = t.get("listen")
    if listen is not None and (not isinstance(listen, str) or ":" not in listen):
        raise ConfigError(f"{where}: listen must be 'ADDRESS:PORT' such as '127.0.0.1:9108'")
    traces = t.get("traces", "upstream")
    if traces not in SCOPES:
        raise ConfigError(f"{where}: traces must be one of {', '.join(SCOPES)}")
    enabled = t.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: enabled must be true or false")
    paths = {}
    for key in ("buffer", "credentials_file"):
        v = t.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise ConfigError(f"{where}: {key} must be a path")
        paths[key] = path.parent / v if v else None
    return TelemetrySettings(
        enabled=enabled, interval=num("interval", 10.0, 1.0, 86400.0), buffer=paths["buffer"],
        budget_bytes=int(num("budget_bytes", 16 << 20, 4096, 1 << 40)),
        full_resolution=num("full_resolution", 3600.0, 0.0, 30 * 86400.0),
        downsample_step=num("downsample_step", 60.0, 1.0, 86400.0),
        remote_write_url=url("remote_write_url"), otlp_url=url("otlp_url"),
        credentials_file=paths["credentials_file"],
        bytes_per_second=int(num("bytes_per_second", 64 << 10, 256, 1 << 32)),
        batch_samples=int(num("batch_samples", 2000, 1, 100_000)), targets=tuple(targets),
        probe_count=int(num("probe_count", 5, 1, 100)),
        probe_timeout=num("probe_timeout", 2.0, 0.05, 60.0), listen=listen,
        rules=parse_rules(t.get("policy"), where), traces=traces)


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _fleet(doc: dict[str, Any], path: Path) -> FleetConfig | None:
    # Not a table: as before, the device may still be managed through a fleet.toml beside it.
    table = doc.get("fleet")
    return parse_fleet(table, path.parent, f"{path} [fleet]") if isinstance(table, dict) else None


def _table(doc: dict[str, Any], name: str, path: Path, *, required: bool = True) -> dict[str, Any]:
    value = doc.get(name)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: missing [{name}] table")
    return value


def _str(table: dict[str, Any], key: str, path: Path) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: '{key}' must be a non-empty string")
    return value


def load(path: Path) -> AgentConfig:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}",
                          hint="pass --config FILE (a sim device has DIR/agent.toml)") from None
    return parse(decode(raw, path), path.resolve())


def decode(raw: bytes, path: Path) -> str:
    """The text of a config file; TOML is UTF-8 by definition, so anything else is refused here
    with the byte that broke it (a file saved in Latin-1, or half of it overwritten)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})",
                          hint="save the file as UTF-8") from None
