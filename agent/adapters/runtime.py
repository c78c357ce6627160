"""Facts about the running system: which slot booted, which boot this is, and how to reboot.

Two implementations behind one protocol: ``LinuxRuntime`` reads /proc and asks
systemd to reboot; the sim board's lives in ``agent.adapters.simboard``. A runtime that
must be told which agent processes run on the device (the sim board, whose reboot
stops them) also implements ``RegistersProcess``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Protocol, runtime_checkable

from agent.errors import DeviceError

# Kernel command-line keys that name the booted slot. rauc.slot is RAUC's, so
# boot scripts written for RAUC work unchanged.
SLOT_KEYS = ("edgeops.slot", "rauc.slot")


class Runtime(Protocol):
    def booted_slot(self) -> str: ...

    def boot_id(self) -> str: ...

    def reboot(self, reason: str) -> None: ...


@runtime_checkable
class RegistersProcess(Protocol):
    def register_process(self) -> Path:
        """Record this process as running on the device; returns the file to remove at exit."""


def slot_from_cmdline(cmdline: str, slots: tuple[str, ...]) -> str:
    for word in shlex.split(cmdline):
        key, _, value = word.partition("=")
        if key in SLOT_KEYS:
            if value in slots:
                return value
            raise DeviceError(f"kernel command line names slot {value!r}, which is not configured")
    raise DeviceError("the kernel command line does not say which slot booted",
                      hint=f"have the boot script add {SLOT_KEYS[0]}=<slot> to bootargs")


class LinuxRuntime:
    def __init__(self, slots: tuple[str, ...], proc: Path = Path("/proc"),
                 systemctl: str = "systemctl") -> None:
        self.slots = slots
        self.proc = proc
        self.systemctl = systemctl

    def booted_slot(self) -> str:
        return slot_from_cmdline((self.proc / "cmdline").read_text(), self.slots)

    def boot_id(self) -> str:
        return (self.proc / "sys/kernel/random/boot_id").read_text().strip()

    def reboot(self, reason: str) -> None:
        import subprocess  # here: only a reboot needs it, and every status would pay for it

        # systemctl asks logind first; on an image without D-Bus (mmdebstrap's essential
        # variant) it prints "Failed to connect to bus", then asks PID 1 over its private
        # socket and the reboot goes ahead (systemd 252, systemctl-start-special.c). So its
        # stderr is kept and shown only when the reboot was refused: a refusal is an error,
        # never a reboot that silently did not happen.
        try:
            proc = subprocess.run([self.systemctl, "reboot", f"--message={reason}"],
                                  check=False, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeviceError(f"reboot: cannot run {self.systemctl}: {exc}",
                              hint="reboot the device by hand") from None
        if proc.returncode != 0:
            said = proc.stderr.decode(errors="replace").strip().splitlines()
            raise DeviceError(f"reboot refused by {self.systemctl} (exit {proc.returncode})"
                              f"{': ' + said[-1][:200] if said else ''}",
                              hint="reboot the device by hand")
