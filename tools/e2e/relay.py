"""One guest connection to one host port: QEMU's guestfwd runs this per connection.

QEMU (``guestfwd=tcp:10.0.2.100:8080-cmd:...``) gives the guest's TCP connection to this
process as its stdin and stdout; it connects to HOST:PORT (the host's 127.0.0.1 only) and
copies bytes both ways until either side closes. Standard library only.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    if host != "127.0.0.1":
        print("relay: only the host's loopback is reachable from the guest", file=sys.stderr)
        return 2
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError:
        return 1
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "guest")
    sel.register(sock, selectors.EVENT_READ, "host")
    open_ends = 2
    while open_ends:
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(0, 65536)
                if not data:
                    sel.unregister(0)
                    sock.shutdown(socket.SHUT_WR)
                    open_ends -= 1
                else:
                    sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return 0  # the host closed: so does the guest's connection, with us
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(1, view):]
    return 0


if __name__ == "__main__":
    sys.exit(main())
