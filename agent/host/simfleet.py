"""Simulated fleets for tests, the demo and the benchmark: sim boards driven by a minimal DDI poller.

This is test tooling, not the device agent (that is ``agent.device.fleet``): one
synchronous step per call, following the hawkBit DDI documents the controller
serves. It reports ``closed/success`` only after the trial boot committed the
new slot, as the real agent does, so rollout gates see the same signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import requests

from agent.core import lifecycle
from agent.core.config import load
from agent.device.updater import Updater, open_device
from agent.host import sim


@dataclass
class SimDevice:
    device_id: str
    token: str
    base: Path  # the sim board's directory
    controller: str  # http://127.0.0.1:PORT
    tenant: str = "DEFAULT"
    session: requests.Session = field(default_factory=requests.Session)
    log: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)  # action ids this device downloaded

    @property
    def root(self) -> str:
        return f"{self.controller}/{self.tenant}/controller/v1/{self.device_id}"

    def _req(self, method: str, url: str, body: Any = None, stream: bool = False) -> requests.Response:
        r = self.session.request(method, url, json=body, stream=stream, timeout=30,
                                 headers={"Authorization": f"TargetToken {self.token}"})
        r.raise_for_status()
        return r

    def status(self) -> dict[str, Any]:
        dev = open_device(load(self.base / "agent.toml"))
        try:
            return Updater(dev).status()
        finally:
            dev.close()

    def running_version(self) -> str | None:
        st = self.status()
        v: str | None = st["slots"][st["booted_slot"]]["version"]
        return v

    def step(self) -> str:
        """One poll and whatever it asks for. Returns what happened, for logs and tests."""
        links = self._req("GET", self.root).json().get("_links", {})
        if "configData" in links:
            self._req("PUT", links["configData"]["href"],
                      {"mode": "merge", "data": {"version": self.running_version() or ""}})
        if "cancelAction" in links:
            aid = links["cancelAction"]["href"].rsplit("/", 1)[-1]
            self._req("GET", links["cancelAction"]["href"])
            self._feedback(f"{self.root}/cancelAction/{aid}/feedback", "closed", "success", "canceled")
            return "canceled"
        if "deploymentBase" in links:
            return self._deploy(links["deploymentBase"]["href"])
        return "idle"

    def _feedback(self, url: str, execution: str, finished: str, detail: str) -> None:
        self._req("POST", url, {"status": {"execution": execution, "result": {"finished": finished},
                                           "details": [detail]}})

    def _deploy(self, href: str) -> str:
        doc = self._req("GET", href).json()
        aid = doc["id"]
        fb = f"{self.root}/deploymentBase/{aid}/feedback"
        self._feedback(fb, "proceeding", "none", "downloading")
        art = doc["deployment"]["chunks"][0]["artifacts"][0]
        self.received.append(aid)
        dev = open_device(load(self.base / "agent.toml"))
        try:
            with self._req("GET", art["_links"]["download"]["href"], stream=True) as r:
                r.raw.decode_content = True
                Updater(dev, sleep=lambda s: None).install(cast(BinaryIO, r.raw), total=int(art["size"]))
        except Exception as exc:
            self._feedback(fb, "closed", "failure", f"install failed: {exc}")
            return "failure"
        finally:
            dev.close()
        ok = self._trial(doc["deployment"]["chunks"][0]["version"])
        self._feedback(fb, "closed", "success" if ok else "failure",
                       "committed after trial" if ok else "health check failed; reverted")
        return "success" if ok else "failure"

    def _trial(self, version: str) -> bool:
        """Reboot into the trial and let the agent cycle until it committed or reverted."""
        sim.SimFirmware(self.base).reboot()
        for _ in range(4):
            dev = open_device(load(self.base / "agent.toml"))
            try:
                Updater(dev, sleep=lambda s: None).cycle()
                phase = dev.journal.state().phase
            finally:
                dev.close()
            if phase is lifecycle.Phase.IDLE:
                break
        st = self.status()
        booted = st["slots"][st["booted_slot"]]
        return bool(booted["version"] == version and booted["state"] == "good")


@dataclass
class LocalController:
    """A real controller on 127.0.0.1 (port 0) in a thread, over a real SQLite file."""

    url: str
    fleet: Any
    token: str
    stop_fn: Any

    def api(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        r = requests.request(method, f"{self.url}/api/v1{path}", json=body, timeout=30,
                             headers={"Authorization": f"Bearer {self.token}"}, **kw)
        if r.status_code >= 400:
            raise AssertionError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    def stop(self) -> None:
        self.stop_fn()
        self.fleet.db.close()


def start_controller(data: Path, *, keyring: Path | None = None, parent: str | None = None,
                     db_url: str | None = None, port: int = 0, **settings: Any) -> LocalController:
    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet
    from agent.controller.http import Settings
    from agent.controller.serve import serve_in_thread

    db = open_database(db_url or str(data / "controller.db"))
    fleet = Fleet(db, data, keyring_pem=keyring.read_bytes() if keyring else None)
    s = Settings(api_token="test-token", parent=parent, **settings)
    running = serve_in_thread(fleet, s, port=port)
    return LocalController(running.url, fleet, s.api_token, running.stop)
