"""Board files: one declarative TOML per board, and ``board check`` against the running system.

A board file names the bootloader backend and its settings, the slots (each
payload class by PARTLABEL, PARTUUID or path, with a minimum size), the boot
partition, the watchdog device, default health checks, the compatible string
and whether a TPM is required. ``check`` returns one ``Problem`` per finding,
each with the fix; every path is looked up under ``root`` so tests (and image
builders) can check a replica of the board's storage.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.adapters import bootloader
from agent.errors import ConfigError, EdgeopsError

BOARD_DIRS = (Path("/etc/edgeops/boards"), Path("/usr/share/edgeops/boards"),
              Path(__file__).resolve().parents[2] / "boards")
# [bootloader] settings that are paths on the device, rooted by --root
PATH_SETTINGS = ("env", "fw_env_config", "boot_dir", "grubenv", "proc", "reboot_param")
_SECTIONS = {"board", "bootloader", "slots", "boot", "health"}
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


def parse(text: str, source: str) -> Board:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(doc) - _SECTIONS
    if unknown:
        raise ConfigError(f"{source}: unknown sections {', '.join(sorted(unknown))}")
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
        )
    except KeyError as exc:
        raise ConfigError(f"{source}: missing {exc.args[0]!r} ([board] name and compatible, "
                          f"[bootloader] backend)") from None


def find(name: str, dirs: tuple[Path, ...] = BOARD_DIRS) -> Path:
    if name.endswith(".toml") or "/" in name:
        return Path(name)
    for d in dirs:
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    raise ConfigError(f"no board file '{name}.toml' in {', '.join(map(str, dirs))}",
                      hint=f"choose one of: {', '.join(available(dirs)) or 'none installed'}")


def available(dirs: tuple[Path, ...] = BOARD_DIRS) -> list[str]:
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})


def load(name: str, dirs: tuple[Path, ...] = BOARD_DIRS) -> Board:
    path = find(name, dirs)
    try:
        return parse(path.read_text(), str(path))
    except OSError as exc:
        raise ConfigError(f"cannot read board file {path}: {exc.strerror}") from None


# --- board check ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what} — fix: {self.fix}"


def check(board: Board, root: Path = Path("/"), *, agent_compatible: str | None = None,
          agent_backend: str | None = None) -> list[Problem]:
    problems = _check_slots(board, root) + _check_boot(board, root) + _check_env_place(board, root)
    if agent_compatible is not None and agent_compatible != board.compatible:
        problems.append(Problem(f"agent.toml compatible '{agent_compatible}' differs from the board's "
                                f"'{board.compatible}'",
                                "set [device] compatible in agent.toml to the board's string"))
    if agent_backend is not None and agent_backend != board.backend:
        problems.append(Problem(f"agent.toml uses bootloader '{agent_backend}', the board needs "
                                f"'{board.backend}'", "set [bootloader] backend in agent.toml"))
    if board.watchdog and not (root / board.watchdog.lstrip("/")).exists():
        problems.append(Problem(f"watchdog device {board.watchdog} is missing",
                                "enable the SoC watchdog driver in the kernel/device tree"))
    if board.tpm_required and not (root / "dev/tpmrm0").exists():
        problems.append(Problem("the board requires a TPM but /dev/tpmrm0 is missing",
                                "enable the TPM (firmware setting / tpm_tis driver)"))
    return problems


def _check_slots(board: Board, root: Path) -> list[Problem]:
    from agent.adapters import slots

    out = []
    for s in board.slots:
        path = s.device.resolve(root)
        if not path.exists():
            out.append(Problem(f"slot {s.slot} {s.cls}: {s.device} not found",
                               "partition the disk as the board file says (see docs/boards.md)"))
            continue
        try:
            size = slots.capacity(path)
        except EdgeopsError as exc:
            out.append(Problem(f"slot {s.slot} {s.cls}: {exc}", "point the board file at a "
                                                                "partition or a preallocated file"))
            continue
        if size < s.min_size:
            out.append(Problem(f"slot {s.slot} {s.cls}: {s.device} holds {size} bytes, the board needs "
                               f"{s.min_size}", "grow the partition (sfdisk) or re-flash the layout"))
    if board.boot is not None and not board.boot.resolve(root).exists():
        out.append(Problem(f"boot partition {board.boot} not found",
                           "create and format it as the board file says"))
    return out


def _check_boot(board: Board, root: Path) -> list[Problem]:
    # Registers the board backends even before agent.adapters.bootloader._load_builtin lists them.
    from agent.adapters.bootloader import grub, rpi_tryboot, uboot_rauc  # noqa: F401

    if board.backend not in bootloader.names():
        return [Problem(f"unknown bootloader backend '{board.backend}'",
                        f"use one of {', '.join(bootloader.names())}")]
    try:
        bl = bootloader.create(board.backend, board.rooted_settings(root), root, board.slot_names)
        primary, trial = bl.primary(), bl.trial()
    except EdgeopsError as exc:
        return [Problem(f"bootloader state unreadable: {exc}", exc.hint or "initialise it")]
    out = []
    booted = _booted(board, root, bl)
    if booted is None:
        out.append(Problem("cannot tell which slot is running (no edgeops.slot=/rauc.slot= on the "
                           "kernel command line)", "have the boot script add edgeops.slot=<slot>"))
    elif booted not in (primary, trial):
        out.append(Problem(f"running slot {booted} is neither the primary ({primary}) nor the trial",
                           "commit it ('edgeops rollback' / mark-good) or reboot"))
    return out


def _check_env_place(board: Board, root: Path) -> list[Problem]:
    """A U-Boot env at raw offsets of a disk must not lie inside a partition: writing it would
    corrupt that partition (and the partition's writes the env). Read with sfdisk --json."""
    import json
    import shutil
    import subprocess

    env, offsets = board.settings.get("env"), board.settings.get("env_offsets")
    size = int(board.settings.get("env_size", 0) or 0)
    if not isinstance(env, str) or not isinstance(offsets, list) or not size or not shutil.which("sfdisk"):
        return []
    disk = root / env.lstrip("/")
    if not disk.exists():
        return []
    proc = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return []  # no partition table (a file, or the env on its own device): nothing to overlap
    try:
        table = json.loads(proc.stdout)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        parts = [(p.get("name") or p["node"], int(p["start"]) * sector, int(p["size"]) * sector)
                 for p in table.get("partitions", [])]
    except (ValueError, KeyError, TypeError):
        return []
    out = []
    for off in offsets:
        for name, start, length in parts:
            if int(off) < start + length and start < int(off) + size:
                out.append(Problem(f"U-Boot env copy at {int(off):#x} (+{size:#x}) overlaps partition "
                                   f"{name} ({start:#x}..{start + length:#x}) on {env}",
                                   "start the first partition after the env (sfdisk start=) or move "
                                   "env_offsets, in the board file and U-Boot's CONFIG_ENV_OFFSET"))
    return out


def _booted(board: Board, root: Path, bl: object) -> str | None:
    from agent.adapters.runtime import slot_from_cmdline

    from_dt = getattr(bl, "booted_slot", None)
    if callable(from_dt):
        slot = from_dt()
        if isinstance(slot, str):
            return slot
    try:
        return slot_from_cmdline((root / board.cmdline.lstrip("/")).read_text(), board.slot_names)
    except (OSError, EdgeopsError):
        return None


# --- agent.toml from a board file ---------------------------------------------------------------
def agent_toml(board: Board, *, keyring: str = "/etc/edgeops/keyring/root.crt",
               state_dir: str = "/var/lib/edgeops", crl_dir: str | None = "/etc/edgeops/keyring",
               tpm_tcti: str | None = None) -> str:
    """The agent.toml a device image ships for ``board``: what ``board check`` then agrees with.

    Slots by PARTLABEL/PARTUUID become their /dev/disk/by-* links, which udev creates on
    every Linux system, so the image does not depend on the kernel's enumeration order.
    """
    from agent.host import tomlout

    device: dict[str, Any] = {"board": board.name, "compatible": board.compatible,
                              "state_dir": state_dir, "keyring": keyring}
    if crl_dir:
        device["crl_dir"] = crl_dir
    slots: dict[str, dict[str, str]] = {}
    for s in board.slots:
        ref = s.device
        slots.setdefault(s.slot, {})[s.cls] = (ref.value if ref.kind == "path"
                                              else str(ref.resolve(Path("/"))))
    parts = [f"# generated by 'edgeops board config {board.name}' from the board file\n",
             tomlout.table("device", device),
             tomlout.table("bootloader", {"backend": board.backend, **board.settings})]
    parts += [tomlout.table(f"slots.{name}", classes) for name, classes in slots.items()]
    if board.health:
        parts.append(tomlout.table("health", board.health))
    if board.tpm_required or tpm_tcti:
        from agent.core.config import DEVICE_TCTI

        parts.append(tomlout.table("tpm", {"tcti": tpm_tcti or DEVICE_TCTI,
                                           "required": board.tpm_required}))
    return "\n".join(parts)
