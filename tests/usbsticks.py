"""Real filesystem images for the USB tests: ext4 on a loop device, FAT made with mtools."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is missing: apt install {package}")


@contextmanager
def ext4_stick(tree: Path, image: Path, size_mb: int = 16) -> Iterator[str]:
    """``tree`` as an ext4 filesystem (mkfs.ext4 -d, no mount needed) on a loop device."""
    need("mkfs.ext4", "e2fsprogs")
    need("losetup", "mount")
    if os.geteuid() != 0:
        pytest.skip("loop devices need root (run the tests as root, as CI does)")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), f"{size_mb}M"],
                   check=True, capture_output=True)
    proc = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no loop device available here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def fat_image(files: dict[str, Path | bytes], image: Path, size_kb: int = 8192) -> Path:
    """A FAT filesystem image holding ``files`` (paths inside it, 'edgeops/x' makes the folder)."""
    need("mformat", "mtools")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    with open(image, "wb") as f:
        f.truncate(size_kb * 1024)
    subprocess.run(["mformat", "-i", str(image), "::"], check=True, capture_output=True, env=env)
    made: set[str] = set()
    for name, content in files.items():
        if "/" in name and (folder := name.rsplit("/", 1)[0]) not in made:
            subprocess.run(["mmd", "-i", str(image), f"::/{folder}"], check=True, env=env)
            made.add(folder)
        src = content if isinstance(content, Path) else image.with_name("fat-src.bin")
        if isinstance(content, bytes):
            src.write_bytes(content)
        subprocess.run(["mcopy", "-i", str(image), str(src), f"::/{name}"], check=True, env=env)
    return image
