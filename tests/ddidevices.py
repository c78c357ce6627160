"""Many light hawkBit DDI clients for dashboard tests: poll, fetch the deployment, report an outcome.

``agent.host.simfleet.SimDevice`` runs a whole sim board per device (slots, trial boots);
the dashboard tests need hundreds of registered devices of which a canary wave reports, so
these clients speak the same DDI documents (hawkBit DDI v1: base resource, deploymentBase,
feedback) to the real controller and decide their outcome by a rule instead of a boot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from agent.host.simfleet import LocalController

SITES = ("north", "south", "east", "west")


@dataclass
class DdiDevice:
    device_id: str
    token: str
    controller: str
    session: requests.Session = field(default_factory=requests.Session)
    reported: list[str] = field(default_factory=list)  # outcomes sent, in order

    def _req(self, method: str, url: str, body: object = None) -> requests.Response:
        r = self.session.request(method, url, json=body, timeout=30,
                                 headers={"Authorization": f"TargetToken {self.token}"})
        r.raise_for_status()
        return r

    def step(self, fails: Callable[[str], str | None]) -> str:
        """One poll; a deployment is reported closed at once: failed with the reason ``fails``
        gives for this device, or succeeded when it gives None."""
        root = f"{self.controller}/DEFAULT/controller/v1/{self.device_id}"
        links = self._req("GET", root).json().get("_links", {})
        if "configData" in links:
            self._req("PUT", links["configData"]["href"], {"mode": "merge", "data": {"version": "1.0"}})
        if "deploymentBase" not in links:
            return "idle"
        href = links["deploymentBase"]["href"].split("?")[0]
        doc = self._req("GET", href).json()
        reason = fails(self.device_id)
        finished = "failure" if reason else "success"
        self._req("POST", f"{href}/feedback", {"id": doc["id"], "status": {
            "execution": "closed", "result": {"finished": finished}, "details": [reason or "committed"]}})
        self.reported.append(finished)
        return finished


def register(ctl: LocalController, n: int, *, prefix: str = "dev") -> list[DdiDevice]:
    """``n`` devices over four sites, in group ``all``."""
    out = []
    for i in range(n):
        did = f"{prefix}{i:04d}"
        token = ctl.api("POST", "/devices", {"id": did, "site": SITES[i % 4],
                                             "tags": ["rack-a" if i % 2 else "rack-b"]})["token"]
        out.append(DdiDevice(did, token, ctl.url))
    ctl.api("POST", "/groups", {"name": "all", "devices": [d.device_id for d in out]})
    return out
