"""A regional controller: mirrors its parent while the WAN is up, serves from cache when it is down,
and forwards device feedback upstream, in order, once the parent is back."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

from agent.host import sim
from agent.host.simfleet import SimDevice, start_controller
from tests.conftest import Keys, make_image


def wait_for(cond: Callable[[], bool], timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_regional_serves_offline_and_forwards_later(tmp_path: Path, pki: Keys, make_bundle) -> None:
    central = start_controller(tmp_path / "central", keyring=pki.root_crt, tick_interval=3600)
    port = int(central.url.rsplit(":", 1)[1])
    regional = start_controller(tmp_path / "regional", parent=central.url, parent_interval=0.1,
                                tick_interval=3600)
    board = tmp_path / "board"
    sim.init_device(board, image=make_image(tmp_path / "v1.img", 4096, "1.0"), keyring=pki.root_crt,
                    slot_size=1 << 20)
    token = central.api("POST", "/devices", {"id": "dev1", "site": "far"})["token"]
    dev = SimDevice("dev1", token, board, regional.url)
    assert dev.step() == "idle"  # first contact: the parent vouches for the token

    bundle = make_bundle("2.0", size=6000)
    with open(bundle, "rb") as f:
        bid = central.api("POST", "/bundles?filename=v2.bundle", data=f)["id"]
    central.api("POST", "/deployments", {"bundle": bid, "device": "dev1"})
    auth = {"Authorization": f"TargetToken {token}"}
    poll = f"{regional.url}/DEFAULT/controller/v1/dev1"

    def mirrored() -> bool:
        return "deploymentBase" in requests.get(poll, headers=auth, timeout=5).json().get("_links", {})
    wait_for(mirrored)

    # The WAN goes down: the parent is gone.
    central.stop()
    href = requests.get(poll, headers=auth, timeout=5).json()["_links"]["deploymentBase"]["href"]
    assert href.startswith(regional.url)  # devices cannot tell the regional from the central
    doc = requests.get(href, headers=auth, timeout=5).json()
    art = doc["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download"]["href"]
    assert art.startswith(regional.url)
    r = requests.get(art, headers={**auth, "Range": "bytes=10-19"}, timeout=5)
    assert r.status_code == 206 and r.content == bundle.read_bytes()[10:20]
    stranger = requests.get(f"{regional.url}/DEFAULT/controller/v1/dev2",
                            headers={"Authorization": "TargetToken x"}, timeout=5)
    assert stranger.status_code == 503  # nobody can vouch for a new device while the WAN is down
    assert requests.get(poll, headers={"Authorization": "TargetToken forged"}, timeout=5).status_code == 503

    assert dev.step() == "success"  # downloaded from the mirror, installed, committed
    assert dev.running_version() == "2.0"
    assert dev.step() == "idle"  # reported here: not offered again while the parent cannot know
    assert requests.get(f"{regional.url}/_regional", timeout=5).json()["outbox"] >= 2

    # The WAN returns: the queued reports reach the parent, in order.
    central = start_controller(tmp_path / "central", keyring=pki.root_crt, tick_interval=3600, port=port)
    wait_for(lambda: requests.get(f"{regional.url}/_regional", timeout=5).json()["outbox"] == 0)
    assert [a["status"] for a in central.api("GET", "/actions?device=dev1")["actions"]] == ["success"]
    assert central.api("GET", "/devices")["devices"][0]["version"] == "2.0"
    wait_for(lambda: not mirrored())
    regional.stop()
    central.stop()
    shutil.rmtree(board)


class HostileParent:
    """A parent whose documents the test rewrites: garbage, path-like hashes, revoked tokens."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.docs: dict[str, bytes] = {}
        self.split: set[str] = set()  # paths sent in two pieces, 0.2 s apart
        parent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                cid = self.path.split("/controller/v1/", 1)[-1].split("/", 1)[0]
                if self.headers.get("Authorization") != f"TargetToken {parent.tokens.get(cid)}":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = parent.docs.get(self.path, b"")
                self.send_response(200 if self.path in parent.docs else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in parent.split:
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    time.sleep(0.2)
                    body = body[100:]
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"

    def base(self, cid: str, links: dict[str, object] | None = None) -> None:
        doc = {"config": {"polling": {"sleep": "00:00:10"}}, "_links": links or {}}
        self.docs[f"/DEFAULT/controller/v1/{cid}"] = json.dumps(doc).encode()

    def close(self) -> None:
        self.srv.shutdown()


def test_regional_survives_a_parent_that_sends_nonsense(tmp_path: Path) -> None:
    parent = HostileParent()
    regional = start_controller(tmp_path / "regional", parent=parent.url, parent_interval=0.1,
                                tick_interval=3600)
    try:
        def poll(cid: str) -> requests.Response:
            return requests.get(f"{regional.url}/DEFAULT/controller/v1/{cid}",
                                headers={"Authorization": f"TargetToken t-{cid}"}, timeout=5)
        for cid in ("flaky", "good", "evil"):
            parent.tokens[cid] = f"t-{cid}"
            parent.base(cid)
        assert poll("flaky").status_code == poll("good").status_code == 200

        # A deployment whose artifact "sha256" is a path: never used as a file name.
        dep = f"{parent.url}/DEFAULT/controller/v1/evil/deploymentBase/7"
        parent.base("evil", {"deploymentBase": {"href": dep}})
        parent.docs[dep.removeprefix(parent.url)] = json.dumps({"id": "7", "deployment": {"chunks": [
            {"part": "os", "name": "x", "version": "1", "artifacts": [{
                "filename": "x.bundle", "size": 4, "hashes": {"sha256": "../../../escaped"},
                "_links": {"download": {"href": f"{parent.url}/DEFAULT/controller/v1/evil/"
                                                "softwaremodules/1/artifacts/x.bundle"}}}]}]}}).encode()
        assert poll("evil").status_code == 502
        assert not any(p.name == "escaped" for p in tmp_path.rglob("*"))

        # One device's documents turn to garbage: the others are still mirrored.
        parent.docs["/DEFAULT/controller/v1/flaky"] = b"{not json"
        parent.base("good", {"configData": {"href": f"{parent.url}/DEFAULT/controller/v1/good/configData"}})
        wait_for(lambda: "configData" in poll("good").json()["_links"])

        # A larger document that arrives in pieces is read whole.
        parent.tokens["slow"] = "t-slow"
        parent.base("slow", {"configData": {"href": f"{parent.url}/DEFAULT/controller/v1/slow/configData",
                                            "padding": "x" * 5000}})
        parent.split.add("/DEFAULT/controller/v1/slow")
        assert poll("slow").status_code == 200
        assert "configData" in poll("slow").json()["_links"]

        # The parent stops vouching for a token: the regional stops accepting it too.
        parent.tokens["good"] = "rotated"
        wait_for(lambda: poll("good").status_code == 401)
    finally:
        regional.stop()
        parent.close()


def test_regional_caches_only_artifacts_that_match_their_hash(tmp_path: Path) -> None:
    parent = HostileParent()
    regional = start_controller(tmp_path / "regional", parent=parent.url, parent_interval=3600,
                                tick_interval=3600)
    cache = tmp_path / "regional" / "mirror"
    try:
        parent.tokens["dev"] = "t-dev"
        root = "/DEFAULT/controller/v1/dev"
        good = b"signed bundle bytes"
        sha = hashlib.sha256(good).hexdigest()

        def offer(body: bytes, aid: int) -> requests.Response:
            art = f"{root}/softwaremodules/{aid}/artifacts/x.bundle"
            parent.docs[art] = body
            dep = f"{root}/deploymentBase/{aid}"
            parent.docs[dep] = json.dumps({"id": str(aid), "deployment": {"chunks": [
                {"part": "os", "name": "x", "version": "1", "artifacts": [{
                    "filename": "x.bundle", "size": len(good), "hashes": {"sha256": sha},
                    "_links": {"download": {"href": parent.url + art}}}]}]}}).encode()
            parent.base("dev", {"deploymentBase": {"href": parent.url + dep}})
            return requests.get(f"{regional.url}{root}", headers={"Authorization": "TargetToken t-dev"},
                                timeout=5)

        assert offer(b"x" * len(good), 1).status_code == 502  # right size, wrong bytes
        assert offer(good + b"!", 2).status_code == 502  # longer than declared
        assert offer(good[:-1], 3).status_code == 502  # shorter than declared
        assert sorted(p.name for p in cache.iterdir()) == []  # no artifact, no temporary file left

        assert offer(good, 4).status_code == 200
        assert sorted(p.name for p in cache.iterdir()) == [sha]
        assert (cache / sha).read_bytes() == good
    finally:
        regional.stop()
        parent.close()
