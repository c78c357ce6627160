"""autoboot.txt, the Raspberry Pi firmware's partition chooser: bytes in, an ``Autoboot`` out, and back. Pure.

As the firmware reads it (documentation/asciidoc/computers/config_txt/autoboot.adoc): at
most 512 bytes, ASCII, the ``[all]``, ``[none]`` and ``[tryboot]`` filters, ``key=value``
lines where the last setting wins. Hand-written because it is tiny and must be exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import BootloaderError

AUTOBOOT = "autoboot.txt"
MAX_AUTOBOOT = 512  # the firmware reads no more (autoboot.adoc)
FILTERS = ("all", "none", "tryboot")


class AutobootError(BootloaderError):
    pass


@dataclass(frozen=True)
class Autoboot:
    """What an autoboot.txt says. ``extra`` keeps other [all] properties the board uses."""

    boot_partition: int
    tryboot_partition: int | None
    tryboot_a_b: bool = True
    extra: tuple[tuple[str, str], ...] = ()

    def to_bytes(self) -> bytes:
        lines = ["[all]", f"tryboot_a_b={int(self.tryboot_a_b)}",
                 *(f"{k}={v}" for k, v in self.extra), f"boot_partition={self.boot_partition}"]
        if self.tryboot_partition is not None:
            lines += ["[tryboot]", f"boot_partition={self.tryboot_partition}"]
        data = ("\n".join(lines) + "\n").encode()
        if len(data) > MAX_AUTOBOOT:
            raise AutobootError(f"autoboot.txt would be {len(data)} bytes; the firmware reads 512")
        return data


def parse_autoboot(data: bytes) -> Autoboot:
    """Sections and properties as the firmware reads them: the last setting wins."""
    if len(data) > MAX_AUTOBOOT:
        raise AutobootError(f"autoboot.txt is {len(data)} bytes; the firmware reads only 512")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise AutobootError("autoboot.txt is not ASCII") from None
    section = "all"
    props: dict[str, dict[str, str]] = {f: {} for f in FILTERS}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            if section not in FILTERS:
                raise AutobootError(f"autoboot.txt supports only [all], [none] and [tryboot], "
                                    f"not [{section}]")
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise AutobootError(f"autoboot.txt line {raw!r} is not key=value")
        props[section][key.strip()] = value.strip()
    base = props["all"]
    trial = props["tryboot"].get("boot_partition")
    return Autoboot(
        boot_partition=_partition(base.get("boot_partition", "0")),
        tryboot_partition=_partition(trial) if trial is not None else None,
        tryboot_a_b=base.get("tryboot_a_b", "0") == "1",
        extra=tuple((k, v) for k, v in base.items() if k not in ("boot_partition", "tryboot_a_b")),
    )


def _partition(text: str) -> int:
    if not (text.isascii() and text.isdigit()):  # int() would also take "1_0" or " +3"
        raise AutobootError(f"autoboot.txt boot_partition={text!r} is not a partition number")
    return int(text)


def initial_autoboot(primary_partition: int, other_partition: int) -> bytes:
    """autoboot.txt for a freshly flashed board: boot ``primary``, trials go to ``other``."""
    return Autoboot(primary_partition, other_partition).to_bytes()
