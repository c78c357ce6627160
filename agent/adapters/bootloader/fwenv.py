"""fw_env.config → EnvStore: where the U-Boot environment lives, as libubootenv reads it.

One line per copy (two lines: a redundant environment), ``#`` starts a comment::

    # device            offset     env size   [sector size  [sectors]]
    /dev/mmcblk0        0x3f8000   0x4000
    /dev/mmcblk0        0x3fc000   0x4000
    /dev/mmcblk0boot1   -0x4000    0x4000     # negative: from the end of the device
    /boot/uboot.env     0x0        0x4000     # a file on a FAT partition

Numbers are C literals (``strtoull(.., 0)``: 0x.. hex, 0.. octal, decimal).
Sector size and count matter only for MTD flash and are accepted but unused.
An eMMC hardware boot partition (``mmcblkNbootM``) is read-only until its
``/sys/block/<dev>/force_ro`` is 0; ``FwEnvStore`` lifts that around each write
and restores it, as fw_setenv does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.adapters.bootloader.envfile import EnvStore, Location
from agent.core.uboot_env import EnvError
from agent.errors import ConfigError

DEFAULT_ENV_SIZE = 0x4000  # U-Boot's CONFIG_ENV_SIZE on the boards we ship files for

_EMMC_BOOT = re.compile(r"^mmcblk\d+boot\d+$")
SizeOf = Callable[[Path], int]


def _c_int(text: str) -> int:
    t = text.strip().lower()
    neg = t.startswith("-")
    t = t.lstrip("+-")
    base = 16 if t.startswith("0x") else 8 if len(t) > 1 and t.startswith("0") else 10
    try:
        value = int(t, base)
    except ValueError:
        raise EnvError(f"fw_env.config: {text!r} is not a number") from None
    return -value if neg else value


def _device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def parse(text: str, *, base: Path = Path("/"), size_of: SizeOf = _device_size
          ) -> tuple[list[Location], int]:
    """The copies (device path, absolute offset) and the environment size."""
    locations: list[Location] = []
    sizes: set[int] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        if len(line) < 3:
            raise EnvError(f"fw_env.config line {n}: need 'device offset size', got {raw.strip()!r}")
        if re.match(r"^/dev/(mtd|ubi)", line[0]):
            # flash needs erase-before-write and libubootenv's flag semantics for NAND;
            # writing it like a block device would corrupt the copy without an error
            raise EnvError(f"fw_env.config line {n}: {line[0]} is MTD/UBI flash, which edgeops "
                           f"does not write", hint="keep the environment on eMMC/SD or in a file")
        path = base / line[0].lstrip("/") if line[0].startswith("/") else base / line[0]
        offset, size = _c_int(line[1]), _c_int(line[2])
        if offset < 0:  # libubootenv: counted back from the end of the device
            try:
                offset += size_of(path)
            except OSError as exc:
                raise EnvError(f"fw_env.config line {n}: cannot size {path}: {exc.strerror}") from None
            if offset < 0:
                raise EnvError(f"fw_env.config line {n}: offset lies before the start of {path}")
        locations.append(Location(path, offset))
        sizes.add(size)
    if not 1 <= len(locations) <= 2:
        raise EnvError(f"fw_env.config names {len(locations)} environment copies; U-Boot uses 1 or 2")
    if len(sizes) != 1:
        raise EnvError("fw_env.config: both copies must have the same size")
    return locations, sizes.pop()


class FwEnvStore(EnvStore):
    """An EnvStore that unlocks eMMC boot partitions (force_ro) only while it writes."""

    def __init__(self, locations: list[Location], size: int, *, sysfs: Path = Path("/sys")) -> None:
        super().__init__(locations, size)
        self.sysfs = sysfs

    def write(self, env: Mapping[str, str]) -> None:
        with self._writable():
            super().write(env)

    @contextmanager
    def _writable(self) -> Iterator[None]:
        switches = [self.sysfs / "block" / loc.path.name / "force_ro" for loc in self.locations
                    if _EMMC_BOOT.match(loc.path.name)]
        changed = []
        try:
            for sw in dict.fromkeys(switches):
                if sw.exists() and sw.read_text().strip() != "0":
                    sw.write_text("0")
                    changed.append(sw)
            yield
        except OSError as exc:
            raise EnvError(f"cannot make the eMMC boot partition writable: {exc.strerror}",
                           hint="run as root") from None
        finally:
            for sw in changed:  # back to read-only: nothing else should write there
                sw.write_text("1")


def load(config: Path, *, base: Path = Path("/"), sysfs: Path = Path("/sys")) -> FwEnvStore:
    try:
        text = config.read_text()
    except OSError as exc:
        raise EnvError(f"cannot read {config}: {exc.strerror}",
                       hint="install the board's fw_env.config (see docs/boards.md)") from None
    locations, size = parse(text, base=base)
    return FwEnvStore(locations, size, sysfs=sysfs)


def store_from_settings(settings: Mapping[str, Any], base: Path) -> EnvStore:
    """[bootloader] fw_env_config = PATH (as on a real board), else env/env_size/env_offsets.

    The one place both U-Boot schemes (uboot, uboot_rauc) get their environment from."""
    cfg = settings.get("fw_env_config")
    if cfg is None:
        return _explicit_store(settings, base)
    root = base / str(settings.get("root", "/"))
    return load(base / str(cfg), base=root, sysfs=root / "sys")


def _explicit_store(settings: Mapping[str, Any], base: Path) -> EnvStore:
    try:
        env = base / str(settings["env"])
        size = int(settings.get("env_size", DEFAULT_ENV_SIZE))
        offsets = [int(o) for o in settings.get("env_offsets", [0, size])]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"[bootloader] needs env (path), env_size and env_offsets: {exc}") from None
    try:
        return EnvStore([Location(env, o) for o in offsets], size)
    except EnvError as exc:
        raise ConfigError(f"[bootloader] {exc}") from None
