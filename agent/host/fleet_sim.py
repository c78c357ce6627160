"""``edgeops fleet-sim``: N simulated devices (``litedevice``) against a real controller on loopback.

A scenario (TOML, ``tools/fleet_sim/scenarios/``) names the fleet, its sites and their links
(``netsim.Link``: latency, jitter, loss, bandwidth, partitions, flapping), a release (which
share of devices fails its health checks), the rollout policy and, optionally, a regional
controller that one site reaches its central controller through, with WAN cuts. Time is
compressed (``time_scale`` simulated seconds per real second, ``netsim.SimClock``): the
controller runs on the same simulated clock, network delays stay real.

The controller is the real one (aiohttp, SQLite WAL, in a thread of this process, or a URL
of one already running: ``controller_url``), fed devices and a synthetic artifact directly
through its ``Fleet``; the devices run as asyncio tasks in this process, each site behind
its own proxy. ``run`` returns a ``Report``: the devices' own view, the controller's view,
poll latency and rate, and what the run was about (rollout status, when each device finished).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.errors import ConfigError
from agent.host.litedevice import SimAgent, Stats
from agent.host.netsim import Link, SimClock, SiteProxy, flapping

SCENARIOS = Path(__file__).resolve().parents[2] / "tools" / "fleet_sim" / "scenarios"
MAX_DEVICES = 50_000


@dataclass(frozen=True)
class Site:
    name: str
    share: float = 1.0
    link: Link = field(default_factory=Link)
    regional: bool = False  # reaches the central controller through the regional one


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: int = 100
    time_scale: float = 60.0
    poll_sleep: int = 60  # simulated seconds, the controller's config.polling.sleep
    duration: float = 3600.0  # simulated seconds: the run ends by then at the latest
    bundle_size: int = 64 << 10
    release: str = "2.0"
    fail_share: float = 0.0  # share of devices whose health checks reject the release
    rollout_at: float = 60.0  # simulated seconds after the start
    policy: dict[str, Any] = field(default_factory=dict)
    sites: tuple[Site, ...] = (Site("site0"),)
    wan: Link = field(default_factory=Link)  # between the regional controller and the central one
    description: str = ""

    @classmethod
    def load(cls, path: Path) -> Scenario:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"scenario {path}: {exc}") from None
        return cls.from_dict(doc, str(path))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "scenario") -> Scenario:
        try:
            sites = tuple(_site(s) for s in doc.get("sites", [{"name": "site0"}]))
            wan = _link(doc.get("wan", {}))
            devices = int(doc.get("devices", 100))
            sc = cls(name=str(doc.get("name", Path(where).stem)), devices=devices,
                     time_scale=float(doc.get("time_scale", 60.0)), poll_sleep=int(doc.get("poll_sleep", 60)),
                     duration=float(doc.get("duration", 3600.0)),
                     bundle_size=int(doc.get("bundle_size", 64 << 10)),
                     release=str(doc.get("release", "2.0")), fail_share=float(doc.get("fail_share", 0.0)),
                     rollout_at=float(doc.get("rollout_at", 60.0)), policy=dict(doc.get("policy", {})),
                     sites=sites, wan=wan, description=str(doc.get("description", "")))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{where}: {type(exc).__name__}: {exc}") from None
        if not 1 <= sc.devices <= MAX_DEVICES:
            raise ConfigError(f"{where}: devices must be from 1 to {MAX_DEVICES}")
        if sc.time_scale <= 0 or sc.poll_sleep < 1 or not sites or not 0 <= sc.fail_share <= 1:
            raise ConfigError(f"{where}: time_scale > 0, poll_sleep >= 1, at least one site, "
                              "fail_share in [0, 1]")
        return sc

    def with_(self, **changes: Any) -> Scenario:
        return Scenario(**{**self.__dict__, **changes})


def _link(d: dict[str, Any]) -> Link:
    parts = [tuple(float(x) for x in p) for p in d.get("partitions", [])]
    if "flap" in d:
        f = d["flap"]
        parts += flapping(float(f["period"]), float(f["down"]), float(f.get("start", 0)),
                          float(f["end"]))
    if any(len(p) != 2 or p[0] >= p[1] for p in parts):
        raise ValueError("a partition is [start, end] with start < end (simulated seconds)")
    return Link(latency=float(d.get("latency_ms", 0)) / 1000, jitter=float(d.get("jitter_ms", 0)) / 1000,
                loss=float(d.get("loss", 0)), bandwidth=float(d.get("bandwidth_kib", 0)) * 1024,
                partitions=tuple((p[0], p[1]) for p in parts))


def _site(d: dict[str, Any]) -> Site:
    return Site(str(d["name"]), float(d.get("share", 1.0)), _link(d), bool(d.get("regional", False)))


def scenario_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml" and p.exists():
        return p
    found = SCENARIOS / f"{name}.toml"
    if not found.exists():
        known = ", ".join(sorted(x.stem for x in SCENARIOS.glob("*.toml")))
        raise ConfigError(f"no scenario {name!r} (known: {known}, or a path to a .toml file)")
    return found


# --- the controller side ------------------------------------------------------------------------
@dataclass
class Controllers:
    central: Any  # serve.Running
    fleet: Any  # controller.fleet.Fleet
    regional: Any | None = None
    regional_fleet: Any | None = None

    def stop(self) -> None:
        for running, fleet in ((self.regional, self.regional_fleet), (self.central, self.fleet)):
            if running is not None and fleet is not None:
                running.stop()
                fleet.db.close()


def start_central(data: Path, clock: SimClock, sc: Scenario, db_url: str | None = None) -> Controllers:
    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet
    from agent.controller.http import Settings
    from agent.controller.serve import serve_in_thread

    fleet = Fleet(open_database(db_url or str(data / "central.db")), data / "central", clock=clock.now)
    s = Settings(api_token="fleet-sim", poll_sleep=sc.poll_sleep, tick_interval=0.5, flush_interval=1.0)
    return Controllers(serve_in_thread(fleet, s), fleet)


def start_regional(ctl: Controllers, data: Path, clock: SimClock, sc: Scenario, parent: str) -> None:
    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet
    from agent.controller.http import Settings
    from agent.controller.serve import serve_in_thread

    fleet = Fleet(open_database(str(data / "regional.db")), data / "regional", clock=clock.now)
    s = Settings(api_token="fleet-sim", poll_sleep=sc.poll_sleep, parent=parent, parent_interval=0.2)
    ctl.regional, ctl.regional_fleet = serve_in_thread(fleet, s), fleet


def populate(fleet: Any, sc: Scenario, rng: random.Random) -> tuple[list[tuple[str, str, Site]], int]:
    """Register the devices (spread over the sites by share) and one synthetic bundle; returns
    (device id, token, site) per device and the bundle id."""
    from agent.controller import tokens

    total = sum(s.share for s in sc.sites)
    counts = [math.floor(sc.devices * s.share / total) for s in sc.sites]
    counts[0] += sc.devices - sum(counts)
    devices: list[tuple[str, str, Site]] = []
    with fleet.db.tx():
        for site, n in zip(sc.sites, counts, strict=True):
            for _ in range(n):
                did, token = f"{site.name}-{len(devices):05d}", f"t{rng.getrandbits(64):016x}"
                fleet.db.execute("INSERT INTO devices (id, token, site, tags, created) "
                                 "VALUES (?, ?, ?, '[]', ?)",
                                 [did, tokens.digest(token), site.name, fleet.clock()])
                devices.append((did, token, site))
        payload = rng.randbytes(sc.bundle_size)
        sha = hashlib.sha256(payload).hexdigest()
        (fleet.artifacts / sha).write_bytes(payload)
        bid = fleet.db.insert(
            "INSERT INTO bundles (version, compatible, sha256, sha1, md5, size, filename, signer, created) "
            "VALUES (?, 'sim', ?, ?, ?, ?, 'release.edgeops', 'fleet-sim', ?)",
            [sc.release, sha, hashlib.sha1(payload).hexdigest(), hashlib.md5(payload).hexdigest(),
             len(payload), fleet.clock()])
    return devices, bid


# --- the run ------------------------------------------------------------------------------------
@dataclass
class Report:
    scenario: str
    wall_seconds: float
    sim_seconds: float
    devices: list[dict[str, Any]]
    controller_versions: dict[str, str | None]  # device -> version the central controller records
    rollout: dict[str, Any]
    stats: Stats
    proxies: dict[str, dict[str, int]]
    finished_at: dict[str, float]  # device -> simulated time its release action ended
    central_closed_at: dict[str, float]  # device -> simulated time central saw it closed
    wan_back: float | None  # simulated time the WAN came back (its last cut's end)
    canary: list[str] = field(default_factory=list)  # the devices of wave 0

    def percentile(self, q: float) -> float:
        lat = sorted(self.stats.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * q))] if lat else 0.0

    def poll_rates(self, window: float, start: float = 0.0) -> list[int]:
        """Polls the controller answered in each ``window`` of simulated seconds from ``start``."""
        counts: dict[int, int] = {}
        for t in self.stats.poll_times:
            if t >= start:
                counts[int((t - start) // window)] = counts.get(int((t - start) // window), 0) + 1
        return [counts.get(i, 0) for i in range(max(counts, default=-1) + 1)]

    def summary(self) -> dict[str, Any]:
        running: dict[str, int] = {}
        for d in self.devices:
            running[str(d["running"])] = running.get(str(d["running"]), 0) + 1
        return {"scenario": self.scenario, "wall_seconds": round(self.wall_seconds, 1),
                "sim_seconds": round(self.sim_seconds), "devices": len(self.devices),
                "running": running, "rollout": {k: self.rollout.get(k) for k in (
                    "status", "reason", "current_wave", "waves", "wave_sizes", "pacing")},
                "polls": len(self.stats.latencies), "poll_p50_ms": round(self.percentile(0.5) * 1000, 1),
                "poll_p99_ms": round(self.percentile(0.99) * 1000, 1),
                "throttled": self.stats.throttled, "failed_requests": self.stats.failed,
                "bytes_in": self.stats.bytes_in, "downloads": self.stats.downloads,
                "proxies": self.proxies}


async def _run(sc: Scenario, data: Path, seed: int, db_url: str | None,
               until: str) -> Report:
    import time

    rng = random.Random(seed)
    clock = SimClock(sc.time_scale)
    ctl = await asyncio.to_thread(start_central, data, clock, sc, db_url)
    proxies: dict[str, SiteProxy] = {}
    sessions: list[aiohttp.ClientSession] = []
    stop = asyncio.Event()
    try:
        devices, bid = await asyncio.to_thread(populate, ctl.fleet, sc, rng)
        host, port = _hostport(ctl.central.url)
        wan: SiteProxy | None = None
        if any(s.regional for s in sc.sites):
            wan = SiteProxy("wan", sc.wan, (host, port), clock, random.Random(seed + 1))
            await wan.start()
            await asyncio.to_thread(start_regional, ctl, data, clock, sc, wan.url)
            proxies["wan"] = wan
        stats = Stats()
        agents: list[SimAgent] = []
        fail_ids = _failing(devices, sc.fail_share, seed)
        for site in sc.sites:
            target = _hostport(ctl.regional.url) if site.regional and ctl.regional else (host, port)
            proxy = SiteProxy(site.name, site.link, target, clock, random.Random(f"{seed}:{site.name}"))
            await proxy.start()
            proxies[site.name] = proxy
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, force_close=False),
                timeout=aiohttp.ClientTimeout(total=60, sock_connect=10))
            sessions.append(session)
            for did, token, s in devices:
                if s is site:
                    fails = (lambda d: lambda v: v == sc.release and d in fail_ids)(did)
                    agents.append(SimAgent(did, token, proxy.url, session, clock, stats,
                                           poll_sleep=sc.poll_sleep, fails=fails,
                                           rng=random.Random(f"{seed}:{did}")))
        started = time.monotonic()
        tasks = [asyncio.create_task(a.run(stop, rng.uniform(0, sc.poll_sleep))) for a in agents]
        rid = None
        central_closed: dict[str, float] = {}
        while clock.elapsed() < sc.duration:
            await asyncio.sleep(0.25)
            if rid is None and clock.elapsed() >= sc.rollout_at:
                rid = await asyncio.to_thread(_create_rollout, ctl.fleet, bid, sc)
            if rid is None:
                continue
            status = await asyncio.to_thread(ctl.fleet.rollout_status, rid)
            closed = await asyncio.to_thread(_closed_devices, ctl.fleet, rid)
            now = clock.elapsed()
            for d in closed:
                central_closed.setdefault(d, now)
            if _done(status, agents, sc, until, len(closed)):
                break
        wall = time.monotonic() - started
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        status = await asyncio.to_thread(ctl.fleet.rollout_status, rid) if rid else {}
        versions = {d["id"]: d["version"] for d in await asyncio.to_thread(ctl.fleet.devices)}
        wan_back = max((b for _, b in sc.wan.partitions), default=None)
        finished = {a.id: t for a in agents for aid, t in a.finished_at.items()}
        canary = await asyncio.to_thread(ctl.fleet.wave_members, rid, 0) if rid else []
        return Report(sc.name, wall, clock.elapsed(), [a.view() for a in agents], versions, status, stats,
                      {k: p.stats.__dict__ for k, p in proxies.items()}, finished, central_closed, wan_back,
                      canary)
    finally:
        stop.set()
        for session in sessions:
            await session.close()
        for p in proxies.values():
            await p.close()
        await asyncio.to_thread(ctl.stop)


def _hostport(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[1]
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def _failing(devices: list[tuple[str, str, Site]], share: float, seed: int) -> set[str]:
    ranked = sorted(devices, key=lambda d: hashlib.sha256(f"{seed}:{d[0]}".encode()).digest())
    return {d[0] for d in ranked[:round(len(devices) * share)]}


def _create_rollout(fleet: Any, bid: int, sc: Scenario) -> int:
    from agent.controller import rollout

    targets = fleet.resolve_targets(everyone=True)  # the whole simulated fleet, named as the API requires
    return int(fleet.create_rollout(bid, targets, rollout.Policy.from_dict(sc.policy), name=sc.name))


def _closed_devices(fleet: Any, rid: int) -> list[str]:
    rows = fleet.db.query("SELECT device_id FROM actions WHERE rollout_id = ? AND status IN "
                          "('success', 'failure')", [rid])
    return [r[0] for r in rows]


def _done(status: dict[str, Any], agents: list[SimAgent], sc: Scenario, until: str, closed: int) -> bool:
    """The run's question is answered: the rollout stopped (paused, halted, finished) and every
    device is settled; with ``until = "converged"`` also every device on the release and
    every action closed at the central controller."""
    if status.get("status") == "running":
        return False
    settled = all(not a.busy and not a.outbox for a in agents)
    if until == "converged":
        return settled and closed >= len(agents) and all(a.board.running == sc.release for a in agents)
    return settled


def run(sc: Scenario, data: Path, *, seed: int = 1, db_url: str | None = None,
        until: str = "settled") -> Report:
    """Run one scenario to its end (see ``_done``) or its ``duration``."""
    data.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result: Report = runner(_run(sc, data, seed, db_url, until))
    return result
