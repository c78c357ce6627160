"""make e2e scenario (g): a technician at the guest's serial console installs an update from a USB stick.

Standard library only, like run.py, which calls ``scenario`` at the end of its run (the
device is up, on its committed slot). What a technician does, on the board's console port
(boards/x86-64-grub.toml: ttyS0, which tools/e2e/qemu.py also offers as a unix socket):

  login     ``login key``: the device shows a challenge; a technician certificate issued
            by the fleet's root (the image's test PKI, as a factory's technician tool
            would hold one: ``edgeops console issue-technician``) answers it
            (``edgeops console answer``). No PIN is baked into the image: the keyring the
            image trusts for bundles is all the device needs.
  status    checked against the device's truth: the booted slot the guest's markers report
            (tools/e2e/guest, /proc/cmdline), good, as the harness left it
  health    every check passes, the board's probe (multi-user.target) among them
  stick     an ext4 image (``mkfs.ext4 -d``) with a signed bundle in ``edgeops/``, hot-plugged
            over QMP (``blockdev-add`` + ``device_add usb-storage`` on the qemu-xhci bus
            present from boot); edgeops-usb.service offers it and the console says so
  install   ``install usb``: the confirmation's version, signer and size are the signed
            bundle's; ``yes``; ``installed ... into slot X``; the stick is pulled
            (``device_del``); ``reboot`` (confirmed)
  trial     the guest boots slot X (markers), the agent commits it (its log on ttyS1), and
            after logging in again ``status`` shows X booted and good with the new version;
            ``logs`` holds the audit rows of the login and of the install

Writes OUT/console-g.log: the console session as the technician saw it (escapes removed).
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu import E2EFailure, Machine, clean

REPO = Path(__file__).resolve().parents[2]
EDGEOPS = str(REPO / ".venv/bin/edgeops")
FOLDER = "edgeops"  # where agent/device/usb_updates.py looks, beside the top level


@dataclass
class UsbRelease:
    """What run.py's ``sign`` reads of a release (run.Release's fields)."""

    name: str = "console-usb"
    key: str = "g"
    version: str = "7.0"
    security_version: int = 3  # at or above every floor the other scenarios leave
    health: dict[str, Any] | None = None
    path: Path | None = None
    bundle_id: int | None = None


class SerialConsole:
    """The guest's ttyS0 over QEMU's socket: what it prints is kept (raw, and cleaned of
    terminal escapes), and ``expect`` searches the cleaned text after the last match."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.path, self.closed = path, False
        self.sock = self._connect(timeout)
        self.raw = bytearray()
        self.lock = threading.Lock()
        self.cursor = 0  # in the cleaned text
        threading.Thread(target=self._read, daemon=True).start()

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(self.path))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline or self.closed:
                    raise E2EFailure(f"console: cannot connect to {self.path}") from None
                time.sleep(0.2)

    def _read(self) -> None:
        """Keep what the console prints; when QEMU ends (a guest reset is a power cycle,
        tools/e2e/qemu.py) connect to the next one's socket, as a serial cable stays plugged."""
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if data:
                with self.lock:
                    self.raw += data
                continue
            if self.closed:
                return
            try:
                sock = self._connect(600)
            except E2EFailure:
                return
            self.sock.close()
            self.sock = sock

    def text(self) -> str:
        with self.lock:
            return clean(bytes(self.raw).decode(errors="replace"))

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def expect(self, pattern: str, timeout: float, what: str, *,
               poke: float | None = None) -> re.Match[str]:
        """The first match after the last one; with ``poke``, Enter every ``poke`` seconds
        (a console that printed its banner before anyone connected shows a fresh prompt)."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        next_poke = time.monotonic()
        while True:
            if (m := rx.search(self.text(), self.cursor)) is not None:
                self.cursor = m.end()
                return m
            if time.monotonic() > deadline:
                tail = "\n".join(self.text()[self.cursor:].splitlines()[-15:])
                raise E2EFailure(f"console: {what}: {pattern!r} not seen within {timeout:.0f} s; "
                                 f"after the last match:\n{tail}")
            if poke is not None and time.monotonic() >= next_poke:
                self.send("\r")
                next_poke = time.monotonic() + poke
            time.sleep(0.1)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):  # ends the reader's recv; close alone would not
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Technician:
    """One technician at the device's console: the prompt, commands, login with the key."""

    def __init__(self, con: SerialConsole, device: str, tech: Path) -> None:
        self.con, self.device, self.tech = con, device, tech
        self.prompt = rf"^{re.escape(device)}([>#]) "

    def ready(self, timeout: float) -> str:
        """A prompt, and then quiet: the Enters sent while waiting (or typed into a console
        still starting) each give a prompt of their own, and none of them is a command's end."""
        kind = self.con.expect(self.prompt, timeout, "the console's prompt", poke=5)[1]
        seen = -1
        while seen != len(self.con.text()):
            seen = len(self.con.text())
            time.sleep(1.5)
        self.con.cursor = seen
        return kind

    def run(self, line: str, timeout: float = 180) -> str:
        """Type ``line``; what it printed (after its echo) until the next prompt."""
        self.con.send(line + "\r")
        echo = self.con.expect(re.escape(line) + r"\n", 30, f"the echo of {line!r}")
        m = self.con.expect(self.prompt, timeout, line)
        return self.con.text()[echo.end():m.start()]

    def login(self) -> str:
        self.con.send("login key\r")
        challenge = self.con.expect(r"(edgeops-console-v1 \S+ [0-9a-f]{32} \d+)", 120,
                                    "the login challenge")[1]
        self.con.expect(r"answer: ", 30, "the answer prompt")
        answer = run([EDGEOPS, "console", "answer", challenge, "--key",
                      str(self.tech / "technician.key"), "--cert",
                      str(self.tech / "technician.crt")]).strip()
        self.con.send(answer + "\r")
        m = self.con.expect(r"logged in \(([^)\n]+)\)|login failed: [^\n]*", 180, "the login")
        if m[1] is None:
            raise E2EFailure(f"console: {m[0]}")
        self.ready(30)
        return m[1]


def run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise E2EFailure(f"{' '.join(argv[:3])} failed ({proc.returncode}): {proc.stderr[-600:]}")
    return proc.stdout


def technician_key(image: Path, out: Path) -> Path:
    """A technician key and certificate from the image's root, as a factory's tool issues one."""
    tech = out / "technician"
    if not (tech / "technician.crt").exists():
        tech.mkdir(parents=True, exist_ok=True)
        run([EDGEOPS, "console", "issue-technician", "--root", str(image / "pki/root"), "--out",
             str(tech), "--name", "E2E Technician", "--days", "2"])
    return tech


def stick_image(bundle: Path, dest: Path) -> Path:
    """An ext4 filesystem (no partition table, as many sticks are formatted) holding
    ``edgeops/<bundle>``: mkfs.ext4 -d, no loop mount."""
    tree = dest.with_suffix(".d")
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    (tree / FOLDER).mkdir(parents=True)
    subprocess.run(["cp", "--reflink=auto", str(bundle), str(tree / FOLDER / bundle.name)], check=True)
    mib = (bundle.stat().st_size >> 20) + 48
    dest.unlink(missing_ok=True)
    run(["mkfs.ext4", "-q", "-F", "-L", "EDGEOPS-USB", "-E", "root_owner=0:0", "-d", str(tree),
         str(dest), f"{mib}M"])
    return dest


def signer_cn(cert: Path) -> str:
    subject = run(["openssl", "x509", "-in", str(cert), "-noout", "-subject", "-nameopt", "RFC2253"])
    found = re.search(r"CN=((?:[^,\\]|\\.)+)", subject)
    if not found:
        raise E2EFailure(f"no CN in the signer certificate's subject: {subject.strip()}")
    return found[1]


def slot_line(status: str, slot: str) -> re.Match[str] | None:
    return re.search(rf"^([* ]) slot {slot}\s+(\S+)\s+(\S+)", status, re.M)


def scenario(run_: Any, current: str) -> None:
    """(g), on the running device whose committed slot ``current`` is booted."""
    m: Machine = run_.machine
    rep = run_.report
    image: Path = run_.image
    other = "B" if current == "A" else "A"
    t0 = time.monotonic()
    r = UsbRelease()
    run_.sign_bundle(r)
    assert r.path is not None
    stick = stick_image(r.path, run_.out / "stick.img")
    tech = technician_key(image, run_.out)
    rep.row("(g) bundle signed, stick and technician key made", time.monotonic() - t0,
            f"{r.version}: ext4 stick {stick.stat().st_size >> 20} MiB, edgeops/{r.path.name}")
    con = SerialConsole(m.console_sock)
    try:
        _scenario(run_, m, rep, con, Technician(con, m.name, tech), r, stick, current, other)
    finally:
        con.close()
        (run_.out / "console-g.log").write_text(con.text())


def _scenario(run_: Any, m: Machine, rep: Any, con: SerialConsole, tech: Technician,
              r: UsbRelease, stick: Path, current: str, other: str) -> None:
    image: Path = run_.image
    name = r.path.name if r.path else ""
    t0 = time.monotonic()
    tech.ready(180)
    who = tech.login()
    rep.row("(g) console: login with the technician key", time.monotonic() - t0,
            f"challenge answered by 'edgeops console answer': logged in ({who})")

    t0 = time.monotonic()
    booted = m.boots[-1].slot
    status = tech.run("status")
    line = slot_line(status, booted)
    if (f"booted    slot {booted}" not in status or booted != current or line is None
            or line[1] != "*" or line[2] != "good"):
        raise E2EFailure(f"console: status disagrees with the device (markers: slot {booted} "
                         f"booted, harness: {current} committed):\n{status}")
    health = tech.run("health")
    counted = re.search(r"^(\d+) of (\d+) checks passed", health, re.M)
    if (counted is None or counted[1] != counted[2] or int(counted[2]) < 1
            or "FAIL" in health or "multi-user.target" not in health
            or not re.search(r"^healthy$", health, re.M)):
        raise E2EFailure(f"console: health is not what the device is (up, multi-user reached):\n{health}")
    rep.row("(g) console: status and health", time.monotonic() - t0,
            f"slot {booted} booted and {line[2]} ({line[3]}); {counted[0]}")

    t0 = time.monotonic()
    m.qmp("blockdev-add", {"driver": "raw", "node-name": "stick", "read-only": False,
                           "file": {"driver": "file", "filename": str(stick)}})
    m.qmp("device_add", {"driver": "usb-storage", "bus": "xhci.0", "drive": "stick", "id": "stick0"})
    offer = con.expect(rf"USB stick (/dev/\S+): {FOLDER}/{re.escape(name)}",
                       180, "the stick's offer", poke=5)
    devnode = offer[1]
    tech.ready(30)
    rep.row("(g) stick hot-plugged (QMP) -> offered on the console", time.monotonic() - t0,
            f"{devnode}: {FOLDER}/{name}")

    payload = (image / "rootfs.ext4").stat().st_size
    cn = signer_cn(image / "pki/signer/signer.crt")
    want = {"version": rf"^version\s+{re.escape(r.version)} \(security {r.security_version}, ",
            "signer": rf"^signer\s+.*CN={re.escape(cn)}",
            "size": rf"^size\s+{payload} bytes .* into slot {other}$",
            "question": rf"install {re.escape(r.version)} into slot {other}\?"}
    busy = 0
    while True:
        t0 = time.monotonic()
        start = con.cursor
        con.send("install usb\r")
        confirm = con.expect(r"type 'yes' to go on: ", 600, "the install's confirmation")
        shown = con.text()[start:confirm.start()]
        wrong = [k for k, rx in want.items() if not re.search(rx, shown, re.M)]
        if wrong:
            con.send("no\r")
            raise E2EFailure(f"console: the confirmation's {', '.join(wrong)} is not the bundle's "
                             f"({r.version}, CN={cn}, {payload} bytes):\n{shown}")
        t_confirm = time.monotonic() - t0
        t0 = time.monotonic()
        con.send("yes\r")
        done = con.expect(r"installed (\S+) into slot (\w+) \((\d+) bytes\)|install stopped: [^\n]*"
                          r"|error: another edgeops process holds the device lock[^\n]*",
                          1200, "the install from the stick")
        # the agent's cycle holds the lock for a moment now and then (seconds under TCG):
        # the console refuses at once and says to try again, as a technician then does
        if done[0].startswith("error: another edgeops process") and busy < 8:
            busy += 1
            tech.ready(30)
            time.sleep(10)
            continue
        break
    if done[1] != r.version or done[2] != other:
        raise E2EFailure(f"console: {done[0]}")
    tech.ready(60)
    rep.row("(g) confirmation (version, signer, size) shown", t_confirm,
            f"{r.version}, CN={cn}, {payload} bytes into slot {other}")
    rep.row(f"(g) install {r.version} from the stick", time.monotonic() - t0,
            f"installed into slot {other} ({done[3]} bytes)"
            + (f"; {busy} time(s) 'busy' (the agent's cycle) first, tried again" if busy else ""))
    m.qmp("device_del", {"id": "stick0"})  # pulled once installed, as a technician would

    t0 = time.monotonic()
    con.send("reboot\r")
    con.expect(r"reboot the device now\? type 'yes' to go on: ", 60, "the reboot's question")
    con.send("yes\r")
    con.expect(r"^rebooting", 60, "the reboot")
    # a shutdown, the firmware and a whole boot: as long as run.py allows a reboot with work in it
    b = m.wait_booted(run_.boot_timeout * 2, f"{r.version}: trial boot after the console's reboot")
    if b.slot != other:
        raise E2EFailure(f"(g) the console's reboot booted slot {b.slot}, not the trial {other}")
    m.wait_for(rf"committed: slot {other} {re.escape(r.version)}", 300, f"{r.version}: commit")
    rep.row(f"(g) reboot -> trial {other} -> committed", time.monotonic() - t0,
            f"{m.split(b.at, b.uptime)}")

    t0 = time.monotonic()
    tech.ready(240)
    tech.login()
    status = tech.run("status")
    line = slot_line(status, other)
    if (f"booted    slot {other}" not in status or line is None or line[1] != "*"
            or line[2] != "good" or line[3] != r.version):
        raise E2EFailure(f"console: after the trial, status does not show {other} booted, good, "
                         f"{r.version}:\n{status}")
    logs = tech.run("logs 40")
    audited = [a for a in ("console-login", "install usb") if a not in logs]
    if audited or not re.search(rf"ok: {re.escape(r.version)} into slot {other}", logs):
        raise E2EFailure(f"console: the audit rows are missing ({audited}):\n{logs}")
    tech.run("logout")
    rep.results["g"] = "passed"
    rep.row("(g) console after the trial: status, audit", time.monotonic() - t0,
            f"slot {other} booted, good, {r.version}; login and install audited")
