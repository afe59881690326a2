"""The ``/metrics`` endpoint both exporters serve (the agent's and the gateway's): a page made at each scrape.

Plain ``http.server``, one thread per scrape, 127.0.0.1 unless configured. The serving loop blocks until a
scrape comes (polling for its shutdown twice a second was a fifth of an idle agent's CPU), so ``stop``
wakes it with a connection of its own. A page that cannot be made (``page`` returns None) answers 500:
Prometheus shows the target down and the next scrape tries again. Gzip when asked, at level 1 (level 9
cost more than a county's whole page for 15 % less size: 1.1 s against 0.12 s at 2,000 rooms).
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from examwatch.kernel.config import parse_listen
from examwatch.kernel.exposition import CONTENT_TYPE

Page = Callable[[], bytes | None]  # the page, or None when it cannot be made (its maker logs why)


class _Handler(BaseHTTPRequestHandler):
    server: Server
    timeout = 30  # s: a client that connects and says nothing does not keep its thread

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = self.server.page()
        if body is None:
            self.send_error(500, "scrape failed: see the log")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int, page: Page) -> None:
        self.page = page
        self.address_family = family
        super().__init__(address, _Handler)


def serve(listen: str, page: Page) -> tuple[Server, threading.Thread]:
    """Serve ``page`` on ``host:port``; (server, its thread). End it with ``stop``."""
    host, port = parse_listen(listen)
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server = Server((str(sockaddr[0]), port), family, page)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": None}, name="exporter", daemon=True)
    thread.start()
    return server, thread


def stop(server: ThreadingHTTPServer) -> None:
    """``shutdown`` sets the serving loop's flag and waits for it to see it; a connection of our own wakes
    the loop (blocked without a timeout) until it has."""
    shutting = threading.Thread(target=server.shutdown, daemon=True)
    shutting.start()
    while shutting.is_alive():
        with contextlib.suppress(OSError):
            host, port = server.server_address[:2]
            socket.create_connection((str(host), int(port)), timeout=0.5).close()
        shutting.join(0.05)
    server.server_close()
