"""Board files: one declarative TOML per board, text in, a frozen ``Board`` out. Pure.

A board file names the bootloader backend and its settings, the slots (each
payload class by PARTLABEL, PARTUUID or path, with a minimum size), the boot
partition, the persistent data partition ([data]: where the agent's state lives,
never on a slot), the watchdog device, default health checks, the compatible string,
whether a TPM is required, the serial console's port and the per-slot fix-ups of boot
files ([[fixups]], agent.core.fixups). Finding board files on disk is
agent.adapters.boardfiles; checking a running system against one is
agent.device.boardcheck; the agent.toml an image ships is agent.host.boardconfig.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.config import toml_doc
from agent.core.console_policy import check_tty
from agent.core.fixups import Fixup, parse_fixups
from agent.errors import ConfigError

# [bootloader] settings that are paths on the device, rooted by --root
PATH_SETTINGS = ("env", "fw_env_config", "boot_dir", "grubenv", "proc", "reboot_param")
_SECTIONS = {"board", "bootloader", "slots", "boot", "health", "data", "fixups"}
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class DeviceRef:
    """A block device or file by PARTLABEL, PARTUUID or path."""

    kind: str  # partlabel | partuuid | path
    value: str

    def resolve(self, root: Path) -> Path:
        rel = {"partlabel": f"dev/disk/by-partlabel/{self.value}",
               "partuuid": f"dev/disk/by-partuuid/{self.value.lower()}",
               "path": self.value.lstrip("/")}[self.kind]
        return root / rel

    def __str__(self) -> str:
        return self.value if self.kind == "path" else f"{self.kind.upper()}={self.value}"


@dataclass(frozen=True)
class SlotSpec:
    slot: str
    cls: str
    device: DeviceRef
    min_size: int = 0


@dataclass(frozen=True)
class DataSpec:
    """The persistent data partition: what it is, and where the running system mounts it."""

    device: DeviceRef
    mount: str  # absolute, e.g. /var/lib/edgeops


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    compatible: str
    backend: str
    settings: dict[str, Any]
    slots: tuple[SlotSpec, ...]
    boot: DeviceRef | None = None
    watchdog: str | None = None
    tpm_required: bool = False
    health: dict[str, Any] = field(default_factory=dict)
    cmdline: str = "/proc/cmdline"  # where the running kernel's command line is read
    console: str | None = None  # the serial port the technician console runs on (ttyS0, ttyAMA0)
    data: DataSpec | None = None  # the persistent data partition, if the board names one
    fixups: tuple[Fixup, ...] = ()  # per-slot boot-file fix-ups (agent.core.fixups)

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.slot for s in self.slots))

    def rooted_settings(self, root: Path) -> dict[str, Any]:
        out = dict(self.settings)
        for key in PATH_SETTINGS:
            if isinstance(out.get(key), str):
                out[key] = str(root / out[key].lstrip("/"))
        out.setdefault("root", str(root))
        return out


def parse_size(text: object, where: str) -> int:
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(float(t[:-1]) * _UNITS[t[-1]]) if t and t[-1] in _UNITS else int(t)
    except ValueError:
        raise ConfigError(f"{where}: size {text!r} is not a number with K/M/G/T") from None


def _ref(d: object, where: str) -> DeviceRef:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a table with one of partlabel, partuuid, path")
    kinds = [k for k in ("partlabel", "partuuid", "path") if k in d]
    if len(kinds) != 1 or not isinstance(d[kinds[0]], str) or not d[kinds[0]]:
        raise ConfigError(f"{where} must name exactly one of partlabel, partuuid or path")
    return DeviceRef(kinds[0], d[kinds[0]])


def _data(d: object, source: str) -> DataSpec:
    where = f"{source}: [data]"
    ref = _ref(d, where)  # partlabel, partuuid or path; "mount" beside it
    mount = d.get("mount") if isinstance(d, Mapping) else None
    if not isinstance(mount, str) or not mount.startswith("/") or ".." in mount.split("/"):
        raise ConfigError(f"{where} needs mount = an absolute path where the system mounts it, "
                          f"e.g. \"/var/lib/edgeops\"")
    return DataSpec(ref, mount.rstrip("/") or "/")


def parse(text: str, source: str) -> Board:
    doc = toml_doc(text, source, _SECTIONS)
    meta, boot = doc.get("board", {}), dict(doc.get("bootloader", {}))
    slots: list[SlotSpec] = []
    for slot, classes in doc.get("slots", {}).items():
        if not isinstance(classes, Mapping) or "rootfs" not in classes:
            raise ConfigError(f"{source}: [slots.{slot}] must map payload classes (incl. rootfs) "
                              f"to devices")
        for cls, d in classes.items():
            where = f"{source}: slots.{slot}.{cls}"
            slots.append(SlotSpec(slot, cls, _ref(d, where),
                                  parse_size(d.get("min_size", 0), where)))
    names = {s.slot for s in slots}
    if len(names) != 2:
        raise ConfigError(f"{source}: an A/B board has exactly two slots, found {len(names)}")
    if len({frozenset(s.cls for s in slots if s.slot == n) for n in names}) != 1:
        raise ConfigError(f"{source}: both slots must carry the same payload classes")
    try:
        return Board(
            name=str(meta["name"]), description=str(meta.get("description", "")),
            compatible=str(meta["compatible"]), backend=str(boot.pop("backend")),
            settings=boot, slots=tuple(slots),
            boot=_ref(doc["boot"], f"{source}: [boot]") if "boot" in doc else None,
            watchdog=meta.get("watchdog"), tpm_required=bool(meta.get("tpm_required", False)),
            health=dict(doc.get("health", {})),
            cmdline=str(meta.get("cmdline", "/proc/cmdline")),
            console=(check_tty(meta["console"], f"{source}: [board] console")
                     if "console" in meta else None),
            data=_data(doc["data"], source) if "data" in doc else None,
            fixups=parse_fixups(doc.get("fixups"), source, slots=sorted(names),
                                classes=(s.cls for s in slots)),
        )
    except KeyError as exc:
        raise ConfigError(f"{source}: missing {exc.args[0]!r} ([board] name and compatible, "
                          f"[bootloader] backend)") from None
