"""The one way edgeops replaces a file: readers see the old bytes or the new, never a mix.

Power can fail at any instruction on a device, so a replacement is: a temporary file in
the same directory (created with its final mode, so a secret is never world-readable even
for an instant), the data, ``fsync`` of the file, ``rename`` over the target, and ``fsync``
of the directory so the rename itself is on disk before we report success. Every writer
in the agent, the host tools and the controller goes through here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Files that hold secrets (keys, tokens, the keystore) are created 0600; everything else 0644.
PUBLIC = 0o644
SECRET = 0o600


def fsync_dir(path: Path) -> None:
    """Make a rename, create or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, *, mode: int = PUBLIC, dir_mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` when the block exits without an exception.

    On an exception the temporary file is removed and ``path`` is left as it was.
    ``dir_mode`` creates missing parent directories with that mode.
    """
    if dir_mode is not None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    tmp, fd = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _create_temp(path: Path, mode: int) -> tuple[Path, int]:
    """A new file beside ``path``, created with ``mode`` (less the umask) in the same call: no
    chmod afterwards, which a FAT boot partition refuses for bits it cannot represent."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write(path: Path, data: bytes | str, *, mode: int = PUBLIC, dir_mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8), durably and atomically."""
    with atomic_file(path, mode=mode, dir_mode=dir_mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def replace_durably(src: Path, dst: Path) -> None:
    """Rename a file that is already complete and fsynced over ``dst``, and make the rename durable."""
    os.replace(src, dst)
    fsync_dir(dst.parent)
