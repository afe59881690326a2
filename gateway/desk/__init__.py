"""The duty desk (值班台): a Chinese web page at / and /desk for the people on duty, and its routes.

Reads (the page, the site's state as server-sent events, a room, an alarm, an incident) need a session;
every state-changing request (acknowledge, note, close, log-out) needs the session, its CSRF token in the
X-CSRF-Token header, and the role (gateway/auth.py). The page is plain HTML, CSS and JavaScript shipped
in this package: nothing is fetched from the internet.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from importlib import resources
from typing import Annotated, Any, Literal
from urllib.parse import quote

import msgspec
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from examwatch.gateway import auth, duty, store
from examwatch.gateway.desk import views
from examwatch.gateway.params import BadRequest, Forbidden, NotFound, Unauthorized
from examwatch.gateway.routes import body, query, read, server, write

log = structlog.get_logger("examwatch.gateway.desk")
router = APIRouter(include_in_schema=False)

MAX_STREAMS = 16  # open event streams at once (each polls the database twice a second)
STREAM_SECONDS = 600.0  # a stream then ends and the page's EventSource opens a new one (the session is checked)
POLL = 0.5  # s between looks at the database for a change
STATIC = {"desk.css": "text/css", "desk.js": "text/javascript"}
PAGE_HEADERS = {
    # only our own files; inline SVG is markup, not script
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
Text = Annotated[str, msgspec.Meta(max_length=1000)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Login(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Ack(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["alarm", "incident"]
    id: Id
    who: Annotated[str, msgspec.Meta(max_length=64)] = ""  # who took it, when not the logged-in user
    note: Text = ""


class Note(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["alarm", "incident"]
    id: Id
    category: Literal["cause", "measure", "spare", "result", "summary"]  # 原因 措施 备件 结果 总结
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]


class Close(msgspec.Struct, forbid_unknown_fields=True):
    id: Id
    note: Text = ""


def parse_body(data: bytes, kind: type[Any]) -> Any:
    """A desk request's JSON body as ``kind``; BadRequest otherwise. Pure."""
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as err:
        raise BadRequest(f"body: {str(err)[:120]}") from None


def session(request: Request) -> auth.Session:
    s = server(request).auth.session(request.cookies.get(auth.COOKIE), time.time())
    if s is None:
        raise Unauthorized("请先登录")
    return s


def allowed(request: Request, action: str | None) -> auth.Session:
    """The session of a state-changing request that carries its CSRF token and whose role may ``action``."""
    s = session(request)
    if not auth.csrf_ok(s, request.headers.get("X-CSRF-Token")):
        raise Forbidden("缺少或错误的 CSRF 令牌，请刷新页面")
    if action is not None and not auth.may(s, action):
        raise Forbidden(f"{s.user}（{s.role}）无此权限")
    return s


def _static(name: str) -> bytes:
    return resources.files("examwatch.gateway.desk").joinpath(name).read_bytes()


@router.get("/")
@router.get("/desk")
def page() -> Response:
    return Response(_static("desk.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/desk/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound("no such endpoint")
    return Response(_static(name), media_type=f"{STATIC[name]}; charset=utf-8", headers={"Cache-Control": "no-cache"})


@router.post("/desk/login")
async def login(request: Request) -> Response:
    """``{"name", "password"}`` -> the session cookie and its CSRF token; 401 wrong, 429 too many tries."""
    srv = server(request)
    if not request.headers.get("Content-Type", "").startswith("application/json"):  # no cross-site form can send it
        raise BadRequest("Content-Type must be application/json")
    creds = parse_body(await body(request), Login)
    try:
        got = await run_in_threadpool(srv.auth.login, creds.name, creds.password, time.time())
    except auth.RateLimited:
        srv.refuse("unauthorized", "log-in rate-limited")
        log.warning("desk_login_limited", user=creds.name[:64])
        return JSONResponse({"error": "登录失败次数过多，请稍后再试"}, 429)
    if got is None:
        srv.refuse("unauthorized", "wrong user name or password")
        log.info("desk_login_failed", user=creds.name[:64])
        return JSONResponse({"error": "用户名或密码错误"}, 401)
    sid, s = got
    log.info("desk_login", user=s.user, role=s.role)
    answer = JSONResponse({"user": s.user, "role": s.role, "csrf": s.csrf})
    answer.set_cookie(auth.COOKIE, sid, max_age=int(auth.SESSION_SECONDS), httponly=True, samesite="strict", path="/")
    return answer


@router.get("/desk/session")
def whoami(request: Request) -> dict[str, Any]:
    s = session(request)
    return {"user": s.user, "role": s.role, "csrf": s.csrf}


@router.post("/desk/logout")
def logout(request: Request) -> Response:
    allowed(request, None)
    server(request).auth.logout(request.cookies.get(auth.COOKIE))
    answer = JSONResponse({"ok": True})
    answer.delete_cookie(auth.COOKIE, path="/")
    return answer


@router.get("/desk/events")
async def events(request: Request) -> Response:
    """The desk's state as server-sent events: at once, on every change of the database, and every 15 s."""
    srv, sid = server(request), request.cookies.get(auth.COOKIE)
    session(request)
    if srv.streams >= MAX_STREAMS:
        srv.refuse("busy", f"{MAX_STREAMS} desk streams open")
        return JSONResponse({"error": "too many desk streams"}, 503)
    return StreamingResponse(
        _stream(request, sid), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


async def _stream(request: Request, sid: str | None) -> Any:
    srv = server(request)
    # SQLite's change mark (data_version) is a connection's own: a stream keeps its connection (a file, no pool).
    # PostgreSQL's is the server's: a stream borrows a pooled connection for each look only, never for its ten
    # minutes (sixteen streams would hold sixteen of the pool's twenty while the API and the ingest wait).
    held = None if isinstance(srv.db_path, store.Postgres) else store.connect(srv.db_path, readonly=True)

    def look(version: object, due: bool) -> tuple[object, dict[str, Any] | None]:
        """The change mark, and the desk's state if it changed (or a refresh is ``due``)."""
        conn = held if held is not None else store.connect(srv.db_path, readonly=True)
        try:
            mark = store.change_mark(conn)
            if mark == version and not due:
                return mark, None
            return mark, views.state(conn, srv.roster, srv.secrecy, time.time())
        finally:
            if conn is not held:
                conn.close()

    srv.streams += 1  # counted once running: a stream whose client left before it started never runs its finally
    try:
        yield "retry: 2000\n\n"
        version, last, sent, started = None, None, 0.0, time.monotonic()
        while not srv.stopping.is_set() and time.monotonic() - started < STREAM_SECONDS:
            if srv.auth.session(sid, time.time()) is None:
                break  # logged out or expired (a client that left is cancelled by Starlette)
            # off the event loop: a round trip on PostgreSQL (and a wait for the pool when it is busy)
            version, state = await run_in_threadpool(look, version, time.monotonic() - sent > 15)
            if state is not None:
                shown = {k: v for k, v in state.items() if k != "now"}
                if shown != last or time.monotonic() - sent > 15:  # most commits are readings: nothing to show
                    last, sent = shown, time.monotonic()
                    yield f"event: state\ndata: {json.dumps(state, ensure_ascii=False)}\n\n"
            await asyncio.sleep(POLL)
    finally:
        if held is not None:
            held.close()
        srv.streams -= 1


@router.get("/desk/api/room")
def room(request: Request) -> dict[str, Any]:
    session(request)
    return read(server(request).db_path, views.room, query(request)["agent"])


@router.get("/desk/api/alarm")
def alarm(request: Request) -> dict[str, Any]:
    session(request)
    got = read(server(request).db_path, views.alarm, query(request)["id"])
    if got is None:
        raise NotFound("没有这条告警")
    return got


@router.get("/desk/api/incident")
def incident(request: Request) -> dict[str, Any]:
    session(request)
    got = read(server(request).db_path, views.incident, query(request)["id"], time.time())
    if got is None:
        raise NotFound("没有这个事件")
    return got


def _who(s: auth.Session, given: str) -> str:
    """The name on the record: the user, or whoever the user says took it (with the user, for the trail)."""
    given = given.strip()
    return s.user if not given or given == s.user else f"{given}（{s.user}）"


@router.post("/desk/api/ack")
async def ack(request: Request) -> dict[str, Any]:
    s = allowed(request, "ack")
    a = parse_body(await body(request), Ack)
    who, table = _who(s, a.who), "alarms" if a.kind == "alarm" else "incidents"
    if not await run_in_threadpool(
        write, server(request).db_path, store.acknowledge, table, a.id, who, a.note.strip(), time.time()
    ):
        raise NotFound(f"no such {a.kind}")
    log.info("acknowledged", kind=a.kind, id=a.id, who=who, via="desk")
    return {"ok": True, "who": who}


@router.post("/desk/api/note")
async def note(request: Request) -> dict[str, Any]:
    s = allowed(request, "note")
    n = parse_body(await body(request), Note)
    args = (n.kind, n.id, s.user, n.category, n.text.strip(), time.time())
    if not await run_in_threadpool(write, server(request).db_path, store.add_note, *args):
        raise NotFound(f"no such {n.kind}")
    log.info("note_added", kind=n.kind, id=n.id, who=s.user, category=n.category)
    return {"ok": True}


@router.post("/desk/api/close")
async def close(request: Request) -> Response:
    s = allowed(request, "close")
    c = parse_body(await body(request), Close)
    srv = server(request)
    if srv.close_incident is None:
        return JSONResponse({"error": "本网关不能关闭事件"}, 503)
    try:
        closed = await run_in_threadpool(srv.close_incident, c.id, s.user, c.note.strip())
    except TimeoutError:
        return JSONResponse({"error": "网关繁忙，请稍后再试"}, 503)
    except duty.NotLeading:
        return JSONResponse({"error": "本网关为备用副本，请在主网关上关闭事件"}, 503)
    if not closed:
        raise NotFound("没有这个未关闭的事件")
    log.info("incident_closed_by_hand", id=c.id, who=s.user)
    return JSONResponse({"ok": True})


@router.get("/desk/reports")
async def report(request: Request) -> Response:
    """A record form as PDF or DOCX, rendered and stored by examwatch.gateway.records (when installed)."""
    s = session(request)
    q = query(request)
    if not auth.may(s, "report"):  # a GET (a link): SameSite=Strict keeps other sites' requests without the cookie
        raise Forbidden(f"{s.user}（{s.role}）无此权限")
    if bool(q["incident"]) == bool(q["day"]):
        raise BadRequest("give incident or day")
    records = importlib.import_module("examwatch.gateway.records")  # on the first report: not at the gateway's start
    srv = server(request)
    args = {"form": q["form"], "incident": q["incident"] or None, "day": q["day"] or None, "fmt": q["format"]}
    try:
        name, content_type, data = await run_in_threadpool(
            write, srv.db_path, lambda conn: records.render_and_store(conn, **args, **srv.records, who=s.user)
        )
    except ValueError as err:  # records.RecordError: a message for people (no such incident, ...)
        raise BadRequest(str(err)) from None
    disposition = f"attachment; filename*=UTF-8''{quote(name)}"
    return Response(data, media_type=content_type, headers={"Content-Disposition": disposition})
