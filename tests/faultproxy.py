"""A fault-injecting TCP proxy on 127.0.0.1 for HTTP tests.

Each accepted connection reads the client's first bytes (the request line), and if it
matches ``match`` takes the next fault from the plan; other connections pass clean. Faults
act on the server-to-client direction, after ``after`` bytes of the response:

    drop      reset the connection (RST)            truncate  close cleanly (FIN)
    stall     send nothing for ``seconds``, then close
    trickle   send ``rate`` bytes/s for ``seconds``, then close
    http503   answer 503 at once, never contacting the upstream

Bounded in count (the plan is finite) and time (every stall/trickle has ``seconds``).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

MAX_FAULT_SECONDS = 10.0


@dataclass
class Fault:
    kind: str  # drop | truncate | stall | trickle | http503
    after: int = 0
    seconds: float = 0.0
    rate: int = 0


@dataclass
class FaultProxy:
    upstream: tuple[str, int]
    plan: list[Fault] = field(default_factory=list)
    match: bytes = b""
    applied: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _next_fault(self, head: bytes) -> Fault | None:
        first_line = head.split(b"\r\n", 1)[0]
        with self._lock:
            if self.plan and self.match in first_line:
                f = self.plan.pop(0)
                self.applied.append(f.kind)
                return f
        return None

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            client.settimeout(5)
            try:
                head = client.recv(65536)
            except OSError:
                return
            fault = self._next_fault(head)
            if fault is not None and fault.kind == "http503":
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                return
            stack.enter_context(up)
            up.sendall(head)
            threading.Thread(target=_pump, args=(client, up), daemon=True).start()
            self._relay(up, client, fault)
            # close() alone does not end a connection another thread is blocked reading:
            # shutdown wakes the pump and sends the FIN (or, after SO_LINGER 0, the RST).
            for s in (client, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _relay(self, up: socket.socket, client: socket.socket, fault: Fault | None) -> None:
        sent = 0
        while True:
            try:
                data = up.recv(16384)
            except OSError:
                data = b""
            if not data:
                return
            if fault is not None and sent + len(data) > fault.after:
                cut = max(0, fault.after - sent)
                with contextlib.suppress(OSError):
                    client.sendall(data[:cut])
                self._apply(fault, client, data[cut:], up)
                return
            try:
                client.sendall(data)
            except OSError:
                return
            sent += len(data)

    def _apply(self, fault: Fault, client: socket.socket, rest: bytes, up: socket.socket) -> None:
        seconds = min(fault.seconds, MAX_FAULT_SECONDS)
        if fault.kind == "drop":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif fault.kind == "stall":
            self._stop.wait(seconds)
        elif fault.kind == "trickle":
            end = time.monotonic() + seconds
            buf = rest
            while time.monotonic() < end and not self._stop.is_set():
                if not buf:
                    try:
                        buf = up.recv(16384)
                    except OSError:
                        return
                    if not buf:
                        return
                step = max(1, fault.rate // 10)
                try:
                    client.sendall(buf[:step])
                except OSError:
                    return
                buf = buf[step:]
                time.sleep(0.1)
        # truncate: just return; the with-block closes both sockets (FIN)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    while True:
        try:
            data = src.recv(65536)
            if not data:
                return
            dst.sendall(data)
        except OSError:
            return
