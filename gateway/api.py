"""The gateway's HTTP API under /api/v1/ (JSON), for the county office and scripts.

GET  /api/v1/alarms?state=active|raised|updated|cleared&level=2&site=S&room=R&limit=N
GET  /api/v1/alarms/timeline?id=<alarm id>        every transition with the room's original times
GET  /api/v1/incidents?state=open|closed&site=S&level=N
GET  /api/v1/agents                               last seen, status, clock skew, missing sequence numbers
POST /api/v1/ack   {"alarm"|"incident": id, "who": "...", "note": "..."}   needs "Authorization: Bearer <token>"

Each request uses its own SQLite connection (WAL: readers never block the ingest writer).
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from examwatch.gateway import store

log = structlog.get_logger("examwatch.gateway.api")

MAX_BODY = 64 * 1024


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: str, db_path: str, token: str) -> None:
        host, port = listen.rsplit(":", 1)
        self.db_path = db_path
        self.token = token
        super().__init__((host, int(port)), _Handler)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="gateway-api", daemon=True)
        t.start()
        return t


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # access logs are not ours to keep; errors are logged below

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            level = int(q["level"]) if "level" in q else None
            limit = min(int(q.get("limit", 500)), 10_000)
        except ValueError:
            return self._send(400, {"error": "level and limit must be integers"})
        conn = store.connect(self.server.db_path, readonly=True)
        try:
            if url.path == "/api/v1/alarms":
                return self._send(200, {"alarms": store.alarms(conn, state=q.get("state", ""), level=level,
                                                                site=q.get("site", ""), room=q.get("room", ""), limit=limit)})
            if url.path == "/api/v1/alarms/timeline":
                if "id" not in q:
                    return self._send(400, {"error": "id is required"})
                return self._send(200, {"id": q["id"], "timeline": store.alarm_timeline(conn, q["id"])})
            if url.path == "/api/v1/incidents":
                return self._send(200, {"incidents": store.incidents(conn, state=q.get("state", ""), site=q.get("site", ""),
                                                                      level=level, limit=limit)})
            if url.path == "/api/v1/agents":
                return self._send(200, {"agents": store.agents(conn)})
            return self._send(404, {"error": "no such endpoint"})
        finally:
            conn.close()

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/api/v1/ack":
            return self._send(404, {"error": "no such endpoint"})
        token = self.server.token
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            return self._send(401, {"error": "acknowledgement needs a valid token"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._send(413, {"error": "body too large"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return self._send(400, {"error": "body must be a JSON object"})
        who, note = str(body.get("who", "")).strip(), str(body.get("note", ""))
        kinds = [k for k in ("alarm", "incident") if k in body]
        if len(kinds) != 1 or not who:
            return self._send(400, {"error": "give exactly one of alarm or incident, and who"})
        table = "alarms" if kinds[0] == "alarm" else "incidents"
        conn = store.connect(self.server.db_path)
        try:
            found = store.acknowledge(conn, table, str(body[kinds[0]]), who, note, time.time())
        finally:
            conn.close()
        if not found:
            return self._send(404, {"error": f"no such {kinds[0]}"})
        log.info("acknowledged", kind=kinds[0], id=body[kinds[0]], who=who)
        return self._send(200, {"ok": True, kinds[0]: body[kinds[0]], "who": who})
