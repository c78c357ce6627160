"""Secrets at rest: the controller's database holds token digests only, in files nobody else can read.

The database, its -wal/-shm and every file beside them are 0600 (directories 0700) under
``controller serve``; a database written by an older controller (version 1: plaintext tokens,
0644) is migrated when it is opened, and its plaintext is gone from the file afterwards.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import requests

from agent.controller.db import SCHEMA_VERSION, open_database
from agent.controller.fleet import Fleet
from tests.test_controller_ddi import free_port, serve_cli

ROOT = Path(__file__).resolve().parent.parent

# The schema of version 1 (before tokens were hashed), to build an old database with.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, token TEXT NOT NULL, site TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]', attributes TEXT NOT NULL DEFAULT '{}',
    version TEXT, last_seen DOUBLE PRECISION, created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS group_members (
    grp TEXT NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (grp, device_id));
CREATE TABLE IF NOT EXISTS bundles (
    id {pk}, version TEXT NOT NULL, compatible TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    sha1 TEXT NOT NULL, md5 TEXT NOT NULL, size BIGINT NOT NULL, filename TEXT NOT NULL,
    signer TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id {pk}, bundle_id BIGINT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL,
    policy TEXT NOT NULL, current_wave INTEGER NOT NULL, waves INTEGER NOT NULL,
    wave_started DOUBLE PRECISION, reason TEXT NOT NULL DEFAULT '',
    created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_targets (
    rollout_id BIGINT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS actions (
    id {pk}, device_id TEXT NOT NULL, bundle_id BIGINT NOT NULL, rollout_id BIGINT,
    wave INTEGER, status TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS actions_device ON actions (device_id, status);
CREATE INDEX IF NOT EXISTS actions_rollout ON actions (rollout_id, wave);
CREATE TABLE IF NOT EXISTS feedback (
    id {pk}, action_id BIGINT NOT NULL, device_id TEXT NOT NULL, execution TEXT NOT NULL,
    finished TEXT NOT NULL, body TEXT NOT NULL, received DOUBLE PRECISION NOT NULL, idem_key TEXT);
CREATE INDEX IF NOT EXISTS feedback_key ON feedback (device_id, idem_key);
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mirror_docs (
    device_id TEXT NOT NULL, path TEXT NOT NULL, body TEXT NOT NULL,
    fetched DOUBLE PRECISION NOT NULL, PRIMARY KEY (device_id, path));
CREATE TABLE IF NOT EXISTS mirror_auth (device_id TEXT PRIMARY KEY, auth TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id {pk}, device_id TEXT NOT NULL, path TEXT NOT NULL, method TEXT NOT NULL,
    body TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
"""


def make_v1_database(path: Path, device_tokens: dict[str, str], operator: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_SCHEMA.replace("{pk}", "INTEGER PRIMARY KEY AUTOINCREMENT"))
    for did, token in device_tokens.items():
        db.execute("INSERT INTO devices (id, token, created) VALUES (?, ?, 0)", [did, token])
    db.execute("INSERT INTO kv (k, v) VALUES ('api_token', ?)", [operator])
    db.close()
    path.chmod(0o644)


def _files(base: Path) -> list[Path]:
    return [p for p in base.rglob("*")]


def _raw(base: Path) -> bytes:
    return b"".join(p.read_bytes() for p in base.rglob("*") if p.is_file())


def test_the_database_and_every_file_beside_it_are_private_and_hold_no_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPS_CONTROLLER_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    base = tmp_path / "srv"
    base.mkdir()
    port = free_port()
    proc = serve_cli(port, env, "--db", base / "controller.db")
    try:
        operator = (base / "controller-data" / "operator.token").read_text().strip()
        url = f"http://127.0.0.1:{port}"
        op = {"Authorization": f"Bearer {operator}"}
        device = requests.post(f"{url}/api/v1/devices", json={"id": "dev1"}, headers=op,
                               timeout=5).json()["token"]
        chosen = requests.post(f"{url}/api/v1/devices", json={"id": "dev2", "token": "my-own-token-2"},
                               headers=op, timeout=5).json()["token"]
        assert chosen == "my-own-token-2"  # shown once, at creation
        auth = {"Authorization": f"TargetToken {device}"}
        poll = f"{url}/DEFAULT/controller/v1/dev1"
        assert requests.get(poll, headers=auth, timeout=5).status_code == 200
        assert requests.put(f"{poll}/configData", json={"data": {"hw": "2"}}, headers=auth,
                            timeout=5).status_code == 200
        names = {p.name for p in _files(base)}
        assert {"controller.db", "controller.db-wal", "controller.db-shm", "operator.token"} <= names
        for p in _files(base):  # while it runs, so the -wal and -shm files are there
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode & 0o077 == 0, f"{p} is {mode:o}"
        raw = b"".join(p.read_bytes() for p in base.glob("controller.db*"))
        for secret in (operator, device, chosen):
            assert secret.encode() not in raw
    finally:
        proc.terminate()
        proc.wait(10)
    # the digests are enough to authenticate after a restart
    port = free_port()
    proc = serve_cli(port, env, "--db", base / "controller.db")
    try:
        r = requests.get(f"http://127.0.0.1:{port}/DEFAULT/controller/v1/dev2", timeout=5,
                         headers={"Authorization": "TargetToken my-own-token-2"})
        assert r.status_code == 200
        assert requests.get(f"http://127.0.0.1:{port}/api/v1/devices", timeout=5,
                            headers={"Authorization": f"Bearer {operator}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_plaintext_database_is_migrated_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "controller.db"
    make_v1_database(path, {"dev1": "plain-token-one", "dev2": "plain-token-two"}, "plain-operator")
    db = open_database(str(path))
    try:
        fleet = Fleet(db, tmp_path / "data")
        fleet.authenticate("dev1", "plain-token-one")  # the old tokens still work ...
        assert db.query("SELECT v FROM kv WHERE k = 'schema'") == [(str(SCHEMA_VERSION),)]
        assert not db.query("SELECT 1 FROM kv WHERE k = 'api_token'")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("controller.db*"))
        for secret in (b"plain-token-one", b"plain-token-two", b"plain-operator"):
            assert secret not in raw  # ... but are no longer in the file, not even in free pages
    finally:
        db.close()
