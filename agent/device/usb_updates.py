"""Signed bundles from a USB stick: find them, verify them as any source, offer or install by policy.

The stick is trusted no further than the signature. What is read from it is bounded here:
at most ``MAX_CANDIDATES`` bundles, names of safe characters and bounded length, only
regular files (``agent.adapters.usb`` refuses links and device nodes), only at the top
level or in an ``edgeops/`` folder; a size the filesystem claims is never trusted (the
signed manifest gives the size that is shown and written, and a stream that ends early is
a truncated bundle). ``preview`` verifies a bundle's signed head exactly as an install
does (``TrustStore.verify`` and ``plan_install``) and changes nothing; ``install`` is
``Updater.install`` on the stick's stream, so a stick pulled mid-install is a truncated
stream: nothing is committed, the active slot and the boot configuration stay as they were.

Board policy (``[console] usb``): ``offer`` records what a new stick holds in
``STATE/usb/offer.json`` for the console to show (``install usb``, and ``diag usb`` writes
there even when it holds no bundle), ``install`` installs
the newest verified bundle at once (the console is not needed), ``off`` ignores sticks.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from agent.adapters import usb
from agent.adapters.fsutil import atomic_write
from agent.core import console_audit, logs
from agent.errors import BundleError, EdgeopsError, StateError

if TYPE_CHECKING:
    from agent.device.updater import InstallResult, Progress, Updater

log = logs.get(__name__)
BUNDLE_SUFFIXES = (".eob", ".bundle", ".edgeops")
FOLDER = "edgeops"
MAX_CANDIDATES = 16
MAX_NAME = 96
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
OFFER_FILE = "usb/offer.json"


@dataclass(frozen=True)
class Found:
    path: str  # relative to the filesystem's root: NAME or edgeops/NAME
    claimed_size: int | None  # what the filesystem says; shown as a claim, never trusted


def find_bundles(medium: usb.Medium) -> list[Found]:
    """Bundle files at the top level or in ``edgeops/``, sorted by path, at most MAX_CANDIDATES."""
    out: list[Found] = []
    for folder in ("", FOLDER):
        for e in medium.entries(folder):
            if (e.kind != "file" or len(e.name) > MAX_NAME or not _NAME.fullmatch(e.name)
                    or not e.name.lower().endswith(BUNDLE_SUFFIXES)):
                continue
            out.append(Found(f"{folder}/{e.name}" if folder else e.name, e.size))
    return sorted(out, key=lambda f: f.path)[:MAX_CANDIDATES]


@dataclass(frozen=True)
class Preview:
    """What the confirmation shows: all from the verified, signed head."""

    path: str
    version: str
    security_version: int
    compatible: str
    signer: str
    size: int  # bytes the payloads take in the slot (signed)
    target: str
    replaces: str  # what the target slot holds now
    booted: str
    head_len: int = 0  # the signed head's bytes, and their hash: what the confirmation saw
    head_sha256: str = ""

    def lines(self) -> list[str]:
        return [f"bundle    {self.path}",
                f"version   {self.version} (security {self.security_version}, for {self.compatible})",
                f"signer    {self.signer}",
                f"size      {self.size} bytes ({self.size / 2**20:.1f} MiB) into slot {self.target}",
                f"effect    slot {self.target} ({self.replaces}) is overwritten; the next boot",
                f"          tries {self.version} once; slot {self.booted} stays the fallback"]


def preview(up: Updater, stream: BinaryIO, path: str) -> Preview:
    """Verify the bundle's signed head and plan it, changing nothing (raises as an install would)."""
    from agent.adapters.bundle import BundleReader
    from agent.adapters.truststore import TrustStore
    from agent.core.plan import pending_trial, plan_install

    seen_bytes = _Recorder(stream)
    head = BundleReader(cast(BinaryIO, seen_bytes)).read_head()
    head_len = head.size
    head_sha = hashlib.sha256(bytes(seen_bytes.data[:head_len])).hexdigest()
    seen = up.guard.witnessed
    verdict = TrustStore(up.cfg, up.journal, up.root()).verify(
        head, up.clock(), floor_at_least=seen.security_floor if seen else 0,
        time_at_least=seen.trusted_time if seen else 0)
    state, bl, m = up.journal.state(), up.dev.bootloader, verdict.manifest
    booted = up.dev.runtime.booted_slot()
    plan = plan_install(m, phase=state.phase, booted=booted, primary=bl.primary(),
                        slots=up.cfg.slots, device_health=up.cfg.health_policy,
                        pending=pending_trial(state, bl.trial()), replace_trial=False)
    held = up.journal.slots().get(plan.target)
    replaces = f"{held.version or '-'} {held.state}" if held else "empty"
    return Preview(path, m.version, m.security_version, m.compatible, verdict.signer_subject,
                   sum(p.size for p in m.payloads), plan.target, replaces, booted, head_len, head_sha)


def install(up: Updater, stream: BinaryIO, *, progress: Progress | None = None,
            confirmed: Preview | None = None) -> InstallResult:
    """``Updater.install`` from the stick (an armed trial is not replaced from a stick).

    With ``confirmed``, the stream must carry the very head that was verified and shown:
    a stick (or a file) that answers the second read with another bundle is refused when
    its head has been read, before the install verifies, plans or records anything."""
    if confirmed is not None:
        stream = cast(BinaryIO, SameHead(stream, confirmed))
    return up.install(stream, progress=progress, replace_trial=False)


class _Recorder:
    """Keeps the bytes read through it (only the head is read through it: bounded by the
    bundle reader's head limits)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.data = raw, bytearray()

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n)
        self.data += chunk
        return chunk


class SameHead:
    """A stream whose first ``head_len`` bytes must hash to the confirmed head's SHA-256."""

    def __init__(self, raw: BinaryIO, pv: Preview) -> None:
        self.raw, self.pv = raw, pv
        self.h = hashlib.sha256()
        self.seen = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n)
        if self.seen < self.pv.head_len:
            take = chunk[: self.pv.head_len - self.seen]
            self.h.update(take)
            self.seen += len(take)
            if self.seen >= self.pv.head_len and self.h.hexdigest() != self.pv.head_sha256:
                raise BundleError(f"{self.pv.path} changed after it was confirmed",
                                  hint="the source gave different bytes the second time; "
                                       "use another stick or copy of the bundle")
        return chunk


# --- a stick, opened --------------------------------------------------------------------------
@dataclass(frozen=True)
class Offer:
    devnode: str
    fs_type: str | None
    bundles: tuple[str, ...]
    at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, path: Path) -> Offer | None:
        try:
            d = json.loads(path.read_text())
            return cls(str(d["devnode"]), d.get("fs_type"), tuple(map(str, d["bundles"]))[:MAX_CANDIDATES],
                       float(d["at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


Opener = Callable[[str, str | None], usb.Medium]


def default_opener(state_dir: Path) -> Opener:
    return lambda node, fs: usb.open_medium(node, fs, mount_under=state_dir / "usb" / "mnt")


@contextmanager
def opened(opener: Opener, devnode: str, fs_type: str | None) -> Any:
    medium = opener(devnode, fs_type)
    try:
        yield medium
    finally:
        medium.close()


def open_bundle(medium: usb.Medium, path: str) -> BinaryIO:
    return medium.open(path)


# --- the agent's watcher ----------------------------------------------------------------------
def sticks(events: Iterable[usb.BlockEvent]) -> Iterator[usb.BlockEvent]:
    """Only block devices on a USB bus: the device's own disk (its slots, its data partition,
    virtio/SATA/eMMC) has filesystems too, and is never a stick to mount and offer."""
    return (ev for ev in events if ev.bus == "usb")



class UsbWatcher:
    """Turns block events into offers (or installs) by the board's policy."""

    def __init__(self, up_factory: Callable[[], Any], state_dir: Path, policy: str, *,
                 opener: Opener | None = None, clock: Callable[[], float] = time.time) -> None:
        self.up_factory = up_factory  # a context manager giving an Updater
        self.state_dir = state_dir
        self.policy = policy
        self.opener = opener or default_opener(state_dir)
        self.clock = clock
        self.messages: list[str] = []

    @property
    def offer_path(self) -> Path:
        return self.state_dir / OFFER_FILE

    def run(self, events: Iterable[usb.BlockEvent]) -> None:
        for ev in events:
            self.handle(ev)

    def handle(self, ev: usb.BlockEvent) -> None:
        if self.policy == "off":
            return
        if ev.action == "remove":
            offer = Offer.load(self.offer_path)
            if offer is not None and offer.devnode == ev.devnode:
                self.offer_path.unlink(missing_ok=True)
                self.messages.append(f"{ev.devnode} removed")
            return
        if ev.action not in ("add", "change") or ev.fs_type is None:
            return  # a whole disk with partitions: its partitions come as events of their own
        if ev.action == "change":  # media into a card reader, a loop device attached
            offer = Offer.load(self.offer_path)
            if offer is not None and offer.devnode == ev.devnode:
                return  # already seen
        try:
            with opened(self.opener, ev.devnode, ev.fs_type) as medium:
                found = find_bundles(medium)
                if found and self.policy == "install":
                    self._install_newest(medium, ev, found)
                    return
        except EdgeopsError as exc:
            self.messages.append(f"{ev.devnode}: {exc.one_line()}")
            log.warning("USB stick %s: %s", ev.devnode, exc.one_line())
            return
        offer = Offer(ev.devnode, ev.fs_type, tuple(f.path for f in found), self.clock())
        atomic_write(self.offer_path, offer.to_json(), dir_mode=0o700)
        self.messages.append(f"{ev.devnode}: {len(found)} bundle(s) offered on the console")


    def _install_newest(self, medium: usb.Medium, ev: usb.BlockEvent, found: list[Found]) -> None:
        """Policy ``install``: the last bundle (by name) that verifies is installed, unless
        a good slot already holds its version (the stick was left in)."""
        with self.up_factory() as up:
            for f in reversed(found):
                try:
                    with open_bundle(medium, f.path) as stream:
                        pv = preview(up, stream, f.path)
                except StateError:
                    raise
                except EdgeopsError as exc:
                    self.messages.append(f"{f.path}: refused: {exc.one_line()}")
                    continue
                held = {i.version for i in up.journal.slots().values() if i.state == "good"}
                if pv.version in held:
                    # a stick left in: the next start must not install (and try) it again
                    self.messages.append(f"{f.path}: {pv.version} is already on this device")
                    return
                try:
                    with open_bundle(medium, f.path) as stream:
                        result = install(up, stream, confirmed=pv)
                    outcome = f"installed {result.version} into slot {result.slot}"
                except EdgeopsError as exc:
                    outcome = f"failed: {exc.one_line()}"
                self.messages.append(f"{f.path}: {outcome}")
                audit = console_audit.AuditEvent(self.clock(), "usb", "-", "-",
                                                 f"install {f.path}", outcome, ev.devnode)
                up.journal.record([audit.history()], now=self.clock())
                up.journal.enqueue(console_audit.KIND, audit.outbox_body(), now=self.clock())
                return


def usb_write(state_dir: Path, offer: Offer, name: str, data: bytes) -> None:
    """The diagnostics bundle onto the offered stick (``agent.adapters.usb.write_file``)."""
    usb.write_file(offer.devnode, offer.fs_type, name, data, mount_under=state_dir / "usb" / "mnt")
