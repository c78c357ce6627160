"""The device-side import stays lean: no server, test or optional heavy dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("pytest", "hypothesis", "flask", "starlette", "uvicorn", "aiohttp", "fastapi",
             "prometheus_client", "tpm2_pytss", "ai_edge_litert", "tflite_runtime", "numpy",
             "psycopg", "agent.controller")


def loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return set(out.split())


def test_cli_and_updater_import_no_server_or_test_dependency() -> None:
    mods = loaded_after("import agent.cli.main, agent.device.updater; agent.cli.main.build_parser()")
    bad = sorted(m for m in mods if m.split(".")[0] in FORBIDDEN or m.startswith("agent.controller"))
    assert not bad, f"device-side import pulls in {bad}"


def test_install_path_does_not_import_requests_or_psutil() -> None:
    mods = loaded_after("import agent.device.updater, agent.adapters.bundle, agent.core.trust")
    assert "requests" not in mods and "psutil" not in mods
