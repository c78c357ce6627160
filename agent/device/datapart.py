"""Whether the agent's state lives on the board's persistent data partition, not on a slot.

An A/B update rewrites the inactive slot whole, so anything the agent keeps on a slot's root
filesystem is gone (or, worse, a different copy) after the trial boot: the journal says
"idle", the trial is never committed, the security floor drops back. The board file's
``[data]`` names the partition and where it is mounted; this module reads the mount table
(``/proc/self/mountinfo``, under ``root`` for a replica) and says, for each path the agent
keeps state in, which mount holds it. ``board check`` lists the problems
(agent.device.boardcheck); the updater refuses a trial verdict on a state dir that is not
on the data partition (``require_persistent``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.core.boardfile import Board, DeviceRef
from agent.core.config import AgentConfig
from agent.errors import DeviceError

MAX_MOUNTINFO = 1 << 20  # bytes of /proc/self/mountinfo read at most


@dataclass(frozen=True)
class Mount:
    point: str  # where it is mounted, absolute
    source: str  # the device, as the kernel names it (/dev/vda4), or a pseudo source


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (proc(5))
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """proc(5)'s mountinfo: field 5 the mount point; after the " - " separator, the fs type
    and the source. Lines that do not parse are skipped."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        mounts.append(Mount(_unescape(fields[4]), _unescape(rest[1])))
    return mounts


def mounts(root: Path) -> list[Mount]:
    path = root / "proc/self/mountinfo"
    try:
        with open(path, "rb") as f:
            return parse_mountinfo(f.read(MAX_MOUNTINFO).decode(errors="replace"))
    except OSError:
        return []


def mount_of(path: str, table: list[Mount]) -> Mount | None:
    """The mount holding ``path`` (absolute, as the device sees it): the last-mounted of the
    longest mount points that contain it, as the kernel resolves it."""
    best: Mount | None = None
    for m in table:
        if _under(path, m.point) and (best is None or len(m.point.rstrip("/")) >=
                                      len(best.point.rstrip("/"))):
            best = m
    return best


def device_path(ref: DeviceRef, root: Path) -> str:
    """The device a board file's reference is, as the kernel names it (``/dev/vda4``): a
    /dev/disk/by-* link resolved, relative to ``root``."""
    link = ref.resolve(root)
    try:
        real = Path(os.path.realpath(link))
        rel = real.relative_to(root.resolve())
    except (OSError, ValueError):
        return "/" + str(link.relative_to(root)) if link.is_relative_to(root) else str(link)
    return "/" + str(rel)


def state_paths(cfg: AgentConfig) -> dict[str, Path]:
    """Every place the agent keeps state that must outlive a slot, named for a person."""
    paths = {"state_dir (journal)": cfg.state_dir,
             "keyring anchors (keystore, TPM blobs)": cfg.state_dir / "keystore",
             "fetched CRLs": cfg.state_dir / "crls",
             "identity keys": cfg.state_dir / "identity",
             "model store": (cfg.base / str(cfg.models["dir"]) if "dir" in cfg.models
                             else cfg.state_dir / "models"),
             "buffers": cfg.state_dir / "buffers"}
    if cfg.witness is not None:
        paths["journal witness"] = cfg.witness
    return paths


def off_data(board: Board, cfg: AgentConfig, root: Path = Path("/")) -> list[tuple[str, Path, str]]:
    """(what, path, where it is instead) for each state path not on the board's data
    partition; empty when the board names none (e.g. the sim board) or all are on it."""
    if board.data is None:
        return []
    table = mounts(root)
    want = device_path(board.data.device, root)
    out = []
    for what, path in state_paths(cfg).items():
        dev_path = _device_view(path, root)
        if not table:  # an image tree, not a running system: hold the paths to the mount point
            if what != "journal witness" and not _under(dev_path, board.data.mount):
                out.append((what, path, f"outside {board.data.mount}, where the board mounts "
                                        f"{board.data.device}"))
            continue
        m = mount_of(dev_path, table)
        if m is None:
            continue  # unreachable: "/" is always mounted
        if m.source == want:
            continue
        if what == "journal witness" and m.point != "/" and not _is_slot(board, m, root):
            continue  # on another persistent partition on purpose (config.py: witness)
        place = ("the slot's root filesystem" if m.point == "/" or _is_slot(board, m, root)
                 else f"{m.source} at {m.point}")
        out.append((what, path, f"{place}, not {board.data.device} at {board.data.mount}"))
    return out


def _under(path: str, point: str) -> bool:
    return point == "/" or path == point or path.startswith(point.rstrip("/") + "/")


def _device_view(path: Path, root: Path) -> str:
    """``path`` as the device sees it: under a replica ``root``, without the root prefix."""
    if root != Path("/") and path.is_relative_to(root):
        return "/" + str(path.relative_to(root))
    return str(path)


def _is_slot(board: Board, m: Mount, root: Path) -> bool:
    return any(device_path(s.device, root) == m.source for s in board.slots)


def require_persistent(cfg: AgentConfig, root: Path = Path("/")) -> None:
    """Refuse (DeviceError, one line) when the journal's directory is not on the board's data
    partition: a trial decided there would be forgotten by the next slot."""
    from agent.adapters import boardfiles
    from agent.errors import ConfigError

    try:
        board = boardfiles.load(cfg.board)
    except ConfigError:
        return  # no board file to say where data lives (a generic config): nothing to hold to
    for what, path, where in off_data(board, cfg, root):
        if what.startswith("state_dir"):
            raise DeviceError(
                f"no trial verdict: state dir {path} is on {where}",
                hint=f"mount the data partition at {board.data.mount if board.data else path} "
                     f"before edgeops-agent starts (fstab, image/README.md)")
