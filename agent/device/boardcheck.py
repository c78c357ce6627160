"""``board check``: compare the running system (or a replica under ``root``) with its board file.

``check`` returns one ``Problem`` per finding, each with the fix; every path is looked up
under ``root`` so tests (and image builders) can check a replica of the board's storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.adapters import bootloader
from agent.core.boardfile import Board
from agent.core.config import AgentConfig
from agent.errors import EdgeopsError


@dataclass(frozen=True)
class Problem:
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what} — fix: {self.fix}"


def check(board: Board, root: Path = Path("/"), *, agent_compatible: str | None = None,
          agent_backend: str | None = None, config: AgentConfig | None = None) -> list[Problem]:
    problems = _check_slots(board, root) + _check_boot(board, root) + _check_env_place(board, root)
    problems += _check_data(board, root, config) + _check_fixups(board, root)
    if agent_compatible is not None and agent_compatible != board.compatible:
        problems.append(Problem(f"agent.toml compatible '{agent_compatible}' differs from the board's "
                                f"'{board.compatible}'",
                                "set [device] compatible in agent.toml to the board's string"))
    if config is not None and config.fixups != board.fixups:
        problems.append(Problem("agent.toml's [[fixups]] differ from the board file's, so an install "
                                "would leave the slot's boot files as the board does not want them",
                                "regenerate agent.toml with 'edgeops board config' (it copies them)"))
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


def _check_data(board: Board, root: Path, cfg: AgentConfig | None) -> list[Problem]:
    """The data partition exists and is mounted where the board says, and every place the
    agent keeps state (agent.device.datapart.state_paths) is on it, not on a slot."""
    from agent.device import datapart

    if board.data is None:
        return []
    out = []
    if not board.data.device.resolve(root).exists():
        out.append(Problem(f"data partition {board.data.device} not found",
                           "partition the disk as the board file says, with a data partition"))
    table = datapart.mounts(root)
    if table:
        m = datapart.mount_of(board.data.mount, table)
        want = datapart.device_path(board.data.device, root)
        if m is None or m.source != want or m.point.rstrip("/") != board.data.mount:
            out.append(Problem(f"data partition {board.data.device} is not mounted at "
                               f"{board.data.mount}",
                               "add it to /etc/fstab (x-systemd.before=edgeops-agent.service)"))
    if cfg is not None:
        for what, path, where in datapart.off_data(board, cfg, root):
            out.append(Problem(f"{what} {path} is on {where}",
                               f"keep it under {board.data.mount} (agent.toml [device] state_dir)"))
    return out


def _check_fixups(board: Board, root: Path) -> list[Problem]:
    """Each slot's files carry what the board's fix-ups set for that slot (agent.core.fixups):
    a slot whose cmdline.txt or fstab names the other slot would boot the wrong root. A slot
    that holds no filesystem yet (never written) has nothing to check."""
    from agent.adapters import fixup_apply
    from agent.core import fixups

    out = []
    for fix in board.fixups:
        for spec in (s for s in board.slots if s.cls == fix.payload):
            device = spec.device.resolve(root)
            if not device.exists() or fixup_apply.blank(device):
                continue
            where = f"slot {spec.slot} {fix.payload}:{fix.file}"
            try:
                wrong = fixups.mismatches(fix.format, fixup_apply.read(device, fix.file),
                                          fix.pairs(spec.slot), where)
            except EdgeopsError as exc:
                out.append(Problem(f"{where} cannot be checked: {exc}",
                                   exc.hint or "check the slot's filesystem (fsck) or install again"))
                continue
            if wrong:
                out.append(Problem(f"{where} does not name slot {spec.slot}: it needs "
                                   f"{' '.join(wrong)}",
                                   "install an update again (the agent applies the board's "
                                   "fix-ups), or edit the file on that partition"))
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

    if isinstance(bl, bootloader.KnowsBootedSlot) and (slot := bl.booted_slot()) is not None:
        return slot
    try:
        return slot_from_cmdline((root / board.cmdline.lstrip("/")).read_text(), board.slot_names)
    except (OSError, EdgeopsError):
        return None
