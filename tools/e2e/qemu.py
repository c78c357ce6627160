"""Boot an edgeops disk image in QEMU and follow it: power on, wait for markers, power cut.

Standard library only. One ``Machine`` is one device: its disk, its UEFI variables and its
TPM state persist across power cycles; a power cut is killing QEMU. A guest reset (a reboot,
a watchdog's reset) is served as a power cycle: QEMU exits on it (``-action reboot=shutdown``)
and the same power-on goes on in a new QEMU process, with the same disk, vars and TPM state
(see ``_after_exit`` for why). What QEMU gives it:

  firmware   OVMF: the code pflash read-only, a copy of the VARS pflash per device
  accel      KVM when /dev/kvm really runs OVMF here (tried once), otherwise TCG; never required
  identity   the board's serial number in SMBIOS type 1 (``-smbios type=1,serial=``), which the
             guest reads from /sys/class/dmi/id/product_serial: its fleet id (fleet.toml's
             controller_id_file), so one image serves every device, as from a factory line
  disk       virtio-blk, raw, cache=unsafe (the host is not the device: its flushes are moot)
  serial     ttyS0 (kernel, the technician console) and ttyS1 (markers, tools/e2e/guest)
             written to files; each is also a unix socket (WORK/ttyS0.sock to type on,
             WORK/ttyS1.sock for ``guest_run``'s fixed commands)
  usb        a qemu-xhci controller (bus xhci.0) from boot, for sticks hot-plugged over QMP
             (``qmp``: blockdev-add, device_add usb-storage)
  network    none, or user-mode with restrict=on and one guestfwd: the guest reaches
             10.0.2.100:8080 and nothing else; each connection runs tools/e2e/relay.py,
             which connects to one port on the host's 127.0.0.1
  TPM        swtpm (socket, TPM 2.0) attached as tpm-crb
  watchdog   i6300esb (systemd owns it: image/systemd/system.conf.d); QEMU's own account of
             a watchdog reset comes from its QMP events (``events``, ``WATCHDOG``)

Waits are bounded; a failed wait raises ``E2EFailure`` with the tail of both consoles.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
GUEST_CONTROLLER = "10.0.2.100:8080"
RELAY = Path(__file__).resolve().parent / "relay.py"
ANSI = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x00-\x08\x0b-\x1f\x7f]")
# firmware and loader milestones on ttyS0, for where a boot's time goes (``stages``)
STAGES = (("firmware", re.compile(rb"BdsDxe: loading")), ("grub", re.compile(rb"Welcome to GRUB")))
BOOTED = re.compile(r"EDGEOPS-E2E booted slot=(\w*) uptime=([\d.]+) agent=(\S*) boot_id=(\S+)")


class E2EFailure(Exception):
    """A scenario's expectation did not hold; the message says which, with the consoles' tail."""


@dataclass
class Booted:
    slot: str
    uptime: float  # seconds since the guest kernel started, when multi-user was reached
    agent: str  # systemctl is-active edgeops-agent.service at that moment
    boot_id: str
    at: float  # host seconds since this power-on


@dataclass
class Event:
    at: float  # host seconds since this power-on
    name: str  # QMP event name, e.g. WATCHDOG, RESET
    data: dict[str, object]


@dataclass
class Line:
    at: float  # host seconds since this power-on
    text: str


def kvm_works(work: Path) -> tuple[bool, str]:
    """Try KVM with the same firmware: /dev/kvm existing is not enough (nested setups fail)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    work.mkdir(parents=True, exist_ok=True)
    vars_copy, log, err = (work / "kvm-probe-vars.fd", work / "kvm-probe-serial.log",
                           work / "kvm-probe.err")
    shutil.copyfile(OVMF_VARS, vars_copy)
    log.unlink(missing_ok=True)
    with open(err, "wb") as err_f:
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256",
             "-nodefaults", "-display", "none", "-no-user-config",
             "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
             "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
             "-serial", f"file:{log}"], stderr=err_f, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            problem = err.read_text(errors="replace")
            if "error" in problem.lower() or proc.poll() is not None:
                first = problem.strip().splitlines()[:1] or [f"exit {proc.returncode}"]
                return False, f"KVM fails here ({first[0]})"
            if log.exists() and b"BdsDxe" in log.read_bytes():
                return True, "KVM runs OVMF"
            time.sleep(0.2)
        return False, "KVM: OVMF printed nothing within 20 s"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@dataclass
class Machine:
    name: str
    work: Path  # this device's files: vars, TPM state, consoles
    disk: Path
    accel: str = "tcg"
    controller_port: int | None = None  # host 127.0.0.1 port behind 10.0.2.100:8080
    tpm: bool = True
    watchdog: bool = True
    memory_mib: int = 1024
    xhci: bool = True  # a USB controller present from boot (bus "xhci.0")
    serial: str = ""  # SMBIOS system serial number: the device's identity; "" for none
    smp: int = 2  # virtual CPUs (under TCG with thread=multi, one host thread each)
    tcg_thread: str = "multi"  # TCG: one host thread per vCPU ("multi") or one for all ("single")
    transcript: Path | None = None
    trace: Path | None = None  # QEMU's TPM trace of the current power-on
    resets: list[str] = field(default_factory=list)  # guest resets, each served as a power cycle
    label: str = ""  # "power-on N" or "power-on N, after guest reset K": the transcript's heading
    power_ons: int = 0
    qemu: subprocess.Popen[bytes] | None = None
    swtpm: subprocess.Popen[bytes] | None = None
    t0: float = 0.0
    lines: list[Line] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    stages: list[tuple[float, str]] = field(default_factory=list)  # (host s, milestone) on ttyS0
    boots: list[Booted] = field(default_factory=list)  # every boot of every power-on
    cursor: int = 0
    _pos: int = 0
    _partial: str = ""
    halted: bool = False  # set by halt(): no power-on after it (the run is being stopped)
    _power: threading.RLock = field(default_factory=threading.RLock)
    _reader: threading.RLock = field(default_factory=threading.RLock)  # the console files' cursors
    _first_event: int = 0  # where this QEMU process's QMP events start in ``events``
    _qmp_thread: threading.Thread | None = None

    # --- power -------------------------------------------------------------------------------
    def power_on(self) -> None:
        with self._power:
            self._power_on()

    def halt(self) -> None:
        """Power off for good, from any thread: a run being stopped leaves no QEMU behind."""
        with self._power:
            self.halted = True
            self._power_cut()

    def _power_on(self, after_reset: bool = False) -> None:
        """Start QEMU: a new power-on, or (``after_reset``) the same one going on after a guest
        reset, whose marker lines, events, boots and clock carry on."""
        if self.halted:
            raise E2EFailure(f"{self.name}: the run is being stopped")
        if self.qemu is not None:
            raise RuntimeError("already powered on")
        self.work.mkdir(parents=True, exist_ok=True)
        vars_fd = self.work / "OVMF_VARS.fd"
        if not vars_fd.exists():
            shutil.copyfile(OVMF_VARS, vars_fd)
        if not after_reset:
            self.power_ons += 1
            self.lines, self.events, self.cursor = [], [], 0
            self.stages, self.t0 = [], time.monotonic()
        n = self.power_ons
        part = f"{n}" if not after_reset else f"{n}.{len(self.resets)}"
        self.label = f"power-on {n}" + (f", after guest reset {len(self.resets)}" if after_reset else "")
        with self._reader:
            self.console = self.work / f"console-{part}.log"
            self.markers = self.work / f"markers-{part}.log"
            self._pos, self._partial, self._cpos = 0, "", 0
        self.console_sock = self.work / "ttyS0.sock"
        self.console_sock.unlink(missing_ok=True)
        (self.work / "ttyS1.sock").unlink(missing_ok=True)
        argv = ["qemu-system-x86_64", "-name", self.name, "-machine", "q35",
                "-accel", "kvm" if self.accel == "kvm" else f"tcg,thread={self.tcg_thread}",
                "-cpu", "host" if self.accel == "kvm" else "max",
                "-smp", str(self.smp), "-m", str(self.memory_mib),
                "-nodefaults", "-display", "none", "-no-user-config",
                # a guest reset ends this QEMU (_after_exit starts the next): qemu(1), -action
                "-action", "reboot=shutdown",
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
                "-drive", f"file={self.disk},format=raw,if=virtio,cache=unsafe",
                # ttyS0 is logged to the same file as before, and a socket one can type on
                # (qemu-options: -chardev socket,...,logfile=); with no client its output is
                # only logged
                "-chardev", f"socket,id=ttyS0,path={self.console_sock},server=on,wait=off,"
                            f"logfile={self.console}",
                "-serial", "chardev:ttyS0",
                # ttyS1 the same way: markers logged, and a socket for guest_run's commands
                "-chardev", f"socket,id=ttyS1,path={self.work / 'ttyS1.sock'},server=on,"
                            f"wait=off,logfile={self.markers}",
                "-serial", "chardev:ttyS1",
                "-device", "virtio-rng-pci"]
        if self.serial:
            if not re.fullmatch(r"[A-Za-z0-9._:-]+", self.serial):
                raise E2EFailure(f"serial {self.serial!r}: letters, digits and . _ : - only")
            argv += ["-smbios", f"type=1,serial={self.serial}"]  # docs: qemu(1), -smbios
        if self.controller_port is not None:
            host, port = GUEST_CONTROLLER.split(":")
            cmd = shlex.join([sys.executable, str(RELAY), "127.0.0.1", str(self.controller_port)])
            if "," in cmd:
                raise E2EFailure(f"the relay command may not contain a comma (QEMU option syntax): {cmd}")
            argv += ["-netdev", f"user,id=n0,restrict=on,guestfwd=tcp:{host}:{port}-cmd:{cmd}",
                     "-device", "virtio-net-pci,netdev=n0"]
        else:
            argv += ["-nic", "none"]
        if self.tpm:
            argv += self._start_swtpm()
        if self.watchdog:
            argv += ["-device", "i6300esb", "-action", "watchdog=reset"]
        if self.xhci:
            argv += ["-device", "qemu-xhci,id=xhci"]
        # QEMU's own trace of the TPM path (commands to swtpm, the CRB's start and locality
        # writes; not its polled reads): few lines a boot, and what a quiet firmware was
        # waiting for (qemu(1) -trace; the event names: qemu-system-x86_64 -trace help)
        events = self.work / "trace-events"
        events.write_text("tpm_emulator_*\ntpm_crb_mmio_write\ntpm_util_get_buffer_size\n")
        self.trace = self.work / f"qemu-trace-{part}.log"
        argv += ["-trace", f"events={events},file={self.trace}"]
        qmp = self.work / "qmp.sock"
        qmp.unlink(missing_ok=True)
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
        (self.work / "qmp-cmd.sock").unlink(missing_ok=True)  # a second monitor, for ``qmp``
        argv += ["-qmp", f"unix:{self.work / 'qmp-cmd.sock'},server=on,wait=off"]
        self._first_event = len(self.events)
        self.qemu = proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                            stderr=open(self.work / f"qemu-{part}.err", "wb"))  # noqa: SIM115
        self._qmp_thread = threading.Thread(target=self._follow_qmp, args=(qmp, proc), daemon=True)
        self._qmp_thread.start()
        threading.Thread(target=self._supervise, args=(proc,), daemon=True).start()

    def _supervise(self, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        self._after_exit(proc)

    def _after_exit(self, proc: subprocess.Popen[bytes]) -> None:
        """A QEMU process that ended on its own: after a guest reset, the same power-on goes on
        in a new process; after anything else it stays off (``wait_for`` says so).

        Why a reset is a power cycle here: QEMU's warm reset keeps the guest's RAM as the guest
        left it, and with two TCG VMs on this 2-core machine OVMF (edk2 2023.x, Debian's
        ovmf) then ran on in DXE after its TPM commands and never reached its boot manager, in
        about one warm reset of fifteen; pressing reset again did not help, a new QEMU process
        always booted (every power cut of scenario (d), every first boot). edk2 has open
        reports of warm-reset-only hangs (tianocore/edk2#12441). What edgeops relies on is on
        the disk, in the UEFI variables and in the TPM, and a power cycle keeps all three: on
        the boards edgeops targets a watchdog or reboot resets the SoC, and the TPM (reset
        with the platform) starts over as it does here."""
        with self._power:
            if self.qemu is not proc or self.halted:
                return  # cut by the harness, or already handled
            if self._qmp_thread is not None:
                self._qmp_thread.join(5)  # the SHUTDOWN event QEMU sent as it left
            why = next((e for e in self.events[self._first_event:] if e.name == "SHUTDOWN"), None)
            reason = str(why.data.get("reason", "")) if why is not None else ""
            if not reason.endswith("reset"):
                return
            with self._reader:
                self._read()  # the last marker lines before the reset
            self._stop_swtpm()
            self._save_transcript()
            self.qemu = None
            self.resets.append(f"{self.now():.0f} s: guest reset ({reason}), QEMU started again")
            with suppress(E2EFailure, OSError):
                self._power_on(after_reset=True)

    def _follow_qmp(self, path: Path, proc: subprocess.Popen[bytes]) -> None:
        """Collect QEMU's QMP events of this power-on (docs: qemu-qmp-ref, "Events")."""
        deadline = time.monotonic() + 30
        sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                sock.connect(str(path))
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    return
                time.sleep(0.1)
        with sock, sock.makefile("rwb") as f, suppress(OSError):  # QEMU gone: the events end
            f.write(b'{"execute": "qmp_capabilities"}\n')
            f.flush()
            for raw in f:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if "event" in msg:
                    self.events.append(Event(self.now(), str(msg["event"]), dict(msg.get("data", {}))))

    def qmp(self, command: str, arguments: dict[str, object] | None = None,
            timeout: float = 30) -> object:
        """One QMP command on the second monitor (the first one follows events); its
        "return", or E2EFailure with QEMU's error (docs: qemu-qmp-ref)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.work / "qmp-cmd.sock"))
            with sock.makefile("rwb") as f:
                f.readline()  # the greeting
                for msg in ({"execute": "qmp_capabilities"},
                            {"execute": command, "arguments": arguments or {}}):
                    f.write(json.dumps(msg).encode() + b"\n")
                    f.flush()
                    while True:
                        reply = json.loads(f.readline())
                        if "error" in reply:
                            raise E2EFailure(f"QMP {command}: {reply['error'].get('desc')}")
                        if "return" in reply:
                            break
                return reply["return"]

    def _start_swtpm(self) -> list[str]:
        state = self.work / "tpm"
        state.mkdir(exist_ok=True)
        sock = self.work / "swtpm.sock"
        sock.unlink(missing_ok=True)
        self.swtpm = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--ctrl", f"type=unixio,path={sock}", "--terminate", "--flags", "startup-clear"],
            stdout=subprocess.DEVNULL, stderr=open(self.work / "swtpm.err", "ab"))  # noqa: SIM115
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or self.swtpm.poll() is not None:
                raise E2EFailure(f"swtpm did not start: {(self.work / 'swtpm.err').read_text()[-500:]}")
            time.sleep(0.05)
        return ["-chardev", f"socket,id=chrtpm,path={sock}", "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0"]

    def power_cut(self) -> None:
        """Pull the plug: SIGKILL, whatever the guest was doing."""
        with self._power:
            self._power_cut()

    def _power_cut(self) -> None:
        if self.qemu is None and self.swtpm is None:
            return  # off already: its transcript is saved
        if self.qemu is not None:
            proc, self.qemu = self.qemu, None  # None first: _after_exit leaves a cut QEMU alone
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self._stop_swtpm()
        self._save_transcript()

    def _stop_swtpm(self) -> None:
        if self.swtpm is None:
            return
        if self.swtpm.poll() is None:
            self.swtpm.terminate()
        try:
            self.swtpm.wait(5)
        except subprocess.TimeoutExpired:
            self.swtpm.kill()
            self.swtpm.wait()
        self.swtpm = None

    def _save_transcript(self) -> None:
        if self.transcript is None:
            return
        with open(self.transcript, "a") as out:
            for label, path in (("ttyS0 console", self.console), ("ttyS1 markers", self.markers)):
                out.write(f"\n===== {self.name}: {self.label}, {label} =====\n")
                if path.exists():
                    out.write(clean(path.read_bytes().decode(errors="replace")))

    # --- following the consoles ----------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def _read_console(self) -> None:
        with self._reader:
            self._read_console_locked()

    def _read_console_locked(self) -> None:
        try:
            with open(self.console, "rb") as f:
                f.seek(max(0, self._cpos - 64))  # a milestone may straddle two reads
                data = f.read()
        except (FileNotFoundError, AttributeError):
            return
        at, base = self.now(), max(0, self._cpos - 64)
        for name, rx in STAGES:
            for m in rx.finditer(data):
                if base + m.start() >= self._cpos:
                    self.stages.append((at, name))
        self._cpos = base + len(data)

    def split(self, booted_at: float, uptime: float) -> str:
        """The last boot's time by stage: (power-on ->) OVMF's boot manager -> GRUB -> the
        kernel (the marker's time less the guest's uptime) -> multi-user."""
        self._read_console()
        fw = [t for t, n in self.stages if n == "firmware" and t <= booted_at]
        gr = [t for t, n in self.stages if n == "grub" and t <= booted_at]
        kernel = booted_at - uptime
        if not fw or not gr:
            return f"kernel at {kernel:.1f} s"
        first = f"power-on -> OVMF boot manager {fw[-1]:.1f} s, " if len(fw) == 1 else ""
        return (f"{first}-> GRUB {gr[-1] - fw[-1]:.1f} s, -> kernel {kernel - gr[-1]:.1f} s, "
                f"-> multi-user {uptime:.1f} s")

    def _read(self) -> None:
        with self._reader:
            self._read_locked()

    def _read_locked(self) -> None:
        self._read_console()
        try:
            with open(self.markers, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return
        self._pos += len(data)
        text = self._partial + data.decode(errors="replace")
        *done, self._partial = text.split("\n")
        at = self.now()
        self.lines += [Line(at, clean(t).strip()) for t in done if clean(t).strip()]

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, what: str) -> re.Match[str]:
        """The next marker line (after the last one a wait returned) that matches, or a failure."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            while self.cursor < len(self.lines):
                line = self.lines[self.cursor]
                self.cursor += 1
                if (m := rx.search(line.text)) is not None:
                    self.last_at = line.at
                    return m
            if (q := self.qemu) is not None and q.poll() is not None:
                self._after_exit(q)  # after a guest reset the next QEMU is running
                if self.qemu is q:
                    raise E2EFailure(f"{what}: QEMU exited ({q.returncode})\n{self.tail()}")
            if time.monotonic() > deadline:
                raise E2EFailure(f"{what}: not seen within {timeout:.0f} s\n{self.tail()}"
                                 f"\n{self.diagnose()}")
            time.sleep(0.2)

    def diagnose(self) -> str:
        """What QEMU says of a guest that went quiet: run state, where the vCPU is (twice, 2 s
        apart: a CPU that moves is running something; one that stays is stuck), the TPM and the
        last QMP events. Best effort: a QEMU that does not answer says so."""
        if self.qemu is None or self.qemu.poll() is not None:
            return "--- QEMU is not running ---"
        out = ["--- QEMU's view ---"]
        for cmd in ("info status", "info registers", "info tpm", "info registers"):
            try:
                text = str(self.qmp("human-monitor-command", {"command-line": cmd}, timeout=10))
            except (OSError, ValueError, E2EFailure) as exc:
                text = f"no answer ({exc})"
            if cmd == "info registers":  # the instruction pointer and mode are what tell
                text = " ".join(w for w in text.split() if w.startswith(("RIP=", "CR0=", "HLT=")))
                time.sleep(2)
            out.append(f"{cmd}: {text.strip()}")
        out.append("events: " + ", ".join(f"{e.at:.0f}s {e.name}" for e in list(self.events)[-12:]))
        if self.swtpm is not None:
            alive = self.swtpm.poll() is None
            cpu = ""
            with suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{self.swtpm.pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = f", {(int(stat[11]) + int(stat[12])) / os.sysconf('SC_CLK_TCK'):.1f} s CPU"
            out.append(f"swtpm: {'running' if alive else f'exited {self.swtpm.returncode}'}{cpu}")
        with suppress(OSError, AttributeError):
            lines = self.trace.read_text(errors="replace").splitlines()
            out.append(f"QEMU's TPM trace, last 12 of {len(lines)} lines:\n" + "\n".join(lines[-12:]))
        return "\n".join(out)

    def guest_run(self, name: str, timeout: float) -> tuple[int, list[str]]:
        """One of the guest's fixed e2e commands (tools/e2e/guest/usr/local/bin/edgeops-e2e-exec:
        a name, no arguments), sent on ttyS1: its exit code and the lines it printed."""
        if not re.fullmatch(r"[a-z-]+", name):
            raise E2EFailure(f"guest command {name!r}: lower-case letters and '-' only")
        start = self.cursor
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.work / "ttyS1.sock"))
            # connected until the answer: QEMU drops what it has not yet fed the UART when the
            # client leaves (seen: 8 of 13 bytes arrived), and ttyS1's output, sent to this
            # socket meanwhile, is read and dropped (the log file keeps it)
            threading.Thread(target=_drain, args=(sock,), daemon=True).start()
            try:
                sock.sendall(name.encode() + b"\n")
                m = self.wait_for(rf"^EDGEOPS-E2E exec {name} rc=(\d+)", timeout,
                                  f"guest command {name}")
            finally:  # shutdown, not only close: it ends the drain's recv and tells QEMU at once
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        prefix = f"EDGEOPS-E2E exec {name} | "
        out = [ln.text[len(prefix):] for ln in self.lines[start:self.cursor]
               if ln.text.startswith(prefix)]
        return int(m[1]), out

    def wait_booted(self, timeout: float, what: str) -> Booted:
        m = self.wait_for(BOOTED, timeout, what)
        b = Booted(m[1], float(m[2]), m[3], m[4], self.last_at)
        self.boots.append(b)
        return b

    def event(self, name: str) -> Event | None:
        """The first QMP event ``name`` of this power-on (its guest resets included), if any."""
        return next((e for e in list(self.events) if e.name == name), None)

    def seen(self, pattern: str) -> list[Line]:
        """Every marker line so far (this power-on) that matches; consumes nothing."""
        self._read()
        rx = re.compile(pattern)
        return [ln for ln in self.lines if rx.search(ln.text)]

    def tail(self, n: int = 25) -> str:
        out = []
        for label, path in (("ttyS0", self.console), ("ttyS1", self.markers)):
            try:
                text = clean(path.read_bytes().decode(errors="replace"))
            except (FileNotFoundError, AttributeError):
                continue
            lines = [ln for ln in text.splitlines() if ln.strip()][-n:]
            out.append(f"--- last {len(lines)} lines of {label} ({path}) ---\n" + "\n".join(lines))
        return "\n".join(out)


def _drain(sock: socket.socket) -> None:
    with suppress(OSError):
        while sock.recv(65536):
            pass


def clean(text: str) -> str:
    """Console bytes without terminal escapes (GRUB's menu, OVMF) and control characters."""
    return ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
