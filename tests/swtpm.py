"""Start a real software TPM (swtpm) on 127.0.0.1 for a test: never a mock.

``SwTpm(state_dir)`` runs ``swtpm socket --tpm2`` with its server and control
ports on loopback and its NV state in ``state_dir``. Stopping and starting it
again with the same directory is a power cycle (PCRs reset, NV kept), which is
how the tests simulate a re-image: the agent's state dir is wiped, the TPM's is not.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def require_swtpm() -> None:
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed (Debian packages swtpm swtpm-tools); TPM tests need it")
    try:
        import tpm2_pytss  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        pytest.skip("tpm2-pytss is not installed (pip install '.[tpm]'); TPM tests need it")


def _free_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind((HOST, port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of loopback ports")


class SwTpm:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host={HOST},port={self.port}"

    def start(self) -> SwTpm:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a port taken between probing and binding: try another pair
            self.port = _free_pair()
            self.proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", f"type=tcp,port={self.port},bindaddr={HOST}",
                 "--ctrl", f"type=tcp,port={self.port + 1},bindaddr={HOST}",
                 "--tpmstate", f"dir={self.state_dir}",
                 "--flags", "not-need-init,startup-clear"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_listening():
                return self
            self.stop()
        raise RuntimeError("swtpm did not start")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def power_cycle(self) -> None:
        self.stop()
        self.start()
