"""The duty desk over HTTP against a real gateway and broker: log-in, sessions, CSRF, roles, notes, closing an
incident (and it staying closed), OpenAPI, the reports' route, a clean stop with a stream open; and the pure
parts (log-in rules, the request head check, the timeline picture)."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

import pytest

from examwatch.gateway import auth
from examwatch.gateway.desk import Note, parse_body
from examwatch.gateway.desk.views import timeline_svg
from examwatch.gateway.params import BadRequest, check_head
from tests.support import until
from tests.support.desk import PASSWORD, DeskClient, alarm, desk_gateway, desk_site
from tests.support.gateway import start


def test_login_rules_sessions_expire_and_failures_are_limited_per_name():
    users = [auth.User(name="张老师", role="duty", password_hash=auth.hash_password("pw-12345678"))]
    a = auth.Auth(users)
    assert a.login("张老师", "wrong", 0.0) is None
    sid, s = a.login("张老师", "pw-12345678", 1.0)
    assert s.role == "duty" and a.session(sid, 2.0) is s and auth.may(s, "close") and not auth.may(s, "admin")
    assert auth.csrf_ok(s, s.csrf) and not auth.csrf_ok(s, s.csrf[:-1] + "x") and not auth.csrf_ok(s, None)
    assert a.session(sid, 1.0 + auth.SESSION_SECONDS) is None  # expired, and gone
    for n in range(auth.FAIL_MAX):
        assert a.login("nobody", "x", 10.0 + n) is None
    with pytest.raises(auth.RateLimited):
        a.login("nobody", "x", 20.0)
    for _ in range(auth.FAIL_MAX):
        a.login("张老师", "wrong", 30.0)
    with pytest.raises(auth.RateLimited):  # even the right password, until the window has passed
        a.login("张老师", "pw-12345678", 31.0)
    assert a.login("张老师", "pw-12345678", 31.0 + auth.FAIL_WINDOW) is not None


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /desk/api/ack HTTP/1.1\r\nHost: x", 411),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5", 411),
        (b"POST /x HTTP/1.1\r\ncontent-length: 5\r\nContent-Length: 6", 400),
        (b"GET /x HTTP/1.1\r\nContent-Length: 70000", 413),
        (b"POST /x HTTP/1.1\r\nContent-Length:  0x10", 400),
    ],
)
def test_request_heads_without_a_bounded_body_are_refused(head, status):
    with pytest.raises(BadRequest) as err:
        check_head(head)
    assert err.value.status == status
    check_head(b"GET /api/v1/agents HTTP/1.1\r\nHost: x")
    check_head(b"POST /desk/api/ack HTTP/1.1\r\nContent-Length: 12")


def test_desk_bodies_are_checked():
    for bad in (b"{}", b'{"kind": "alarm", "id": "a", "category": "ack", "text": "x"}', b"[" * 10_000):
        with pytest.raises(BadRequest):
            parse_body(bad, Note)
    assert (
        parse_body(b'{"kind": "incident", "id": "i", "category": "measure", "text": "t"}', Note).category == "measure"
    )


def test_the_timeline_draws_each_alarm_as_a_bar_and_escapes_text():
    alarms = [
        {
            "room": "101",
            "raised_at": 100.0,
            "cleared_at": 400.0,
            "level": 1,
            "rule": "r",
            "device": "d",
            "message": "<b>",
        },
        {"room": "102", "raised_at": 200.0, "cleared_at": None, "level": 2, "rule": "r", "device": "d", "message": "m"},
    ]
    svg = timeline_svg(["101", "102"], alarms, 150.0, 600.0, 600.0)
    assert svg.count("<rect") == 2 and "&lt;b&gt;" in svg and "<b>" not in svg
    # the first bar starts at the left edge (the earliest raise), the open one runs to now (the right edge)
    assert 'x="90.0"' in svg and 'width="620.0"' not in svg and svg.startswith("<svg")


@pytest.mark.integration
def test_login_csrf_roles_and_notes(mosquitto, procs, tmp_path):
    gw, rooms = desk_site(procs, tmp_path, mosquitto.port)
    ev = alarm("s1", "101", "ups_on_battery", 1, time.time())
    rooms.send(ev)
    until(lambda: gw.get("/api/v1/alarms?state=active")["alarms"], what="the alarm stored")

    anon = DeskClient(gw.api_port)
    assert anon.call("GET", "/desk/api/room?agent=s1/101")[0] == 401
    assert anon.login("值班员", "wrong password") == 401
    assert anon.login("nobody", PASSWORD) == 401
    form = urllib.request.Request(  # what another site's form could send: refused, no session made
        f"http://127.0.0.1:{gw.api_port}/desk/login",
        data=json.dumps({"name": "值班员", "password": PASSWORD}).encode(),
        headers={"Content-Type": "text/plain"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(form, timeout=10)
    assert err.value.code == 400

    viewer, duty = DeskClient(gw.api_port), DeskClient(gw.api_port)
    assert viewer.login("查看员") == 200 and duty.login("值班员") == 200
    assert viewer.call("GET", "/desk/api/room?agent=s1/101")[1]["alarms"][0]["id"] == ev.id
    ack = {"kind": "alarm", "id": ev.id, "note": "已到场"}
    assert viewer.call("POST", "/desk/api/ack", ack)[0] == 403  # a viewer reads only
    assert duty.call("POST", "/desk/api/ack", ack, csrf=False)[0] == 403  # the session alone is not enough
    status, got = duty.call("POST", "/desk/api/ack", {**ack, "who": "李老师"})
    assert status == 200 and got["who"] == "李老师（值班员）"
    assert (
        duty.call("POST", "/desk/api/note", {"kind": "alarm", "id": ev.id, "category": "cause", "text": "跳闸"})[0]
        == 200
    )
    assert (
        duty.call("POST", "/desk/api/note", {"kind": "alarm", "id": "nope", "category": "cause", "text": "x"})[0] == 404
    )
    notes = duty.call("GET", f"/desk/api/alarm?id={ev.id}")[1]["notes"]
    assert [(n["category"], n["who"], n["text"]) for n in notes] == [
        ("ack", "李老师（值班员）", "已到场"),
        ("cause", "值班员", "跳闸"),
    ]
    assert gw.get("/api/v1/alarms")["alarms"][0]["acked_by"] == "李老师（值班员）"

    assert duty.call("POST", "/desk/logout", {})[0] == 200
    assert duty.call("GET", "/desk/session")[0] == 401
    for _ in range(auth.FAIL_MAX):
        anon.login("查看员", "guess")
    assert anon.login("查看员") == 429  # limited per name, the right password too
    log = gw.log()
    assert PASSWORD not in log and "argon2" not in log and "Traceback" not in log
    assert 'examwatch_gateway_api_refused_total{reason="forbidden"} 2.0' in gw.metrics()


@pytest.mark.integration
def test_an_incident_closed_at_the_desk_stays_closed(mosquitto, procs, tmp_path):
    gw, rooms = desk_site(procs, tmp_path, mosquitto.port)
    now = time.time()
    for r in ("101", "102"):
        rooms.send(alarm("s1", r, "ups_on_battery", 1, now))
    incident = until(lambda: gw.get("/api/v1/incidents?state=open")["incidents"], what="the power incident")[0]

    duty = DeskClient(gw.api_port)
    assert duty.login("值班员") == 200
    assert duty.call("POST", "/desk/api/close", {"id": incident["id"], "note": "已恢复供电"})[0] == 200
    assert duty.call("POST", "/desk/api/close", {"id": incident["id"]})[0] == 404  # closed once
    # the next batches (a third room with the same fault raised before the close, and a tick) keep it closed
    rooms.send(alarm("s1", "103", "ups_on_battery", 1, time.time(), raised_at=now + 1))
    until(lambda: len(gw.get("/api/v1/alarms?state=active")["alarms"]) == 3, what="the third alarm stored")
    time.sleep(1.5)  # the ingest loop's tick (every second) correlates again
    (closed,) = gw.get("/api/v1/incidents")["incidents"]
    assert closed["state"] == "closed" and closed["timeline"][-1]["what"] == "closed"
    assert duty.call("GET", f"/desk/api/incident?id={incident['id']}")[1]["notes"][-1]["category"] == "close"
    # the same after a restart (the close is read back from the store)
    gw.stop()
    gw.start()
    time.sleep(1.5)
    assert [i["state"] for i in gw.get("/api/v1/incidents")["incidents"]] == ["closed"]
    # faults raised after the close are news: a new incident
    later = time.time()
    for r in ("101", "104"):
        rooms.send(alarm("s1", r, "ups_on_battery", 1, later, raised_at=later))
    opened = until(lambda: gw.get("/api/v1/incidents?state=open")["incidents"], what="a new incident")
    assert opened[0]["id"] != incident["id"]


@pytest.mark.integration
def test_openapi_reports_and_a_clean_stop_with_a_stream_open(mosquitto, procs, tmp_path):
    gw = desk_gateway(tmp_path, mosquitto.port)
    start(procs, gw)
    spec = gw.get("/api/v1/openapi.json")
    assert set(spec["paths"]) >= {"/api/v1/alarms", "/api/v1/incidents", "/api/v1/ack", "/api/v1/agents"}
    limit = next(p for p in spec["paths"]["/api/v1/alarms"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    assert not any(p.startswith("/desk") for p in spec["paths"])

    viewer, duty = DeskClient(gw.api_port), DeskClient(gw.api_port)
    assert viewer.login("查看员") == 200 and duty.login("值班员") == 200
    assert viewer.call("GET", "/desk/reports?day=2026-06-07&form=county")[0] == 403
    assert duty.call("GET", "/desk/reports?day=2026-06-07&form=county&incident=x")[0] == 400
    assert duty.call("GET", "/desk/reports?day=2026-13-07&form=county")[0] == 400
    status, docx = duty.call("GET", "/desk/reports?day=2026-06-07&form=county&format=docx")
    assert status == 200 and docx[:2] == b"PK"  # a DOCX (a zip), rendered by the records and kept with its hash
    kept = sqlite3.connect(gw.db).execute("SELECT form, format, who, sha256 FROM reports").fetchall()
    assert kept == [("county", "docx", "值班员", hashlib.sha256(docx).hexdigest())]

    # an open event stream (the desk's) does not hold the gateway up at SIGTERM
    stream = socket.create_connection(("127.0.0.1", gw.api_port), timeout=10)
    sid = next(c.value for h in duty.opener.handlers if hasattr(h, "cookiejar") for c in h.cookiejar)
    stream.sendall(f"GET /desk/events HTTP/1.1\r\nHost: x\r\nCookie: {auth.COOKIE}={sid}\r\n\r\n".encode())
    first = stream.recv(65536)
    while b"event: state" not in first:
        first += stream.recv(65536)
    assert b"text/event-stream" in first and json.loads(first.split(b"data: ", 1)[1].split(b"\n", 1)[0])["rooms"]
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(15) == 0
    assert "gateway_stopped" in gw.log() and "Traceback" not in gw.log()
    stream.close()


@pytest.fixture
def desk_server(tmp_path, monkeypatch):
    """The gateway's HTTP side in this process, with a short connection deadline and one desk user."""
    from examwatch.gateway import api, store

    monkeypatch.setattr(api, "CONNECTION_DEADLINE", 1.0)
    db = tmp_path / "gateway.db"
    store.connect(str(db)).close()
    user = auth.User(name="值班员", role="duty", password_hash=auth.hash_password(PASSWORD))
    server = api.ApiServer("127.0.0.1:0", str(db), "t0ken", users=[user], roster=["s1/101"])
    server.start()
    yield server, db
    server.shutdown()
    server.server_close()


def test_the_event_stream_outlives_the_connection_deadline_and_follows_the_database(desk_server):
    server, db = desk_server
    duty = DeskClient(server.server_address[1])
    assert duty.login("值班员") == 200
    sid = next(c.value for h in duty.opener.handlers if hasattr(h, "cookiejar") for c in h.cookiejar)
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(f"GET /desk/events HTTP/1.1\r\nHost: x\r\nCookie: {auth.COOKIE}={sid}\r\n\r\n".encode())
        got = b""
        while b"event: state" not in got:
            got += s.recv(65536)
        time.sleep(2.0)  # past CONNECTION_DEADLINE: a plain request would have been cut by now
        conn = sqlite3.connect(db)
        conn.execute("INSERT INTO agents (agent, site, room, status) VALUES ('s1/101', 's1', '101', 'online')")
        conn.commit()
        conn.close()
        got = b""
        while b'"status": "online"' not in got:
            chunk = s.recv(65536)
            assert chunk, "the stream was cut"
            got += chunk
    assert server.refused["deadline"] == 0


def test_the_page_fetches_nothing_from_the_internet():
    from importlib import resources

    files = resources.files("examwatch.gateway.desk")
    for name in ("desk.html", "desk.css", "desk.js"):
        text = files.joinpath(name).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), name  # no CDN, no fonts


def open_stream(port: int, sid: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET /desk/events HTTP/1.1\r\nHost: x\r\nCookie: {auth.COOKIE}={sid}\r\n\r\n".encode())
    return s


def test_desk_streams_are_bounded(desk_server, monkeypatch):
    from examwatch.gateway import desk

    monkeypatch.setattr(desk, "MAX_STREAMS", 1)
    server, _ = desk_server
    duty = DeskClient(server.server_address[1])
    assert duty.login("值班员") == 200
    sid = next(c.value for h in duty.opener.handlers if hasattr(h, "cookiejar") for c in h.cookiejar)
    with open_stream(server.server_address[1], sid) as first:
        got = b""
        while b"event: state" not in got:
            got += first.recv(65536)
        assert duty.call("GET", "/desk/events")[0] == 503
    until(lambda: server.streams == 0, what="the stream's slot free again")
    assert server.refused["busy"] == 1


def test_answers_go_out_at_once_on_kept_alive_connections(desk_server):
    """TCP_NODELAY on every connection: without it a kept-alive request waited 40 ms for the client's
    delayed ACK (bench/gateway_http.py measures it; here the option itself is checked)."""
    server, _ = desk_server
    c = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    c.request("GET", "/api/v1/agents")
    assert c.getresponse().read() == b'{"agents":[]}'
    (conn,) = list(server._open)
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    c.close()


def test_a_follower_replica_refers_closing_to_the_leader(desk_server):
    """Incidents are the leader's to judge: a follower's desk says so instead of closing (or claiming none)."""
    from examwatch.gateway import duty

    server, _ = desk_server

    def follower_close(incident_id: str, who: str, note: str) -> bool:
        raise duty.NotLeading(incident_id)

    server.close_incident = follower_close
    desk = DeskClient(server.server_address[1])
    assert desk.login("值班员") == 200
    assert desk.call("POST", "/desk/api/close", {"id": "s1/power/1", "note": "已恢复"}) == (
        503,
        {"error": "本网关为备用副本，请在主网关上关闭事件"},
    )


def test_the_reports_route_hands_the_request_to_the_records(desk_server, monkeypatch):
    """The agreed interface: records.render_and_store(conn, form, incident, day, fmt, who) -> (name, type, bytes)."""
    server, _ = desk_server
    asked = []

    def render_and_store(conn, **kwargs):
        asked.append((conn.execute("PRAGMA query_only").fetchone()[0], kwargs))
        if kwargs["incident"] == "nope":
            raise ValueError("没有编号为 nope 的事件或告警")  # records.RecordError
        return "首报-s1.pdf", "application/pdf", b"%PDF-1.7 test"

    monkeypatch.setitem(
        sys.modules, "examwatch.gateway.records", types.SimpleNamespace(render_and_store=render_and_store)
    )
    duty = DeskClient(server.server_address[1])
    assert duty.login("值班员") == 200
    req = urllib.request.Request(f"{duty.base}/desk/reports?incident=s1%2Fpower%2F1&form=first&format=pdf")
    with duty.opener.open(req, timeout=10) as r:
        assert r.read() == b"%PDF-1.7 test" and r.headers["Content-Type"] == "application/pdf"
        assert r.headers["Content-Disposition"] == "attachment; filename*=UTF-8''%E9%A6%96%E6%8A%A5-s1.pdf"
    assert asked == [(0, {"form": "first", "incident": "s1/power/1", "day": None, "fmt": "pdf", "who": "值班员"})]
    assert duty.call("GET", "/desk/reports?incident=nope&form=l1") == (400, {"error": "没有编号为 nope 的事件或告警"})


def test_hash_password_reads_stdin_and_prints_an_argon2_hash():
    run = [sys.executable, "-m", "examwatch", "gateway", "hash-password"]
    done = subprocess.run(run, input="correct horse 7\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert auth.Auth([auth.User(name="u", password_hash=done.stdout.strip())]).login("u", "correct horse 7", 0.0)
    short = subprocess.run(run, input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "至少 8" in short.stderr and not short.stdout


def test_sixteen_desk_streams_leave_the_api_answering_on_postgresql(postgres):
    """A stream borrows a pooled connection for each look, not for its ten minutes: with every stream open
    (more than the pool has connections), the API and the desk still answer."""
    from examwatch.gateway import api, desk, store

    where = store.Postgres(postgres.new_database(), pool_max=4)  # fewer connections than streams
    store.connect(where).close()  # the schema, and this database's pool, of 4
    user = auth.User(name="值班员", role="duty", password_hash=auth.hash_password(PASSWORD))
    server = api.ApiServer("127.0.0.1:0", where, "t0ken", users=[user], roster=["s1/101"])
    server.start()
    port, streams = server.server_address[1], []
    try:
        duty = DeskClient(port)
        assert duty.login("值班员") == 200
        sid = next(c.value for h in duty.opener.handlers if hasattr(h, "cookiejar") for c in h.cookiejar)
        for _ in range(desk.MAX_STREAMS):
            s = open_stream(port, sid)
            streams.append(s)
            got = b""
            while b"event: state" not in got:
                chunk = s.recv(65536)
                assert chunk, "the stream was cut"
                got += chunk
        assert server.streams == desk.MAX_STREAMS
        for _ in range(10):  # each answered (DeskClient waits 15 s at most), not refused nor timed out
            assert duty.call("GET", "/api/v1/agents") == (200, {"agents": []})
        assert duty.call("GET", "/desk/api/room?agent=s1/101")[0] == 200
    finally:
        for s in streams:
            s.close()
        server.shutdown()
        server.server_close()
