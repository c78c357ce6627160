#!/usr/bin/env python3
"""make e2e: the x86-64 image booted in QEMU, updated from a controller on the host's loopback.

Standard library only (it drives ``edgeops`` and QEMU as subprocesses). One device, as few
boots as the scenarios allow, in this order:

  baseline  the same image booted with edgeops' units masked (systemd.mask= through the
            grubenv's EO_CMDLINE), for boot-to-ready without the agent: one boot
  (a)       a good release A->B from the controller: download, trial boot, health, commit,
            success reported only after the commit. With (d): the power is cut at 40 % of
            its slot write, the next boot runs A, and the same deployment, retried, is (a)
  (f)       a bundle below the floor, refused on the booted system, failure reported
  (c)       a trial whose system hangs (tools/e2e/guest/usr/local/bin/edgeops-e2e-hang):
            first the agent (SIGSTOP; its service watchdog fires, systemd restarts it),
            then the kernel (panic; PID 1 stops feeding the i6300esb, which resets the
            machine); GRUB falls back to the committed slot by itself, failure reported
  (b)       a release whose health check fails: trial, revert, failure reported
  (e)       back to the first slot with the same rootfs payload (slots are chosen by
            partition, not by label). With (d): the power is cut the moment the first
            grubenv copy on the disk says the trial slot is committed; the next boot must
            run a committed slot, and the commit be finished (or undone and installed again)
  (d)       alone (without a and e): a power cut during the slot write of its own release
  (g)       the technician console on ttyS0: login, status, health, a USB stick install (console_e2e.py)

The guest reaches only 10.0.2.100:8080 (QEMU user networking, restrict=on, one guestfwd),
which is tools/e2e/relay.py -> this script's counting proxy -> the controller, all on
127.0.0.1. ``--only d`` (make e2e SCENARIOS=d) runs a subset, in the same order, and signs
only the bundles it deploys. Writes OUT/transcript.log (both serial consoles of every power-on),
OUT/timings.md (the table it prints) and OUT/result.json. Exit 0 only if every scenario passed.
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
DEVICE_ID = "qemu-1"
COMPATIBLE = "edgeops-x86-64"
MASK = "systemd.mask=edgeops-agent.service systemd.mask=edgeops-provision.service"
# Under TCG only, on every boot (the grubenv's EO_CMDLINE): QEMU's software MMU pays for
# each address-space switch, so the kernel's page-table isolation and other speculation
# mitigations, useless against an emulated CPU, cost the guest dearly. Hardware, and a
# KVM run, keep the board's command line as it is.
TCG_CMDLINE = "mitigations=off"
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

    def action(self, action_id: int) -> dict[str, Any]:
        for a in self.api("GET", f"/actions?device={DEVICE_ID}")["actions"]:
            if a["id"] == action_id:
                return dict(a)
        raise E2EFailure(f"controller has no action {action_id}")

    def wait_action(self, action_id: int, timeout: float, machine: Machine, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            a = self.action(action_id)
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
    """The e2e device's fleet.toml, kept beside the cached image (its token is in the image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        found = re.search(r'token = "([0-9a-f]+)"', path.read_text())
        if found:
            return path, found[1]
    token = secrets.token_hex(16)
    path.write_text(f"""# e2e device's fleet config (tools/e2e/run.py); the guest's only route is this URL
[fleet]
url = "http://10.0.2.100:8080"
controller_id = "{DEVICE_ID}"
auth = "target"
token = "{token}"
poll_interval = 5
min_sleep = 1
max_sleep = 10
push = "longpoll"
longpoll_wait = 30
read_timeout = 60
""")
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


ALL = ["a", "f", "c", "b", "e", "d", "g"]  # the scenarios, in the order they run


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
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=dict)
    baseline: float | None = None  # power-on to multi-user with edgeops masked, when measured

    def row(self, what: str, seconds: float | None, note: str = "") -> None:
        self.rows.append((what, "" if seconds is None else f"{seconds:.1f}", note))
        print(f"e2e: {what}: {'' if seconds is None else f'{seconds:.1f} s'} {note}".rstrip(), flush=True)

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"| {'step':<{w}} | seconds | note |", f"|{'-' * (w + 2)}|---------|------|"]
        lines += [f"| {a:<{w}} | {b:>7} | {c} |" for a, b, c in self.rows]
        return "\n".join(lines)


# --- the scenarios ------------------------------------------------------------------------------------
@dataclass
class Run:
    out: Path
    machine: Machine
    ctl: Controller
    proxy: Proxy
    report: Report
    esp_offset: int
    esp_bytes: int
    boot_timeout: float
    sign_bundle: Callable[[Release], None]

    def add_bundle(self, r: Release) -> None:
        """Sign ``r`` now (a release only some outcomes need) and give it to the controller."""
        t0 = time.monotonic()
        self.sign_bundle(r)
        upload(self.ctl, r)
        self.report.row(f"bundle {r.version} signed and uploaded", time.monotonic() - t0)

    def deploy(self, r: Release) -> int:
        res = self.ctl.api("POST", "/deployments", {"bundle": r.bundle_id, "device": DEVICE_ID})
        ids = [a["id"] for a in self.ctl.api("GET", f"/actions?device={DEVICE_ID}")["actions"]
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

    def expect_boot(self, slot: str, what: str) -> float:
        b = self.machine.wait_booted(self.boot_timeout, what)
        if b.slot != slot:
            raise E2EFailure(f"{what}: booted slot {b.slot}, expected {slot}\n{self.machine.tail()}")
        return b.at

    def update(self, r: Release, *, to: str, back: str | None = None, expect: str) -> float:
        """Deploy r; follow the trial boot into slot ``to`` (and ``back`` after a revert)."""
        t0 = time.monotonic()
        action = self.deploy(r)
        self.expect_boot(to, f"{r.version}: trial boot")
        t_commit_line = None
        if expect == "success":
            self.machine.wait_for(rf"committed: slot {to} {re.escape(r.version)}", 300,
                                  f"{r.version}: commit")
            t_commit_line = time.monotonic()
        if back is not None:
            self.expect_boot(back, f"{r.version}: revert boot")
        a = self.ctl.wait_action(action, 300, self.machine, f"{r.version}")
        t_report = time.monotonic()
        if a["status"] != expect:
            raise E2EFailure(f"{r.version}: action {a['status']} ({a['detail']}), expected {expect}"
                             f"\n{self.machine.tail()}")
        if t_commit_line is not None and t_report < t_commit_line:
            raise E2EFailure(f"{r.version}: success reported before the commit")
        return time.monotonic() - t0


def scenarios(run_: Run, which: list[str]) -> None:
    m, rep = run_.machine, run_.report
    rel = {r.name: r for r in RELEASES}
    extra = TCG_CMDLINE if m.accel == "tcg" else ""
    if "baseline" in which:
        set_cmdline(m.disk, run_.esp_offset, f"{MASK} {extra}".strip(), run_.out)
        m.power_on()
        b = m.wait_booted(run_.boot_timeout, "baseline boot (edgeops masked)")
        if b.agent == "active":
            raise E2EFailure("baseline: the agent ran although masked")
        rep.baseline = b.at
        rep.row("boot to multi-user, edgeops masked", b.at, f"{m.split(b.at, b.uptime)}"
                f"{boot_split(m)}")
        m.power_cut()
    set_cmdline(m.disk, run_.esp_offset, extra, run_.out)

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
            if rep.baseline is not None else "without the agent: make e2e SCENARIOS=baseline,...")
    current = "A"
    if "a" in which:
        if "d" in which:
            # one boot fewer: the power cut hits (a)'s download, and the retry of that same
            # deployment is (a) (trial boot into B, health, commit, success after the commit)
            power_cut_then_install(run_, rel["good-ab"], "A", "B")
        else:
            took = run_.update(rel["good-ab"], to="B", expect="success")
            rep.row("(a) 2.0: good-ab", took, "A/B -> B, committed, success reported")
        rep.results["a"] = "passed"
        current = "B"
    other = "B" if current == "A" else "A"
    if "f" in which:
        t0 = time.monotonic()
        boots = len(m.seen("EDGEOPS-E2E booted"))
        action = run_.deploy(rel["below-floor"])
        a = run_.ctl.wait_action(action, 180, m, "below-floor")
        if a["status"] != "failure" or len(m.seen("EDGEOPS-E2E booted")) != boots:
            raise E2EFailure(f"below-floor: action {a['status']} ({a['detail']}), "
                             f"{len(m.seen('EDGEOPS-E2E booted')) - boots} reboots")
        if "floor" not in (a.get("detail") or "") and not m.seen("floor|RollbackRefused|refused"):
            raise E2EFailure(f"below-floor: failure without the floor as reason: {a['detail']}")
        rep.results["f"] = "passed"
        rep.row("(f) 1.5 below the floor", time.monotonic() - t0,
                f"refused on the device: {a['detail'][:60]}")
    if "c" in which:
        hang(run_, rel["hang"], current, other)
    if "b" in which:
        took = run_.update(rel["failing-health"], to=other, back=current, expect="failure")
        rep.results["b"] = "passed"
        rep.row("(b) 4.0 failing health check", took,
                f"trial on {other}, reverted to {current}, failure reported")
    if "e" in which:
        r = rel["same-payload-ba"]
        if "d" in which:
            landed = commit_cut(run_, r, current, other)
            if landed != other:  # the cut came before the bootloader heard: install again
                retry = rel["same-payload-retry"]
                run_.add_bundle(retry)
                took = run_.update(retry, to=other, expect="success")
                rep.row(f"(e) {retry.version}: the same payload again", took,
                        f"{current} -> {other}, committed, success reported")
        else:
            took = run_.update(r, to=other, expect="success")
            rep.row(f"(e) {r.version}: same-payload", took,
                    f"{current} -> {other}, committed, success reported")
        rep.results["e"] = "passed"
        current, other = other, current
    if "d" in which and "a" not in which:
        power_cut_then_install(run_, rel["after-power-cut"], current, other)
        current, other = other, current
    if "g" in which:
        console_e2e.scenario(run_, current)
    m.power_cut()


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
    run_.expect_boot(other, f"{r.version}: trial boot")
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
    run_.expect_boot(other, f"{r.version}: trial boot")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, default=REPO / "build/e2e")
    p.add_argument("--edgeops", default=str(REPO / ".venv/bin/edgeops"))
    p.add_argument("--skip-build", action="store_true", help="reuse OUT/image as it is")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("EDGEOPS_CACHE",
                                                                  "/var/cache/edgeops")) / "e2e",
                   help="where the last image is kept, keyed on its inputs ('' for none)")
    p.add_argument("--scenarios", "--only", default=",".join(["baseline", *ALL]),
                   help="comma-separated, run in the fixed order above (default: all, with "
                        "'baseline', the boot without the agent, for the timing table)")
    p.add_argument("--boot-timeout", type=float, default=300)
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
    report, t_start = Report(), time.monotonic()
    (out / "transcript.log").write_text("")
    ctl: Controller | None = None
    machine: Machine | None = None
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
        ctl.api("POST", "/devices", {"id": DEVICE_ID, "token": token})
        for r in wanted:
            upload(ctl, r)
        proxy = Proxy(int(ctl.url.rsplit(":", 1)[1]))
        port = proxy.start()
        kvm, why = kvm_works(out / "kvm-probe")
        report.row("accelerator", None, f"{'kvm' if kvm else 'tcg'} ({why})")
        disk = out / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(image / "disk.img"), str(disk)], check=True)
        dev = out / "device"
        shutil.rmtree(dev, ignore_errors=True)
        machine = Machine(DEVICE_ID, dev, disk, accel="kvm" if kvm else "tcg",
                          controller_port=port, transcript=out / "transcript.log")
        esp_part = next(pt for pt in build["partitions"] if pt["name"] == "esp")
        esp = int(esp_part["start"])
        run_ = Run(out, machine, ctl, proxy, report, esp, int(esp_part["size_mib"]) << 20,
                   a.boot_timeout, lambda r: sign(a.edgeops, image, out / "bundles", r))
        scenarios(run_, which)
        up = [b.uptime for b in machine.boots]
        report.row(f"{len(up)} boots in {machine.power_ons} power-ons", sum(up),
                   f"kernel -> multi-user: mean {sum(up) / len(up):.1f} s, "
                   f"min {min(up):.1f} s, max {max(up):.1f} s (guest clock)")
        report.row("grubenv at the end", None, grubenv(disk, esp, out))
        ok = True
    except E2EFailure as exc:
        print(f"e2e: FAILED: {exc}", file=sys.stderr)
        report.row("FAILED", None, str(exc).splitlines()[0][:120])
    finally:
        if machine is not None and machine.qemu is not None:
            machine.power_cut()
        if ctl is not None:
            ctl.proc.terminate()
            ctl.proc.wait(10)
        report.row("total", time.monotonic() - t_start)
        table = report.table()
        (out / "timings.md").write_text(table + "\n")
        (out / "result.json").write_text(json.dumps({"ok": ok, "scenarios": report.results,
                                                     "rows": report.rows}, indent=1) + "\n")
        print(table)
        print(f"e2e: transcript {out / 'transcript.log'}, timings {out / 'timings.md'}")
        chosen = [w for w in which if w in ALL]
        passed = sum(1 for w in chosen if report.results.get(w) == "passed")
        print(f"e2e: {passed} passed, {len(chosen) - passed} failed")  # CI reads this last line
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
