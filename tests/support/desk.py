"""The duty desk's tests: a real gateway with desk users, a signer of rooms' alarms, a logged-in HTTP client."""

from __future__ import annotations

import http.cookiejar
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

from examwatch.gateway.auth import hash_password
from examwatch.kernel import wire
from examwatch.kernel.model import AlarmEvent
from tests.support.gateway import GatewayProc, key_hex, start, until_subscribed

PASSWORD = "correct horse 7"
USERS = {"值班员": "duty", "查看员": "viewer", "admin": "admin"}
ROOMS = ["s1/101", "s1/102", "s1/103", "s1/104", "s1/bmj"]
_HASH = hash_password(PASSWORD)  # argon2 is slow on purpose: once per test run


def desk_gateway(tmp_path: Path, broker_port: int, agents: list[str] = ROOMS) -> GatewayProc:
    users = "".join(
        f'\n[[api.users]]\nname = "{n}"\nrole = "{r}"\npassword_hash = "{_HASH}"\n' for n, r in USERS.items()
    )
    extra = 'secrecy_rooms = ["s1/bmj"]\n' + users
    return GatewayProc(tmp_path, broker_port, agents, extra=extra)


def alarm(
    site: str, room: str, rule: str, level: int, at: float, state: str = "raised", raised_at: float = 0
) -> AlarmEvent:
    return AlarmEvent(
        id=f"{site}/{room}/{rule}/dev1/{int((raised_at or at) * 1000)}",
        site=site,
        room=room,
        rule=rule,
        level=level,
        state=state,  # type: ignore[arg-type]
        device="dev1",
        at=at,
        raised_at=raised_at or at,
        message={"ups_on_battery": "UPS 市电中断，正在使用电池供电"}.get(rule, "设备故障，请到场检查"),
    )


def desk_site(procs: list[Any], tmp_path: Path, broker_port: int) -> tuple[GatewayProc, Signer]:
    """A started desk gateway, subscribed, and a signer of its rooms' alarms on the same broker."""
    from tests.test_gateway_trust import Client

    gw = desk_gateway(tmp_path, broker_port)
    start(procs, gw)
    client = Client(broker_port)
    procs.append(client)
    until_subscribed(gw, client.client)
    return gw, Signer(client)


class Signer:
    """Publishes alarms as each room's agent would: signed with the room's key, sequence numbers in order."""

    def __init__(self, client: Any) -> None:
        self.client = client  # a connected paho client (tests.test_gateway_trust.Client)
        self.seq: dict[str, int] = {}

    def send(self, ev: AlarmEvent) -> None:
        agent = f"{ev.site}/{ev.room}"
        self.seq[agent] = self.seq.get(agent, 0) + 1
        key = bytes.fromhex(key_hex(agent))
        body = msgspec.json.encode(ev)
        self.client.publish(
            wire.topic(agent, "alarms"), wire.encode(key, agent, self.seq[agent], time.time(), "alarms", body, epoch=7)
        )


class DeskClient:
    """An HTTP client of the desk with its own cookie jar (a browser's session, without the browser)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.csrf = ""

    def call(self, method: str, path: str, body: Any = None, csrf: bool = True) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if csrf and self.csrf:
            req.add_header("X-CSRF-Token", self.csrf)
        try:
            with self.opener.open(req, timeout=15) as r:
                raw, status, kind = r.read(), r.status, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raw, status, kind = err.read(), err.code, err.headers.get("Content-Type", "")
        return status, json.loads(raw) if "json" in kind else raw

    def login(self, name: str, password: str = PASSWORD) -> int:
        status, got = self.call("POST", "/desk/login", {"name": name, "password": password})
        if status == 200:
            self.csrf = got["csrf"]
        return status
