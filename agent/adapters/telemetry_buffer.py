"""The device's telemetry buffer: samples and update traces in one SQLite file that outlives reboots.

It lives in the state directory (the data partition) as ``telemetry.db``, written with
``synchronous=FULL`` in WAL mode, so a power cut loses no committed sample. Everything is
kept until a receiver acknowledged it (``ack``): a batch that was sent and not acknowledged
when the power went is sent again after the reboot — a duplicate remote write tolerates
(same series, same timestamp, same value) — and never one that was.

The disk budget, the downsampling and the eviction order are decided in
``agent.core.telemetry_policy``; this module runs them in SQL and counts every sample it
removes, by reason (``downsampled``, ``evicted``, ``rejected``, ``spans-evicted``), in the
same transaction as the removal.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core import telemetry_policy as tp

Labels = tuple[tuple[str, str], ...]
MAX_SPANS = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, labels TEXT UNIQUE NOT NULL,
    priority INTEGER NOT NULL, kind TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (id INTEGER PRIMARY KEY, series INTEGER NOT NULL,
    ts INTEGER NOT NULL, value REAL NOT NULL, res INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS samples_ts ON samples (ts, id);
CREATE TABLE IF NOT EXISTS spans (id INTEGER PRIMARY KEY, trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL, parent_id TEXT, name TEXT NOT NULL, start_ns INTEGER NOT NULL,
    end_ns INTEGER, attrs TEXT NOT NULL, ok INTEGER NOT NULL DEFAULT 1,
    done INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Point:
    labels: Labels  # sorted, __name__ included
    ts: int  # ms
    value: float
    kind: str = "gauge"


@dataclass(frozen=True)
class Batch:
    ids: list[int]
    series: list[tuple[Labels, list[tuple[int, float]]]]

    @property
    def samples(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class BufferStatus:
    samples: int
    max_samples: int
    series: int
    oldest_ms: int | None
    newest_ms: int | None
    spans_pending: int
    last_send: float | None
    last_trace_send: float | None
    dropped: dict[str, int]
    file_bytes: int


class TelemetryBuffer:
    def __init__(self, path: Path, budget: tp.Budget | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.budget = path, budget or tp.Budget()
        # one user at a time, but not always the thread that opened it (the agent's telemetry
        # thread takes over the buffer its constructor opened)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA cache_size=-256")  # KiB: a device's agent, not a database server
        self.db.executescript(_SCHEMA)
        os.chmod(path, 0o600)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- counters and meta ------------------------------------------------------------------
    def _count(self, name: str, n: int) -> None:
        if n:
            self.db.execute("INSERT INTO counters (name, n) VALUES (?, ?) ON CONFLICT (name) "
                            "DO UPDATE SET n = n + excluded.n", (name, n))

    def dropped(self) -> dict[str, int]:
        return {str(k): int(n) for k, n in self.db.execute("SELECT name, n FROM counters ORDER BY name")}

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                        "DO UPDATE SET value = excluded.value", (key, value))

    # --- samples -------------------------------------------------------------------------------
    def _series_id(self, labels: Labels, kind: str) -> int:
        key = json.dumps(labels, separators=(",", ":"))
        row = self.db.execute("SELECT id FROM series WHERE labels = ?", (key,)).fetchone()
        if row:
            return int(row[0])
        name = dict(labels).get("__name__", "")
        cur = self.db.execute("INSERT INTO series (labels, priority, kind) VALUES (?, ?, ?)",
                              (key, int(tp.priority_of(name)), kind))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def count(self, name: str, n: int) -> None:
        """Count ``n`` samples under ``name`` (e.g. a relay's ``kept-on-site``)."""
        with self.tx():
            self._count(name, n)

    def add(self, points: Iterable[Point], now_ms: int) -> int:
        """Buffer ``points``, then hold the budget; returns how many samples are held."""
        with self.tx():
            rows = [(self._series_id(p.labels, p.kind), p.ts, p.value) for p in points]
            self.db.executemany("INSERT INTO samples (series, ts, value) VALUES (?, ?, ?)", rows)
            return self._hold_budget(now_ms)

    def _held(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def _hold_budget(self, now_ms: int) -> int:
        held = self._held()
        if held <= self.budget.max_samples:
            return held
        horizon = now_ms - self.budget.full_resolution_ms
        rows = [tp.Row(i, s, t, v, k) for i, s, t, v, k in self.db.execute(
            "SELECT s.id, s.series, s.ts, s.value, se.kind FROM samples s JOIN series se "
            "ON se.id = s.series WHERE s.res = 0 AND s.ts < ?", (horizon,))]
        plan = tp.downsample(rows, now_ms, self.budget)
        self.db.executemany("UPDATE samples SET value = ?, res = 1 WHERE id = ?",
                            [(r.value, r.id) for r in plan.keep])
        self.db.executemany("DELETE FROM samples WHERE id = ?", [(i,) for i in plan.remove])
        self._count("downsampled", len(plan.remove))
        held -= len(plan.remove)
        n = tp.evict_count(held, self.budget)
        if n:
            self.db.execute("DELETE FROM samples WHERE id IN (SELECT id FROM samples "
                            "ORDER BY ts, id LIMIT ?)", (n,))
            self._count("evicted", n)
            held -= n
        return held

    def batch(self, max_samples: int) -> Batch:
        """The next samples to send: highest priority first, oldest first within it."""
        rows = self.db.execute(
            "SELECT s.id, se.labels, s.ts, s.value FROM samples s JOIN series se ON se.id = s.series "
            "ORDER BY se.priority, s.ts, s.id LIMIT ?", (max_samples,)).fetchall()
        ids: list[int] = []
        by_series: dict[str, list[tuple[int, float]]] = {}
        for i, labels, ts, value in rows:
            ids.append(int(i))
            by_series.setdefault(str(labels), []).append((int(ts), float(value)))
        series = [(tuple((str(k), str(v)) for k, v in json.loads(key)), pts)
                  for key, pts in by_series.items()]
        return Batch(ids, series)

    def ack(self, ids: Sequence[int], now: float) -> None:
        """The receiver took these: delete them (they are never sent again)."""
        with self.tx():
            self.db.executemany("DELETE FROM samples WHERE id = ?", [(i,) for i in ids])
            self._set_meta("last_send", repr(now))

    def note_send(self, now: float) -> None:
        """Samples went out without passing through here: remember when, for ``status``."""
        with self.tx():
            self._set_meta("last_send", repr(now))

    def reject(self, ids: Sequence[int], reason: str = "rejected") -> None:
        with self.tx():
            self.db.executemany("DELETE FROM samples WHERE id = ?", [(i,) for i in ids])
            self._count(reason, len(ids))

    def all_samples(self) -> list[tuple[Labels, int, float, bool]]:
        """Every held sample (tests and ``telemetry status --all``), oldest first."""
        return [(tuple((str(k), str(v)) for k, v in json.loads(lb)), int(t), float(v), bool(r))
                for lb, t, v, r in self.db.execute(
                    "SELECT se.labels, s.ts, s.value, s.res FROM samples s JOIN series se "
                    "ON se.id = s.series ORDER BY s.ts, s.id")]

    # --- update traces --------------------------------------------------------------------------
    def mark_span(self, name: str, now_ns: int, attrs: dict[str, str] | None = None) -> None:
        """End the open span of the update's trace at ``now_ns`` and open ``name`` (a trace is
        opened by its first span; "download" or "verify" after anything else starts a new one)."""
        with self.tx():
            cur = self._open_trace()
            if cur is not None and cur["span"] == name:
                return  # the same phase again (written, then trial-pending: both "reboot")
            if cur is not None and name in ("download", "verify") and cur["span"] != "download":
                self._finish(now_ns, ok=False, why="abandoned")
                cur = None
            if cur is None:
                trace_id, root = os.urandom(16).hex(), os.urandom(8).hex()
                self.db.execute("INSERT INTO spans (trace_id, span_id, parent_id, name, start_ns, "
                                "attrs) VALUES (?, ?, NULL, 'update', ?, ?)",
                                (trace_id, root, now_ns, json.dumps(attrs or {})))
            else:
                trace_id, root = cur["trace_id"], cur["root"]
                self._note_durations("id = ?", (cur["row"],), now_ns)
                self.db.execute("UPDATE spans SET end_ns = ? WHERE id = ?", (now_ns, cur["row"]))
                if attrs:
                    self._merge_attrs(trace_id, root, attrs)
            row = self.db.execute("INSERT INTO spans (trace_id, span_id, parent_id, name, start_ns, "
                                  "attrs) VALUES (?, ?, ?, ?, ?, ?)",
                                  (trace_id, os.urandom(8).hex(), root, name, now_ns,
                                   json.dumps(attrs or {}))).lastrowid
            self._set_meta("trace", json.dumps({"trace_id": trace_id, "root": root, "row": row,
                                                "span": name}))

    def end_trace(self, now_ns: int, *, ok: bool, why: str = "") -> None:
        with self.tx():
            self._finish(now_ns, ok=ok, why=why)

    def _merge_attrs(self, trace_id: str, span_id: str, attrs: dict[str, str]) -> None:
        row = self.db.execute("SELECT attrs FROM spans WHERE trace_id = ? AND span_id = ?",
                              (trace_id, span_id)).fetchone()
        merged = {**json.loads(row[0]), **attrs} if row else attrs
        self.db.execute("UPDATE spans SET attrs = ? WHERE trace_id = ? AND span_id = ?",
                        (json.dumps(merged), trace_id, span_id))

    def _open_trace(self) -> dict[str, Any] | None:
        raw = self._meta("trace")
        doc = json.loads(raw) if raw else None
        return doc if isinstance(doc, dict) and doc else None

    def _finish(self, now_ns: int, *, ok: bool, why: str) -> None:
        cur = self._open_trace()
        if cur is None:
            return
        self._note_durations("trace_id = ? AND end_ns IS NULL", (cur["trace_id"],), now_ns)
        self.db.execute("UPDATE spans SET end_ns = ? WHERE trace_id = ? AND end_ns IS NULL",
                        (now_ns, cur["trace_id"]))
        if not ok:
            self.db.execute("UPDATE spans SET ok = 0 WHERE trace_id = ? AND (span_id = ? OR id = ?)",
                            (cur["trace_id"], cur["root"], cur["row"]))
            if why:
                self._merge_attrs(cur["trace_id"], cur["root"], {"edgeops.outcome": why})
        self.db.execute("UPDATE spans SET done = 1 WHERE trace_id = ?", (cur["trace_id"],))
        self._set_meta("trace", "{}")
        self._trim_spans()

    def _note_durations(self, where: str, args: tuple[Any, ...], end_ns: int) -> None:
        """The spans about to end here, as the last duration of each span name (``update`` is
        the whole update): the one source of the agent's duration series, kept after the
        spans themselves are sent and deleted."""
        rows = self.db.execute(f"SELECT name, start_ns FROM spans WHERE {where}", args).fetchall()
        if rows:
            last = self.durations()
            last.update({str(n): max(0, end_ns - int(s)) / 1e9 for n, s in rows})
            self._set_meta("durations", json.dumps(last, sort_keys=True))

    def durations(self) -> dict[str, float]:
        """Seconds the last finished span of each name took (``update``: the whole update)."""
        raw = self._meta("durations")
        doc = json.loads(raw) if raw else {}
        return {str(k): float(v) for k, v in doc.items()} if isinstance(doc, dict) else {}

    def note_health(self, results: Iterable[tuple[str, bool, float]]) -> None:
        """The last health round: (probe, passed, seconds) per probe."""
        with self.tx():
            self._set_meta("health", json.dumps([[n, bool(ok), float(d)] for n, ok, d in results]))

    def health(self) -> list[tuple[str, bool, float]]:
        raw = self._meta("health")
        doc = json.loads(raw) if raw else []
        return [(str(n), bool(ok), float(d)) for n, ok, d in doc] if isinstance(doc, list) else []

    def _trim_spans(self) -> None:
        n = int(self.db.execute("SELECT COUNT(*) FROM spans WHERE done = 1").fetchone()[0])
        if n > MAX_SPANS:
            gone = self.db.execute("DELETE FROM spans WHERE id IN (SELECT id FROM spans WHERE "
                                   "done = 1 ORDER BY id LIMIT ?)", (n - MAX_SPANS,)).rowcount
            self._count("spans-evicted", gone)

    def add_spans(self, spans: Iterable[tp.Span]) -> None:
        """Spans of finished traces received from elsewhere (a relay's), ready to send on."""
        with self.tx():
            self.db.executemany(
                "INSERT INTO spans (trace_id, span_id, parent_id, name, start_ns, end_ns, attrs, ok, "
                "done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
                [(s.trace_id, s.span_id, s.parent_id, s.name, s.start_ns, s.end_ns,
                  json.dumps(s.attrs), int(s.ok)) for s in spans])
            self._trim_spans()

    def span_batch(self, limit: int = 512) -> tuple[list[int], list[tp.Span]]:
        """Spans of finished traces, oldest first."""
        ids: list[int] = []
        spans: list[tp.Span] = []
        for i, tid, sid, pid, name, start, end, attrs, ok in self.db.execute(
                "SELECT id, trace_id, span_id, parent_id, name, start_ns, end_ns, attrs, ok FROM spans "
                "WHERE done = 1 ORDER BY id LIMIT ?", (limit,)):
            ids.append(int(i))
            spans.append(tp.Span(tid, sid, pid, name, int(start), int(end or start),
                                 {str(k): str(v) for k, v in json.loads(attrs).items()}, bool(ok)))
        return ids, spans

    def ack_spans(self, ids: Sequence[int], now: float) -> None:
        with self.tx():
            self.db.executemany("DELETE FROM spans WHERE id = ?", [(i,) for i in ids])
            self._set_meta("last_trace_send", repr(now))

    def reject_spans(self, ids: Sequence[int]) -> None:
        with self.tx():
            self.db.executemany("DELETE FROM spans WHERE id = ?", [(i,) for i in ids])
            self._count("spans-rejected", len(ids))

    # --- status ---------------------------------------------------------------------------------
    def status(self) -> BufferStatus:
        n, lo, hi = self.db.execute("SELECT COUNT(*), MIN(ts), MAX(ts) FROM samples").fetchone()
        series = self.db.execute("SELECT COUNT(DISTINCT series) FROM samples").fetchone()[0]
        spans = self.db.execute("SELECT COUNT(*) FROM spans WHERE done = 1").fetchone()[0]
        last, last_t = self._meta("last_send"), self._meta("last_trace_send")
        size = sum(p.stat().st_size for p in (self.path, self.path.with_name(self.path.name + "-wal"))
                   if p.exists())
        return BufferStatus(int(n), self.budget.max_samples, int(series), lo, hi, int(spans),
                            float(last) if last else None, float(last_t) if last_t else None,
                            self.dropped(), size)
