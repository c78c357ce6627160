"""Per-slot fix-ups: declared edits that make a written slot's boot files name that slot. Pure.

The same signed payload installs into either slot, so a file inside it cannot say which
slot it is in. On boards whose boot files live on a per-slot partition (the Raspberry Pi's
``cmdline.txt`` names the root filesystem; the rootfs's ``/etc/fstab`` names the boot
partition mounted at ``/boot/firmware``) the board file declares, per slot, the values those
files must carry. After the payload's hash is verified and before the trial is armed the
agent rewrites them (agent.adapters.fixup_apply); ``board check`` reports a slot whose files
do not carry them. A fix-up is data, not code shipped in the update: RAUC's slot hooks and
Mender's state scripts run scripts instead (docs/boards.md, "Per-slot fix-ups").

A board file (and the agent.toml made from it) declares::

    [[fixups]]
    payload = "boot"            # payload class: the file is in that slot's filesystem
    file = "cmdline.txt"        # relative to that filesystem's root
    format = "cmdline"          # "cmdline" (key=value words of one line) | "fstab"
    access = "mount"            # "mount" (default) | "mtools" (FAT, without mounting)
    set.A = { root = "/dev/mmcblk0p5", "edgeops.slot" = "A" }
    set.B = { root = "/dev/mmcblk0p6", "edgeops.slot" = "B" }

``format = "fstab"``: each key is a mount point, its value the device (first field) of the
entry that mounts there. Every edit is idempotent: applying a fix-up to its own output
changes nothing, so a run that a power cut stopped is simply run again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from agent.core.frozen import Frozen
from agent.errors import ConfigError, SlotError

FORMATS = ("cmdline", "fstab")
ACCESS = ("mount", "mtools")
MAX_FIXUPS = 8  # per board
MAX_KEYS = 16  # per slot of one fix-up
MAX_PATH = 255  # characters of ``file``
MAX_PARTS = 8  # directory depth of ``file``
MAX_VALUE = 255  # characters of one key or value
MAX_FILE = 64 << 10  # bytes of a file a fix-up reads (cmdline.txt is one line; fstab a few)

_KEY = re.compile(r"[A-Za-z0-9_.\-]+")  # a kernel parameter name
_VALUE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no blank, no quote (below)
_PART = re.compile(r"[A-Za-z0-9_.\-+]+")  # one component of ``file``


class Fixup(Frozen):
    """One file of one payload class, and per slot the (key, value) pairs it must carry."""

    payload: str
    file: str  # normalised relative path inside that payload's filesystem
    format: str
    access: str
    values: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (slot, ((key, value), ...))

    def pairs(self, slot: str) -> tuple[tuple[str, str], ...]:
        return dict(self.values)[slot]

    def describe(self, slot: str) -> str:
        """One line for the journal and for messages: which file and what it is set to."""
        return f"{self.payload}:{self.file} " + " ".join(f"{k}={v}" for k, v in self.pairs(slot))


class SlotFixup(Frozen):
    """A fix-up to apply to one written slot (core.plan puts these into an InstallPlan)."""

    fixup: Fixup
    slot: str
    device: Path  # the target slot's device (or file) for ``fixup.payload``

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return self.fixup.pairs(self.slot)


# --- declarations -----------------------------------------------------------------------------
def rel_path(text: object, where: str) -> str:
    """``text`` as a normalised path inside a filesystem, or the refusal: relative, no ``..``,
    no empty or dot components, bounded length and depth, plain characters only."""
    if not isinstance(text, str) or not text or len(text) > MAX_PATH:
        raise ConfigError(f"{where}: file must be a relative path of 1 to {MAX_PATH} characters")
    if text.startswith("/") or "\\" in text:
        raise ConfigError(f"{where}: file {text!r} must be relative to the slot's filesystem, "
                          f"e.g. \"cmdline.txt\"")
    parts = text.split("/")
    if len(parts) > MAX_PARTS or any(p in ("", ".", "..") or not _PART.fullmatch(p) for p in parts):
        raise ConfigError(f"{where}: file {text!r} must stay inside the slot's filesystem "
                          f"(no '..', '.', empty parts; letters, digits, '._-+'; at most "
                          f"{MAX_PARTS} parts)")
    return str(PurePosixPath(*parts))


def _pairs(fmt: str, table: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(table, Mapping) or not table:
        raise ConfigError(f"{where} must be a table of key = \"value\"")
    if len(table) > MAX_KEYS:
        raise ConfigError(f"{where}: at most {MAX_KEYS} keys, found {len(table)}")
    out = []
    for key, value in table.items():
        if fmt == "fstab":
            ok_key = (isinstance(key, str) and key.startswith("/") and len(key) <= MAX_VALUE
                      and bool(_VALUE.fullmatch(key)) and ".." not in key.split("/"))
        else:
            ok_key = isinstance(key, str) and len(key) <= MAX_VALUE and bool(_KEY.fullmatch(key))
        if not ok_key:
            raise ConfigError(f"{where}: key {key!r} is not " + (
                "an absolute mount point" if fmt == "fstab" else "a kernel parameter name"))
        if (not isinstance(value, str) or len(value) > MAX_VALUE or not _VALUE.fullmatch(value)
                or '"' in value or "'" in value):
            raise ConfigError(f"{where}: {key} = {value!r} must be 1 to {MAX_VALUE} printable "
                              f"characters without blanks or quotes")
        out.append((key, value))
    return tuple(out)


def parse_fixups(doc: object, where: str, *, slots: Iterable[str],
                 classes: Iterable[str]) -> tuple[Fixup, ...]:
    """The ``[[fixups]]`` array of a board file or agent.toml, checked against the board's
    slots and payload classes. Every slot gets its own values for every fix-up."""
    if doc is None:
        return ()
    if not isinstance(doc, list) or not all(isinstance(d, Mapping) for d in doc):
        raise ConfigError(f"{where}: fixups must be an array of tables ([[fixups]])")
    if len(doc) > MAX_FIXUPS:
        raise ConfigError(f"{where}: at most {MAX_FIXUPS} fix-ups, found {len(doc)}")
    slot_names, class_names = tuple(slots), set(classes)
    out: list[Fixup] = []
    for n, d in enumerate(doc):
        at = f"{where}: fixups[{n}]"
        unknown = set(d) - {"payload", "file", "format", "access", "set"}
        if unknown:
            raise ConfigError(f"{at}: unknown keys {', '.join(sorted(map(str, unknown)))} "
                              f"(payload, file, format, access, set)")
        payload = d.get("payload")
        if payload not in class_names:
            raise ConfigError(f"{at}: payload {payload!r} is not one of the slots' payload "
                              f"classes ({', '.join(sorted(class_names))})")
        fmt, access = d.get("format"), d.get("access", "mount")
        if fmt not in FORMATS:
            raise ConfigError(f"{at}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        if access not in ACCESS:
            raise ConfigError(f"{at}: access {access!r} is not one of {', '.join(ACCESS)}")
        per_slot = d.get("set")
        if not isinstance(per_slot, Mapping) or set(per_slot) != set(slot_names):
            raise ConfigError(f"{at}: set must give values for each slot "
                              f"(set.{slot_names[0]} = {{ ... }}, set.{slot_names[-1]} = {{ ... }})")
        values = tuple((s, _pairs(fmt, per_slot[s], f"{at}.set.{s}")) for s in slot_names)
        if len({tuple(k for k, _ in p) for _, p in values}) != 1:
            raise ConfigError(f"{at}: every slot must set the same keys")
        if len({p for _, p in values}) == 1 and len(slot_names) > 1:
            raise ConfigError(f"{at}: the slots' values are all equal, so the fix-up cannot "
                              f"tell the slots apart", hint="give each slot its own value")
        fix = Fixup(str(payload), rel_path(d.get("file"), at), str(fmt), str(access), values)
        if any((f.payload, f.file) == (fix.payload, fix.file) for f in out):
            raise ConfigError(f"{at}: {fix.payload}:{fix.file} has a fix-up already; "
                              f"put all its keys into one")
        out.append(fix)
    return tuple(out)


def to_toml(fixups: Iterable[Fixup]) -> list[dict[str, object]]:
    """The ``[[fixups]]`` array again (``board config`` writes it into agent.toml)."""
    return [{"payload": f.payload, "file": f.file, "format": f.format, "access": f.access,
             "set": {s: dict(p) for s, p in f.values}} for f in fixups]


# --- the edits ----------------------------------------------------------------------------------
def _text(data: bytes, where: str) -> str:
    if len(data) > MAX_FILE:
        raise SlotError(f"{where} is {len(data)} bytes; a fix-up reads at most {MAX_FILE}",
                        hint="the payload's file is not the one the board file means")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SlotError(f"{where} is not UTF-8 text", hint="check the payload's boot files") from None


def _cmdline_words(text: str, where: str) -> list[str]:
    body = text.removesuffix("\n").removesuffix("\r")
    if "\n" in body or "\r" in body:
        raise SlotError(f"{where} has more than one line; a kernel command line is one line",
                        hint="join it into one line in the payload")
    return body.split()


def apply(fmt: str, data: bytes, pairs: tuple[tuple[str, str], ...], where: str) -> bytes:
    """``data`` with ``pairs`` set: the new file's bytes (``data`` itself if nothing changes)."""
    text = _text(data, where)
    if fmt == "cmdline":
        words = _cmdline_words(text, where)
        for key, value in pairs:
            hits = [i for i, w in enumerate(words) if w.split("=", 1)[0] == key]
            word = f"{key}={value}"
            if hits:  # the first keeps its place; later ones would override it: dropped
                words[hits[0]] = word
                words = [w for i, w in enumerate(words) if i not in hits[1:]]
            else:
                words.append(word)
        out = " ".join(words) + "\n"
    elif fmt == "fstab":
        lines = text.splitlines(keepends=True)
        for mount, device in pairs:
            hits = [i for i, ln in enumerate(lines) if _fstab_mount(ln) == mount]
            if not hits:
                raise SlotError(f"{where} has no entry for {mount}",
                                hint=f"add a line mounting {mount} to the payload's fstab")
            for i in hits:
                ln = lines[i]
                lead = ln[:len(ln) - len(ln.lstrip())]
                rest = ln.lstrip()
                lines[i] = lead + device + rest[len(rest.split()[0]):]
        out = "".join(lines)
    else:
        raise ConfigError(f"unknown fix-up format {fmt!r}")
    new = out.encode()
    return data if new == data else new


def _fstab_mount(line: str) -> str | None:
    fields = line.split()
    if len(fields) < 2 or fields[0].startswith("#"):
        return None
    return fields[1]


def mismatches(fmt: str, data: bytes, pairs: tuple[tuple[str, str], ...], where: str) -> list[str]:
    """Which declared ``key=value`` pairs ``data`` does not carry (``board check``): the file
    names its slot when this is empty."""
    text = _text(data, where)
    if fmt == "cmdline":
        have: dict[str, str] = {}
        for w in _cmdline_words(text, where):
            k, _, v = w.partition("=")
            have[k] = v  # the kernel and the agent take the last one
    else:
        have = {m: ln.split()[0] for ln in text.splitlines() if (m := _fstab_mount(ln)) is not None}
    return [f"{k}={v}" for k, v in pairs if have.get(k) != v]


def for_install(fixups: Iterable[Fixup], target: str, written: Mapping[str, Path]
                ) -> tuple[SlotFixup, ...]:
    """The fix-ups an install applies: those of the payload classes it writes (``written``:
    class -> the target's device), for the target slot, in declaration order."""
    return tuple(SlotFixup(f, target, written[f.payload]) for f in fixups if f.payload in written)
