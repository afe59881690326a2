"""The gateway's HTTP side: FastAPI (gateway/routes.py, gateway/desk/) on uvicorn, in a thread, within bounds.

The API under /api/v1/ (JSON, for the county office and scripts; OpenAPI at /api/v1/openapi.json):

GET  /api/v1/alarms?state=active|raised|updated|cleared&level=2&site=S&room=R&limit=N
GET  /api/v1/alarms/timeline?id=<alarm id>        every transition with the room's original times
GET  /api/v1/incidents?state=open|closed&site=S&level=N&limit=N
GET  /api/v1/notifications?id=<alarm or incident id>&limit=N   who was told what and when
GET  /api/v1/agents                               last seen, status, clock skew, missing sequence numbers
POST /api/v1/ack   {"alarm"|"incident": id, "who": "...", "note": "..."}   needs "Authorization: Bearer <token>"
GET  /api/v1/ack/link?kind=&id=&exp=&sig=        the signed link in a message: a Chinese form (name, note)
POST /api/v1/ack/link  (form: the same four, who, note)   acknowledges; the signature is the authority

Every request is hostile until checked: parameters are validated by ``parse_query`` (gateway/params.py:
unknown, repeated or out-of-range ones are a 400 with a JSON error); a request's head is checked before h11
parses it (``check_head``: a POST needs a Content-Length within MAX_BODY); and each connection (``_Handler``, uvicorn's
h11 protocol with our bounds) is one of at most MAX_CONNECTIONS (more get a 503), is closed when the client
sends nothing for IDLE_TIMEOUT while its request is incomplete, and is cut after CONNECTION_DEADLINE however
slowly it trickles (the desk's event streams excepted: they are counted and end by themselves). Each refusal
is counted by reason (examwatch_gateway_api_refused_total) and the first of each reason logged.
Each request uses its own SQLite connection (WAL: readers never block the ingest writer).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
import msgspec
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# What clients send is checked in gateway/params.py; its names are the API's too (the tests', the fuzz harness').
from examwatch.gateway.params import (
    MAX_BODY,
    MAX_HEAD,
    BadRequest,
    Forbidden,
    LengthRequired,
    NotFound,
    TooLarge,
    Unauthorized,
    body_reason,
    check_head,
    content_length,
    parse_ack,
    parse_ack_form,
    parse_query,
)
from examwatch.kernel.config import parse_listen

if TYPE_CHECKING:
    from examwatch.gateway.store import Where

log = structlog.get_logger("examwatch.gateway.api")

MAX_CONNECTIONS = 32
IDLE_TIMEOUT = 10.0  # s a read (request line, headers, body) may wait for the client
CONNECTION_DEADLINE = 30.0  # s a connection may last at all, however slowly it trickles

# Why a request was refused, counted in examwatch_gateway_api_refused_total{reason}.
REFUSALS = (
    "bad_query",
    "not_found",
    "unauthorized",
    "forbidden",  # the desk: a session without the role, or without its CSRF token
    "length_required",
    "too_large",
    "bad_body",
    "bad_request",  # not HTTP at all (h11 refused it)
    "timeout",
    "busy",
    "deadline",
    "broken",
    "read_only",  # a province's aggregate gateway takes no acknowledgement, note or close
)


def _raw_answer(status: int, error: str) -> bytes:
    body = msgspec.json.encode({"error": error})
    phrase = {400: "Bad Request", 411: "Length Required", 413: "Content Too Large", 503: "Service Unavailable"}
    return (
        f"HTTP/1.1 {status} {phrase.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


class _Handler(H11Protocol):
    """One client connection: uvicorn's h11 protocol inside the API's bounds (see the module's doc)."""

    api: ApiServer  # set on the subclass each ApiServer makes
    timeout = IDLE_TIMEOUT  # s the client may send nothing while its request is incomplete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._admitted = self.api.admit(self)
        self._head, self._checking, self.streaming = b"", True, False
        self._timers: list[asyncio.TimerHandle] = []
        if not self._admitted:  # answered 503 once its request is in (or after a second), then closed
            self.transport = transport
            self._timers.append(self.loop.call_later(1.0, self._busy))
            return
        # asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP, not on those of a listening
        # socket from socket.create_server: without it an answer's second write waits for the client's
        # delayed ACK (40 ms) on a kept-alive connection
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self.app = self._watch(self.app)
        self._timers = [
            self.loop.call_later(self.timeout, self._idle_out),
            self.loop.call_later(CONNECTION_DEADLINE, self._deadline_out),
        ]

    def connection_lost(self, exc: Exception | None) -> None:
        for t in self._timers:
            t.cancel()
        if self._admitted:
            self.api.release(self)
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return self._busy()
        self._timers[0].cancel()
        self._timers[0] = self.loop.call_later(self.timeout, self._idle_out)
        if self._checking:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end >= 0 or len(self._head) > MAX_HEAD:
                self._checking = False
                try:
                    check_head(self._head[: max(end, 0)])
                except BadRequest as err:
                    return self._answer(err, body_reason(err))
        return super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head, self._checking, self.streaming = b"", True, False

    def send_400_response(self, msg: str) -> None:
        self._answer(BadRequest("malformed HTTP request"), "bad_request")

    def _answer(self, err: BadRequest, reason: str) -> None:
        self.api.refuse(reason, str(err))
        self.transport.write(_raw_answer(err.status, str(err)))
        self.transport.close()

    def _busy(self) -> None:
        if not self.transport.is_closing():
            self.api.refuse("busy", f"{MAX_CONNECTIONS} connections open")
            self.transport.write(_raw_answer(503, "too many requests"))
            self.transport.close()

    def _idle_out(self) -> None:
        if self.conn.their_state is h11.DONE:
            return  # the request is in: the app answers, or streams
        if self.conn.their_state is h11.SEND_BODY:
            self.api.refuse("timeout", "body not sent in time")
        self.transport.close()

    def _deadline_out(self) -> None:
        if self.streaming:
            return  # the desk's event stream: bounded in number, and it ends by itself
        self.api.refuse("deadline", f"connection open over {CONNECTION_DEADLINE:g} s")
        self.transport.close()

    def _watch(self, app: Any) -> Any:
        """The app, telling this connection when its answer is an event stream."""

        async def watched(scope: Any, receive: Any, send: Any) -> None:
            async def sending(message: Any) -> None:
                if message["type"] == "http.response.start":
                    self.streaming = any(
                        k.lower() == b"content-type" and v.startswith(b"text/event-stream")  # "; charset=utf-8"
                        for k, v in message.get("headers", [])
                    )
                await send(message)

            await app(scope, receive, sending)

        return watched


class ApiServer:
    """The gateway's HTTP server: bound at construction (a port in use fails the start), served by ``start``."""

    def __init__(
        self,
        listen: str,
        db_path: Where,
        token: str,
        ack_key: bytes = b"",
        *,
        users: Any = None,
        roster: Any = (),
        secrecy_rooms: Any = (),
        close_incident: Callable[[str, str, str], bool] | None = None,
        records: dict[str, Any] | None = None,
        read_only: bool = False,
    ) -> None:
        from examwatch.gateway import auth, routes

        host, port = parse_listen(listen)
        self.db_path, self.token, self.ack_key = db_path, token, ack_key  # ack_key checks the signed links
        self.auth = auth.Auth(users or [])
        self.close_incident = close_incident  # hands a close to the ingest thread, the incidents' one writer
        self.read_only = read_only  # every state-changing request refused (log-in aside)
        self.records = records or {}  # the records' settings from the config: tz, correlation rules, county
        self.roster, self.secrecy = sorted(roster), frozenset(secrecy_rooms)  # the desk's rooms; 保密室 apart
        self.streams = 0  # the desk's open event streams (at most desk.MAX_STREAMS)
        self.stopping = threading.Event()
        self.refused: Counter[str] = Counter(dict.fromkeys(REFUSALS, 0))  # by reason, for the exporter
        self._logged: set[str] = set()
        self._max = MAX_CONNECTIONS
        self._open: dict[_Handler, float] = {}  # connection -> when it was accepted (monotonic)
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=64)
        self.server_address = self.socket.getsockname()
        self.app = routes.app_for(self)
        handler = type("_Handler", (_Handler,), {"api": self})
        config = uvicorn.Config(
            self.app,
            http=handler,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=3,
            h11_max_incomplete_event_size=MAX_HEAD,
        )
        logging.getLogger("uvicorn.error").setLevel(logging.ERROR)  # refusals are ours to count and log
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.socket]}, name="gateway-api", daemon=True
        )
        self._thread.start()
        return self._thread

    def shutdown(self) -> None:
        """Stop serving (open requests get a few seconds to finish), from any thread."""
        self.stopping.set()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def server_close(self) -> None:
        self.socket.close()

    def refuse(self, reason: str, detail: str) -> None:
        """Count a refused request by reason and log the first of each reason (a flood must not flood the log)."""
        with self._lock:
            self.refused[reason] += 1
            first = reason not in self._logged
            self._logged.add(reason)
        if first:
            log.warning("api_request_refused", reason=reason, detail=detail[:200])

    def connections(self) -> int:
        return len(self._open)

    def admit(self, conn: _Handler) -> bool:
        with self._lock:
            if len(self._open) >= self._max:
                return False
            self._open[conn] = time.monotonic()
            return True

    def release(self, conn: _Handler) -> None:
        with self._lock:
            self._open.pop(conn, None)


__all__ = [
    "MAX_BODY",
    "ApiServer",
    "BadRequest",
    "Forbidden",
    "LengthRequired",
    "NotFound",
    "TooLarge",
    "Unauthorized",
    "content_length",
    "parse_ack",
    "parse_ack_form",
    "parse_query",
]
