"""Device telemetry: collect system, agent and QoE metrics, buffer them, ship them when the link is up.

Off unless agent.toml has a ``[telemetry]`` section; then ``start`` runs one daemon thread in
the agent's process (the idle service's or ``run``'s) that every ``interval`` seconds
collects (/proc for CPU, memory, network and uptime, statvfs for the disk, /sys/class/thermal
for temperatures; a read-only look at the journal for the agent's own state; TCP-connect or
HTTP timing for latency, jitter and loss to the controller and configured targets), applies
the series policies (``agent.core.telemetry_policy``), adds what may leave the device to the
SQLite buffer (``agent.adapters.telemetry_buffer``) and drains it through remote write and
OTLP (``agent.adapters.telemetry_ship``). Without the section nothing is imported, started
or written — the idle agent stays as lean as before.

Update traces: ``mark`` and ``transition`` are the hooks the updater and the fleet agent
call at each phase (download, verify, write, reboot, health, commit or revert); one span
ends where the next begins, in the buffer, so a trace survives the reboot in its middle.
This module's top level imports only the standard library (the updater imports it).

Long because it is one job in three parts that share that rule — the trace hooks, the
collector and the runner with its local endpoint; split, each would re-import the others.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core import logs
from agent.core.frozen import Frozen

if TYPE_CHECKING:
    from agent.adapters.telemetry_buffer import Point, TelemetryBuffer
    from agent.adapters.telemetry_ship import FlushReport, Shipper
    from agent.core.config import AgentConfig
    from agent.core.telemetry_config import TelemetrySettings
    from agent.core.telemetry_policy import ModelRecord

log = logs.get("edgeops.telemetry")
Labels = tuple[tuple[str, str], ...]
NOTE_SEND_EVERY = 300.0  # seconds between writing down a direct send's time (status shows it)


def enabled(cfg: AgentConfig) -> bool:
    return cfg.telemetry is not None and cfg.telemetry.enabled


# --- the trace hooks ----------------------------------------------------------------------------
def mark(cfg: AgentConfig, name: str, *, now: float | None = None, **attrs: str) -> None:
    """Span boundary: the update's open span ends now and ``name`` begins. Never raises."""
    if not enabled(cfg):
        return
    _with_buffer(cfg, lambda b: b.mark_span(name, _ns(now), {k: str(v) for k, v in attrs.items()}))


def transition(cfg: AgentConfig, before: str, after: str, *, version: str | None = None,
               now: float | None = None) -> None:
    """A journal phase change, as a span boundary (``telemetry_policy.span_for``)."""
    if not enabled(cfg):
        return
    from agent.core.telemetry_policy import span_for

    before, after = str(before), str(after)  # a lifecycle.Phase hashes by its enum name
    span = span_for(before, after)
    if span is None:
        return
    if span == "":
        ok = before == "committing"
        _with_buffer(cfg, lambda b: b.end_trace(_ns(now), ok=ok, why="" if ok else
                                                 ("reverted" if before == "reverting" else "failed")))
    else:
        attrs = {"edgeops.version": version} if version else {}
        _with_buffer(cfg, lambda b: b.mark_span(span, _ns(now), attrs))


def health(cfg: AgentConfig, results: Iterable[tuple[str, bool, float]]) -> None:
    """A health round's results, (probe, passed, seconds) each: the last round is a series."""
    if not enabled(cfg):
        return
    rows = list(results)
    _with_buffer(cfg, lambda b: b.note_health(rows))


def _ns(now: float | None) -> int:
    return int((time.time() if now is None else now) * 1e9)


def _with_buffer(cfg: AgentConfig, act: Callable[[TelemetryBuffer], None]) -> None:
    try:
        buf = open_buffer(cfg)
        try:
            act(buf)
        finally:
            buf.close()
    except Exception as exc:  # telemetry is for people watching: never a reason to fail an update
        log.warning("telemetry: cannot record a span: %s", exc)


def open_buffer(cfg: AgentConfig) -> TelemetryBuffer:
    from agent.adapters.telemetry_buffer import TelemetryBuffer
    from agent.core.telemetry_policy import Budget

    t = cfg.telemetry
    assert t is not None
    return TelemetryBuffer(cfg.telemetry_path, Budget(t.budget_bytes, int(t.full_resolution * 1000),
                                                      int(t.downsample_step * 1000)))


# --- collection ---------------------------------------------------------------------------------
class Probe(Frozen):
    """Latency, jitter and loss of ``count`` TCP connects (or HTTP requests) to one target."""

    target: str
    latency: float | None  # mean seconds of the probes that answered
    jitter: float | None  # mean absolute difference of consecutive latencies
    loss: float  # fraction that did not answer


def probe(target: str, *, count: int, timeout: float,
          clock: Callable[[], float] = time.perf_counter) -> Probe:
    import socket

    times: list[float] = []
    for _ in range(count):
        t0 = clock()
        try:
            if target.startswith(("http://", "https://")):
                import urllib.request

                with urllib.request.urlopen(target, timeout=timeout) as r:
                    r.read(1)
            else:
                host, _, port = target.rpartition(":")
                name = host.strip("[]")
                addr: Any = (name.encode() if name.isascii() else name, int(port))  # as in post()
                with socket.create_connection(addr, timeout=timeout):
                    pass
        except OSError:
            continue
        except ValueError:
            break  # not host:port: counted as lost, said once by the config check
        times.append(clock() - t0)
    if not times:
        return Probe(target, None, None, 1.0)
    jitter = (sum(abs(a - b) for a, b in itertools.pairwise(times)) / (len(times) - 1)
              if len(times) > 1 else 0.0)
    return Probe(target, sum(times) / len(times), jitter, 1 - len(times) / count)


class Collector(Frozen, frozen=False):
    """One collection: (labels, value, kind) triples with the metric name in ``__name__``."""

    cfg: AgentConfig
    extra: Callable[[], Iterable[tuple[Labels, float, str]]] | None = None  # tests, the bench
    buffer: TelemetryBuffer | None = None  # the durations and health rounds noted in it

    def __call__(self) -> list[tuple[Labels, float, str]]:
        out = self.system() + self.agent() + self.qoe()
        if self.extra is not None:
            out.extend(self.extra())
        return out

    def system(self) -> list[tuple[Labels, float, str]]:
        """From /proc and /sys, what psutil would read there (psutil itself costs the idle
        agent a megabyte; /proc/stat, /proc/meminfo, /proc/net/dev are stable kernel ABI)."""
        out: list[tuple[Labels, float, str]] = []

        def g(name: str, value: float, kind: str = "gauge", **labels: str) -> None:
            out.append((tuple(sorted({"__name__": name, **labels}.items())), float(value), kind))

        hz = os.sysconf("SC_CLK_TCK")
        for line in _read("/proc/stat").splitlines():
            f = line.split()
            if f and f[0] == "cpu":  # proc(5): user nice system idle iowait ...
                for mode, v in zip(("user", "nice", "system", "idle", "iowait"), f[1:6], strict=False):
                    g("node_cpu_seconds_total", int(v) / hz, "counter", mode=mode)
            elif f and f[0] == "btime":
                g("node_boot_time_seconds", int(f[1]))
        mem = {k: v.split() for k, _, v in (line.partition(":") for line in
                                             _read("/proc/meminfo").splitlines())}
        for key in ("MemTotal", "MemAvailable"):
            if key in mem:
                g(f"node_memory_{key}_bytes", int(mem[key][0]) * 1024)
        try:
            st = os.statvfs(self.cfg.state_dir)
            g("node_filesystem_size_bytes", st.f_blocks * st.f_frsize, mountpoint=str(self.cfg.state_dir))
            g("node_filesystem_avail_bytes", st.f_bavail * st.f_frsize, mountpoint=str(self.cfg.state_dir))
        except OSError:
            pass
        for line in _read("/proc/net/dev").splitlines()[2:18]:
            nic, _, rest = line.partition(":")
            f = rest.split()
            if len(f) >= 9:
                g("node_network_receive_bytes_total", int(f[0]), "counter", device=nic.strip())
                g("node_network_transmit_bytes_total", int(f[8]), "counter", device=nic.strip())
        g("node_load1", os.getloadavg()[0])
        for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*"))[:16]:
            try:
                g("node_thermal_zone_temp", int((zone / "temp").read_text()) / 1000, zone=zone.name)
            except (OSError, ValueError):
                continue
        t = os.times()
        g("edgeops_agent_cpu_seconds_total", t.user + t.system, "counter")
        statm = _read("/proc/self/statm").split()
        if len(statm) > 1:
            g("edgeops_agent_resident_bytes", int(statm[1]) * os.sysconf("SC_PAGE_SIZE"))
        return out

    def agent(self) -> list[tuple[Labels, float, str]]:
        """The journal's view, read-only and ``immutable``: even a read-only connection would
        create the journal's -wal and -shm files, which the idle service takes for a change
        (``worker.journal_mark``) and starts a worker for. The price: a commit still in the
        WAL shows at the next collection, once checkpointed (a torn read is skipped)."""
        import json
        import sqlite3

        path = self.cfg.journal_path
        if not path.exists():
            return []
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, timeout=1)
            try:
                raw = db.execute("SELECT value FROM kv WHERE key = 'state'").fetchone()
                slots = db.execute("SELECT name, state, version FROM slots").fetchall()
                pending = db.execute("SELECT COUNT(*) FROM outbox WHERE sent IS NULL").fetchone()[0]
                dl = db.execute("SELECT value FROM kv WHERE key = 'delta.last'").fetchone()
            finally:
                db.close()
        except sqlite3.Error as exc:
            log.debug("telemetry: journal not readable: %s", exc)
            return []
        state = json.loads(raw[0]) if raw else {}
        out: list[tuple[Labels, float, str]] = [
            ((("__name__", "edgeops_phase_info"), ("phase", str(state.get("phase", "idle")))), 1.0,
             "gauge"),
            ((("__name__", "edgeops_reports_pending"),), float(pending), "gauge")]
        for name, st, version in slots:
            out.append(((("__name__", "edgeops_slot_info"), ("slot", str(name)), ("state", str(st)),
                         ("version", str(version or ""))), 1.0, "gauge"))
        try:
            last_download = json.loads(dl[0]) if dl else None
        except ValueError:
            last_download = None
        out.extend(self.recorded(last_download))
        return out

    def recorded(self, last_download: Any) -> list[tuple[Labels, float, str]]:
        """Durations and health rounds from the buffer (the trace hooks note them), the last
        download's bytes (``delta.last``), and the models with ModelHost's counts."""
        from agent.core.telemetry_policy import agent_series

        b = self.buffer
        return agent_series(b.durations() if b else {}, b.health() if b else [],
                            last_download if isinstance(last_download, dict) else None,
                            model_records(self.cfg))

    def qoe(self) -> list[tuple[Labels, float, str]]:
        t = self.cfg.telemetry
        if t is None:
            return []
        out: list[tuple[Labels, float, str]] = []
        deadline = time.monotonic() + t.interval / 2  # dead targets must not stretch the interval
        for target in qoe_targets(self.cfg):
            if time.monotonic() > deadline:
                log.info("telemetry: QoE probes took half the interval; the rest wait for the next")
                break
            p = probe(target, count=t.probe_count, timeout=t.probe_timeout)
            lb = ("target", target)
            out.append(((("__name__", "edgeops_qoe_loss_ratio"), lb), p.loss, "gauge"))
            if p.latency is not None and p.jitter is not None:
                out.append(((("__name__", "edgeops_qoe_latency_seconds"), lb), p.latency, "gauge"))
                out.append(((("__name__", "edgeops_qoe_jitter_seconds"), lb), p.jitter, "gauge"))
        return out


def model_records(cfg: AgentConfig) -> list[ModelRecord]:
    """Each installed model's current version and state, and the counts its ModelHost last
    wrote (``.host-stats.json``): files only, the runtime stays out of the agent. A ``current``
    that names no plain version, or a file that is too big or not JSON, is skipped."""
    from agent.core.telemetry_policy import ModelRecord

    where = cfg.models.get("dir")
    root = cfg.base / where if isinstance(where, str) else cfg.state_dir / "models"
    out: list[ModelRecord] = []
    try:
        dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return out
    for d in dirs[:64]:
        try:
            version = os.readlink(d / "current")
            if "/" in version or version.startswith("."):
                continue  # not one of the store's versions: nothing to read beyond it
            state = str(_small_json(d / version / "info.json").get("state", ""))
        except (OSError, ValueError, AttributeError):
            continue
        served, requests, errors = None, 0, 0
        try:
            st = _small_json(d / ".host-stats.json")
            served, requests, errors = str(st["version"]), int(st["requests"]), int(st["errors"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        out.append(ModelRecord(d.name, version, state, served, requests, errors))
    return out


def _small_json(path: Path, limit: int = 65536) -> Any:
    import json

    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{path} is over {limit} bytes")
    return json.loads(raw)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def qoe_targets(cfg: AgentConfig) -> list[str]:
    """The configured targets, and the controller (host:port of its URL) when [fleet] has one."""
    from urllib.parse import urlsplit

    t = cfg.telemetry
    targets = list(t.targets) if t is not None else []
    if cfg.fleet is not None:
        u = urlsplit(cfg.fleet.url)
        if u.hostname:
            ctl = f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}"
            if ctl not in targets:
                targets.append(ctl)
    return targets


# --- the runner ---------------------------------------------------------------------------------
def read_token(t: TelemetrySettings) -> str | None:
    """The bearer token from ``credentials_file``, read when needed (never logged)."""
    if t.credentials_file is None:
        return None
    try:
        return t.credentials_file.read_text().strip() or None
    except OSError as exc:
        log.warning("telemetry: cannot read credentials_file %s: %s", t.credentials_file, exc.strerror)
        return None


def shipper(cfg: AgentConfig, buf: TelemetryBuffer, **kw: Any) -> Shipper:
    import socket

    from agent.adapters.remote_write import RemoteWrite
    from agent.adapters.telemetry_ship import Shipper

    t = cfg.telemetry
    assert t is not None
    token = read_token(t)
    metrics = RemoteWrite(t.remote_write_url, token=token) if t.remote_write_url else None
    traces = None
    if t.otlp_url and t.traces != "local":  # local: recorded here, never sent
        from agent.adapters.otlp import OtlpTraces

        traces = OtlpTraces(t.otlp_url, token=token)
    resource = {"service.name": "edgeops", "host.name": socket.gethostname(),
                "edgeops.compatible": cfg.compatible}
    if t.traces == "regional":
        resource["edgeops.scope"] = "regional"  # the relay keeps these on site
    return Shipper(buf, metrics, traces, resource, batch_samples=t.batch_samples,
                   bytes_per_second=t.bytes_per_second, **kw)


def _salt(cfg: AgentConfig) -> bytes:
    """The device's own salt for hashed labels (STATE/telemetry.salt, 0600, made once)."""
    from agent.adapters.fsutil import SECRET, atomic_write

    path = cfg.state_dir / "telemetry.salt"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        salt = os.urandom(16)
        atomic_write(path, salt, mode=SECRET)
        return salt


class Telemetry:
    """Collect, decide, buffer and ship; ``tick`` once per interval (``start`` runs a thread)."""

    def __init__(self, cfg: AgentConfig, *, clock: Callable[[], float] = time.time,
                 collector: Callable[[], list[tuple[Labels, float, str]]] | None = None,
                 ship: Shipper | None = None) -> None:
        t = cfg.telemetry
        assert t is not None
        self.cfg, self.t, self.clock = cfg, t, clock
        self.buffer = open_buffer(cfg)
        self.collect = collector or Collector(cfg, buffer=self.buffer)
        self.ship = ship or shipper(cfg, self.buffer, clock=clock)
        self.salt = _salt(cfg) if any(r.hash for r in t.rules) else b""
        self.latest: dict[Labels, tuple[float, str]] = {}  # for the local endpoint, local ones too
        self.last_flush: FlushReport | None = None
        self.backlog: bool | None = None  # samples wait in the buffer (None: not looked yet)
        self.noted = 0.0  # when the last direct send was written down as "last send"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None

    def close(self) -> None:
        self.buffer.close()

    def points(self, now: float) -> list[Point]:
        """One collection, through the series policies: what may leave the device."""
        from agent.adapters.telemetry_buffer import Point
        from agent.core.telemetry_policy import aggregate, decide

        ts = int(now * 1000)
        keep: list[Point] = []
        agg: list[tuple[Labels, int, float]] = []
        kinds: dict[Labels, str] = {}
        self.latest = {}
        serving = self.t.listen is not None
        for labels, value, kind in self.collect():
            if serving:
                self.latest[labels] = (value, kind)
            d = decide(dict(labels), self.t.rules, self.salt)
            if d.scope == "local":
                continue
            if d.aggregate:
                agg.append((d.labels, ts, value))
                kinds[d.labels] = kind
            else:
                keep.append(Point(d.labels, ts, value, kind))
        keep.extend(Point(lb, t, v, kinds[lb]) for lb, t, v in aggregate(agg))
        return keep

    def tick(self) -> FlushReport:
        """One collection. With the link up and nothing waiting, the samples go straight out
        and nothing is written (the buffer is for outages: SD cards wear out); otherwise they
        join the buffer, which is drained oldest first so no series goes out of order."""
        from agent.adapters.telemetry_ship import FlushReport
        from agent.core.telemetry_policy import Outcome

        now = self.clock()
        points = self.points(now)
        if self.ship.metrics is None:
            return self.flush()  # no receiver for samples: only the local endpoint has them
        if self.backlog is None:
            self.backlog = self.buffer.status().samples > 0
        if not self.backlog:
            report = FlushReport()
            series: dict[Labels, list[tuple[int, float]]] = {}
            for p in points:
                series.setdefault(p.labels, []).append((p.ts, p.value))
            outcome = self.ship.send_now(list(series.items()), report)
            if outcome is Outcome.ACKED:
                if now - self.noted >= NOTE_SEND_EVERY:
                    self.buffer.note_send(now)
                    self.noted = now
                if self.ship.traces is not None:
                    self.ship.flush_traces(report)
                self.last_flush = report
                return report
            if outcome is Outcome.REJECTED:
                self.buffer.count("rejected", len(points))
                return report
        self.buffer.add(points, int(now * 1000))
        report = self.flush()
        self.backlog = report.retry_in is not None
        return report

    def flush(self, *, force: bool = False) -> FlushReport:
        self.last_flush = self.ship.flush(force=force)
        return self.last_flush

    # --- as a thread of the agent's process --------------------------------------------------------
    def start(self) -> Telemetry:
        if self.t.listen:
            self._serve_local(self.t.listen)
        self._thread = threading.Thread(target=self._run, name="edgeops-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a send cut short is not acknowledged: sent again later
        if self._server is not None:
            self._server.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # a bug here must not take the update agent down with it
                log.exception("telemetry tick failed")
            self._stop.wait(max(0.0, self.t.interval - (time.monotonic() - started)))
        self.buffer.close()

    def _serve_local(self, listen: str) -> None:
        """The Prometheus text endpoint (prometheus-client), loopback unless configured."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        owner = self

        class Latest:
            def collect(self) -> Iterable[Any]:
                by_name: dict[str, list[tuple[Labels, float, str]]] = {}
                for labels, (value, kind) in list(owner.latest.items()):
                    by_name.setdefault(dict(labels)["__name__"], []).append((labels, value, kind))
                for name, rows in sorted(by_name.items()):
                    keys = sorted({k for lb, _, _ in rows for k, _ in lb if k != "__name__"})
                    counter = rows[0][2] == "counter" and name.endswith("_total")
                    fam = (CounterMetricFamily(name[:-6], name, labels=keys) if counter
                           else GaugeMetricFamily(name, name, labels=keys))
                    for lb, value, _ in rows:
                        d = dict(lb)
                        fam.add_metric([d.get(k, "") for k in keys], value)
                    yield fam

        reg = CollectorRegistry()
        reg.register(Latest())  # type: ignore[arg-type]
        host, _, port = listen.rpartition(":")
        self._server, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=reg)


def start(cfg: AgentConfig) -> Telemetry | None:
    """The telemetry thread when [telemetry] is on, else None (nothing imported or written).
    A missing [telemetry] extra is a config error now, not at the first send; a buffer that
    cannot be opened (a full or read-only data partition) costs the telemetry, not the agent."""
    if not enabled(cfg):
        return None
    from agent.errors import ConfigError

    t = cfg.telemetry
    assert t is not None
    needs = ((["google.protobuf", "cramjam"] if t.remote_write_url else [])
             + (["opentelemetry.proto"] if t.otlp_url else []) + (["prometheus_client"] if t.listen else []))
    for name in needs:
        try:
            __import__(name)
        except ImportError:
            raise ConfigError(f"[telemetry] needs {name.split('.')[0]}",
                              hint="pip install 'edgeops[telemetry]'") from None
    try:
        return Telemetry(cfg).start()
    except (OSError, sqlite3_error()) as exc:
        log.warning("telemetry off: cannot open %s: %s", cfg.telemetry_path, exc)
        return None


def sqlite3_error() -> type[Exception]:
    import sqlite3

    return sqlite3.Error
