"""The gateway's HTTP API under /api/v1/ (JSON), for the county office and scripts.

GET  /api/v1/alarms?state=active|raised|updated|cleared&level=2&site=S&room=R&limit=N
GET  /api/v1/alarms/timeline?id=<alarm id>        every transition with the room's original times
GET  /api/v1/incidents?state=open|closed&site=S&level=N&limit=N
GET  /api/v1/notifications?id=<alarm or incident id>&limit=N   who was told what and when: each message
                                                  with its channel, escalations, acknowledgements
GET  /api/v1/agents                               last seen, status, clock skew, missing sequence numbers
POST /api/v1/ack   {"alarm"|"incident": id, "who": "...", "note": "..."}   needs "Authorization: Bearer <token>"
GET  /api/v1/ack/link?kind=&id=&exp=&sig=        the signed link in a message: a Chinese form (name, note)
POST /api/v1/ack/link  (form: the same four, who, note)   acknowledges; the signature is the authority

Every request is hostile until checked: parameters are validated by ``parse_query`` (unknown, repeated or
out-of-range ones are a 400 with a JSON error), a body needs a Content-Length within MAX_BODY, and the
server bounds what clients can hold: MAX_CONNECTIONS at once (more get a 503), IDLE_TIMEOUT per read, and
CONNECTION_DEADLINE for a whole connection, so slow or idle sockets cannot take every thread.
Each request uses its own SQLite connection (WAL: readers never block the ingest writer).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import structlog

from examwatch.gateway import acklink, store
from examwatch.gateway.notify import outbox
from examwatch.kernel.config import parse_listen

log = structlog.get_logger("examwatch.gateway.api")

MAX_BODY = 64 * 1024
MAX_QUERY = 2048  # characters of a query string
LIMIT_MAX = 1000  # rows per answer
MAX_CONNECTIONS = 32
IDLE_TIMEOUT = 10.0  # s a read (request line, headers, body) may wait for the client
CONNECTION_DEADLINE = 30.0  # s a connection may last at all, however slowly it trickles

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a site or room id
# Why a request was refused, counted in examwatch_gateway_api_refused_total{reason}.
REFUSALS = (
    "bad_query",
    "not_found",
    "unauthorized",
    "length_required",
    "too_large",
    "bad_body",
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


def _choice(values: tuple[str, ...]) -> Any:
    def check(v: str) -> str:
        if v not in values:
            raise BadRequest(f"must be one of {', '.join(values)}")
        return v

    return check


def _name(v: str) -> str:
    if not NAME.fullmatch(v):
        raise BadRequest("must be 1 to 64 letters, digits, '_' or '-'")
    return v


def _int(lo: int, hi: int) -> Any:
    def check(v: str) -> int:
        if not re.fullmatch(r"[0-9]{1,10}", v) or not lo <= int(v) <= hi:
            raise BadRequest(f"must be an integer from {lo} to {hi}")
        return int(v)

    return check


def _alarm_id(v: str) -> str:
    if not 1 <= len(v) <= 256 or not v.isprintable():
        raise BadRequest("must be 1 to 256 printable characters")
    return v


def _sig(v: str) -> str:
    if not re.fullmatch(f"[0-9a-f]{{{acklink.SIG_CHARS}}}", v):
        raise BadRequest(f"must be {acklink.SIG_CHARS} hex digits")
    return v


def _text(limit: int) -> Any:
    def check(v: str) -> str:
        v = v.strip()
        if len(v) > limit or not all(c.isprintable() or c in "\r\n" for c in v):
            raise BadRequest(f"at most {limit} printable characters")
        return v

    return check


# Per endpoint: parameter -> validator, and the defaults of those not given.
ENDPOINTS: dict[str, tuple[dict[str, Any], dict[str, object]]] = {
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
    "/api/v1/alarms/timeline": ({"id": _alarm_id}, {}),
    "/api/v1/incidents": (
        {"state": _choice(INCIDENT_STATES), "level": _int(1, 3), "site": _name, "limit": _int(1, LIMIT_MAX)},
        {"state": "", "level": None, "site": "", "limit": 200},
    ),
    "/api/v1/notifications": ({"id": _alarm_id, "limit": _int(1, LIMIT_MAX)}, {"limit": 500}),
    "/api/v1/agents": ({}, {}),
}
_LINK = {"kind": _choice(acklink.KINDS), "id": _alarm_id, "exp": _int(0, 2**32), "sig": _sig}
ENDPOINTS["/api/v1/ack/link"] = (_LINK, {})
ENDPOINTS["POST /api/v1/ack/link"] = ({**_LINK, "who": _text(64), "note": _text(1000)}, {"note": ""})
REQUIRED = {
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
    validators, defaults = ENDPOINTS[path]
    out = dict(defaults)
    for key, values in fields.items():
        if key not in validators:
            raise BadRequest(f"unknown parameter {key[:40]!r}; this endpoint takes: {', '.join(validators) or 'none'}")
        if len(values) > 1:
            raise BadRequest(f"parameter {key} given more than once")
        try:
            out[key] = validators[key](values[0])
        except BadRequest as err:
            raise BadRequest(f"{key}: {err}") from None
    for key in REQUIRED.get(path, ()):
        if key not in out:
            raise BadRequest(f"{key} is required")
    return out


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
        raise _LengthRequired("Content-Length required")
    value = value.strip()
    if not re.fullmatch(r"[0-9]+", value):
        raise BadRequest("Content-Length must be a non-negative integer")
    if len(value) > 9 or int(value) > MAX_BODY:
        raise _TooLarge(f"body larger than {MAX_BODY} bytes")
    return int(value)


class _LengthRequired(BadRequest):
    status = 411


class _TooLarge(BadRequest):
    status = 413


class _Unauthorized(BadRequest):
    status = 401


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, listen: str, db_path: store.Where, token: str, ack_key: bytes = b"") -> None:
        host, port = parse_listen(listen)
        self.ack_key = ack_key  # checks the signed acknowledgement links (acklink)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.db_path = db_path
        self.token = token
        self.refused: Counter[str] = Counter(dict.fromkeys(REFUSALS, 0))  # by reason, for the exporter
        self._logged: set[str] = set()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: dict[socket.socket, float] = {}  # connection -> when it was accepted (monotonic)
        self._open_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="gateway-api", daemon=True)
        t.start()
        threading.Thread(target=self._reap, name="gateway-api-reaper", daemon=True).start()
        return t

    def refuse(self, reason: str, detail: str) -> None:
        """Count a refused request by reason and log the first of each reason (a flood must not flood the log)."""
        self.refused[reason] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("api_request_refused", reason=reason, detail=detail[:200])

    def connections(self) -> int:
        with self._open_lock:
            return len(self._open)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refuse("busy", f"{MAX_CONNECTIONS} connections open")
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 30\r\nConnection: close\r\n\r\n{"error": "too many requests"}'
                )
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        self._slots.release()

    def _reap(self) -> None:
        """Cut connections past CONNECTION_DEADLINE: their thread then sees the socket closed and ends."""
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self._open_lock:
                late = [s for s, since in self._open.items() if now - since > CONNECTION_DEADLINE]
            for s in late:
                self.refuse("deadline", f"connection open over {CONNECTION_DEADLINE:g} s")
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke mid-request (reset, timed out): counted, logged once, no traceback on stderr."""
        self.refuse("broken", repr(sys.exc_info()[1]))


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    timeout = IDLE_TIMEOUT  # socket timeout for every read from the client

    def log_message(self, format: str, *args: Any) -> None:
        pass  # access logs are not ours to keep; refusals are counted and logged by the server

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_html(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", "default-src 'none'; form-action 'self'")
        self.send_header("Referrer-Policy", "no-referrer")  # the link is a credential
        self.end_headers()
        self.wfile.write(data)

    def _link(self, q: dict[str, Any]) -> bool:
        """Whether the signed link holds; a refusal page (403) sent when not."""
        try:
            acklink.check(self.server.ack_key, q["kind"], q["id"], q["exp"], q["sig"], time.time())
        except acklink.LinkError as err:
            self.server.refuse("unauthorized", str(err))
            self._send_html(403, acklink.page("无法确认", str(err)))
            return False
        return True

    def _refuse(self, err: BadRequest, reason: str) -> None:
        self.server.refuse(reason, str(err))
        self.close_connection = True  # an unread body must not be taken for the next request
        self._send(err.status, {"error": str(err)})

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        try:
            q = parse_query(url.path, url.query)
        except BadRequest as err:
            return self._refuse(err, "not_found" if isinstance(err, NotFound) else "bad_query")
        if url.path == "/api/v1/ack/link":
            if self._link(q):
                self._send_html(200, acklink.form(q))
            return None
        conn = store.connect(self.server.db_path, readonly=True)
        try:
            if url.path == "/api/v1/alarms":
                return self._send(200, {"alarms": store.alarms(conn, **q)})  # type: ignore[arg-type]
            if url.path == "/api/v1/alarms/timeline":
                return self._send(200, {"id": q["id"], "timeline": store.alarm_timeline(conn, str(q["id"]))})
            if url.path == "/api/v1/incidents":
                return self._send(200, {"incidents": store.incidents(conn, **q)})  # type: ignore[arg-type]
            if url.path == "/api/v1/notifications":
                done = outbox.notifications(conn, str(q["id"]), int(q["limit"]))  # type: ignore[call-overload]
                return self._send(200, {"id": q["id"], **done})
            return self._send(200, {"agents": store.agents(conn)})
        finally:
            conn.close()

    def do_POST(self) -> None:
        if urlsplit(self.path).path == "/api/v1/ack/link":
            return self._ack_link()
        if urlsplit(self.path).path != "/api/v1/ack":
            return self._refuse(NotFound("no such endpoint"), "not_found")
        if not self._authorised():
            return self._refuse(
                _Unauthorized("acknowledgement needs a valid token (Authorization: Bearer <token>)"), "unauthorized"
            )
        parsed = self._body(parse_ack)
        if parsed is None:
            return None
        kind, item, who, note = parsed
        if not self._acknowledge(kind, item, who, note):
            return self._send(404, {"error": f"no such {kind}"})
        log.info("acknowledged", kind=kind, id=item, who=who)
        return self._send(200, {"ok": True, kind: item, "who": who})

    def _body(self, parse: Any) -> Any:
        """``parse`` of the request's body, read within its bounds; None when refused (the answer is sent)."""
        try:
            length = content_length(
                self.headers.get("Content-Length"), "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            )
            body = self.rfile.read(length)
            if len(body) != length:
                raise BadRequest("body shorter than Content-Length")
            return parse(body)
        except TimeoutError:
            self.server.refuse("timeout", "body not sent in time")
            self.close_connection = True
        except BadRequest as err:
            self._refuse(err, {411: "length_required", 413: "too_large"}.get(err.status, "bad_body"))
        return None

    def _acknowledge(self, kind: str, item: str, who: str, note: str) -> bool:
        conn = store.connect(self.server.db_path)
        try:
            return store.acknowledge(conn, "alarms" if kind == "alarm" else "incidents", item, who, note, time.time())
        finally:
            conn.close()

    def _ack_link(self) -> None:
        """The form of a signed link: no token, the link's signature is the authority (and the CSRF defence)."""
        q = self._body(parse_ack_form)
        if q is None or not self._link(q):
            return None
        kind, item, who, note = str(q["kind"]), str(q["id"]), str(q["who"]), str(q["note"])
        if not self._acknowledge(kind, item, who, note):
            return self._send_html(404, acklink.page("无法确认", f"没有编号为 {item} 的记录"))
        log.info("acknowledged", kind=kind, id=item, who=who, via="link")
        return self._send_html(
            200, acklink.page("已确认", f"{who} 已确认 {item}。升级提醒已停止，确认信息已通知各群。")
        )

    def _authorised(self) -> bool:
        """Bearer only, compared in constant time; no token configured: nobody may acknowledge."""
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        token = self.server.token
        return (
            bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
        )
