"""The /api/v1 routes on FastAPI (the contract is gateway/api.py's doc) and the app that serves them and the desk.

Parameters are checked by ``api.parse_query`` against the raw query (so an unknown, repeated or malformed
one is refused the same way everywhere); OpenAPI describes them from the same table. Errors are JSON
``{"error": "..."}``, counted by reason in the server's ``refused``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from examwatch.gateway import acklink, store
from examwatch.gateway.notify import outbox
from examwatch.gateway.params import (
    MAX_BODY,
    BadRequest,
    NotFound,
    ReadOnly,
    TooLarge,
    Unauthorized,
    body_reason,
    openapi_parameters,
    parse_ack,
    parse_ack_form,
    parse_query,
)

SESSION_PATHS = ("/desk/login", "/desk/logout")  # a read-only gateway's desk still has its viewers log in

if TYPE_CHECKING:
    from examwatch.gateway.api import ApiServer

log = structlog.get_logger("examwatch.gateway.api")


def server(request: Request) -> ApiServer:
    return request.app.state.server


def query(request: Request, path: str = "") -> dict[str, Any]:
    """The request's parameters checked against ``path``'s (default: its own) table; BadRequest otherwise."""
    return parse_query(path or request.url.path, request.scope["query_string"].decode("latin-1"))


async def body(request: Request) -> bytes:
    """The request's body, at most MAX_BODY (the head was checked before: this bounds what slips past it)."""
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise TooLarge(f"body larger than {MAX_BODY} bytes")
    return data


def read(db_path: store.Where, fn: Any, *args: Any, **kwargs: Any) -> Any:
    conn = store.connect(db_path, readonly=True)
    try:
        return fn(conn, *args, **kwargs)
    finally:
        conn.close()


def write(db_path: store.Where, fn: Any, *args: Any) -> Any:
    conn = store.connect(db_path)
    try:
        return fn(conn, *args)
    finally:
        conn.close()


def _doc(path: str) -> dict[str, Any]:
    return {"openapi_extra": {"parameters": openapi_parameters(path)}}


def app_for(srv: ApiServer) -> FastAPI:
    from examwatch.gateway import desk

    def writable(request: Request) -> None:
        if srv.read_only and request.method != "GET" and request.url.path not in SESSION_PATHS:
            raise ReadOnly("read-only: acknowledge on the county's gateway")

    app = FastAPI(
        dependencies=[Depends(writable)],
        title="examwatch gateway",
        version="1",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # the interactive pages load scripts from a CDN: the gateway works offline
        redoc_url=None,
    )
    app.state.server = srv

    @app.exception_handler(BadRequest)
    async def refused(request: Request, err: BadRequest) -> Response:
        reason = (
            "read_only"
            if isinstance(err, ReadOnly)
            else {404: "not_found", 401: "unauthorized", 403: "forbidden"}.get(err.status)
        )
        if reason is None:
            reason = "bad_query" if request.method == "GET" else body_reason(err)
        srv.refuse(reason, str(err))
        return JSONResponse({"error": str(err)}, err.status, headers={"Connection": "close"})

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, err: HTTPException) -> Response:
        if err.status_code in (404, 405):  # a method an endpoint does not take is no endpoint either
            return await refused(request, NotFound("no such endpoint"))
        return JSONResponse({"error": str(err.detail)}, err.status_code)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=400)  # nobody is left to read it

    app.include_router(_api(srv))
    app.include_router(desk.router)
    return app


def _api(srv: ApiServer) -> Any:
    from fastapi import APIRouter

    r = APIRouter()
    db = srv.db_path

    @r.get("/api/v1/alarms", **_doc("/api/v1/alarms"))
    def alarms(request: Request) -> dict[str, Any]:
        """Alarms, newest raise first."""
        return {"alarms": read(db, store.alarms, **query(request))}

    @r.get("/api/v1/alarms/timeline", **_doc("/api/v1/alarms/timeline"))
    def alarm_timeline(request: Request) -> dict[str, Any]:
        """Every transition of one alarm, with the room's original times."""
        q = query(request)
        return {"id": q["id"], "timeline": read(db, store.alarm_timeline, q["id"])}

    @r.get("/api/v1/incidents", **_doc("/api/v1/incidents"))
    def incidents(request: Request) -> dict[str, Any]:
        """Incidents (several rooms, or the site), newest first, each with its timeline."""
        return {"incidents": read(db, store.incidents, **query(request))}

    @r.get("/api/v1/notifications", **_doc("/api/v1/notifications"))
    def notifications(request: Request) -> dict[str, Any]:
        """Who was told what and when about an alarm or incident: messages, escalations, acknowledgements."""
        q = query(request)
        return {"id": q["id"], **read(db, outbox.notifications, q["id"], q["limit"])}

    @r.get("/api/v1/agents", **_doc("/api/v1/agents"))
    def agents(request: Request) -> dict[str, Any]:
        """The rooms' agents: last seen, status, clock skew, missing sequence numbers."""
        query(request)
        return {"agents": read(db, store.agents)}

    @r.post("/api/v1/ack")
    async def ack(request: Request) -> Response:
        """Acknowledge an alarm or incident: ``{"alarm"|"incident": id, "who": ..., "note": ...}``, bearer token."""
        if not authorised(srv.token, request.headers.get("Authorization", "")):
            raise Unauthorized("acknowledgement needs a valid token (Authorization: Bearer <token>)")
        kind, item, who, note = parse_ack(await body(request))
        if not await run_in_threadpool(acknowledge, db, kind, item, who, note):
            return JSONResponse({"error": f"no such {kind}"}, 404)
        log.info("acknowledged", kind=kind, id=item, who=who)
        return JSONResponse({"ok": True, kind: item, "who": who})

    @r.get("/api/v1/ack/link", response_class=HTMLResponse, **_doc("/api/v1/ack/link"))
    def ack_link_form(request: Request) -> Response:
        """The signed link of a message: a form (name, note) that acknowledges that one alarm or incident."""
        q = query(request)
        return _link_refused(srv, q) or _html(200, acklink.form(q))

    @r.post("/api/v1/ack/link", response_class=HTMLResponse)
    async def ack_link(request: Request) -> Response:
        """The signed link's form: no token, the link's signature is the authority (and the CSRF defence)."""
        q = parse_ack_form(await body(request))
        refusal = _link_refused(srv, q)
        if refusal is not None:
            return refusal
        kind, item, who, note = str(q["kind"]), str(q["id"]), str(q["who"]), str(q["note"])
        if not await run_in_threadpool(acknowledge, db, kind, item, who, note):
            return _html(404, acklink.page("无法确认", f"没有编号为 {item} 的记录"))
        log.info("acknowledged", kind=kind, id=item, who=who, via="link")
        return _html(200, acklink.page("已确认", f"{who} 已确认 {item}。升级提醒已停止，确认信息已通知各群。"))

    return r


def acknowledge(db_path: store.Where, kind: str, item: str, who: str, note: str) -> bool:
    table = "alarms" if kind == "alarm" else "incidents"
    return bool(write(db_path, store.acknowledge, table, item, who, note, time.time()))


def authorised(token: str, header: str) -> bool:
    """Bearer only, compared in constant time; no token configured: nobody may acknowledge."""
    import hmac

    scheme, _, given = header.partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _html(status: int, data: bytes) -> Response:
    headers = {
        "Content-Security-Policy": "default-src 'none'; form-action 'self'",
        "Referrer-Policy": "no-referrer",  # the link is a credential
    }
    return Response(data, status, headers=headers, media_type="text/html; charset=utf-8")


def _link_refused(srv: ApiServer, q: dict[str, Any]) -> Response | None:
    """None if the signed link holds; else the refusal page (403)."""
    try:
        acklink.check(srv.ack_key, q["kind"], q["id"], q["exp"], q["sig"], time.time())
    except acklink.LinkError as err:
        srv.refuse("unauthorized", str(err))
        return _html(403, acklink.page("无法确认", str(err)))
    return None
