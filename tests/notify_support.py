"""Local stand-ins for the notification platforms, each implementing the platform's documented contract:
DingTalk (signed URL, errcode, 20 a minute), WeCom (key, errcode, 20 a minute, 4096 bytes), Feishu (signed
body within an hour, code, 100 a minute), and a signed JSON webhook receiver. No tests here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from examwatch.gateway import store
from examwatch.kernel.model import AlarmEvent
from examwatch.simulators.broker import free_port


class Bot(ThreadingHTTPServer):
    """One robot. ``received`` holds the bodies it accepted, in order; ``answers`` every answer it gave."""

    daemon_threads = True

    def __init__(self, platform: str, secret: str = "", key: str = "k", per_minute: int | None = None) -> None:
        self.platform, self.secret, self.key = platform, secret, key
        self.per_minute = (
            per_minute if per_minute is not None else {"dingtalk": 20, "wecom": 20, "feishu": 100}.get(platform, 0)
        )
        self.received: list[Any] = []
        self.headers_seen: list[dict[str, str]] = []
        self.answers: list[int] = []
        self.recent: deque[float] = deque()
        self.fail_with: int | None = None  # answer this error code (with HTTP 200) to everything
        self.down = False  # answer HTTP 503
        self.delay = 0.0  # s before answering (a slow robot: a kill lands mid-send)
        self.arrived = 0  # requests come in, answered or not yet
        self.raw: bytes | None = None  # answer these bytes instead (a hostile or broken endpoint)
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        port = self.server_address[1]
        return {
            "dingtalk": f"http://127.0.0.1:{port}/robot/send?access_token={self.key}",
            "wecom": f"http://127.0.0.1:{port}/cgi-bin/webhook/send?key={self.key}",
            "feishu": f"http://127.0.0.1:{port}/open-apis/bot/v2/hook/{self.key}",
        }.get(self.platform, f"http://127.0.0.1:{port}/hook")

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def bodies(self) -> list[Any]:
        with self.lock:
            return list(self.received)

    # --- the contracts ---------------------------------------------------------------------------------

    def judge(self, path: str, headers: dict[str, str], data: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, answer) as the platform gives them."""
        url = urlsplit(path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        now = time.time()
        if self.platform == "webhook":
            ts = headers.get("X-Examwatch-Timestamp", "0")
            want = "sha256=" + hmac.new(self.secret.encode(), f"{ts}.".encode() + data, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(headers.get("X-Examwatch-Signature", ""), want) or abs(now - int(ts)) > 300:
                return 401, {"error": "bad signature"}
            return (503, {}) if self.down else (200, {"ok": True})
        if self.down:
            return 503, {}
        body = json.loads(data)
        code_field = "code" if self.platform == "feishu" else "errcode"
        if self.platform == "dingtalk":
            if q.get("access_token") != self.key:
                return 200, {"errcode": 300001, "errmsg": "token is not exist"}
            if self.secret:
                ts = int(q.get("timestamp", "0"))
                want = base64.b64encode(
                    hmac.new(self.secret.encode(), f"{ts}\n{self.secret}".encode(), hashlib.sha256).digest()
                ).decode()
                if q.get("sign") != want or abs(now * 1000 - ts) > 3600_000:
                    return 200, {"errcode": 310000, "errmsg": "sign not match"}
            if body.get("msgtype") != "markdown" or not body["markdown"].get("title"):
                return 200, {"errcode": 40035, "errmsg": "缺少参数 json"}
        elif self.platform == "wecom":
            if q.get("key") != self.key:
                return 200, {"errcode": 93000, "errmsg": "invalid webhook url"}
            if len(body["markdown"]["content"].encode()) > 4096:
                return 200, {"errcode": 40058, "errmsg": "markdown.content exceed max length 4096"}
        elif self.platform == "feishu":
            if self.secret:
                ts = int(body.get("timestamp", "0"))
                want = base64.b64encode(
                    hmac.new(f"{ts}\n{self.secret}".encode(), b"", hashlib.sha256).digest()
                ).decode()
                if body.get("sign") != want or abs(now - ts) > 3600:
                    return 200, {
                        "code": 19021,
                        "msg": "sign match fail or timestamp is not within one hour from current time",
                    }
            if len(data) > 20 * 1024:
                return 200, {"code": 9499, "msg": "request body too large"}
        if self.fail_with is not None:
            return 200, {code_field: self.fail_with, ("msg" if code_field == "code" else "errmsg"): "refused"}
        while self.recent and now - self.recent[0] >= 60:
            self.recent.popleft()
        if self.per_minute and len(self.recent) >= self.per_minute:
            rate = {"dingtalk": 130101, "wecom": 45009, "feishu": 11232}[self.platform]
            return 200, {code_field: rate, "errmsg": "send too fast"}
        self.recent.append(now)
        return 200, {code_field: 0, ("msg" if code_field == "code" else "errmsg"): "ok"}


class _Handler(BaseHTTPRequestHandler):
    server: Bot

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.arrived += 1
        if self.server.delay:
            time.sleep(self.server.delay)
        headers = {k: v for k, v in self.headers.items()}
        with self.server.lock:
            status, answer = self.server.judge(self.path, headers, data)
            code = answer.get("errcode", answer.get("code", 0 if status == 200 else status))
            self.server.answers.append(code)
            if status == 200 and code == 0:
                self.server.received.append(json.loads(data))
                self.server.headers_seen.append(headers)
        out = self.server.raw if self.server.raw is not None else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


_ALARMS = (
    "INSERT INTO alarms (id, site, room, rule, level, state, device, message, raised_at, updated_at, cleared_at,"
    " source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET level = excluded.level,"
    " state = excluded.state, updated_at = excluded.updated_at, cleared_at = excluded.cleared_at"
)


def store_alarm(conn: Any, ev: AlarmEvent, received: float | None = None) -> None:
    """Write one transition the way the gateway's ingest does (alarms row and alarm_events row)."""
    store.write_batch(
        conn,
        [
            (
                "INSERT INTO alarm_events (alarm_id, at, state, level, received, seq, event) VALUES (?,?,?,?,?,?,?)",
                [(ev.id, ev.at, ev.state, ev.level, received or ev.at, 0, msgspec.json.encode(ev))],
            ),
            (
                _ALARMS,
                [
                    (
                        ev.id,
                        ev.site,
                        ev.room,
                        ev.rule,
                        ev.level,
                        ev.state,
                        ev.device,
                        ev.message,
                        ev.raised_at,
                        ev.at,
                        ev.at if ev.state == "cleared" else None,
                        "agent",
                    )
                ],
            ),
        ],
    )


def webhook_channels(*bots: tuple[str, Bot], notify: str = "") -> str:
    """Gateway TOML: one signed webhook channel per (name, bot), and a [notify] table."""
    out = [f'[[channels]]\nname = "{n}"\ntype = "webhook"\nurl = "{b.url}"\nsecret = "{b.secret}"\n' for n, b in bots]
    return "".join(out) + f"[notify]\n{notify}\n"


def publisher(port: int) -> Any:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish_alarm(client: Any, ev: AlarmEvent, seq: int) -> None:
    """Publish one transition as the room's agent does: signed, QoS 1, on the room's alarms topic."""
    from examwatch.kernel import wire
    from tests.support.gateway import key_hex

    agent = f"{ev.site}/{ev.room}"
    payload = wire.encode(bytes.fromhex(key_hex(agent)), agent, seq, ev.at, "alarms", msgspec.json.encode(ev), epoch=1)
    client.publish(wire.topic(agent, "alarms"), payload, qos=1).wait_for_publish(10)


def wait_subscribed(gw: Any, client: Any, agent: str, timeout: float = 30.0) -> None:
    """Until the gateway stores a room's heartbeat: its subscription is in place (on a first start, what is
    published before it would not be queued for it)."""
    from examwatch.kernel import wire
    from tests.support.gateway import key_hex

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = msgspec.json.encode(wire.Status(state="online", boot=1, conn=1, n=time.monotonic_ns()))
        payload = wire.encode(bytes.fromhex(key_hex(agent)), agent, 0, time.time(), "status", body, epoch=1)
        client.publish(wire.topic(agent, "status"), payload, qos=1).wait_for_publish(10)
        for _ in range(10):
            if gw.query("SELECT 1 FROM agents WHERE agent = ? AND status = 'online'", agent):
                return
            time.sleep(0.1)
    raise AssertionError(f"the gateway never stored {agent}'s heartbeat")


def raised(
    room: str,
    n: int = 1,
    level: int = 2,
    at: float | None = None,
    rule: str = "recording_stopped",
    site: str = "s1",
    state: str = "raised",
) -> AlarmEvent:
    t = at or time.time()
    return AlarmEvent(
        id=f"{site}/{room}/{rule}/{n}",
        site=site,
        room=room,
        rule=rule,
        level=level,
        state=state,
        device="nvr",
        metric="recording",
        value=0.0,
        at=t,
        raised_at=t,
        message=f"{room} 录像中断",
        action="立即检查录像机",
    )
