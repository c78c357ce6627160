"""ModelHost: serve ``predict()`` from the current model and hot-swap it with no failed request.

An inference application embeds it::

    host = ModelHost(Path("/var/lib/edgeops/models"), "detector", settings=settings,
                     journal_path=Path("/var/lib/edgeops/journal.db"))
    with host:
        outputs = host.predict([frame])

A background thread polls the store's ``current`` link (one readlink(2) per
interval: cheap, and works where inotify does not). When it names another
version, the thread loads that model into fresh interpreters beside the old
ones, warms them with one inference, and only then replaces the one reference
``predict()`` reads — a single attribute store, atomic under the GIL. Requests
already running finish on the old interpreters; no request waits for a load.
The same thread judges the new model's health (agent.core.model_health) and, on
failure, reverts ``current`` to the last-known-good model, which it then swaps
back in the same way. Every ``stats_interval`` seconds, when they changed, it writes the
served version's request and error counts to ``<root>/<name>/.host-stats.json`` (the agent's
telemetry reads them there: it runs in another process and never loads the runtime).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.adapters import tflite as validate_mod
from agent.adapters.model_store import CURRENT, ModelStore
from agent.core import logs
from agent.core.model_health import Decision, WindowStats, decide, p95
from agent.device.models import ModelManager, ModelSettings
from agent.errors import EdgeopsError, ModelStateError

log = logs.get("edgeops.modelhost")
LATENCY_SAMPLES = 4096  # per model: enough for a stable p95, bounded memory
OUTPUT_SAMPLES = 64  # recent outputs handed to the application's health check
STATS_FILE = ".host-stats.json"  # a dot name: never a version (the store refuses those)


@dataclass
class HealthSample:
    """What an application check sees at the end of the health window."""

    version: str
    stats: WindowStats
    outputs: list[list[Any]]  # recent predict() results, newest last


AppCheck = Callable[[HealthSample], "str | None"]  # a failure reason, or None when healthy


@dataclass
class _Stats:
    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    outputs: deque[list[Any]] = field(default_factory=lambda: deque(maxlen=OUTPUT_SAMPLES))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ms: float, outputs: list[Any] | None) -> None:
        with self.lock:
            self.requests += 1
            if outputs is None:
                self.errors += 1
            else:
                self.latencies_ms.append(ms)
                self.outputs.append(outputs)

    def snapshot(self) -> WindowStats:
        with self.lock:
            return WindowStats(self.requests, self.errors, p95(list(self.latencies_ms)))


@dataclass
class _Loaded:
    version: str
    pool: queue.SimpleQueue[validate_mod.Runner]
    stats: _Stats
    loaded_at: float


class ModelHost:
    def __init__(self, root: Path, name: str, *, poll_interval: float = 0.05, pool_size: int = 1,
                 num_threads: int = 1, settings: ModelSettings | None = None,
                 journal_path: Path | None = None, app_check: AppCheck | None = None,
                 on_swap: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, stats_interval: float = 30.0) -> None:
        """``settings`` enables the health window and automatic revert; without it the host
        only serves and swaps. ``pool_size`` interpreters per model serve that many threads
        at once (an interpreter must not be invoked from two threads at the same time)."""
        self.store = ModelStore(root)
        self.name = name
        self.poll_interval = poll_interval
        self.pool_size = max(1, pool_size)
        self.num_threads = num_threads
        self.settings = settings
        self.journal_path = journal_path
        self.app_check = app_check
        self.on_swap = on_swap
        self.clock = clock
        self.stats_interval = stats_interval
        self._stats_written: tuple[str, int, int] | None = None
        self._stats_at = 0.0
        self.swaps = 0
        self.last_error: str | None = None
        self._active: _Loaded | None = None
        self._baseline: WindowStats | None = None  # the previous model's steady state
        self._trial = False
        self._failed: str | None = None  # a version that would not load: not retried
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._manager: ModelManager | None = None

    # --- life cycle ------------------------------------------------------------------------
    def start(self) -> ModelHost:
        version = self.store.current(self.name)
        if version is None:
            raise ModelStateError(f"no model named {self.name} is installed in {self.store.root}")
        self._active = self._load(version)
        self._trial = self._is_trial(version)
        self._stats_at = time.monotonic()  # the first counts are written one interval from now
        self._thread = threading.Thread(target=self._watch, name=f"modelhost-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ModelHost:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def version(self) -> str:
        if self._active is None:
            raise RuntimeError("ModelHost.start() has not been called")
        return self._active.version

    # --- serving ---------------------------------------------------------------------------
    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        """Run the current model on one input per model input tensor; returns the outputs."""
        loaded = self._active  # one read: a swap during this call does not affect it
        if loaded is None:
            raise RuntimeError("ModelHost.start() has not been called")
        runner = loaded.pool.get()  # waits only while this model's interpreters are all busy
        t0 = time.perf_counter()
        try:
            out = runner.run(list(inputs))
        except Exception:
            loaded.stats.add(0.0, None)
            raise
        finally:
            loaded.pool.put(runner)
        loaded.stats.add((time.perf_counter() - t0) * 1000.0, out)
        return out

    # --- the watcher thread ----------------------------------------------------------------
    def _watch(self) -> None:
        try:
            while not self._stop.wait(self.poll_interval):
                try:
                    self.poll()
                except Exception as exc:  # the watcher must outlive any one bad poll
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("model host poll failed")
                if time.monotonic() - self._stats_at >= self.stats_interval:
                    self.write_stats()
        finally:
            self.write_stats()
            if self._manager is not None and self._manager.journal is not None:
                self._manager.journal.close()

    def poll(self) -> None:
        """One look at the ``current`` link, a swap if it moved, and a health verdict if due."""
        try:
            target = os.readlink(self.store.dir(self.name) / CURRENT)
        except FileNotFoundError:
            return
        active = self._active
        assert active is not None
        if target != active.version and target != self._failed:
            self._swap_to(target, active)
        elif self._trial:
            self._judge()

    def write_stats(self) -> bool:
        """The served version's counts, for the agent's telemetry, if they changed; never raises
        (a full disk costs the figures, not the serving). True if written."""
        self._stats_at = time.monotonic()
        active = self._active
        if active is None:
            return False
        snap = active.stats.snapshot()
        now = (active.version, snap.requests, snap.errors)
        if now == self._stats_written:
            return False
        import json

        from agent.adapters.fsutil import atomic_write

        try:
            atomic_write(self.store.dir(self.name) / STATS_FILE, json.dumps(
                {"version": now[0], "requests": now[1], "errors": now[2], "at": time.time()}))
        except OSError as exc:
            log.warning("cannot write the model's counts: %s", exc)
            return False
        self._stats_written = now
        return True

    def _swap_to(self, version: str, old: _Loaded) -> None:
        try:
            new = self._load(version)
        except Exception as exc:  # the interpreter raises ValueError, RuntimeError, …
            # keep serving the old model; the store's validation makes this rare
            self._failed = version
            self.last_error = f"cannot load {self.name} {version}: {exc}"
            log.error("%s", self.last_error)
            return
        self._baseline = old.stats.snapshot()
        self._active = new  # the swap: predict() calls from here on use the new model
        self.swaps += 1
        self._failed = None
        self._trial = self._is_trial(version)
        if self.on_swap is not None:
            self.on_swap(old.version, version)

    def _load(self, version: str) -> _Loaded:
        data = self.store.model_path(self.name, version).read_bytes()
        pool: queue.SimpleQueue[validate_mod.Runner] = queue.SimpleQueue()
        for _ in range(self.pool_size):
            runner = validate_mod.load(data, num_threads=self.num_threads)
            _warm(runner)
            pool.put(runner)
        return _Loaded(version, pool, _Stats(), self.clock())

    def _is_trial(self, version: str) -> bool:
        if self.settings is None or version == self.store.good(self.name):
            return False  # the last-known-good (or a revert to it) has nothing to fall back to
        try:
            return self.store.info(self.name, version).state == "trial"
        except EdgeopsError:
            return False

    # --- health ----------------------------------------------------------------------------
    def _judge(self) -> Decision:
        active = self._active
        assert active is not None and self.settings is not None
        stats = active.stats.snapshot()
        d = decide(self.settings.health, stats, self._baseline,
                   elapsed=self.clock() - active.loaded_at)
        if d.verdict == "commit" and self.app_check is not None:
            with active.stats.lock:
                outputs = list(active.stats.outputs)
            failure = self.app_check(HealthSample(active.version, stats, outputs))
            if failure:
                d = decide(self.settings.health, stats, self._baseline,
                           elapsed=self.clock() - active.loaded_at, app_failure=failure)
        if d.verdict == "wait":
            return d
        self._trial = False
        mgr = self._get_manager()
        if d.verdict == "commit":
            mgr.commit(self.name, active.version, d.reason)
        else:
            # current -> last-known-good; the next poll swaps it in like any other model
            mgr.revert(self.name, active.version, d.reason)
        return d

    def _get_manager(self) -> ModelManager:
        # created in the watcher thread: a SQLite connection belongs to the thread that opened it
        if self._manager is None:
            assert self.settings is not None
            journal = None
            if self.journal_path is not None:
                from agent.adapters.journal import Journal

                journal = Journal(self.journal_path)
            self._manager = ModelManager(self.settings, journal)
        return self._manager


def _warm(runner: validate_mod.Runner) -> None:
    """One inference on zeros, so the first real request does not pay for lazy allocation."""
    import numpy as np

    details = runner.interpreter.get_input_details()
    runner.run([np.zeros(d["shape"], dtype=d["dtype"]) for d in details])
