"""The docs run as written (issue 13, items 4 and 10): the controller quickstart in a temporary
directory, and every health example in docs/health.md through the agent's own parser."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.core import health
from agent.core.probe_spec import KINDS
from tests.conftest import make_image

DOCS = Path(__file__).resolve().parent.parent / "docs"


def quickstart(md: str) -> list[str]:
    """The shell lines of the first ```sh block after 'Quickstart', continuations joined,
    comments dropped."""
    block = re.search(r"Quickstart.*?```sh\n(.*?)```", md, re.S)
    assert block, "no Quickstart ```sh block"
    text = block.group(1).replace("\\\n", " ")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_controller_quickstart_runs_as_written(tmp_path: Path) -> None:
    lines = quickstart((DOCS / "fleet-controller.md").read_text())
    assert lines[0].startswith("pip install")  # done: this is the package under test
    port = _free_port()
    make_image(tmp_path / "rootfs.ext4", 65536, "rootfs")  # "your root filesystem image"
    # The harness around the lines: stop on the first failing one, wait for the server it
    # starts in the background (a person waits by eye), and stop it at the end.
    script = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null' EXIT"]
    for line in lines[1:]:
        script.append(line.replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
        if line.endswith("&"):
            script.append(f'"{sys.executable}" -c "import socket, time\n'
                          f'for _ in range(300):\n'
                          f'    try: socket.create_connection((\'127.0.0.1\', {port}), 1).close(); break\n'
                          f'    except OSError: time.sleep(0.1)"')
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "edgeops").exists(), "the edgeops console script is not installed in this venv"
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "rollout 2 (2.0): 1 devices in 1 waves" in proc.stdout  # the last deploy, as a summary


def _examples(md: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", md, re.S)


@pytest.mark.parametrize("kind", KINDS)
def test_health_docs_show_an_example_of_each_probe_type(kind: str) -> None:
    docs = (DOCS / "health.md").read_text()
    kinds = {p["type"] for ex in _examples(docs)
             for p in tomllib.loads(ex).get("health", {}).get("probe", [])}
    assert kind in kinds


def test_every_health_example_parses() -> None:
    examples = _examples((DOCS / "health.md").read_text())
    assert len(examples) >= len(KINDS)
    for ex in examples:
        doc = tomllib.loads(ex)["health"]
        policy = health.parse_policy(doc)
        assert len(policy.probes) == len(doc.get("probe", []))
