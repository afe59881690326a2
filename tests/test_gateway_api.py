"""The gateway's API under hostile clients: bounded parameters, bodies, tokens, connections."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from examwatch.gateway import api, store
from examwatch.gateway.api import BadRequest, parse_ack, parse_query
from tests.support import until
from tests.support.gateway import GatewayProc, start


@pytest.mark.parametrize(
    ("path", "query", "why"),
    [
        ("/api/v1/alarms", "limit=-1", "limit: must be an integer from 1 to 1000"),
        ("/api/v1/alarms", "limit=0", "from 1 to 1000"),
        ("/api/v1/alarms", "limit=1001", "from 1 to 1000"),
        ("/api/v1/alarms", "limit=1e3", "from 1 to 1000"),
        ("/api/v1/alarms", "level=NaN", "level: must be an integer from 1 to 3"),
        ("/api/v1/alarms", "state=all", "state: must be one of active, raised, updated, cleared"),
        ("/api/v1/alarms", "site=s1%27%20OR%201", "site: must be 1 to 64 letters"),
        ("/api/v1/alarms", "room=" + "x" * 65, "room: must be 1 to 64"),
        ("/api/v1/alarms", "limit=1&limit=2", "given more than once"),
        ("/api/v1/alarms", "order=desc", "unknown parameter 'order'"),
        ("/api/v1/alarms", "a&b", "malformed query"),
        ("/api/v1/alarms", "site=%ff", "malformed query"),
        ("/api/v1/alarms", "site=s1&" * 300, "query longer than"),
        ("/api/v1/incidents", "state=active", "state: must be one of open, closed"),
        ("/api/v1/incidents", "room=101", "unknown parameter 'room'"),
        ("/api/v1/alarms/timeline", "", "id is required"),
        ("/api/v1/alarms/timeline", "id=a%00b", "id: must be 1 to 256 printable"),
        ("/api/v1/agents", "limit=5", "this endpoint takes: none"),
    ],
)
def test_bad_parameters_are_refused_with_the_reason(path, query, why):
    with pytest.raises(BadRequest, match=why) as err:
        parse_query(path, query)
    assert err.value.status == 400


def test_good_parameters_and_defaults():
    assert parse_query("/api/v1/alarms", "state=active&level=2&site=s1&room=101&limit=1000") == {
        "state": "active",
        "level": 2,
        "site": "s1",
        "room": "101",
        "limit": 1000,
    }
    assert parse_query("/api/v1/incidents", "") == {"state": "", "level": None, "site": "", "limit": 200}
    assert parse_query("/api/v1/alarms/timeline", "id=s1/101/door_open/door1/1700000000000") == {
        "id": "s1/101/door_open/door1/1700000000000"
    }
    with pytest.raises(BadRequest) as err:
        parse_query("/api/v1/nothing", "")
    assert err.value.status == 404


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b"{",
        b"\xff",
        b"[" * 60_000,
        b'{"alarm": 1, "who": "w"}',
        b'{"alarm": "a", "incident": "b", "who": "w"}',
        b'{"alarm": "a", "who": " "}',
        b'{"alarm": "a", "who": "w", "extra": 1}',
        b'{"alarm": "a", "who": "' + b"w" * 65 + b'"}',
    ],
)
def test_bad_acknowledgements_are_refused(body):
    with pytest.raises(BadRequest):
        parse_ack(body)


def raw(port: int, request: bytes) -> bytes:
    """Send ``request`` as is and read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def ack_request(headers: str, body: bytes = b"") -> bytes:
    return f"POST /api/v1/ack HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body


@pytest.mark.integration
def test_gateway_refuses_bad_requests_and_keeps_serving(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101"])
    start(procs, gw)
    for query in ("limit=-1", "limit=100000", "bogus=1"):
        with pytest.raises(urllib.error.HTTPError) as err:
            gw.get(f"/api/v1/alarms?{query}")
        assert err.value.code == 400 and "error" in json.loads(err.value.read())
    assert gw.get("/api/v1/alarms?limit=1000") == {"alarms": []}

    body = json.dumps({"alarm": "nope", "who": "张老师"}).encode()
    auth = f"Authorization: Bearer {gw.token}\r\n"
    cases = [
        (ack_request(f"Authorization: {gw.token}\r\nContent-Length: {len(body)}\r\n", body), 401),  # no "Bearer"
        (ack_request(f"Authorization: Basic {gw.token}\r\nContent-Length: {len(body)}\r\n", body), 401),
        (ack_request(auth, body), 411),  # no Content-Length
        (ack_request(auth + "Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 411),
        (ack_request(auth + "Content-Length: -5\r\n", body), 400),
        (ack_request(auth + "Content-Length: 12abc\r\n", body), 400),
        (ack_request(auth + "Content-Length: " + "9" * 5000 + "\r\n", body), 413),
        (ack_request(auth + "Content-Length: 1000000000\r\n", body), 413),
        (ack_request(auth + f"Content-Length: {len(body)}\r\n", body), 404),  # well-formed: no such alarm
    ]
    for request, expected in cases:
        assert status_and_error(raw(gw.api_port, request))[0] == expected, request[:120]
    # A body shorter than announced: the server waits IDLE_TIMEOUT for the rest, then hangs up.
    assert raw(gw.api_port, ack_request(auth + "Content-Length: 500\r\n", body)) == b""
    assert gw.proc.poll() is None
    assert gw.get("/api/v1/agents") == {"agents": []}
    text = gw.metrics()
    assert 'examwatch_gateway_api_refused_total{reason="length_required"} 2.0' in text
    assert 'examwatch_gateway_api_refused_total{reason="unauthorized"} 2.0' in text
    assert 'examwatch_gateway_api_refused_total{reason="timeout"} 1.0' in text
    assert "Traceback" not in gw.log()


@pytest.mark.integration
def test_idle_connections_are_closed_by_the_gateway(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101"])
    start(procs, gw)
    idle = [socket.create_connection(("127.0.0.1", gw.api_port), timeout=30) for _ in range(5)]
    for s in idle:
        assert s.recv(1) == b""  # closed by the server after IDLE_TIMEOUT, not held forever
        s.close()
    assert gw.get("/api/v1/agents") == {"agents": []}


@pytest.fixture
def small_server(tmp_path: Path, monkeypatch):
    """The API in this process with small bounds, so filling and trickling take seconds."""
    monkeypatch.setattr(api, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(api, "CONNECTION_DEADLINE", 2.0)
    monkeypatch.setattr(api._Handler, "timeout", 60.0)
    db = tmp_path / "gateway.db"
    store.connect(str(db)).close()
    server = api.ApiServer("127.0.0.1:0", str(db), "t0ken")
    server.start()
    yield server
    server.shutdown()
    server.server_close()


def test_connections_past_the_limit_get_503_and_trickling_ones_are_cut(small_server):
    port = small_server.server_address[1]
    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    for s in held:
        s.sendall(b"GET /api/v1/agents HTTP/1.1\r\n")  # then a header byte now and then: never finished
    until(lambda: small_server.connections() == 3, what="every slot taken")
    assert status_and_error(raw(port, b"GET /api/v1/agents HTTP/1.1\r\n\r\n")) == (503, "too many requests")
    for s in held:
        s.sendall(b"X")
        time.sleep(0.1)
    for s in held:  # cut at CONNECTION_DEADLINE however they trickle
        assert s.recv(65536) == b""
        s.close()
    until(lambda: small_server.connections() == 0, what="every slot free again")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/agents", timeout=10) as r:
        assert json.loads(r.read()) == {"agents": []}
    assert small_server.refused["busy"] == 1 and small_server.refused["deadline"] == 3
