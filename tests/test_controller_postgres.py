"""Two controllers sharing one PostgreSQL database (a throwaway server on 127.0.0.1).

Skips, naming what is missing, when PostgreSQL's server binaries or psycopg are not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host import sim
from agent.host.simfleet import SimDevice, start_controller
from tests.conftest import Keys, make_image

pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' to test the PostgreSQL backend")


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return None


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    initdb, postgres = _pg_bin("initdb"), _pg_bin("postgres")
    if not initdb or not postgres:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="edgeops-pg-"))
    base.chmod(0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, initdb, "-D", str(base / "data"), "-U", "edgeops", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True, timeout=60)
    proc = subprocess.Popen([*as_user, postgres, "-D", str(base / "data"), "-h", "127.0.0.1", "-p", str(port),
                             "-k", str(base), "-F"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"postgresql://edgeops@127.0.0.1:{port}/postgres"
    import psycopg

    for _ in range(100):
        try:
            psycopg.connect(url).close()
            break
        except psycopg.OperationalError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(base, ignore_errors=True)


def test_two_controllers_share_one_database(pg_url: str, tmp_path: Path, pki: Keys, make_bundle) -> None:
    shared = tmp_path / "shared-artifacts"
    a = start_controller(shared, keyring=pki.root_crt, db_url=pg_url, tick_interval=3600)
    b = start_controller(shared, keyring=pki.root_crt, db_url=pg_url, tick_interval=3600)
    try:
        devices = []
        for i in range(6):
            board = tmp_path / f"b{i}"
            sim.init_device(board, image=make_image(tmp_path / f"i{i}", 4096, "1.0"), keyring=pki.root_crt,
                            slot_size=1 << 20)
            token = a.api("POST", "/devices", {"id": f"d{i}", "site": f"s{i % 2}"})["token"]
            # half the fleet talks to each controller process
            devices.append(SimDevice(f"d{i}", token, board, (a if i % 2 else b).url))
        b.api("POST", "/groups", {"name": "g", "devices": [d.device_id for d in devices]})
        with open(make_bundle("2.0", size=4096), "rb") as f:
            bid = a.api("POST", "/bundles?filename=v2.bundle", data=f)["id"]
        rid = b.api("POST", "/rollouts", {"bundle": bid, "group": "g",
                                          "policy": {"canary_percent": 20}})["id"]
        for _ in range(5):
            for d in devices:
                d.step()
        assert a.api("GET", f"/rollouts/{rid}")["status"] == "finished"
        assert b.api("GET", f"/rollouts/{rid}")["wave_sizes"] == {"0": 2, "1": 4}
        assert all(d.running_version() == "2.0" for d in devices)
        assert {x["version"] for x in b.api("GET", "/devices")["devices"]} == {"2.0"}
    finally:
        a.stop()
        b.stop()


def _fresh_database(pg_url: str, name: str) -> str:
    """A new, empty database on the throwaway server; its URL."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return pg_url.rsplit("/", 1)[0] + f"/{name}"


def test_postgres_keeps_token_digests_and_migrates_plaintext(pg_url: str, tmp_path: Path) -> None:
    import psycopg

    from agent.controller.db import SCHEMA_VERSION, open_database
    from agent.controller.fleet import Fleet
    from tests.test_controller_secrets import V1_SCHEMA

    url = _fresh_database(pg_url, "v1fleet")
    with psycopg.connect(url, autocommit=True) as conn:  # what a version-1 controller left
        for stmt in V1_SCHEMA.replace("{pk}", "BIGSERIAL PRIMARY KEY").split(";"):
            if stmt.strip():
                conn.execute(stmt)  # type: ignore[call-overload]
        conn.execute("INSERT INTO devices (id, token, created) VALUES ('old', 'plain-old-token', 0)")
        conn.execute("INSERT INTO kv (k, v) VALUES ('api_token', 'plain-operator')")
    db = open_database(url)
    try:
        fleet = Fleet(db, tmp_path / "data")
        fleet.authenticate("old", "plain-old-token")
        new = fleet.add_device("new")
        fleet.authenticate("new", new)
        stored = {r[0] for r in db.query("SELECT token FROM devices")} | {
            r[0] for r in db.query("SELECT v FROM kv")}
        assert not stored & {"plain-old-token", new, "plain-operator"}
        assert db.query("SELECT v FROM kv WHERE k = 'schema'") == [(str(SCHEMA_VERSION),)]
    finally:
        db.close()


def test_postgres_damage_is_refused_and_an_unreachable_server_is_one_line(pg_url: str) -> None:
    import psycopg

    from agent.controller.db import open_database
    from agent.controller.errors import DatabaseRefused
    from agent.errors import TransportError
    from tests.conftest import run_cli

    url = _fresh_database(pg_url, "halfgone")
    open_database(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE devices")  # a controller database that lost a table
    with pytest.raises(DatabaseRefused, match="not 'devices'"):
        open_database(url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"postgresql://edgeops@127.0.0.1:{s.getsockname()[1]}/postgres"
    with pytest.raises(TransportError, match="cannot reach the database"):
        open_database(dead)
    r = run_cli("controller", "serve", "--db", dead.replace("edgeops@", "edgeops:secret@"),
                "--data", "/nonexistent-unused")
    assert r.returncode == 40 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "secret" not in r.stderr and "***" in r.stderr


def test_postgres_binds_a_devices_attestation_key_and_spends_each_nonce(pg_url: str, tmp_path: Path,
                                                                         pki: Keys) -> None:
    from agent.adapters.rot.keystore import KeystoreRoot
    from agent.controller.attestation import Attestations
    from agent.controller.db import open_database

    db = open_database(_fresh_database(pg_url, "attest"))
    root = KeystoreRoot(tmp_path / "ks", reason="test")
    root.provision(pki.root_crt.read_bytes())
    root.measure("boot:slot", b"a")
    try:
        att = Attestations(db, pcr=root.pcr)
        doc = root.quote(att.challenge("gw-1")).to_dict()
        first = att.answer("gw-1", doc)
        assert first.refused is None and first.record["boot_slot"] == "a"
        assert att.answer("gw-1", doc).refused is not None  # the nonce was spent
        other = KeystoreRoot(tmp_path / "other", reason="test")
        refused = att.answer("gw-1", other.quote(att.challenge("gw-1")).to_dict()).refused
        assert refused is not None and "another attestation key" in str(refused)
        rec = att.record("gw-1")
        assert rec is not None and rec["quotes"] == 1 and rec["refusals"] == 2
    finally:
        db.close()
