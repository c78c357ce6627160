"""The parts of tools/e2e that judge a run without QEMU: reading the grubenv blocks off the
disk while the guest runs (scenario (d)'s cut during a commit), the image cache key, and the
slimmed slot of image/build.py."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.bootloader import grub
from agent.core import grubenv
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT / "tools/e2e"))
e2e = load_script("e2e_run", ROOT / "tools/e2e/run.py")
build = load_script("image_build_slim", ROOT / "image/build.py")


def envs_of_an_update(tmp_path: Path) -> list[tuple[str, bytes]]:
    """The primary grubenv's bytes at each step of an A->B update, written by the real backend."""
    path = tmp_path / "EFI/edgeops/grubenv"
    path.parent.mkdir(parents=True)
    path.write_bytes(grubenv.encode(grub.initial_env("A", ("A", "B"))))
    (path.parent / "grubenv.b").write_bytes(path.read_bytes())
    bl = grub._factory({"grubenv": "EFI/edgeops/grubenv"}, tmp_path, ("A", "B"))
    steps = [("committed A", path.read_bytes())]
    bl.set_trial("B")
    steps.append(("trial armed", path.read_bytes()))
    env = grubenv.decode(path.read_bytes())
    env["B_TRY"] = "1"  # what grub.cfg saves as it boots the trial
    path.write_bytes(grubenv.encode(env))
    steps.append(("trial booted", path.read_bytes()))
    bl.commit("B")
    steps.append(("committed B", path.read_bytes()))
    return steps


def test_only_the_committed_trial_counts_as_committed(tmp_path: Path) -> None:
    got = [(name, e2e.committed(e2e.env_block(data), "B")) for name, data in envs_of_an_update(tmp_path)]
    assert got == [("committed A", False), ("trial armed", False), ("trial booted", False),
                   ("committed B", True)]


def test_a_torn_block_is_no_block(tmp_path: Path) -> None:
    data = envs_of_an_update(tmp_path)[-1][1]
    assert e2e.env_block(b"\0" + data[1:]) is None  # grub.py tears byte 0 while rewriting
    assert e2e.env_block(data) is not None


def test_env_offsets_finds_both_copies_on_the_disk(tmp_path: Path) -> None:
    block = grubenv.encode(grub.initial_env("A", ("A", "B")))
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
        for off in (1 << 20, 3 << 20):
            f.seek(off)
            f.write(block)
    assert e2e.env_offsets(disk, 1 << 19, 4 << 20) == [1 << 20, 3 << 20]
    with open(disk, "r+b") as f:
        f.seek(5 << 20)
        f.write(block)  # a third, stale copy inside the ESP: the harness refuses to guess
    with pytest.raises(e2e.E2EFailure, match="two grubenv blocks"):
        e2e.env_offsets(disk, 1 << 19, 6 << 20)


def test_image_key_follows_what_goes_into_the_image(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("[fleet]\n")
    one = e2e.image_key(fleet)
    assert e2e.image_key(fleet) == one
    fleet.write_text("[fleet]\ntoken = \"other\"\n")
    assert e2e.image_key(fleet) != one
    assert "agent" in e2e.IMAGE_INPUTS and "tools/e2e/guest" in e2e.IMAGE_INPUTS
    assert "tests" not in e2e.IMAGE_INPUTS


def test_slim_removes_only_what_it_lists(tmp_path: Path) -> None:
    keep = tmp_path / "usr/lib/x86_64-linux-gnu/perl-base/strict.pm"
    gone = tmp_path / "usr/share/perl/5.36/Carp.pm"
    hwdb = tmp_path / "usr/lib/udev/hwdb.bin"
    for f in (keep, gone, hwdb):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * 100)
    assert build.slim(tmp_path) == 200
    assert keep.exists() and not gone.exists() and not hwdb.exists()


def test_every_scenario_runs_once_and_the_dependent_ones_share_a_chain() -> None:
    names = [s for chain in e2e.CHAINS for s in chain if s != "baseline"]
    assert sorted(names) == sorted(set(names)) == sorted(e2e.SCENARIOS)
    # (e) needs (a)'s committed A->B, and (d)'s two power cuts ride on (a) and (e)
    chain_of = {s: i for i, chain in enumerate(e2e.CHAINS) for s in chain}
    assert chain_of["a"] == chain_of["e"] == chain_of["d"]


def test_a_subset_runs_in_chain_order_and_leaves_an_unchosen_chain_off() -> None:
    picked = e2e.chains_for(["e", "b", "a"])
    assert [s for chain in picked for s in chain] == [s for chain in e2e.CHAINS for s in chain
                                                      if s in ("a", "e", "b")]
    only_d = e2e.chains_for(["d"])
    assert sum(1 for chain in only_d if chain) == 1 and ["d"] in only_d


def test_fleet_toml_keeps_its_token_and_takes_the_id_from_the_serial(tmp_path: Path) -> None:
    from agent.device.fleet_files import find_fleet

    old = tmp_path / "fleet.toml"
    old.write_text('[fleet]\nurl = "http://10.0.2.100:8080"\ncontroller_id = "qemu-1"\n'
                   'auth = "target"\ntoken = "00ff"\n')
    path, token = e2e.fleet_toml(old)
    assert token == "00ff" and (path.stat().st_mode & 0o777) == 0o600
    serial = tmp_path / "serial"
    serial.write_text("qemu-7\n")
    path.write_text(path.read_text().replace(e2e.SERIAL_FILE, str(serial)))
    cfg = find_fleet(tmp_path / "agent.toml")
    assert cfg is not None and cfg.controller_id == "qemu-7" and cfg.token == "00ff"


class Ended:
    """A QEMU process stand-in that has exited (only poll() and wait() are used)."""

    returncode = 0

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


def ended_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  reason: str) -> tuple[Any, list[bool]]:
    """A machine whose QEMU just exited after sending SHUTDOWN with ``reason``, one marker
    line written before it left; starting QEMU again is recorded, not done."""
    qemu = sys.modules["qemu"]
    m = qemu.Machine("qemu-t", tmp_path, tmp_path / "disk.img")
    m.console, m.markers = tmp_path / "console-1.log", tmp_path / "markers-1.log"
    m.console.write_bytes(b"")
    m.markers.write_text("EDGEOPS-E2E hang system\n")
    m.t0 = time.monotonic()
    m.events.append(qemu.Event(1.0, "SHUTDOWN", {"guest": True, "reason": reason}))
    m.qemu = Ended()
    starts: list[bool] = []
    monkeypatch.setattr(m, "_power_on", lambda after_reset=False: starts.append(after_reset))
    return m, starts


def test_a_guest_reset_starts_qemu_again_in_the_same_power_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, starts = ended_machine(tmp_path, monkeypatch, "guest-reset")
    m._after_exit(m.qemu)
    assert starts == [True]
    assert len(m.resets) == 1 and "guest-reset" in m.resets[0]
    assert [ln.text for ln in m.lines] == ["EDGEOPS-E2E hang system"]  # read before the switch


def test_a_guest_power_off_leaves_qemu_off_and_the_wait_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, starts = ended_machine(tmp_path, monkeypatch, "guest-shutdown")
    with pytest.raises(sys.modules["qemu"].E2EFailure, match="QEMU exited"):
        m.wait_for(r"never printed", 5, "a marker")
    assert starts == [] and m.resets == []


def test_a_qemu_the_harness_cut_is_not_started_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, starts = ended_machine(tmp_path, monkeypatch, "guest-reset")
    proc, m.qemu = m.qemu, None  # what _power_cut does before it kills QEMU
    m._after_exit(proc)
    assert starts == [] and m.resets == []


def test_the_technician_console_follows_qemu_across_a_power_cycle(tmp_path: Path) -> None:
    console_e2e = sys.modules["console_e2e"]  # imported by run.py
    path = tmp_path / "ttyS0.sock"

    def serve(text: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as srv:
            srv.bind(str(path))
            srv.listen(1)
            conn, _ = srv.accept()
            with conn:
                conn.sendall(text)
        path.unlink()

    first = threading.Thread(target=serve, args=(b"before the reset\n",))
    first.start()
    con = console_e2e.SerialConsole(path, timeout=10)
    first.join(10)
    second = threading.Thread(target=serve, args=(b"edgeops-qemu> \n",))
    second.start()
    try:
        con.expect(r"edgeops-qemu> ", 10, "the prompt of the next QEMU")
        assert "before the reset" in con.text()
    finally:
        second.join(10)
        con.close()


def test_a_guest_command_is_sent_by_name_and_its_lines_and_exit_code_read_back(tmp_path: Path) -> None:
    qemu = sys.modules["qemu"]
    m = qemu.Machine("qemu-t", tmp_path, tmp_path / "disk.img")
    m.console, m.markers = tmp_path / "console-1.log", tmp_path / "markers-1.log"
    m.console.write_bytes(b"")
    m.markers.write_text("EDGEOPS-E2E exec status | slot A, before this command\n")
    m._read()
    m.cursor = len(m.lines)  # what came before is consumed, as after earlier waits
    m.t0 = time.monotonic()
    got: list[bytes] = []
    closed: list[bool] = []

    def guest() -> None:  # what edgeops-e2e-exec does with one line from ttyS1
        with socket.socket(socket.AF_UNIX) as srv:
            srv.bind(str(tmp_path / "ttyS1.sock"))
            srv.listen(1)
            conn, _ = srv.accept()
            with conn:
                got.append(conn.recv(100))
                conn.sendall(b"ttyS1's output, also sent to a connected client\n")
                with open(m.markers, "a") as f:
                    f.write("EDGEOPS-E2E exec tpm-status | Nothing is anchored in the TPM yet\n"
                            "EDGEOPS-E2E booted slot=A uptime=1 agent=active boot_id=x\n"
                            "EDGEOPS-E2E exec tpm-status rc=0\n")
                closed.append(conn.recv(100) == b"")  # the harness stays until the answer

    t = threading.Thread(target=guest)
    t.start()
    time.sleep(0.2)
    rc, out = m.guest_run("tpm-status", 10)
    t.join(5)
    assert got == [b"tpm-status\n"] and closed == [True]
    assert (rc, out) == (0, ["Nothing is anchored in the TPM yet"])


def test_a_guest_command_name_with_arguments_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    m = sys.modules["qemu"].Machine("qemu-t", tmp_path, tmp_path / "disk.img")
    with pytest.raises(sys.modules["qemu"].E2EFailure, match="lower-case letters"):
        m.guest_run("status; reboot", 1)
