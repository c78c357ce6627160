"""Damage is refused, never papered over: a damaged or empty database stops the start with one line.

``controller serve`` makes a new database only where none exists, or in an empty file with
``--init``; anything else that is not a whole controller database ends the start with one line
and exit 20, touching nothing (a service manager should not restart it into an empty fleet).
``operator.token`` is never overwritten.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import requests

from agent.controller.db import open_database
from agent.controller.errors import DatabaseRefused
from agent.controller.fleet import Fleet
from tests.conftest import run_cli
from tests.test_controller_ddi import free_port, serve_cli

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPS_CONTROLLER_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _fleet_db(path: Path, devices: int = 300) -> None:
    """A real controller database with enough rows to span many pages."""
    db = open_database(str(path))
    fleet = Fleet(db, path.parent / "controller-data")
    for i in range(devices):
        fleet.add_device(f"dev{i:04d}", site="x" * 100)
    db.close()


def _refused(db: Path, *extra: str) -> str:
    r = run_cli("controller", "serve", "--db", db, "--listen", f"127.0.0.1:{free_port()}", *extra)
    assert r.returncode == 20, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_an_empty_database_file_is_refused_and_the_operator_token_is_kept(tmp_path: Path) -> None:
    db = tmp_path / "controller.db"
    db.write_bytes(b"")
    token_file = tmp_path / "controller-data" / "operator.token"
    token_file.parent.mkdir()
    token_file.write_text("the-old-operator-token\n")
    line = _refused(db)
    assert "empty" in line and "--init" in line
    assert db.read_bytes() == b"" and token_file.read_text() == "the-old-operator-token\n"

    # With --init the empty file becomes a new fleet, and the operator's token file is adopted.
    port = free_port()
    proc = serve_cli(port, _env(), "--db", db, "--init")
    try:
        r = requests.get(f"http://127.0.0.1:{port}/api/v1/devices", timeout=5,
                         headers={"Authorization": "Bearer the-old-operator-token"})
        assert r.status_code == 200 and r.json() == {"devices": []}
    finally:
        proc.terminate()
        err = proc.communicate(timeout=10)[1]
    assert "kept for the new database" in err
    assert token_file.read_text() == "the-old-operator-token\n"
    assert db.stat().st_size > 0


@pytest.mark.parametrize("damage", ["truncated", "random", "zeroed-page", "not-ours"])
def test_a_damaged_database_is_refused_with_one_line(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "controller.db"
    _fleet_db(db)
    raw = db.read_bytes()
    assert len(raw) > 8 * 4096
    if damage == "truncated":
        db.write_bytes(raw[:len(raw) // 2])
    elif damage == "random":
        db.write_bytes(os.urandom(len(raw)))
    elif damage == "zeroed-page":
        db.write_bytes(raw[:4096 * 3] + bytes(4096) + raw[4096 * 4:])
    else:  # a SQLite file of something else, say a device's journal given as --db by mistake
        db.unlink()
        other = sqlite3.connect(db)
        other.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        other.close()
    before = db.read_bytes()
    line = _refused(db)
    assert str(db) in line
    assert db.read_bytes() == before  # nothing was written over it
    assert not (tmp_path / "controller-data" / "operator.token").exists()
    with pytest.raises(DatabaseRefused):
        open_database(str(db), init=True)  # --init never replaces a file that has content


def test_a_missing_database_is_created_and_a_new_one_never_overwrites_the_token_file(tmp_path: Path) -> None:
    db = tmp_path / "controller.db"
    port = free_port()
    proc = serve_cli(port, _env(), "--db", db)
    proc.terminate()
    assert "(new)" in proc.communicate(timeout=10)[1]
    token = (tmp_path / "controller-data" / "operator.token").read_text()
    for p in tmp_path.glob("controller.db*"):  # the fleet is lost ...
        p.unlink()
    proc = serve_cli(port, _env(), "--db", db)
    try:  # ... the new one keeps the operator's token
        assert requests.get(f"http://127.0.0.1:{port}/api/v1/devices", timeout=5,
                            headers={"Authorization": f"Bearer {token.strip()}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
    assert (tmp_path / "controller-data" / "operator.token").read_text() == token
    assert not list(tmp_path.glob(".controller.db.new-*"))  # the file it was built in is gone


def test_an_operator_token_file_without_a_token_stops_the_start(tmp_path: Path) -> None:
    token_file = tmp_path / "controller-data" / "operator.token"
    token_file.parent.mkdir()
    token_file.write_text("\n")
    r = run_cli("controller", "serve", "--db", tmp_path / "controller.db", "--listen",
                f"127.0.0.1:{free_port()}")
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "holds no operator token" in r.stderr and token_file.read_text() == "\n"
