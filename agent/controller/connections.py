"""Admit, track and shed connections so the controller never runs out of file descriptors.

Without a cap, idle sockets that never send a request (or send one byte at a time) hold
one descriptor each until the process reaches ``RLIMIT_NOFILE``; from then on ``accept``
fails and no device gets in. ``ConnectionGuard`` counts every accepted connection, from
the moment it is accepted (a TLS connection counts during its handshake too), and keeps
two limits far enough below the file limit that accept never fails:

* ``max_unauthenticated``: connections that have not yet carried an authenticated request.
  Past it, the oldest such connection is closed to make room for the new one: first one
  that never sent a byte, then one with no request in flight, then any. A flood of idle
  sockets therefore churns among its own slots while a device that connects and sends its
  request at once is served;
* ``max_connections``: all connections. The slots above ``max_unauthenticated`` are the
  headroom of devices that are already authenticated (keep-alive, held long-polls). When
  everything is full the oldest idle connection goes; with none idle, the new one is
  refused (closed as soon as it is accepted).

The guard wraps aiohttp's protocol factory in a thin ``asyncio.Protocol`` that forwards
every call, so it needs nothing from aiohttp but its public server objects. Requests mark
their connection busy (``begin``/``end``) and authenticated (``authenticated``) from the
middleware in ``http``. Timeouts that close slow or idle connections are aiohttp's own
(``serve``); this module only bounds how many there can be.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

RESERVE = 64  # descriptors kept for the database, logs, the event loop and worker threads
PER_CONNECTION = 2  # a socket, and a bundle file while one is being sent on it
DEFAULT_BACKLOG = 128  # accept() takes up to this many at once before a closed one is reaped


def file_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` in force (a large number stands for "unlimited")."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def raise_file_limit(target: int = 1 << 16) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards the hard limit, for a server process: systemd's
    default soft limit is 1,024 for the sake of old select() users, and its documentation asks
    programs that need more to raise it themselves. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):  # not allowed: keep the limit we have
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return file_limit()


def connection_cap(nofile: int, backlog: int = DEFAULT_BACKLOG) -> int:
    """The most connections that fit ``nofile`` descriptors with the reserve and one accept batch."""
    return max(8, (nofile - RESERVE - backlog) // PER_CONNECTION)


@dataclass(eq=False)
class _Conn:
    inner: Any  # aiohttp's RequestHandler (an asyncio.Protocol)
    since: float
    transport: asyncio.Transport | None = None
    busy: int = 0  # requests in flight on this connection
    spoke: bool = False  # has sent at least one byte
    trusted: bool = False
    made: bool = False  # the wrapped handler has seen connection_made
    refused: bool = False
    gone: bool = False


@dataclass
class GuardStats:
    open: int
    unauthenticated: int
    evicted: int
    refused: int


@dataclass
class ConnectionGuard:
    max_connections: int
    max_unauthenticated: int
    handshake_timeout: float = 10.0  # a TLS handshake longer than this is aborted by asyncio
    clock: Callable[[], float] = time.monotonic
    _anon: dict[_Conn, None] = field(default_factory=dict)  # in accept order: oldest first
    _trusted: dict[_Conn, None] = field(default_factory=dict)
    _pending: dict[_Conn, None] = field(default_factory=dict)  # accepted, connection_made not yet
    _by_handler: dict[Any, _Conn] = field(default_factory=dict)
    evicted: int = 0
    refused: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.max_unauthenticated <= self.max_connections:
            raise ValueError("need 0 < max_unauthenticated <= max_connections")

    @classmethod
    def for_file_limit(cls, nofile: int, max_connections: int | None = None) -> ConnectionGuard:
        cap = connection_cap(nofile)
        if max_connections is not None:
            cap = max(2, min(cap, max_connections))
        return cls(cap, max(1, cap // 2))

    # --- the protocol factory ----------------------------------------------------------------
    def factory(self, make: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        def new() -> asyncio.Protocol:
            self._prune_pending()
            conn = _Conn(make(), self.clock())
            self._anon[conn] = None
            self._pending[conn] = None
            self._by_handler[conn.inner] = conn
            self._make_room(conn)
            return _Tracked(conn, self)
        return new

    def _make_room(self, new: _Conn) -> None:
        while len(self._anon) > self.max_unauthenticated:
            victim = self._oldest(self._anon, new, idle_only=False)
            if victim is None:
                break
            self._evict(victim)
        while len(self._anon) + len(self._trusted) > self.max_connections:
            victim = (self._oldest(self._anon, new, idle_only=False)
                      or self._oldest(self._trusted, new, idle_only=True))
            if victim is None:
                new.refused = True
                self.refused += 1
                self._forget(new)
                return
            self._evict(victim)

    @staticmethod
    def _oldest(conns: dict[_Conn, None], skip: _Conn, *, idle_only: bool) -> _Conn | None:
        """The connection to shed: the oldest silent one, else the oldest idle, else (unless
        ``idle_only``) the oldest at all. A request that arrived but whose handler has not run
        yet counts as spoken, so a burst of new sockets cannot push it out before it is served."""
        idle = busy = None
        for c in conns:
            if c is skip or c.transport is None:  # a handshake in progress cannot be closed yet
                continue
            if c.busy == 0 and not c.spoke:
                return c
            if c.busy == 0:
                idle = idle or c
            elif busy is None:
                busy = c
        return idle or (None if idle_only else busy)

    def _evict(self, conn: _Conn) -> None:
        self.evicted += 1
        self._forget(conn)
        assert conn.transport is not None
        # abort, not close: close() would wait for a peer that does not read to drain our buffer
        conn.transport.abort()

    def _forget(self, conn: _Conn) -> None:
        conn.gone = True
        self._anon.pop(conn, None)
        self._trusted.pop(conn, None)
        self._pending.pop(conn, None)
        self._by_handler.pop(conn.inner, None)

    def _prune_pending(self) -> None:
        # A failed TLS handshake never reaches connection_made/connection_lost of the wrapped
        # protocol; asyncio aborts it after handshake_timeout, so forget it a little later.
        horizon = self.clock() - self.handshake_timeout - 5.0
        while self._pending:
            conn = next(iter(self._pending))
            if conn.since > horizon:
                break
            self._forget(conn)

    # --- called by _Tracked and by the request middleware -------------------------------------
    def _made(self, conn: _Conn, transport: asyncio.Transport) -> None:
        conn.transport = transport
        self._pending.pop(conn, None)

    def _lost(self, conn: _Conn) -> None:
        self._forget(conn)

    def begin(self, handler: Any) -> None:
        conn = self._by_handler.get(handler)
        if conn is not None:
            conn.busy += 1

    def end(self, handler: Any) -> None:
        conn = self._by_handler.get(handler)
        if conn is not None and conn.busy > 0:
            conn.busy -= 1

    def authenticated(self, handler: Any) -> None:
        """The connection carried an authenticated request: it moves to the headroom."""
        conn = self._by_handler.get(handler)
        if conn is not None and not conn.trusted:
            conn.trusted = True
            self._anon.pop(conn, None)
            self._trusted[conn] = None

    def stats(self) -> GuardStats:
        return GuardStats(len(self._anon) + len(self._trusted), len(self._anon), self.evicted,
                          self.refused)


class _Tracked(asyncio.Protocol):
    """Forwards every protocol call to aiohttp's handler; tells the guard when it comes and goes."""

    __slots__ = ("_conn", "_guard")

    def __init__(self, conn: _Conn, guard: ConnectionGuard) -> None:
        self._conn, self._guard = conn, guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        conn, tcp = self._conn, cast(asyncio.Transport, transport)  # a stream server's transport
        if conn.refused or conn.gone:
            conn.transport = tcp
            tcp.abort()
            return
        self._guard._made(conn, tcp)
        conn.made = True
        conn.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard._lost(self._conn)
        if self._conn.made:
            self._conn.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._conn.made:  # nothing reaches a handler that never saw its connection
            self._conn.spoke = True
            self._conn.inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._conn.inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._conn.inner.pause_writing()

    def resume_writing(self) -> None:
        self._conn.inner.resume_writing()
