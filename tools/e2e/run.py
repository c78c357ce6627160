#!/usr/bin/env python3
"""make e2e: the x86-64 image booted in QEMU, updated from a controller on the host's loopback.

Standard library only (it drives ``edgeops`` and QEMU as subprocesses). Two devices at once,
the fleet case: two VMs of the one image, each with its own sparse disk copy, swtpm, OVMF
variables, consoles and transcript, and its own identity (its board serial in SMBIOS, which
the agent takes as its controller id), both polling the one controller, which deploys to each
device. Each device runs one chain of scenarios (CHAINS), as few boots as they allow:

  device qemu-1, chain 1
  baseline  the same image booted with edgeops' units masked (systemd.mask= through the
            grubenv's EO_CMDLINE), for boot-to-ready without the agent: one boot
  (a)       a good release A->B from the controller: download, trial boot, health, commit,
            success reported only after the commit. With (d): the power is cut at 40 % of
            its slot write, the next boot runs A, and the same deployment, retried, is (a)
  (f)       a bundle below the floor, refused on the booted system, failure reported
  (e)       back to the first slot with the same rootfs payload (slots are chosen by
            partition, not by label). With (d): the power is cut the moment the first
            grubenv copy on the disk says the trial slot is committed; the next boot must
            run a committed slot, and the commit be finished (or undone and installed again)
  (d)       alone (without a and e): a power cut during the slot write of its own release
  (g)       the technician console on ttyS0: login, status, health, a USB stick install (console_e2e.py)

  device qemu-2, chain 2, from the factory image
  (c)       a trial whose system hangs (tools/e2e/guest/usr/local/bin/edgeops-e2e-hang):
            first the agent (SIGSTOP; its service watchdog fires, systemd restarts it),
            then the kernel (panic; PID 1 stops feeding the i6300esb, which resets the
            machine); GRUB falls back to the committed slot by itself, failure reported
  (b)       a release whose health check fails: trial, revert, failure reported

Each guest reaches only 10.0.2.100:8080 (QEMU user networking, restrict=on, one guestfwd),
which is tools/e2e/relay.py -> this script's counting proxy (one per device) -> the
controller, all on 127.0.0.1. ``--only d`` (make e2e SCENARIOS=d) runs a subset, each chain
its part in its order; a chain with nothing chosen does not boot; only the bundles deployed
are signed. Writes OUT/transcript-qemu-N.log (both serial consoles of each power-on of device
N), OUT/timings.md (the tables it prints: the run's, then one per device) and OUT/result.json.
Exit 0 only if every chosen scenario passed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import console_e2e
from qemu import E2EFailure, Machine, kvm_works

REPO = Path(__file__).resolve().parents[2]
# Each VM's identity is its board serial (qemu.py: -smbios type=1,serial=), read by the agent
# from the DMI table (fleet.toml's controller_id_file): one image, one fleet.toml, many devices.
SERIAL_FILE = "/sys/class/dmi/id/product_serial"
COMPATIBLE = "edgeops-x86-64"
MASK = "systemd.mask=edgeops-agent.service systemd.mask=edgeops-provision.service"
# Under TCG only, on every boot (the grubenv's EO_CMDLINE): QEMU's software MMU pays for
# each address-space switch, so the kernel's page-table isolation and other speculation
# mitigations, useless against an emulated CPU, cost the guest dearly. Hardware, and a
# KVM run, keep the board's command line as it is.
TCG_CMDLINE = "mitigations=off"
# vCPUs per VM. Two VMs of -smp 2 on 2 host cores (thread=multi) are 4 vCPU threads for 2
# cores: in both such runs on the loaded machine qemu-2's reboot into its trial did not come
# back (once silent after "reboot: Restarting system" for 600 s); the -smp 1 run passed it.
SMP = 1
REQUEST = re.compile(rb"(GET|POST|PUT|DELETE) (\S+) HTTP/1\.[01]\r\n")


# --- the counting proxy between the guest's relay and the controller ------------------------------
@dataclass
class Request:
    at: float  # time.monotonic()
    method: str
    path: str
    conn: int
    bytes_down: int = 0  # response bytes sent to the guest so far


@dataclass
class Proxy:
    target: int  # the controller's port on 127.0.0.1
    requests: list[Request] = field(default_factory=list)
    on_bytes: Callable[[Request], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()
        return int(self.sock.getsockname()[1])

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                guest, _ = self.sock.accept()
            except OSError:
                return
            n += 1
            threading.Thread(target=self._conn, args=(guest, n), daemon=True).start()

    def _conn(self, guest: socket.socket, n: int) -> None:
        try:
            ctl = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            guest.close()
            return
        ctl.settimeout(None)
        current: list[Request] = []

        def up() -> None:
            try:
                while data := guest.recv(65536):
                    for m in REQUEST.finditer(data):
                        r = Request(time.monotonic(), m[1].decode(), m[2].decode(), n)
                        with self.lock:
                            self.requests.append(r)
                        current[:] = [r]
                    ctl.sendall(data)
            except OSError:
                pass
            finally:
                with _quiet():
                    ctl.shutdown(socket.SHUT_WR)

        threading.Thread(target=up, daemon=True).start()
        try:
            while data := ctl.recv(65536):
                if current:
                    current[0].bytes_down += len(data)
                    if self.on_bytes is not None:
                        self.on_bytes(current[0])
                guest.sendall(data)
        except OSError:
            pass
        finally:
            guest.close()
            ctl.close()

    def since(self, t: float) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.at >= t]


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


# --- the controller ---------------------------------------------------------------------------------
@dataclass
class Controller:
    url: str
    token: str
    proc: subprocess.Popen[bytes]

    def api(self, method: str, path: str, body: Any = None, data: bytes | None = None) -> Any:
        payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"{self.url}/api/v1{path}", data=payload, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise E2EFailure(f"controller: {method} {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None

    def action(self, device: str, action_id: int) -> dict[str, Any]:
        for a in self.api("GET", f"/actions?device={device}")["actions"]:
            if a["id"] == action_id:
                return dict(a)
        raise E2EFailure(f"controller has no action {action_id}")

    def wait_action(self, action_id: int, timeout: float, machine: Machine, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            a = self.action(machine.name, action_id)
            if a["status"] in ("success", "failure", "canceled"):
                return a
            if time.monotonic() > deadline:
                raise E2EFailure(f"{what}: action {action_id} still {a['status']} after {timeout:.0f} s"
                                 f"\n{machine.tail()}")
            time.sleep(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_controller(out: Path, edgeops: str, keyring: Path) -> Controller:
    port, token = free_port(), secrets.token_hex(16)
    db = out / "controller" / "controller.db"
    shutil.rmtree(db.parent, ignore_errors=True)
    db.parent.mkdir(parents=True)
    log = open(out / "controller" / "serve.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen([edgeops, "controller", "serve", "--db", str(db), "--listen",
                             f"127.0.0.1:{port}", "--keyring", str(keyring), "--token", token,
                             "--poll-sleep", "5"], stdout=log, stderr=subprocess.STDOUT)
    ctl = Controller(f"http://127.0.0.1:{port}", token, proc)
    deadline = time.monotonic() + 60
    while True:
        try:
            ctl.api("GET", "/devices")
            return ctl
        except (OSError, E2EFailure):
            if proc.poll() is not None or time.monotonic() > deadline:
                log_tail = (out / "controller/serve.log").read_text()[-800:]
                raise E2EFailure(f"controller did not start: {log_tail}") from None
            time.sleep(0.3)


# --- the image and the bundles ----------------------------------------------------------------------
def fleet_toml(path: Path) -> tuple[Path, str]:
    """The e2e devices' fleet.toml, kept beside the cached image (its token is in the image).
    Every device of the image has the same one: its controller id is its board serial. The
    target token is the fleet's here, registered for each device id (a production fleet gives
    each device its own credential: the TPM-sealed identity of docs/tpm.md, identity = true)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    found = re.search(r'token = "([0-9a-f]+)"', path.read_text()) if path.exists() else None
    token = found[1] if found else secrets.token_hex(16)
    text = f"""# e2e devices' fleet config (tools/e2e/run.py); the guest's only route is this URL
[fleet]
url = "http://10.0.2.100:8080"
controller_id_file = "{SERIAL_FILE}"
auth = "target"
token = "{token}"
poll_interval = 5
min_sleep = 1
max_sleep = 10
push = "longpoll"
longpoll_wait = 30
read_timeout = 60
"""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    path.chmod(0o600)
    return path, token


IMAGE_INPUTS = ("agent", "boards", "image", "tools/e2e/guest", "setup.cfg", "pyproject.toml",
                "setup.py", "MANIFEST.in")


def image_key(fleet: Path) -> str:
    """Everything the e2e image is made of: the tracked (and new, unignored) files of the
    parts of this tree that go into it (IMAGE_INPUTS: the agent's package, its packaging, the
    board files, image/ and the guest overlay), and the device's fleet.toml. Tests, docs and
    this harness do not shape the image. The base tree has its own key in image/build.py."""
    h = hashlib.sha256(fleet.read_bytes())
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                            "--", *IMAGE_INPUTS],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in sorted(f for f in files if f):
        path = REPO / name.decode()
        if path.is_file():
            h.update(name + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_image(out: Path, fleet: Path, cache: Path | None) -> tuple[float, str]:
    """OUT/image: from the cache when the same inputs built one before, else built (and
    cached). Returns the seconds it took and how."""
    t0 = time.monotonic()
    dest = out / "image"
    key = image_key(fleet)
    hit = cache / key if cache is not None else None
    if hit is not None and (hit / "build.json").exists():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(hit, dest, copy_function=sparse_copy)
        return time.monotonic() - t0, f"cached image {key} (same source tree and fleet.toml)"
    proc = subprocess.run([sys.executable, str(REPO / "image/build.py"), "--out", str(dest),
                           "--overlay", str(REPO / "tools/e2e/guest"), "--fleet", str(fleet)],
                          check=False)
    if proc.returncode != 0:
        raise E2EFailure("image build failed (see above)")
    if hit is not None:
        for old in hit.parent.glob("*"):  # one image is kept: each is about 650 MB
            shutil.rmtree(old, ignore_errors=True)
        part = hit.with_suffix(".part")
        shutil.copytree(dest, part, copy_function=sparse_copy, ignore=shutil.ignore_patterns("work"))
        part.rename(hit)
    return time.monotonic() - t0, f"built, cached as {key}"


def sparse_copy(src: str, dst: str) -> None:
    subprocess.run(["cp", "--sparse=always", "--preserve=mode", src, dst], check=True)


@dataclass
class Release:
    name: str
    key: str  # the scenario that deploys it
    version: str
    security_version: int
    health: dict[str, Any] | None = None
    path: Path | None = None
    bundle_id: int | None = None


HANG = "/usr/local/bin/edgeops-e2e-hang"  # tools/e2e/guest: hangs the agent, then the system
RELEASES = [
    Release("good-ab", "a", "2.0", 2),
    Release("below-floor", "f", "1.5", 1),
    Release("hang", "c", "4.1", 2, {"deadline": 240, "interval": 2, "retries": 3, "probe": [
        {"type": "command", "command": [HANG], "name": "e2e-hang", "timeout": 60}]}),
    Release("failing-health", "b", "4.0", 2, {"deadline": 45, "interval": 2, "retries": 1, "probe": [
        {"type": "command", "command": ["/bin/false"], "name": "e2e-always-fails"}]}),
    Release("same-payload-ba", "e", "3.0", 2),
    Release("after-power-cut", "d", "5.0", 3),
    # signed only when the power cut during (e)'s commit lands before the bootloader heard of it
    Release("same-payload-retry", "e-retry", "3.1", 2),
]


def make_bundles(out: Path, edgeops: str, image: Path, which: list[str]) -> list[Release]:
    """Sign only the releases the chosen scenarios deploy, two at a time."""
    d = out / "bundles"
    d.mkdir(exist_ok=True)
    wanted = [r for r in RELEASES if r.key in which]
    if "a" in which:  # (d) then cuts (a)'s download: its own release is not deployed
        wanted = [r for r in wanted if r.key != "d"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # zstd of the payload: CPU-bound
        list(pool.map(lambda r: sign(edgeops, image, d, r), wanted))
    return wanted


def sign(edgeops: str, image: Path, d: Path, r: Release) -> None:
    pki, payload = image / "pki", image / "rootfs.ext4"
    r.path = d / f"{r.version}-{r.name}.bundle"
    argv = [edgeops, "bundle", "create", "--key", str(pki / "signer/signer.key"),
            "--cert", str(pki / "signer/signer.crt"), "--compatible", COMPATIBLE,
            "--version", r.version, "--security-version", str(r.security_version),
            "--payload", f"rootfs={payload}", "--compress", "zstd", "-o", str(r.path)]
    if r.health:
        (d / f"{r.version}-health.json").write_text(json.dumps(r.health))
        argv += ["--health", str(d / f"{r.version}-health.json")]
    run(argv)


def upload(ctl: Controller, r: Release) -> None:
    assert r.path is not None
    r.bundle_id = int(ctl.api("POST", f"/bundles?filename={r.path.name}",
                              data=r.path.read_bytes())["id"])


def run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise E2EFailure(f"{' '.join(argv[:3])} failed ({proc.returncode}): {proc.stderr[-800:]}")
    return proc.stdout


def set_cmdline(disk: Path, esp_offset: int, extra: str, work: Path) -> None:
    """EO_CMDLINE in the ESP's grubenv, written while the device is off (mtools, grub-editenv)."""
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    img = f"{disk}@@{esp_offset}"
    local = work / "grubenv"
    for copy in ENV_COPIES:  # both copies (agent/adapters/bootloader/grub.py)
        subprocess.run(["mcopy", "-o", "-i", img, f"::/{copy}", str(local)], env=env, check=True)
        subprocess.run(["grub-editenv", str(local), "set", f"EO_CMDLINE={extra}"], check=True)
        subprocess.run(["mcopy", "-o", "-i", img, str(local), f"::/{copy}"], env=env, check=True)


ENV_COPIES = ("EFI/edgeops/grubenv", "EFI/edgeops/grubenv.b")


def grubenv(disk: Path, esp_offset: int, work: Path) -> str:
    """Both grubenv copies as grub-editenv lists them, or why a copy does not list."""
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    local = work / "grubenv.read"
    out = []
    for copy in ENV_COPIES:
        local.unlink(missing_ok=True)
        got = subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{esp_offset}", f"::/{copy}",
                              str(local)], env=env, capture_output=True, text=True)
        if got.returncode != 0:
            out.append(f"{copy.rsplit('/', 1)[1]}: missing")
            continue
        r = subprocess.run(["grub-editenv", str(local), "list"], capture_output=True, text=True)
        listed = " ".join(r.stdout.split()) if r.returncode == 0 else \
            f"INVALID ({local.stat().st_size} bytes: {r.stderr.strip()[-60:]})"
        out.append(f"{copy.rsplit('/', 1)[1]}: {listed}")
    return "; ".join(out)  # not "|": the note sits in a markdown table


# --- the timing table --------------------------------------------------------------------------------
@dataclass
class Report:
    name: str = ""  # the device's id; "" for the run's own rows (image, bundles, total)
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=dict)
    baseline: float | None = None  # power-on to multi-user with edgeops masked, when measured

    def row(self, what: str, seconds: float | None, note: str = "") -> None:
        self.rows.append((what, "" if seconds is None else f"{seconds:.1f}", note))
        who = f"e2e[{self.name}]" if self.name else "e2e"
        print(f"{who}: {what}: {'' if seconds is None else f'{seconds:.1f} s'} {note}".rstrip(), flush=True)

    def table(self) -> str:
        if not self.rows:
            return ""
        w = max(len(r[0]) for r in self.rows)
        lines = [f"| {'step':<{w}} | seconds | note |", f"|{'-' * (w + 2)}|---------|------|"]
        lines += [f"| {a:<{w}} | {b:>7} | {c} |" for a, b, c in self.rows]
        return "\n".join(lines)


# --- the scenarios ------------------------------------------------------------------------------------
@dataclass
class Run:
    """One device's run: its machine, its proxy to the shared controller, its report, and the
    slot it runs now (``current``) as its chain's scenarios move it."""

    out: Path  # this device's directory (its QEMU files, disk, scratch grubenv copies)
    machine: Machine
    ctl: Controller
    proxy: Proxy
    report: Report
    esp_offset: int
    esp_bytes: int
    boot_timeout: float
    sign_bundle: Callable[[Release], None]
    which: list[str] = field(default_factory=list)  # this chain's selected scenarios
    token: str = ""  # the device's TargetToken (fleet.toml's), for (h)
    current: str = "A"  # the committed slot the device runs
    error: str = ""  # why the chain stopped, when it did

    @property
    def device(self) -> str:
        return self.machine.name

    @property
    def image(self) -> Path:
        """The run's image directory (OUT/image; ``out`` is this device's OUT/NAME)."""
        return self.out.parent / "image"

    @property
    def other(self) -> str:
        return "B" if self.current == "A" else "A"

    def add_bundle(self, r: Release) -> None:
        """Sign ``r`` now (a release only some outcomes need) and give it to the controller."""
        t0 = time.monotonic()
        self.sign_bundle(r)
        upload(self.ctl, r)
        self.report.row(f"bundle {r.version} signed and uploaded", time.monotonic() - t0)

    def deploy(self, r: Release) -> int:
        res = self.ctl.api("POST", "/deployments", {"bundle": r.bundle_id, "device": self.device})
        ids = [a["id"] for a in self.ctl.api("GET", f"/actions?device={self.device}")["actions"]
               if a["bundle"] == r.bundle_id]
        if not ids:
            raise E2EFailure(f"deploy {r.version}: no action created ({res})")
        return int(max(ids))

    def ready_after(self, t_power: float, t_from: float, what: str) -> float:
        """Seconds from power-on until the agent's first request to the controller after t_from."""
        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            reqs = self.proxy.since(t_from)
            if reqs:
                return reqs[0].at - t_power
            time.sleep(0.2)
        raise E2EFailure(f"{what}: the agent never polled the controller\n{self.machine.tail()}")

    def expect_boot(self, slot: str, what: str, *, after: bool = False) -> float:
        """The next boot, into ``slot``; ``after``: something long comes first (the download
        and the slot write before a trial boot, the health window before a revert: under TCG
        with two VMs on a shared 2-core machine, as long again as a boot)."""
        b = self.machine.wait_booted(self.boot_timeout * (2 if after else 1), what)
        if b.slot != slot:
            raise E2EFailure(f"{what}: booted slot {b.slot}, expected {slot}\n{self.machine.tail()}")
        return b.at

    def update(self, r: Release, *, to: str, back: str | None = None, expect: str) -> float:
        """Deploy r; follow the trial boot into slot ``to`` (and ``back`` after a revert)."""
        t0 = time.monotonic()
        action = self.deploy(r)
        self.expect_boot(to, f"{r.version}: trial boot", after=True)
        t_commit_line = None
        if expect == "success":
            self.machine.wait_for(rf"committed: slot {to} {re.escape(r.version)}", 300,
                                  f"{r.version}: commit")
            t_commit_line = time.monotonic()
        if back is not None:
            self.expect_boot(back, f"{r.version}: revert boot", after=True)
        a = self.ctl.wait_action(action, 300, self.machine, f"{r.version}")
        t_report = time.monotonic()
        if a["status"] != expect:
            raise E2EFailure(f"{r.version}: action {a['status']} ({a['detail']}), expected {expect}"
                             f"\n{self.machine.tail()}")
        if t_commit_line is not None and t_report < t_commit_line:
            raise E2EFailure(f"{r.version}: success reported before the commit")
        return time.monotonic() - t0


REL = {r.name: r for r in RELEASES}


def baseline(run_: Run) -> None:
    """The image booted with edgeops' units masked: boot-to-multi-user without the agent."""
    m, rep = run_.machine, run_.report
    set_cmdline(m.disk, run_.esp_offset, f"{MASK} {tcg_extra(m)}".strip(), run_.out)
    m.power_on()
    b = m.wait_booted(run_.boot_timeout, "baseline boot (edgeops masked)")
    if b.agent == "active":
        raise E2EFailure("baseline: the agent ran although masked")
    rep.baseline = b.at
    rep.row("boot to multi-user, edgeops masked", b.at, f"{m.split(b.at, b.uptime)}{boot_split(m)}")
    m.power_cut()


def tcg_extra(m: Machine) -> str:
    return TCG_CMDLINE if m.accel == "tcg" else ""


def first_boot(run_: Run) -> None:
    """Every chain's first power-on with the agent: the factory slot A, TPM provisioning, the
    first poll (the device's id is its board serial: the controller must know it)."""
    m, rep = run_.machine, run_.report
    set_cmdline(m.disk, run_.esp_offset, tcg_extra(m), run_.out)
    m.power_on()
    t_power = m.t0
    b = m.wait_booted(run_.boot_timeout, "first boot")
    if b.slot != "A":
        raise E2EFailure(f"first boot ran slot {b.slot}, not the factory slot A")
    rep.row("boot to multi-user, with edgeops", b.at, f"first boot (TPM provisioning): "
            f"{m.split(b.at, b.uptime)}{boot_split(m)}")
    ready = run_.ready_after(t_power, t_power, "first boot")
    rep.row("boot to agent ready (first poll)", ready,
            f"the same boot without the agent: {rep.baseline:.1f} s to multi-user (baseline, "
            f"this run); ratio {ready / rep.baseline:.2f}x"
            if rep.baseline is not None else "without the agent: the baseline row, if run")
    own = f"/controller/v1/{m.name}"  # DDI's base: /{tenant}/controller/v1/{controllerId}
    deadline = time.monotonic() + 30
    while not any(own in r.path for r in run_.proxy.since(t_power)):
        if time.monotonic() > deadline:
            paths = sorted({r.path for r in run_.proxy.since(t_power)})[:3]
            raise E2EFailure(f"first boot: the agent did not poll as {m.name} (its board serial, "
                             f"{SERIAL_FILE}) but {paths}\n{m.tail()}")
        time.sleep(0.2)


def scenario_a(run_: Run) -> None:
    since = time.time()  # the controller's clock is this machine's
    if "d" in run_.which:
        # one boot fewer: the power cut hits (a)'s download, and the retry of that same
        # deployment is (a) (trial boot into B, health, commit, success after the commit)
        power_cut_then_install(run_, REL["good-ab"], run_.current, run_.other)
    else:
        took = run_.update(REL["good-ab"], to=run_.other, expect="success")
        run_.report.row("(a) 2.0: good-ab", took, f"{run_.current} -> {run_.other}, committed, "
                        "success reported")
    attested(run_, run_.other, since, "(a)")
    run_.report.results["a"] = "passed"
    run_.current = run_.other


def attested(run_: Run, slot: str, since: float, what: str) -> None:
    """The controller verified a quote of the guest's TPM (swtpm) made in the boot of ``slot``:
    the agent quotes once per boot (agent.device.attestation), the controller judges it under
    the key bound by the device's first quote and its own nonce (agent.core.evidence)."""
    m, t0 = run_.machine, time.monotonic()
    rec: Any = None
    while time.monotonic() - t0 < 60:
        try:
            rec = run_.ctl.api("GET", f"/devices/{m.name}/attestation")
        except E2EFailure:  # 404 until the first quote
            rec = None
        if (rec and rec["result"] == "verified" and str(rec["boot_slot"]).upper() == slot
                and rec["verified"] >= since):
            break
        time.sleep(1)
    else:
        raise E2EFailure(f"{what}: no verified quote of the boot of slot {slot} on the controller: "
                         f"{json.dumps(rec)[:400]}\n{m.tail()}")
    run_.report.results["attest"] = "passed"
    run_.report.row(f"{what} TPM quote verified by the controller", time.monotonic() - t0,
                    f"{rec['kind']} quote of PCR {rec['pcr']}, boot slot {rec['boot_slot']}, "
                    f"{len(rec['events'])} event(s), {rec['quotes']} quote(s) since bound")


def scenario_f(run_: Run) -> None:
    m, rep = run_.machine, run_.report
    t0 = time.monotonic()
    boots = len(m.seen("EDGEOPS-E2E booted"))
    action = run_.deploy(REL["below-floor"])
    a = run_.ctl.wait_action(action, 180, m, "below-floor")
    if a["status"] != "failure" or len(m.seen("EDGEOPS-E2E booted")) != boots:
        raise E2EFailure(f"below-floor: action {a['status']} ({a['detail']}), "
                         f"{len(m.seen('EDGEOPS-E2E booted')) - boots} reboots")
    if "floor" not in (a.get("detail") or "") and not m.seen("floor|RollbackRefused|refused"):
        raise E2EFailure(f"below-floor: failure without the floor as reason: {a['detail']}")
    rep.results["f"] = "passed"
    rep.row("(f) 1.5 below the floor", time.monotonic() - t0,
            f"refused on the device: {a['detail'][:60]}")


def scenario_c(run_: Run) -> None:
    hang(run_, REL["hang"], run_.current, run_.other)


def scenario_b(run_: Run) -> None:
    current, other = run_.current, run_.other
    took = run_.update(REL["failing-health"], to=other, back=current, expect="failure")
    run_.report.results["b"] = "passed"
    run_.report.row("(b) 4.0 failing health check", took,
                    f"trial on {other}, reverted to {current}, failure reported")


def scenario_e(run_: Run) -> None:
    r, rep, current, other = REL["same-payload-ba"], run_.report, run_.current, run_.other
    if "d" in run_.which:
        landed = commit_cut(run_, r, current, other)
        if landed != other:  # the cut came before the bootloader heard: install again
            retry = REL["same-payload-retry"]
            run_.add_bundle(retry)
            took = run_.update(retry, to=other, expect="success")
            rep.row(f"(e) {retry.version}: the same payload again", took,
                    f"{current} -> {other}, committed, success reported")
    else:
        took = run_.update(r, to=other, expect="success")
        rep.row(f"(e) {r.version}: same-payload", took,
                f"{current} -> {other}, committed, success reported")
    rep.results["e"] = "passed"
    run_.current = other


def scenario_d(run_: Run) -> None:
    """(d) alone: with (a) in its chain it is (a)'s power cut, with (e) also (e)'s commit cut."""
    if "a" in run_.which:
        return
    power_cut_then_install(run_, REL["after-power-cut"], run_.current, run_.other)
    run_.current = run_.other


def ddi_answer(ctl: Controller, device: str, token: str) -> int:
    """The HTTP status the controller gives a device's poll with ``token`` (DDI's base GET)."""
    req = urllib.request.Request(f"{ctl.url}/DEFAULT/controller/v1/{device}",
                                 headers={"Authorization": f"TargetToken {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def scenario_h(run_: Run) -> None:
    """(h) secure decommission of the booted device: the controller revokes it (its token is
    refused from then on), and on the device, with the agent stopped, ``edgeops decommission``
    erases the identity (none here: the e2e fleet uses TargetTokens), the fleet credentials,
    edgeops's TPM NV indices and the state on the data partition; the TPM then holds no
    anchor (docs/boards.md, "Decommission")."""
    m, rep = run_.machine, run_.report
    t0 = time.monotonic()
    before = ddi_answer(run_.ctl, m.name, run_.token)
    run_.ctl.api("POST", f"/devices/{m.name}/revoke", {})
    after = ddi_answer(run_.ctl, m.name, run_.token)
    if before != 200 or after not in (401, 403):
        raise E2EFailure(f"(h) the device's token: HTTP {before} before the revoke, {after} after "
                         "(expected 200, then 401 or 403)")
    rep.row("(h) controller: device revoked", time.monotonic() - t0,
            f"its poll answered {before} before, {after} after")
    t1 = time.monotonic()
    rc, out = m.guest_run("decommission", 180)
    erased = [ln for ln in out if ln.startswith("erased: ")]
    wanted = ("fleet settings and token", "TPM NV index", "journal")
    missing = [w for w in wanted if not any(w in ln for ln in erased)]
    if rc != 0 or missing:
        raise E2EFailure(f"(h) decommission on the device: exit {rc}, nothing erased of {missing}:"
                         "\n" + "\n".join(out[-15:]))
    rc, tpm = m.guest_run("tpm-status", 120)
    if not any("Nothing is anchored" in ln for ln in tpm):
        raise E2EFailure("(h) after decommission the TPM still holds an anchor:\n" + "\n".join(tpm))
    rep.results["h"] = "passed"
    rep.row("(h) device: decommissioned", time.monotonic() - t1,
            f"{len(erased)} things erased; edgeops tpm status: {tpm[0][:60] if tpm else ''}")


def scenario_g(run_: Run) -> None:
    """(g) the technician at the device (console_e2e.py): it ends committed on the other slot."""
    console_e2e.scenario(run_, run_.current)
    run_.current = run_.other


# --- the chains: which device runs which scenarios, in which order ----------------------------------
# A scenario is a function of one device's Run, called after that device's first boot (the
# factory slot A, committed, polling the controller) with ``run_.current`` the slot it runs;
# it leaves the device powered on, on a committed slot, and sets ``run_.current`` if it moved
# it. "baseline" alone runs before the first boot. To add one (e.g. 'g', the technician's
# console and USB stick of tools/e2e/console_e2e.py): a function here or there, one entry in
# SCENARIOS and its name in the shorter chain below (see the timing table), and its release,
# if it deploys one, in RELEASES.
SCENARIOS: dict[str, Callable[[Run], None]] = {
    "a": scenario_a, "f": scenario_f, "c": scenario_c, "b": scenario_b, "e": scenario_e,
    "d": scenario_d, "g": scenario_g, "h": scenario_h,
}
# Two devices at once, each its own chain on its own VM, against the one controller. (e)
# needs a committed A->B first ((a)'s), and (d)'s power cuts ride on (a) and (e), so they
# share chain 1; (c) and (b) (each a trial that ends back on A) run from the factory image.
# Balanced on the idle machine's figures (2026-12-02, guest resets as power cycles): with the
# baseline boot (about 55 s with its cut) chain 1 took 583 s and chain 2 502 s, so the
# baseline runs on chain 2; (h) (no boot, about 10 s) ends chain 1, as it ends a device's life.
CHAINS: tuple[tuple[str, ...], ...] = (
    ("a", "f", "e", "d", "g", "h"),
    ("baseline", "c", "b"),
)
ALL = [s for chain in CHAINS for s in chain if s != "baseline"]


def chains_for(which: list[str]) -> list[list[str]]:
    """Each chain's part of a selection, in the chain's order; [] for a chain that stays off."""
    return [[s for s in chain if s in which] for chain in CHAINS]


def run_chain(run_: Run, steps: list[str]) -> None:
    """One device's chain, from power-on to the last scenario; a failure ends this chain only
    (``run_.error``), the other device goes on."""
    m, rep = run_.machine, run_.report
    t0 = time.monotonic()
    try:
        if "baseline" in steps:
            baseline(run_)
        first_boot(run_)
        for name in steps:
            if name != "baseline":
                SCENARIOS[name](run_)
        m.power_cut()
        up = [b.uptime for b in m.boots]
        rep.row(f"{len(up)} boots in {m.power_ons} power-ons and {len(m.resets)} guest resets",
                sum(up), f"kernel -> multi-user: mean {sum(up) / len(up):.1f} s, "
                f"min {min(up):.1f} s, max {max(up):.1f} s (guest clock); each reset a power "
                "cycle (tools/e2e/qemu.py _after_exit)")
        rep.row("grubenv at the end", None, grubenv(m.disk, run_.esp_offset, run_.out))
    except Exception as exc:  # any failure is this chain's, reported in its table
        run_.error = str(exc) if isinstance(exc, E2EFailure) else f"{type(exc).__name__}: {exc}"
        print(f"e2e[{m.name}]: FAILED: {run_.error}", file=sys.stderr, flush=True)
        rep.row("FAILED", None, run_.error.splitlines()[0][:120] if run_.error else "")
    finally:
        m.power_cut()
        rep.row(f"chain {'/'.join(steps)}", time.monotonic() - t0, "this device's wall time")


def boot_split(m: Machine) -> str:
    """systemd-analyze's split of the boot just reached (tools/e2e/guest's markers), if any."""
    for _ in range(25):  # printed a moment after the "booted" line
        if got := m.seen(r"EDGEOPS-E2E analyze "):
            break
        time.sleep(0.2)
    return f"; {got[-1].text.split('analyze ', 1)[1][:110]}" if got else ""


def hang(run_: Run, r: Release, current: str, other: str) -> None:
    """(c): the trial system hangs twice in one trial boot (tools/e2e/guest/.../edgeops-e2e-hang):
    first the agent (SIGSTOP: its service watchdog fires, systemd restarts it), then the whole
    system (a kernel panic: PID 1 stops feeding the i6300esb, which resets the machine before
    the kernel's panic=60 would). GRUB then boots the committed slot on its own: the trial slot
    was tried (TRY=1) and not confirmed. The agent there reports the failure."""
    m, rep = run_.machine, run_.report
    t0 = time.monotonic()
    action = run_.deploy(r)
    run_.expect_boot(other, f"{r.version}: trial boot", after=True)
    m.wait_for(r"EDGEOPS-E2E hang agent", 300, f"{r.version}: the hang probe")
    t_stop = m.now()
    m.wait_for(r"edgeops-agent\.service: Watchdog timeout", 120,
               f"{r.version}: systemd's watchdog for the stopped agent")
    t_wd = m.now()
    m.wait_for(r"EDGEOPS-E2E hang system", 180, f"{r.version}: the restarted agent's probe")
    t_panic = m.now()
    rep.row(f"(c) {r.version}: agent hung (SIGSTOP)", t_wd - t_stop,
            "service watchdog fired (WatchdogSec=60), systemd restarted it")
    back = m.wait_booted(run_.boot_timeout, f"{r.version}: the boot after the hardware reset")
    wd = m.event("WATCHDOG")
    if wd is None or wd.at < t_panic:
        raise E2EFailure(f"{r.version}: no i6300esb reset after the kernel hang (QMP events "
                         f"{[e.name for e in m.events]})\n{m.tail()}")
    if wd.at - t_panic >= 60:
        raise E2EFailure(f"{r.version}: the reset came {wd.at - t_panic:.0f} s after the hang, "
                         f"not before panic=60")
    if back.slot != current:
        raise E2EFailure(f"{r.version}: after the reset GRUB booted {back.slot}, not the committed "
                         f"{current}\n{m.tail()}")
    a = run_.ctl.wait_action(action, 300, m, r.version)
    if a["status"] != "failure":
        raise E2EFailure(f"{r.version}: action {a['status']} ({a['detail']}), expected failure")
    rep.results["c"] = "passed"
    rep.row(f"(c) {r.version}: system hung (kernel panic)", wd.at - t_panic,
            f"QMP WATCHDOG {wd.data.get('action')}; GRUB fell back to {current}, failure reported")
    rep.row(f"(c) {r.version}: deploy to failure reported", time.monotonic() - t0,
            f"trial {other}, fallback {current}")


def env_block(data: bytes) -> dict[str, str] | None:
    """A GRUB environment block's variables, or None if it is not one (torn, being written)."""
    head = b"# GRUB Environment Block\n"
    if not data.startswith(head):
        return None
    out = {}
    for line in data[len(head):].split(b"\n"):
        if b"=" in line and not line.startswith(b"#"):
            k, v = line.decode(errors="replace").split("=", 1)
            out[k] = v
    return out


def env_offsets(disk: Path, esp_offset: int, esp_bytes: int) -> list[int]:
    """Where on the disk the two grubenv copies' blocks sit: the agent rewrites each in place
    (agent/adapters/bootloader/grub.py), so the host can read them while the guest runs."""
    with open(disk, "rb") as f:
        f.seek(esp_offset)
        esp = f.read(esp_bytes)
    found, i = [], esp.find(b"# GRUB Environment Block\n")
    while i >= 0:
        if i % 512 == 0:
            found.append(esp_offset + i)
        i = esp.find(b"# GRUB Environment Block\n", i + 1)
    if len(found) != 2:
        raise E2EFailure(f"expected two grubenv blocks on the ESP, found {len(found)}")
    return found


def committed(env: dict[str, str] | None, slot: str) -> bool:
    return (env is not None and "EO_TRIAL" not in env and env.get(f"{slot}_OK") == "1"
            and env.get(f"{slot}_TRY") == "0" and env.get("ORDER", "").split()[:1] == [slot])


def commit_cut(run_: Run, r: Release, current: str, other: str) -> str:
    """(d) during the commit: QEMU killed the moment the first grubenv copy on the disk says
    ``other`` is committed (before the second copy and the journal's end of the commit). The
    next boot must run a committed slot, and the agent finish or undo that commit and say so.
    Returns the slot that then runs."""
    m, rep = run_.machine, run_.report
    t0 = time.monotonic()
    action = run_.deploy(r)
    run_.expect_boot(other, f"{r.version}: trial boot", after=True)
    offsets = env_offsets(m.disk, run_.esp_offset, run_.esp_bytes)  # now, as the guest left them
    deadline = time.monotonic() + 300
    seen: list[bool] = []
    with open(m.disk, "rb") as f:
        while time.monotonic() < deadline:
            seen = [committed(env_block(os.pread(f.fileno(), 1024, off)), other)
                    for off in offsets]
            if any(seen):
                break
            time.sleep(0.01)
        else:
            raise E2EFailure(f"{r.version}: the commit never reached the grubenv\n{m.tail()}")
    m.power_cut()
    rep.row(f"(d) power cut during the commit of {r.version}", time.monotonic() - t0,
            f"QEMU killed; grubenv copies committed: {seen}")
    rep.row("grubenv after the cut", None, grubenv(m.disk, run_.esp_offset, run_.out))
    t1 = time.monotonic()
    m.power_on()
    b = m.wait_booted(run_.boot_timeout, "after the power cut during the commit")
    a = run_.ctl.wait_action(action, 300, m, r.version)
    want = "success" if b.slot == other else "failure"
    if b.slot not in (current, other) or a["status"] != want:
        raise E2EFailure(f"after the cut during the commit: booted {b.slot}, action {a['status']} "
                         f"({a['detail']}), expected {want}\n{m.tail()}")
    rep.results["d"] = "passed"
    rep.row(f"(d) next boot after the cut: slot {b.slot}", time.monotonic() - t1,
            f"the commit {'finished' if want == 'success' else 'undone'}, {a['status']} reported")
    return b.slot


def power_cut_then_install(run_: Run, r: Release, current: str, other: str) -> None:
    """(d): QEMU killed at 40 % of the slot write; the next boot runs ``current``, and the
    same deployment, retried by the agent, installs into ``other`` and commits."""
    m, rep = run_.machine, run_.report
    cut = threading.Event()
    size = r.path.stat().st_size if r.path else 0

    def trigger(req: Request) -> None:
        if "/artifacts/" in req.path and req.bytes_down > size * 0.4 and not cut.is_set():
            cut.set()

    run_.proxy.on_bytes = trigger
    t0 = time.monotonic()
    action = run_.deploy(r)
    if not cut.wait(600):
        raise E2EFailure(f"power cut: the download never reached 40 %\n{m.tail()}")
    m.power_cut()
    run_.proxy.on_bytes = None
    rep.row(f"(d) power cut at 40 % of the slot write ({r.version})", time.monotonic() - t0,
            "QEMU killed")
    rep.row("grubenv after the cut", None, grubenv(m.disk, run_.esp_offset, run_.out))
    t1 = time.monotonic()
    m.power_on()
    run_.expect_boot(current, "after the power cut")
    b = m.wait_booted(run_.boot_timeout * 2, f"{r.version}: trial boot after the retried install")
    if b.slot != other:
        raise E2EFailure(f"{r.version}: the retried install booted {b.slot}, not {other}")
    m.wait_for(rf"committed: slot {other} {re.escape(r.version)}", 300, f"{r.version}: commit")
    a = run_.ctl.wait_action(action, 300, m, r.version)
    if a["status"] != "success":
        raise E2EFailure(f"after the power cut: action {a['status']} ({a['detail']})\n{m.tail()}")
    rep.results["d"] = "passed"
    rep.row(f"(d) next boot on {current}, install {r.version} again, commit", time.monotonic() - t1,
            f"booted {current}, then trial {other} committed, success reported")


def device_name(n: int) -> str:
    return f"qemu-{n}"  # the VM's board serial, so its fleet id (SERIAL_FILE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, default=REPO / "build/e2e")
    p.add_argument("--edgeops", default=str(REPO / ".venv/bin/edgeops"))
    p.add_argument("--skip-build", action="store_true", help="reuse OUT/image as it is")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("EDGEOPS_CACHE",
                                                                  "/var/cache/edgeops")) / "e2e",
                   help="where the last image is kept, keyed on its inputs ('' for none)")
    p.add_argument("--scenarios", "--only", default=",".join(["baseline", *ALL]),
                   help="comma-separated subset; each chain runs its own in its fixed order, "
                        "and a chain with none chosen does not boot (default: all, with "
                        "'baseline', the boot without the agent, for the timing table)")
    p.add_argument("--boot-timeout", type=float, default=300)
    p.add_argument("--smp", type=int, default=SMP, help=f"vCPUs per VM (default {SMP})")
    p.add_argument("--tcg-thread", choices=("multi", "single"), default="multi",
                   help="TCG: a host thread per vCPU, or one for all (default multi)")
    a = p.parse_args(argv)
    # a stopped run must not leave QEMU, swtpm or the controller behind: SIGTERM unwinds too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache: Path | None = a.cache.resolve() if str(a.cache) not in ("", ".") else None
    which = [w.strip() for w in a.scenarios.split(",") if w.strip()]
    unknown = set(which) - {*ALL, "baseline"}
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from baseline,{','.join(ALL)}")
    chains = chains_for(which)
    report, t_start = Report(), time.monotonic()
    for old in out.glob("transcript*.log"):
        old.unlink()
    ctl: Controller | None = None
    runs: list[Run] = []
    ok = False
    try:
        fleet, token = fleet_toml(cache / "fleet.toml" if cache is not None else out / "fleet.toml")
        if not a.skip_build:
            took, how = build_image(out, fleet, cache / "image" if cache is not None else None)
            report.row("make image", took, how)
        image = out / "image"
        build = json.loads((image / "build.json").read_text())
        t0 = time.monotonic()
        wanted = make_bundles(out, a.edgeops, image, which)
        first = wanted[0].path if wanted else None
        report.row(f"{len(wanted)} bundles signed", time.monotonic() - t0,
                   f"{first.stat().st_size >> 20 if first else 0} MiB each")
        ctl = start_controller(out, a.edgeops, image / "pki/root/root.crt")
        for rel in wanted:
            upload(ctl, rel)
        kvm, why = kvm_works(out / "kvm-probe")
        report.row("accelerator", None, f"{'kvm' if kvm else 'tcg'} ({why}); "
                   f"{sum(1 for c in chains if c)} VMs at once, -smp {a.smp}"
                   f"{'' if kvm else f', thread={a.tcg_thread}'}")
        esp_part = next(pt for pt in build["partitions"] if pt["name"] == "esp")
        esp = int(esp_part["start"])
        for n, steps in enumerate(chains, 1):
            if not steps:
                continue  # nothing chosen for this chain: its device does not boot
            name = device_name(n)
            ctl.api("POST", "/devices", {"id": name, "token": token})
            dev = out / name
            shutil.rmtree(dev, ignore_errors=True)
            dev.mkdir(parents=True)
            disk = dev / "disk.img"  # each device its own sparse copy of the image
            subprocess.run(["cp", "--sparse=always", str(image / "disk.img"), str(disk)], check=True)
            proxy = Proxy(int(ctl.url.rsplit(":", 1)[1]))  # per device: its requests, its cuts
            machine = Machine(name, dev, disk, accel="kvm" if kvm else "tcg",
                              controller_port=proxy.start(), serial=name, smp=a.smp,
                              tcg_thread=a.tcg_thread, transcript=out / f"transcript-{name}.log")
            runs.append(Run(dev, machine, ctl, proxy, Report(name), esp,
                            int(esp_part["size_mib"]) << 20, a.boot_timeout,
                            lambda r: sign(a.edgeops, image, out / "bundles", r), which=steps,
                            token=token))
        threads = [threading.Thread(target=run_chain, args=(r, r.which), name=r.device, daemon=True)
                   for r in runs]
        for th in threads:
            th.start()
        for th in threads:
            while th.is_alive():  # a timed join: SIGTERM's handler runs in this thread
                th.join(1)
        ok = not any(r.error for r in runs)
    except E2EFailure as exc:
        print(f"e2e: FAILED: {exc}", file=sys.stderr)
        report.row("FAILED", None, str(exc).splitlines()[0][:120])
    finally:
        for r in runs:
            r.machine.halt()
        if ctl is not None:
            ctl.proc.terminate()
            ctl.proc.wait(10)
        report.row("total", time.monotonic() - t_start, f"wall, {len(runs)} devices at once")
        results = {k: v for r in runs for k, v in r.report.results.items()}
        tables = [report.table()] + [f"\n{r.device} (chain {','.join(r.which)}):\n{r.report.table()}"
                                     for r in runs]
        (out / "timings.md").write_text("\n".join(tables) + "\n")
        (out / "result.json").write_text(json.dumps({
            "ok": ok, "scenarios": results, "rows": report.rows,
            "devices": {r.device: {"chain": r.which, "scenarios": r.report.results,
                                   "error": r.error, "rows": r.report.rows} for r in runs},
        }, indent=1) + "\n")
        print("\n".join(tables))
        print(f"e2e: transcripts {', '.join(str(r.machine.transcript) for r in runs)}; "
              f"timings {out / 'timings.md'}")
        chosen = [w for w in which if w in ALL]
        passed = sum(1 for w in chosen if results.get(w) == "passed")
        print(f"e2e: {passed} passed, {len(chosen) - passed} failed")  # CI reads this last line
    return 0 if ok and passed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
