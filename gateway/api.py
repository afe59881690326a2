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

Every request is hostile until checked: parameters are validated by ``parse_query`` (unknown, repeated or
out-of-range ones are a 400 with a JSON error); a request's head is checked before h11 parses it
(``check_head``: a POST needs a Content-Length within MAX_BODY); and each connection (``_Handler``, uvicorn's
h11 protocol with our bounds) is one of at most MAX_CONNECTIONS (more get a 503), is closed when the client
sends nothing for IDLE_TIMEOUT while its request is incomplete, and is cut after CONNECTION_DEADLINE however
slowly it trickles (the desk's event streams excepted: they are counted and end by themselves). Each refusal
is counted by reason (examwatch_gateway_api_refused_total) and the first of each reason logged.
Each request uses its own SQLite connection (WAL: readers never block the ingest writer).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any, NamedTuple
from urllib.parse import parse_qs

import h11
import msgspec
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from examwatch.gateway import acklink
from examwatch.kernel.config import parse_listen

log = structlog.get_logger("examwatch.gateway.api")

MAX_BODY = 64 * 1024
MAX_QUERY = 2048  # characters of a query string
MAX_HEAD = 16 * 1024  # bytes of a request line and headers (h11 refuses more)
LIMIT_MAX = 1000  # rows per answer
MAX_CONNECTIONS = 32
IDLE_TIMEOUT = 10.0  # s a read (request line, headers, body) may wait for the client
CONNECTION_DEADLINE = 30.0  # s a connection may last at all, however slowly it trickles

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a site or room id
AGENT = re.compile(r"[A-Za-z0-9_-]{1,64}/[A-Za-z0-9_-]{1,64}")  # a room's agent: <site>/<room>
REPORT_FORMS = ("l1", "first", "followup", "final", "county", "school", "day")  # gateway/records (issue 10)
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
)
ALARM_STATES = ("active", "raised", "updated", "cleared")
INCIDENT_STATES = ("open", "closed")


class BadRequest(ValueError):
    """A request we refuse; ``status`` is the HTTP status, the message is the JSON error shown to the client."""

    status = 400


class NotFound(BadRequest):
    status = 404


class LengthRequired(BadRequest):
    status = 411


class TooLarge(BadRequest):
    status = 413


class Unauthorized(BadRequest):
    status = 401


class Forbidden(BadRequest):
    status = 403


class Param(NamedTuple):
    """A query parameter's check (raises BadRequest) and its JSON schema (for OpenAPI)."""

    check: Callable[[str], object]
    schema: dict[str, object]


def _choice(values: tuple[str, ...]) -> Param:
    def check(v: str) -> str:
        if v not in values:
            raise BadRequest(f"must be one of {', '.join(values)}")
        return v

    return Param(check, {"type": "string", "enum": list(values)})


def _check_name(v: str) -> str:
    if not NAME.fullmatch(v):
        raise BadRequest("must be 1 to 64 letters, digits, '_' or '-'")
    return v


def _int(lo: int, hi: int) -> Param:
    def check(v: str) -> int:
        if not re.fullmatch(r"[0-9]{1,10}", v) or not lo <= int(v) <= hi:
            raise BadRequest(f"must be an integer from {lo} to {hi}")
        return int(v)

    return Param(check, {"type": "integer", "minimum": lo, "maximum": hi})


def _check_id(v: str) -> str:
    if not 1 <= len(v) <= 256 or not v.isprintable():
        raise BadRequest("must be 1 to 256 printable characters")
    return v


def _check_sig(v: str) -> str:
    if not re.fullmatch(f"[0-9a-f]{{{acklink.SIG_CHARS}}}", v):
        raise BadRequest(f"must be {acklink.SIG_CHARS} hex digits")
    return v


def _text(limit: int) -> Param:
    def check(v: str) -> str:
        v = v.strip()
        if len(v) > limit or not all(c.isprintable() or c in "\r\n" for c in v):
            raise BadRequest(f"at most {limit} printable characters")
        return v

    return Param(check, {"type": "string", "maxLength": limit})


def _check_agent(v: str) -> str:
    if not AGENT.fullmatch(v):
        raise BadRequest("must be <site>/<room>")
    return v


def _check_day(v: str) -> str:
    try:
        time.strptime(v, "%Y-%m-%d")
    except ValueError:
        raise BadRequest("must be a date YYYY-MM-DD") from None
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", v):
        raise BadRequest("must be a date YYYY-MM-DD")
    return v


_day = Param(_check_day, {"type": "string", "format": "date"})
_name = Param(_check_name, {"type": "string", "pattern": NAME.pattern})
_id = Param(_check_id, {"type": "string", "minLength": 1, "maxLength": 256})
_sig = Param(_check_sig, {"type": "string", "pattern": f"^[0-9a-f]{{{acklink.SIG_CHARS}}}$"})

# Per endpoint: parameter -> Param, and the defaults of those not given.
ENDPOINTS: dict[str, tuple[dict[str, Param], dict[str, object]]] = {
    "/api/v1/alarms": (
        {
            "state": _choice(ALARM_STATES),
            "level": _int(1, 3),
            "site": _name,
            "room": _name,
            "limit": _int(1, LIMIT_MAX),
        },
        {"state": "", "level": None, "site": "", "room": "", "limit": 500},
    ),
    "/api/v1/alarms/timeline": ({"id": _id}, {}),
    "/api/v1/incidents": (
        {"state": _choice(INCIDENT_STATES), "level": _int(1, 3), "site": _name, "limit": _int(1, LIMIT_MAX)},
        {"state": "", "level": None, "site": "", "limit": 200},
    ),
    "/api/v1/notifications": ({"id": _id, "limit": _int(1, LIMIT_MAX)}, {"limit": 500}),
    "/api/v1/agents": ({}, {}),
}
_LINK = {"kind": _choice(acklink.KINDS), "id": _id, "exp": _int(0, 2**32), "sig": _sig}
ENDPOINTS["/api/v1/ack/link"] = (_LINK, {})
ENDPOINTS["POST /api/v1/ack/link"] = ({**_LINK, "who": _text(64), "note": _text(1000)}, {"note": ""})
# The desk's reads (gateway/desk/)
_agent = Param(_check_agent, {"type": "string", "pattern": AGENT.pattern})
ENDPOINTS["/desk/api/room"] = ({"agent": _agent}, {})
ENDPOINTS["/desk/api/alarm"] = ({"id": _id}, {})
ENDPOINTS["/desk/api/incident"] = ({"id": _id}, {})
ENDPOINTS["/desk/reports"] = (
    {"incident": _id, "day": _day, "form": _choice(REPORT_FORMS), "format": _choice(("pdf", "docx"))},
    {"incident": "", "day": "", "format": "pdf"},
)
REQUIRED = {
    "/desk/api/room": ("agent",),
    "/desk/api/alarm": ("id",),
    "/desk/api/incident": ("id",),
    "/desk/reports": ("form",),
    "/api/v1/alarms/timeline": ("id",),
    "/api/v1/notifications": ("id",),
    "/api/v1/ack/link": tuple(_LINK),
    "POST /api/v1/ack/link": (*_LINK, "who"),
}


def parse_query(path: str, query: str, max_len: int = MAX_QUERY) -> dict[str, object]:
    """The validated parameters of a GET or a form, with defaults; ``BadRequest`` (or ``NotFound``) otherwise. Pure."""
    if path not in ENDPOINTS:
        raise NotFound("no such endpoint")
    if len(query) > max_len:
        raise BadRequest(f"query longer than {max_len} characters")
    try:
        fields = parse_qs(query, keep_blank_values=True, strict_parsing=True, max_num_fields=10, errors="strict")
    except ValueError as err:  # also UnicodeDecodeError
        raise BadRequest(f"malformed query: {str(err)[:80]}") from None
    params, defaults = ENDPOINTS[path]
    out = dict(defaults)
    for key, values in fields.items():
        if key not in params:
            raise BadRequest(f"unknown parameter {key[:40]!r}; this endpoint takes: {', '.join(params) or 'none'}")
        if len(values) > 1:
            raise BadRequest(f"parameter {key} given more than once")
        try:
            out[key] = params[key].check(values[0])
        except BadRequest as err:
            raise BadRequest(f"{key}: {err}") from None
    for key in REQUIRED.get(path, ()):
        if key not in out:
            raise BadRequest(f"{key} is required")
    return out


def openapi_parameters(path: str) -> list[dict[str, object]]:
    """The OpenAPI description of an endpoint's query parameters, from the same table ``parse_query`` checks."""
    params, _ = ENDPOINTS[path]
    required = REQUIRED.get(path, ())
    return [{"name": k, "in": "query", "required": k in required, "schema": p.schema} for k, p in params.items()]


class Ack(msgspec.Struct, forbid_unknown_fields=True):
    who: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    alarm: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    incident: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    note: Annotated[str, msgspec.Meta(max_length=1000)] = ""


def parse_ack(body: bytes) -> tuple[str, str, str, str]:
    """(kind, id, who, note) of an acknowledgement body; ``BadRequest`` otherwise. Pure."""
    try:
        ack = msgspec.json.decode(body, type=Ack)
    except msgspec.DecodeError as err:  # ValidationError too: wrong type, unknown field, too long
        raise BadRequest(f"body: {str(err)[:120]}") from None
    kinds = [k for k in ("alarm", "incident") if getattr(ack, k) is not None]
    if len(kinds) != 1 or not ack.who.strip():
        raise BadRequest("give exactly one of alarm or incident, and who")
    return kinds[0], getattr(ack, kinds[0]), ack.who.strip(), ack.note


def parse_ack_form(body: bytes) -> dict[str, object]:
    """The fields of the signed link's form (checked, signature not yet); ``BadRequest`` otherwise. Pure."""
    try:
        q = parse_query("POST /api/v1/ack/link", body.decode(), MAX_BODY)
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8") from None
    if not q["who"]:
        raise BadRequest("who: required")
    return q


def content_length(value: str | None, chunked: bool) -> int:
    """The body's length from its header: required, digits only, at most MAX_BODY. Pure."""
    if value is None or chunked:
        raise LengthRequired("Content-Length required")
    value = value.strip()
    if not re.fullmatch(r"[0-9]+", value):
        raise BadRequest("Content-Length must be a non-negative integer")
    if len(value) > 9 or int(value) > MAX_BODY:
        raise TooLarge(f"body larger than {MAX_BODY} bytes")
    return int(value)


def check_head(head: bytes) -> None:
    """Check a request's line and headers (up to the blank line) for a body we take: a POST needs a
    Content-Length within MAX_BODY and no chunks; any other request may have none or a bounded one.
    Malformed heads are left to h11. ``BadRequest`` otherwise. Pure."""
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0]
    length: str | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = value if length is None else f"{length},{value}"
        elif name == "transfer-encoding":
            chunked = chunked or "chunked" in value.lower()
    if method == "POST" or length is not None or chunked:
        content_length(length, chunked)


def body_reason(err: BadRequest) -> str:
    return {411: "length_required", 413: "too_large"}.get(err.status, "bad_body")


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
                    self.streaming = (b"content-type", b"text/event-stream") in message.get("headers", [])
                await send(message)

            await app(scope, receive, sending)

        return watched


class ApiServer:
    """The gateway's HTTP server: bound at construction (a port in use fails the start), served by ``start``."""

    def __init__(
        self,
        listen: str,
        db_path: str,
        token: str,
        ack_key: bytes = b"",
        *,
        users: Any = None,
        roster: Any = (),
        secrecy_rooms: Any = (),
        close_incident: Callable[[str, str, str], bool] | None = None,
    ) -> None:
        from examwatch.gateway import auth, routes

        host, port = parse_listen(listen)
        self.db_path, self.token, self.ack_key = db_path, token, ack_key  # ack_key checks the signed links
        self.auth = auth.Auth(users or [])
        self.close_incident = close_incident  # hands a close to the ingest thread, the incidents' one writer
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
