"""Run a controller on its own event loop in a thread: for the fleet simulator, the demo and benchmarks.

``edgeops controller serve`` runs the same application in the foreground (``web.run_app``);
this is for a caller that needs the controller beside itself in one process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.controller.app import build_app
from agent.controller.fleet import Fleet
from agent.controller.http import Settings


@dataclass
class Running:
    url: str
    thread: threading.Thread
    stop: Callable[[], None]


def serve_in_thread(fleet: Fleet, settings: Settings, host: str = "127.0.0.1", port: int = 0) -> Running:
    """Start the server on its own loop in a thread. ``stop()`` shuts it down cleanly."""
    ready: dict[str, Any] = {}
    started = threading.Event()

    def main() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(build_app(fleet, settings), access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, host, port, ssl_context=settings.ssl_context)
        loop.run_until_complete(site.start())
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        scheme = "https" if settings.ssl_context is not None else "http"
        ready["url"] = f"{scheme}://{host}:{sock.getsockname()[1]}"
        ready["loop"] = loop
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    t = threading.Thread(target=main, daemon=True, name="controller")
    t.start()
    if not started.wait(10):
        raise RuntimeError("controller did not start")
    loop: asyncio.AbstractEventLoop = ready["loop"]

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)

    return Running(ready["url"], t, stop)
