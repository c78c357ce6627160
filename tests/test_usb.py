"""USB sticks: real ext4 (loop device, mounted ro,nosuid,nodev,noexec) and FAT (mtools, never
mounted), what is found on them and what is refused, synthetic udev events, a stick pulled
mid-install."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from agent.adapters import usb
from agent.core.config import load
from agent.device import console, usb_updates
from agent.device.updater import Device, Updater
from agent.errors import IncompatibleBundle
from tests.conftest import BundleFactory
from tests.usbsticks import ext4_stick, fat_image


def _tree(tmp: Path, bundle: Path) -> Path:
    t = tmp / "tree"
    (t / "edgeops").mkdir(parents=True)
    (t / "top.eob").write_bytes(bundle.read_bytes())
    (t / "edgeops" / "v2.bundle").write_bytes(bundle.read_bytes())
    (t / "readme.txt").write_text("not a bundle")
    (t / "edgeops" / ("x" * 120 + ".eob")).write_bytes(b"too long a name")
    (t / "-rf.eob").write_bytes(b"a name that starts like an option")
    os.symlink("/etc/shadow", t / "link.eob")
    os.mkfifo(t / "fifo.eob")
    os.mknod(t / "disk.eob", 0o600 | 0o060000, os.makedev(7, 0))  # a block device node
    (t / "host").mkdir()
    (t / "host" / "secret.eob").write_bytes(b"stands for a file outside the stick")
    (t / "deep" / "edgeops").mkdir(parents=True)
    (t / "deep" / "edgeops" / "nested.eob").write_bytes(bundle.read_bytes())  # not searched
    return t


@pytest.fixture
def ext4(tmp_path: Path, make_bundle: BundleFactory) -> Any:
    if os.geteuid() != 0:
        pytest.skip("mknod and loop devices need root (run the tests as root, as CI does)")
    bundle = make_bundle("2.0")
    with ext4_stick(_tree(tmp_path, bundle), tmp_path / "stick.ext4") as dev:
        yield dev, bundle


def test_an_ext4_stick_is_mounted_read_only_nosuid_nodev_noexec(ext4: Any, tmp_path: Path) -> None:
    dev, _ = ext4
    medium = usb.MountedMedium(dev, "ext4", under=tmp_path / "mnt")
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        (line,) = [m for m in mounts if f" {medium.mountpoint} " in m]
        opts = set(line.split()[3].split(","))
        assert {"ro", "nosuid", "nodev", "noexec"} <= opts
    finally:
        medium.close()
    assert not medium.mountpoint.exists()


def test_only_bundle_files_with_safe_names_at_the_top_or_in_edgeops_are_found(ext4: Any,
                                                                             tmp_path: Path) -> None:
    dev, _ = ext4
    medium = usb.MountedMedium(dev, "ext4", under=tmp_path / "mnt")
    try:
        assert [f.path for f in usb_updates.find_bundles(medium)] == ["edgeops/v2.bundle", "top.eob"]
    finally:
        medium.close()


@pytest.mark.parametrize("name", ["link.eob", "fifo.eob", "disk.eob"])
def test_links_fifos_and_device_nodes_are_never_opened(ext4: Any, tmp_path: Path, name: str) -> None:
    dev, _ = ext4
    medium = usb.MountedMedium(dev, "ext4", under=tmp_path / "mnt")
    try:
        with pytest.raises(usb.MediumError, match=r"link|not a regular file"):
            medium.open(name)
    finally:
        medium.close()


def test_a_folder_with_thousands_of_entries_is_read_only_up_to_the_bound(tmp_path: Path) -> None:
    d = tmp_path / "many"
    d.mkdir()
    for i in range(usb.MAX_ENTRIES + 100):
        (d / f"b{i:05d}.eob").write_bytes(b"")
    found = usb_updates.find_bundles(usb.DirectoryMedium(d))
    assert len(found) == usb_updates.MAX_CANDIDATES


def test_a_fat_stick_is_read_without_mounting(tmp_path: Path, make_bundle: BundleFactory) -> None:
    bundle = make_bundle("2.0")
    img = fat_image({"top.eob": bundle, "edgeops/v2.bundle": bundle, "notes.txt": b"hi"},
                    tmp_path / "stick.fat")
    medium = usb.MtoolsMedium(str(img))
    assert [f.path for f in usb_updates.find_bundles(medium)] == ["edgeops/v2.bundle", "top.eob"]
    with medium.open("edgeops/v2.bundle") as stream:
        assert stream.read() == bundle.read_bytes()


def test_a_file_that_is_not_fat_is_one_medium_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(65536))
    with pytest.raises(usb.MediumError, match="not a FAT filesystem"):
        usb.MtoolsMedium(str(junk))


def test_a_bundle_on_the_stick_is_verified_like_any_other(updater: Updater, tmp_path: Path,
                                                          make_bundle: BundleFactory) -> None:
    img = fat_image({"bad.eob": make_bundle("2.0", compatible="other-board")}, tmp_path / "s.fat")
    medium = usb.MtoolsMedium(str(img))
    with medium.open("bad.eob") as stream, pytest.raises(IncompatibleBundle):
        usb_updates.preview(updater, stream, "bad.eob")


def test_the_preview_comes_from_the_signed_head_and_changes_nothing(
        updater: Updater, make_bundle: BundleFactory) -> None:
    before = (updater.journal.generation, updater.journal.trusted_time)
    pv = usb_updates.preview(updater, io.BytesIO(make_bundle("2.5", security_version=4).read_bytes()),
                             "x.eob")
    assert (pv.version, pv.security_version, pv.target, pv.booted, pv.size) == ("2.5", 4, "B", "A", 300_000)
    assert "CN=edgeops signer" in pv.signer
    assert (updater.journal.generation, updater.journal.trusted_time) == before


# --- udev events and the watcher ---------------------------------------------------------------
def test_a_real_block_device_becomes_an_event(ext4: Any) -> None:
    pyudev = pytest.importorskip("pyudev", reason="pip install pyudev (the udev extra)")
    dev, _ = ext4
    ctx = pyudev.Context()
    ev = usb.event_of(pyudev.Devices.from_device_file(ctx, dev), "add")
    assert ev is not None and (ev.action, ev.devnode, ev.devtype) == ("add", dev, "disk")


class _Ups:
    def __init__(self, device: Device) -> None:
        self.device = device

    def __call__(self) -> Any:
        from contextlib import nullcontext

        return nullcontext(Updater(self.device))


def _watcher(device: Device, policy: str, opener: Any = None) -> usb_updates.UsbWatcher:
    return usb_updates.UsbWatcher(_Ups(device), device.config.state_dir, policy,
                                  opener=opener or (lambda node, fs: usb.MtoolsMedium(node)))


def test_a_stick_with_bundles_is_offered_and_its_removal_withdraws_the_offer(
        device: Device, tmp_path: Path, make_bundle: BundleFactory) -> None:
    img = fat_image({"edgeops/v2.bundle": make_bundle("2.0")}, tmp_path / "s.fat")
    w = _watcher(device, "offer")
    w.run([usb.BlockEvent("add", str(img), "disk", None),  # a disk without a filesystem: ignored
           usb.BlockEvent("add", str(img), "partition", "vfat")])
    offer = usb_updates.Offer.load(w.offer_path)
    assert offer is not None and offer.bundles == ("edgeops/v2.bundle",)
    w.handle(usb.BlockEvent("remove", str(img), "partition", "vfat"))
    assert not w.offer_path.exists()


def test_policy_install_installs_the_newest_verified_bundle_and_audits_it(
        device: Device, tmp_path: Path, make_bundle: BundleFactory) -> None:
    img = fat_image({"a-2.0.eob": make_bundle("2.0"), "b-3.0.eob": make_bundle("3.0"),
                     "c-9.0.eob": make_bundle("9.0", compatible="other")}, tmp_path / "s.fat")
    w = _watcher(device, "install")
    w.handle(usb.BlockEvent("add", str(img), "partition", "vfat"))
    assert device.journal.slots()["B"].version == "3.0"
    assert any("c-9.0.eob: refused" in m for m in w.messages)
    rows = device.journal.pending(kind="console-audit")
    assert [r[2]["command"] for r in rows] == ["install b-3.0.eob"]


def test_policy_off_ignores_sticks(device: Device, tmp_path: Path, make_bundle: BundleFactory) -> None:
    img = fat_image({"a.eob": make_bundle("2.0")}, tmp_path / "s.fat")
    w = _watcher(device, "off")
    w.handle(usb.BlockEvent("add", str(img), "partition", "vfat"))
    assert not w.offer_path.exists() and device.journal.slots()["B"].state == "empty"


# --- pulling the stick mid-install -------------------------------------------------------------
class _PulledMedium:
    """The real mtools reader, whose mcopy is killed after ``after`` bytes: the stick is gone."""

    def __init__(self, node: str, after: int) -> None:
        self.inner = usb.MtoolsMedium(node)
        self.where, self.after, self.opens = node, after, 0

    def entries(self, folder: str = "") -> list[usb.Entry]:
        return self.inner.entries(folder)

    def open(self, path: str) -> BinaryIO:
        self.opens += 1
        stream: Any = self.inner.open(path)
        if self.opens < 2:  # the preview reads the head intact
            return stream  # type: ignore[no-any-return]
        after, real_read = self.after, stream.read

        def read(n: int = -1) -> bytes:
            if stream.done + max(n, 1) > after and stream.proc.poll() is None:
                stream.proc.send_signal(signal.SIGKILL)
                stream.proc.wait()
            return real_read(n)  # type: ignore[no-any-return]

        stream.read = read
        return stream  # type: ignore[no-any-return]

    def close(self) -> None:
        pass


def test_a_stick_pulled_mid_install_commits_nothing(device: Device, tmp_path: Path,
                                                    make_bundle: BundleFactory) -> None:
    img = fat_image({"v2.eob": make_bundle("2.0", size=900_000)}, tmp_path / "s.fat")
    medium = _PulledMedium(str(img), after=400_000)
    up = Updater(device)
    env_before = (device.config.base / "uboot.env").read_bytes()
    with medium.open("v2.eob") as s:
        usb_updates.preview(up, s, "v2.eob")
    with medium.open("v2.eob") as s, pytest.raises(usb.MediumGone, match="reading stopped"):
        usb_updates.install(up, s)
    assert device.journal.state().phase.value == "idle"
    assert device.bootloader.primary() == "A" and device.bootloader.trial() is None
    assert (device.config.base / "uboot.env").read_bytes() == env_before
    assert device.journal.slots()["B"].state != "good"


def test_the_console_says_what_happened_when_the_stick_is_pulled(
        device_dir: Path, tmp_path: Path, make_bundle: BundleFactory) -> None:
    img = fat_image({"v2.eob": make_bundle("2.0", size=900_000)}, tmp_path / "s.fat")
    cfg = load(device_dir / "agent.toml")
    console.set_pin(cfg, "246813")
    offer = usb_updates.Offer(str(img), "vfat", ("v2.eob",), 0.0)
    (cfg.state_dir / "usb").mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / usb_updates.OFFER_FILE).write_text(offer.to_json())
    medium = _PulledMedium(str(img), after=400_000)
    out = io.StringIO()
    term = console.Terminal(io.StringIO("login\n246813\ninstall usb\nyes\nstatus\nexit\n"), out)
    console.Session(cfg, term, opener=lambda node, fs: medium).run()
    text = out.getvalue()
    assert "install stopped: " in text and "reading stopped at byte" in text
    assert "nothing committed: slot A is still active" in text
    assert "phase     idle" in text.split("install stopped")[1]
    st = json.loads(subprocess.run(
        [*__import__("tests.conftest", fromlist=["EDGEOPS"]).EDGEOPS, "status", "--json", "--config",
         str(device_dir / "agent.toml")], capture_output=True, text=True).stdout)
    assert st["primary_slot"] == "A" and st["trial_pending_slot"] is None


class _LyingStick:
    """A stick that answers the second read of a file with another (validly signed) bundle."""

    def __init__(self, first: Path, second: Path) -> None:
        self.files, self.where = [first, second], "lying-stick"

    def entries(self, folder: str = "") -> list[usb.Entry]:
        return [usb.Entry("v.eob", "file", 1)] if folder == "" else []

    def open(self, path: str) -> BinaryIO:
        return open(self.files.pop(0) if len(self.files) > 1 else self.files[0], "rb")

    def close(self) -> None:
        pass


def test_a_stick_that_changes_the_bundle_after_the_confirmation_is_refused_before_anything_changes(
        device: Device, make_bundle: BundleFactory) -> None:
    from agent.errors import BundleError

    stick = _LyingStick(make_bundle("2.0"), make_bundle("6.6"))
    up = Updater(device)
    with stick.open("v.eob") as s:
        pv = usb_updates.preview(up, s, "v.eob")
    generation = device.journal.generation
    with stick.open("v.eob") as s, pytest.raises(BundleError, match="changed after it was confirmed"):
        usb_updates.install(up, s, confirmed=pv)
    assert device.journal.generation == generation  # not even a refusal's transition
    assert device.journal.slots()["B"].state == "empty"


def _offer(cfg: Any, node: str, fs: str, bundles: tuple[str, ...] = ()) -> None:
    (cfg.state_dir / "usb").mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / usb_updates.OFFER_FILE).write_text(
        usb_updates.Offer(node, fs, bundles, 0.0).to_json())


def _session(cfg: Any, lines: str) -> str:
    out = io.StringIO()
    console.Session(cfg, console.Terminal(io.StringIO(lines), out)).run()
    return out.getvalue()


def test_diag_writes_its_bundle_to_a_fat_stick_without_mounting_it(device_dir: Path,
                                                                   tmp_path: Path) -> None:
    img = fat_image({"notes.txt": b"hi"}, tmp_path / "s.fat")
    cfg = load(device_dir / "agent.toml")
    console.set_pin(cfg, "246813")
    _offer(cfg, str(img), "vfat")
    text = _session(cfg, "login\n246813\ndiag usb\nexit\n")
    assert f"to {img}" in text
    names = [e.name for e in usb.MtoolsMedium(str(img)).entries("")]
    assert any(n.startswith("edgeops-diag-") and n.endswith(".tar.gz") for n in names), names


def test_diag_writes_to_an_ext4_stick_and_unmounts_it(device_dir: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    cfg = load(device_dir / "agent.toml")
    console.set_pin(cfg, "246813")
    with ext4_stick(tree, tmp_path / "s.ext4") as dev:
        _offer(cfg, dev, "ext4")
        text = _session(cfg, "login\n246813\ndiag usb\nexit\n")
        assert f"to {dev}" in text
        assert dev not in Path("/proc/self/mounts").read_text()
        medium = usb.MountedMedium(dev, "ext4", under=tmp_path / "m")
        try:
            names = [e.name for e in medium.entries("")]
        finally:
            medium.close()
    assert any(n.startswith("edgeops-diag-") for n in names), names


def test_the_monitor_hears_the_kernel_announce_a_new_stick(tmp_path: Path) -> None:
    """Real uevents over netlink, from the kernel itself (no udevd here, nor started: the
    machine is shared), for a loop device attached while the monitor listens."""
    import threading

    pytest.importorskip("pyudev", reason="pip install pyudev (the udev extra)")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "x.eob").write_bytes(b"x")
    monitor = usb.UdevMonitor(timeout=0.2, source="kernel")
    seen: list[usb.BlockEvent] = []
    started = threading.Event()

    def listen() -> None:
        monitor.monitor.start()
        started.set()
        for ev in monitor:
            seen.append(ev)

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    started.wait(5)
    try:
        with ext4_stick(tree, tmp_path / "s.ext4") as dev:
            import time

            end = time.monotonic() + 10
            while time.monotonic() < end and not any(e.devnode == dev for e in seen):
                time.sleep(0.1)
            mine = [e for e in seen if e.devnode == dev]
            assert mine, f"no uevent for {dev}; heard {[(e.action, e.devnode) for e in seen]}"
            assert any(e.fs_type == "ext4" for e in mine)
    finally:
        monitor.stopped = True
        t.join(5)


def test_policy_install_does_not_install_again_from_a_stick_left_in(
        device: Device, tmp_path: Path, make_bundle: BundleFactory) -> None:
    img = fat_image({"a-1.0.eob": make_bundle("1.0")}, tmp_path / "s.fat")  # what is running
    w = _watcher(device, "install")
    w.handle(usb.BlockEvent("add", str(img), "partition", "vfat"))
    assert device.journal.slots()["B"].state == "empty"
    assert any("already on this device" in m for m in w.messages)


def test_an_edgeops_folder_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    """A stick whose edgeops/ points elsewhere (on a mounted stick: anywhere on the device)."""
    root = tmp_path / "stick"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "elsewhere.eob").write_bytes(b"not the stick's")
    os.symlink(outside, root / "edgeops")
    medium = usb.DirectoryMedium(root)
    assert usb_updates.find_bundles(medium) == []
    with pytest.raises(usb.MediumError, match="folder on the way"):
        medium.open("edgeops/elsewhere.eob")


@pytest.mark.parametrize("path", ["../outside.eob", "edgeops/../../outside.eob", "./x.eob"])
def test_a_path_that_climbs_out_is_refused(tmp_path: Path, path: str) -> None:
    (tmp_path / "stick" / "edgeops").mkdir(parents=True)
    (tmp_path / "outside.eob").write_bytes(b"x")
    with pytest.raises(usb.MediumError):
        usb.DirectoryMedium(tmp_path / "stick").open(path)



class _PlugsAStickIn(io.StringIO):
    """Terminal input that puts a stick in while the technician types the first line."""

    def __init__(self, text: str, plug: Any) -> None:
        super().__init__(text)
        self.plug, self.lines = plug, 0

    def readline(self, size: int | None = -1) -> str:
        self.lines += 1
        if self.lines == 1:
            self.plug()
        return super().readline(size)


def test_a_stick_put_in_during_a_session_is_announced_once_at_the_next_prompt(
        device_dir: Path, tmp_path: Path) -> None:
    cfg = load(device_dir / "agent.toml")
    stick = tmp_path / "sda"
    stick.write_bytes(b"")  # the offer's device node must exist
    inp = _PlugsAStickIn("help\nhelp\nhelp\nexit\n",
                         lambda: _offer(cfg, str(stick), "ext4", ("edgeops/v2.eob",)))
    out = io.StringIO()
    console.Session(cfg, console.Terminal(inp, out)).run()
    text = out.getvalue()
    note = f"USB stick {stick}: edgeops/v2.eob ('install usb' after login)"
    assert text.count(note) == 1, text
    assert text.index(note) > text.index("> "), "announced before the stick went in"


def test_only_block_devices_on_a_usb_bus_are_taken_for_sticks() -> None:
    # seen on the QEMU guest: the watcher offered the device's own slot partitions
    own = [usb.BlockEvent("add", "/dev/vda2", "partition", "ext4"),
           usb.BlockEvent("add", "/dev/sdb1", "partition", "ext4", "ata")]
    stick = usb.BlockEvent("add", "/dev/sda", "disk", "ext4", "usb")
    assert list(usb_updates.sticks([*own, stick, *own])) == [stick]
