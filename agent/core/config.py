"""Agent configuration: ``agent.toml`` text in, records out. Only ``load`` reads (the file).

Paths in the file are relative to the file's own directory, so a device
folder (the sim board's, or an image staging tree) can be moved as a whole.

Every section is parsed here, once. ``load`` parses them all (a bad table fails there);
``load(path, lazy=True)`` leaves ``[health]``, ``[fleet]``, ``[console]`` and ``[telemetry]``
to their first use, for a command that shows none of them: ``edgeops status`` then loads
neither their parsers nor ``dataclasses`` (tools/bench/startup.py).
"""

from __future__ import annotations

import tomllib
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from agent.errors import ConfigError

if TYPE_CHECKING:  # each parsed on first use (see the docstring)
    from collections.abc import Callable

    from agent.core.console_policy import ConsoleSettings
    from agent.core.fixups import Fixup
    from agent.core.fleet_config import FleetConfig
    from agent.core.health import HealthPolicy
    from agent.core.telemetry_config import TelemetrySettings

T = TypeVar("T")
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


# A NamedTuple, and AgentConfig a plain class, not dataclasses: 'edgeops status' reads both,
# and Python 3.11 compiles each dataclass's methods at import (tools/bench/startup.py).
class TpmSettings(NamedTuple):
    """The [tpm] section: where the TPM is and whether the board may run without one."""

    tcti: str | None = None  # None: no TPM, the software keystore if anything
    required: bool = False
    pcr: int = DEFAULT_PCR
    anchor_index: int = ANCHOR_INDEX
    counter_index: int = COUNTER_INDEX


NO_TPM = TpmSettings()
_LAZY = ("fleet", "telemetry", "console", "fixups", "health_policy")  # parsed on first use, in this order


class AgentConfig:
    """The parsed agent.toml. Built by ``parse`` or directly (then ``fleet``, ``telemetry`` and
    ``console`` are given parsed, and ``health_policy`` is parsed from ``health`` on first use)."""

    def __init__(self, path: Path, board: str, compatible: str, state_dir: Path, keyring: Path,
                 crl_dir: Path | None, bootloader: str, bootloader_settings: dict[str, Any],
                 slots: dict[str, dict[str, Path]], health: dict[str, Any] | None = None,
                 runtime: str = "linux", runtime_dir: Path | None = None,
                 poll_interval: float = 60.0, metrics_file: Path | None = None,
                 tpm: TpmSettings = NO_TPM, fleet: FleetConfig | None = None,
                 models: dict[str, Any] | None = None, witness: Path | None = None,
                 telemetry: TelemetrySettings | None = None, console: ConsoleSettings | None = None,
                 *, tables: dict[str, Any] | None = None) -> None:
        self.path = path
        self.board = board
        self.compatible = compatible
        self.state_dir = state_dir
        self.keyring = keyring
        self.crl_dir = crl_dir
        self.bootloader = bootloader
        self.bootloader_settings = bootloader_settings
        self.slots = slots  # slot name -> payload class -> device or file
        self.health = {} if health is None else health
        self.runtime = runtime  # "linux" (/proc, systemctl) or "sim"
        self.runtime_dir = runtime_dir
        self.poll_interval = poll_interval
        self.metrics_file = metrics_file  # Prometheus node_exporter textfile (needs the [metrics] extra)
        self.tpm = tpm
        self.models = {} if models is None else models  # [models], read by agent.device.models
        # the journal's witness (agent.core.witness); on another partition it survives the loss
        # of the whole state directory. Default: STATE/witness.json
        self.witness = witness
        # ``tables``: the document's [fleet], [telemetry] and [console], parsed on first use;
        # without it these are the values given (cached_property reads the instance first).
        self._tables = tables
        if tables is None:
            self.fleet, self.telemetry = fleet, telemetry
            if console is not None:
                self.console = console

    def __repr__(self) -> str:
        return f"AgentConfig({str(self.path)!r}, board={self.board!r})"

    @cached_property
    def health_policy(self) -> HealthPolicy:
        """[health], parsed once: no health run parses it again."""
        from agent.core.health import parse_policy

        return self._parsed(lambda: parse_policy(self.health))

    @cached_property
    def fleet(self) -> FleetConfig | None:
        """This file's [fleet], token_file not read yet (agent.core.fleet_config). Not a table:
        as before, the device may still be managed through a fleet.toml beside it."""
        table = (self._tables or {}).get("fleet")
        if not isinstance(table, dict):
            return None
        from agent.core.fleet_config import parse_fleet

        return self._parsed(lambda: parse_fleet(table, self.base, f"{self.path} [fleet]"))

    @cached_property
    def console(self) -> ConsoleSettings:
        """[console] (agent.core.console_policy); its defaults without one."""
        from agent.core.console_policy import parse_console

        return self._parsed(lambda: parse_console((self._tables or {}).get("console"), str(self.path)))

    @cached_property
    def telemetry(self) -> TelemetrySettings | None:
        """[telemetry]; None: nothing collected or written."""
        table = (self._tables or {}).get("telemetry")
        if table is None:
            return None
        from agent.core.telemetry_config import parse_telemetry

        return self._parsed(lambda: parse_telemetry(table, self.path))

    @cached_property
    def fixups(self) -> tuple[Fixup, ...]:
        """[[fixups]]: per-slot boot-file fix-ups (agent.core.fixups); none without the array."""
        table = (self._tables or {}).get("fixups")
        if table is None:
            return ()
        from agent.core.fixups import parse_fixups

        classes = sorted(next(iter(self.slots.values()), {}))
        return self._parsed(lambda: parse_fixups(table, str(self.path), slots=sorted(self.slots),
                                                 classes=classes))

    def _parsed(self, parse: Callable[[], T]) -> T:
        try:
            return parse()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.path}: {exc}") from None

    def parse_all(self) -> AgentConfig:
        """Parse every section now, so that a bad one fails here."""
        for name in _LAZY:
            getattr(self, name)
        return self

    def replace(self, **changes: Any) -> AgentConfig:
        """A copy with ``changes`` (as ``dataclasses.replace``)."""
        new = object.__new__(AgentConfig)
        new.__dict__.update(self.__dict__, **changes)
        if "health" in changes:
            new.__dict__.pop("health_policy", None)
        return new

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


def parse(text: str, path: Path, *, lazy: bool = False) -> AgentConfig:
    """``lazy``: leave the sections a reader does not show to their first use (the docstring)."""
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
        cfg = AgentConfig(
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
            models=models,
            witness=rel(dev["witness"], "device.witness") if "witness" in dev else None,
            tables={name: doc.get(name) for name in ("fleet", "telemetry", "console", "fixups")},
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg if lazy else cfg.parse_all()


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


def load(path: Path, *, lazy: bool = False) -> AgentConfig:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}",
                          hint="pass --config FILE (a sim device has DIR/agent.toml)") from None
    return parse(decode(raw, path), path.resolve(), lazy=lazy)


def decode(raw: bytes, path: Path) -> str:
    """The text of a config file; TOML is UTF-8 by definition, so anything else is refused here
    with the byte that broke it (a file saved in Latin-1, or half of it overwritten)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})",
                          hint="save the file as UTF-8") from None
