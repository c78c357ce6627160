"""docs/lifecycle.md shows the transition table as it is: the diagram is generated, never stale."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from agent.core import lifecycle

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "lifecycle_diagram.py"


def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lifecycle_diagram", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_diagram_in_the_doc_is_the_one_the_table_draws() -> None:
    gen = tool()
    text = (ROOT / "docs" / "lifecycle.md").read_text()
    assert gen.render() in text, "docs/lifecycle.md is stale: run python tools/lifecycle_diagram.py"


def test_check_mode_fails_on_a_stale_doc(tmp_path: Path) -> None:
    gen = tool()
    stale = f"# doc\n{gen.BEGIN}\nIDLE --> NOWHERE\n{gen.END}\nafter\n"
    fresh = gen.updated(stale)
    assert fresh.startswith("# doc\n") and fresh.endswith("\nafter\n") and "NOWHERE" not in fresh
    assert gen.updated(fresh) == fresh
    proc = subprocess.run([sys.executable, str(TOOL), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_edge_is_drawn_between_declared_states() -> None:
    block = tool().render()
    for phase in lifecycle.Phase:
        assert f'state "{phase}" as {phase.name}' in block
    for e in lifecycle.edges():
        assert f"    {e.source.name} --> {e.target.name}: {e.event}" in block
