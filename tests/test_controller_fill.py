"""The controller cannot be filled: what one device sends grows the database by a bounded amount.

10,000 feedback reports from one device go through the real HTTP application (pipelined on
one keep-alive connection, so the test stays quick), some of them near the 1 MiB body limit,
half of them on an action that is already closed; the database may grow by at most
``BOUND`` bytes. Also: configData attributes are bounded, and old closed actions are
compacted to their last report (the documented retention).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import requests

from agent.controller.retention import FEEDBACK_KEPT, FEEDBACK_RETENTION
from agent.host.simfleet import LocalController, start_controller
from tests.conftest import BundleFactory, Keys

REPORTS = 10_000
BOUND = 512 << 10  # bytes the database may grow by (stated in docs/fleet-controller.md)


@pytest.fixture
def ctl(tmp_path: Path, pki: Keys) -> Iterator[LocalController]:
    c = start_controller(tmp_path / "ctl", keyring=pki.root_crt, tick_interval=3600)
    yield c
    c.stop()


def _db_bytes(ctl: LocalController) -> int:
    ctl.fleet.db.query("PRAGMA wal_checkpoint(TRUNCATE)")
    path = Path(ctl.fleet.db.path)
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


class Pipe:
    """HTTP/1.1 requests written back to back on one connection; the answers read after."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.buf = b""

    def send(self, requests_: list[bytes]) -> list[int]:
        self.sock.sendall(b"".join(requests_))
        return [self._answer() for _ in requests_]

    def _answer(self) -> int:
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        length = next((int(v) for k, _, v in (line.partition(": ") for line in lines[1:])
                       if k.lower() == "content-length"), 0)
        while len(self.buf) < length:
            self.buf += self._recv()
        self.buf = self.buf[length:]
        return int(lines[0].split()[1])

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise AssertionError("the controller closed the connection")
        return data


def _feedback(path: str, token: str, body: Mapping[str, object], key: str) -> bytes:
    raw = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: TargetToken {token}\r\n"
            f"Content-Type: application/json\r\nIdempotency-Key: {key}\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


def test_ten_thousand_reports_from_one_device_grow_the_database_by_a_bounded_amount(
        ctl: LocalController, make_bundle: BundleFactory, capsys: pytest.CaptureFixture[str]) -> None:
    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    with open(make_bundle("2.0", size=4096), "rb") as f:
        bid = ctl.api("POST", "/bundles?filename=b.bundle", data=f)["id"]
    ctl.api("POST", "/deployments", {"bundle": bid, "device": "dev1"})
    aid = ctl.api("GET", "/actions")["actions"][0]["id"]
    path = f"/DEFAULT/controller/v1/dev1/deploymentBase/{aid}/feedback"
    before = _db_bytes(ctl)
    pipe = Pipe(ctl.url)
    sent = 0

    def report(execution: str, finished: str, detail: str, n: int = 4) -> dict[str, object]:
        return {"status": {"execution": execution, "result": {"finished": finished,
                           "progress": {"cnt": sent % 100, "of": 100}}, "details": [detail] * n}}

    half = REPORTS // 2
    for batch in range(0, half - 10, 100):  # progress on the open action, 2 KiB each
        reqs = [_feedback(path, token, report("proceeding", "none", f"{batch + i:05d} " + "p" * 500),
                          f"k{batch + i}") for i in range(100)]
        assert set(pipe.send(reqs)) == {200}
        sent += len(reqs)
    big = "b" * (60 << 10)
    for i in range(9):  # the body limit is 1 MiB: 16 details of 60 KiB each
        assert pipe.send([_feedback(path, token, report("proceeding", "none", big, 16), f"big{i}")]) == [200]
        sent += 1
    closing = report("closed", "failure", "install failed: the image did not fit")
    assert pipe.send([_feedback(path, token, closing, "closed")]) == [200]
    sent += 1
    for batch in range(0, REPORTS - sent, 100):  # the action is closed: acknowledged, not stored
        n = min(100, REPORTS - sent)
        reqs = [_feedback(path, token, report("proceeding", "none", "late " + "q" * 500),
                          f"late{batch + i}") for i in range(n)]
        assert set(pipe.send(reqs)) == {200}
        sent += n
    pipe.sock.close()
    assert sent == REPORTS
    grown = _db_bytes(ctl) - before

    rows = ctl.fleet.db.query("SELECT execution, finished, body FROM feedback WHERE action_id = ? "
                              "ORDER BY id", [aid])
    assert len(rows) == FEEDBACK_KEPT
    assert rows[-1][:2] == ("closed", "failure")  # the newest, which is also the first failure
    assert max(len(r[2]) for r in rows) <= 4096
    assert ctl.api("GET", "/actions")["actions"][0]["status"] == "failure"
    assert requests.get(f"{ctl.url}/DEFAULT/controller/v1/dev1", timeout=5,
                        headers={"Authorization": f"TargetToken {token}"}).status_code == 200
    with capsys.disabled():
        print(f"\nfill: {REPORTS} feedback posts from one device (9 near 1 MiB, {REPORTS - half} on "
              f"a closed action): database grew by {grown / 1024:.0f} KiB (bound {BOUND >> 10} KiB); "
              f"{len(rows)} reports kept")
    assert grown <= BOUND


def test_the_first_failure_is_kept_beside_the_newest_reports(ctl: LocalController,
                                                            make_bundle: BundleFactory) -> None:
    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    with open(make_bundle("2.0", size=4096), "rb") as f:
        bid = ctl.api("POST", "/bundles?filename=b.bundle", data=f)["id"]
    ctl.api("POST", "/deployments", {"bundle": bid, "device": "dev1"})
    aid = ctl.api("GET", "/actions")["actions"][0]["id"]
    path = f"/DEFAULT/controller/v1/dev1/deploymentBase/{aid}/feedback"
    pipe = Pipe(ctl.url)
    # a download that failed (but the action stays open: the device retries), then a flood
    first = {"status": {"execution": "proceeding", "result": {"finished": "failure"},
                        "details": ["download failed: connection reset"]}}
    reqs = [_feedback(path, token, first, "f")] + [
        _feedback(path, token, {"status": {"execution": "proceeding", "details": [str(i)]}}, f"p{i}")
        for i in range(100)]
    assert set(pipe.send(reqs)) == {200}
    pipe.sock.close()
    rows = ctl.fleet.db.query("SELECT body FROM feedback WHERE action_id = ? ORDER BY id", [aid])
    assert len(rows) == FEEDBACK_KEPT + 1
    assert "download failed" in rows[0][0] and json.loads(rows[-1][0])["details"] == ["99"]


def test_old_closed_actions_keep_only_their_last_report(ctl: LocalController,
                                                       make_bundle: BundleFactory) -> None:
    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    with open(make_bundle("2.0", size=4096), "rb") as f:
        bid = ctl.api("POST", "/bundles?filename=b.bundle", data=f)["id"]
    ctl.api("POST", "/deployments", {"bundle": bid, "device": "dev1"})
    aid = ctl.api("GET", "/actions")["actions"][0]["id"]
    url = f"{ctl.url}/DEFAULT/controller/v1/dev1/deploymentBase/{aid}/feedback"
    auth = {"Authorization": f"TargetToken {token}"}
    for execution, finished in [("proceeding", "none")] * 5 + [("closed", "success")]:
        assert requests.post(url, json={"status": {"execution": execution, "result": {
            "finished": finished}}}, headers=auth, timeout=5).status_code == 200
    fleet = ctl.fleet
    assert fleet.compact() == 0  # closed just now: within the retention
    real = fleet.clock
    fleet.clock = lambda: real() + FEEDBACK_RETENTION + 1
    try:
        assert fleet.compact() == 1
        assert fleet.compact() == 0  # done once
    finally:
        fleet.clock = real
    assert fleet.db.query("SELECT execution, finished FROM feedback WHERE action_id = ?", [aid]) == [
        ("closed", "success")]


def test_config_data_attributes_are_bounded(ctl: LocalController) -> None:
    token = ctl.api("POST", "/devices", {"id": "dev1"})["token"]
    url = f"{ctl.url}/DEFAULT/controller/v1/dev1/configData"
    auth = {"Authorization": f"TargetToken {token}"}
    ok = {f"k{i}": "v" * 2048 for i in range(100)}
    assert requests.put(url, json={"data": ok}, headers=auth, timeout=5).status_code == 200
    more = requests.put(url, json={"data": {"one-more": "x"}}, headers=auth, timeout=5)
    assert more.status_code == 400 and "at most 100" in more.json()["message"]
    for bad in ({"k": "v" * 2049}, {"k" * 129: "v"}, {"": "v"}):
        assert requests.put(url, json={"mode": "replace", "data": bad}, headers=auth,
                            timeout=5).status_code == 400
    assert len(ctl.api("GET", "/devices")["devices"][0]["attributes"]) == 100
