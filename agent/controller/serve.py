"""Put a controller application on a socket: in the foreground (the CLI) or in a thread (tests, simulator).

Both ways go through ``start``, so both get the same limits: aiohttp's keep-alive timer
(``Settings.idle_timeout``, which also bounds how long a client may take to send its
headers), a short lingering close, a TLS handshake timeout, and the connection cap of
``connections.ConnectionGuard`` wrapped around aiohttp's protocol factory. ``reuse_port``
(SO_REUSEPORT) is off unless asked for: with it, a second controller on the same port
silently receives part of the devices' connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.controller.app import build_app
from agent.controller.connections import DEFAULT_BACKLOG, ConnectionGuard
from agent.controller.fleet import Fleet
from agent.controller.http import GUARD, SETTINGS, Settings

LINGER = 2.0  # seconds spent reading (and dropping) a body we answered before it was sent
HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS handshake may take


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with the connection guard between the socket and aiohttp's handler."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, guard: ConnectionGuard,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=DEFAULT_BACKLOG)
        self._host, self._port, self._reuse_port, self._guard = host, port, reuse_port, guard

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:  # type: ignore[attr-defined]
            return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.factory(server), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_port=self._reuse_port,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self._ssl_context is not None else None)


async def start(app: web.Application, host: str, port: int, *,
                reuse_port: bool = False) -> tuple[web.AppRunner, GuardedSite]:
    s: Settings = app[SETTINGS]
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=s.idle_timeout,
                           lingering_time=LINGER)
    await runner.setup()
    site = GuardedSite(runner, host, port, guard=app[GUARD], ssl_context=s.ssl_context,
                       reuse_port=reuse_port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


def run(app: web.Application, host: str, port: int, *, reuse_port: bool = False,
        started: Callable[[GuardedSite], None] = lambda site: None) -> None:
    """Serve in the foreground until SIGINT or SIGTERM; raises OSError if the port cannot be had."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        runner, site = loop.run_until_complete(start(app, host, port, reuse_port=reuse_port))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, loop.stop)
        started(site)
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@dataclass
class Running:
    url: str
    thread: threading.Thread
    stop: Callable[[], None]
    app: web.Application | None = None


def serve_in_thread(fleet: Fleet, settings: Settings, host: str = "127.0.0.1", port: int = 0) -> Running:
    """Start the server on its own loop in a thread. ``stop()`` shuts it down cleanly."""
    ready: dict[str, Any] = {}
    started = threading.Event()

    def main() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            app = build_app(fleet, settings)
            runner, site = loop.run_until_complete(start(app, host, port))
        except BaseException as exc:  # reported to the caller, not lost in the thread
            ready["error"] = exc
            started.set()
            loop.close()
            return
        ready.update(url=site.name, loop=loop, app=app)
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    t = threading.Thread(target=main, daemon=True, name="controller")
    t.start()
    if not started.wait(10):
        raise RuntimeError("controller did not start")
    if "error" in ready:
        raise ready["error"]
    loop: asyncio.AbstractEventLoop = ready["loop"]

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)

    return Running(ready["url"], t, stop, ready["app"])
