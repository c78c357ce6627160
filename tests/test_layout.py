"""The house: every module says its one job on its first line, and stays small or says why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "agent"
MODULES = sorted(p for p in AGENT.rglob("*.py") if "__pycache__" not in p.parts)
MAX_LINES = 400
# A long module names why in its docstring, in a line starting "Long because".
REASON = "Long because"


def _rel(p: Path) -> str:
    return str(p.relative_to(AGENT.parent))


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_every_module_says_its_job_on_its_first_line(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if path.name == "__init__.py" and not path.read_text().strip():
        return  # an empty package marker is allowed
    assert doc, f"{_rel(path)} has no docstring"
    assert doc.splitlines()[0].strip(), f"{_rel(path)}: the docstring's first line is empty"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_a_long_module_gives_its_reason(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert REASON in doc, f"{_rel(path)} has {lines} lines and no '{REASON} ...' in its docstring"


def _imports_logging(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "logging" for a in node.names)
    return isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "logging"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_a_module_takes_its_logger_from_core_logs(path: Path) -> None:
    """Only agent.core.logs imports logging, so an install that logs nothing never loads it
    and every record, once one comes, gets the CLI's format."""
    if _rel(path) == "agent/core/logs.py":
        return
    found = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if _imports_logging(n)]
    assert not found, f"{_rel(path)} imports logging (line {found[0]}): use agent.core.logs.get"
