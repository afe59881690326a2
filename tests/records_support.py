"""A scripted power incident, fed through the gateway's real ingest: signed room messages in, gateway.db out.

Three rooms of one site are online; 101's and 102's UPS go on battery during a session (level 2 each: two
rooms make a level-2 power incident); people acknowledge and write some follow-ups but no cause; both
rooms recover. Times are the rooms' own, on 2024-05-28 in Asia/Shanghai; the gateway receives each message
a few seconds later (those receive times must never reach a form).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec

from examwatch.gateway import store
from examwatch.gateway.config import Config, Liveness, Security
from examwatch.gateway.ingest import Engine, Message
from examwatch.kernel import wire
from examwatch.kernel.model import AlarmEvent

SITE = "s1"
ROOMS = ("101", "102", "103", "104", "105")  # two of five: level 2 (site_share 0.5 makes 3)
KEYS = {f"{SITE}/{r}": bytes([i + 1]) * 32 for i, r in enumerate(ROOMS)}
EPOCH = 3
TZ = "Asia/Shanghai"
T0 = datetime(2024, 5, 28, 8, 31, 5, tzinfo=ZoneInfo(TZ)).timestamp()  # 101's UPS goes on battery
LAG = 2.5  # s between a room's event and the gateway receiving it
MESSAGE = "演示中学考点 {room}考场：市电中断，UPS 电池供电"


def _signed(agent: str, seq: int, ts: float, kind: str, body: bytes) -> Message:
    return Message(
        wire.topic(agent, kind), wire.encode(KEYS[agent], agent, seq, ts, kind, body, epoch=EPOCH), False, ts
    )


def _status(agent: str, ts: float) -> Message:
    body = msgspec.json.encode(wire.Status(state="online", phase="during", kinds={"ups1": "ups"}, boot=1, conn=1, n=1))
    return _signed(agent, 0, ts, "status", body)


def _alarm(room: str, seq: int, state: str, at: float, raised_at: float) -> Message:
    agent = f"{SITE}/{room}"
    ev = AlarmEvent(
        id=f"{agent}/ups_on_battery/ups1/1",
        site=SITE,
        room=room,
        rule="ups_on_battery",
        level=2,
        state=state,
        device="ups1",
        metric="power_on_battery",
        value=1.0 if state != "cleared" else 0.0,
        at=at,
        raised_at=raised_at,
        phase="during",
        message=MESSAGE.format(room=room) if state != "cleared" else f"演示中学考点 {room}考场：市电已恢复",
        action="联系供电部门现场抢修人员恢复市电",
    )
    m = _signed(agent, seq, at + LAG, "alarms", msgspec.json.encode(ev))
    return m._replace(received=at + LAG)


def alarm_id(room: str) -> str:
    return f"{SITE}/{room}/ups_on_battery/ups1/1"


def scripted_incident(db: Path) -> str:
    """Build the scenario in ``db`` (a gateway.db); the incident's id."""
    cfg = Config(security=Security(quiet=30.0), liveness=Liveness(heartbeat_timeout=3600, skew_max=60))
    e = Engine(cfg, store.connect(db), KEYS)
    e.ingest([_status(a, T0 - 60) for a in KEYS], T0 - 60)
    e.ingest([_alarm("101", 1, "raised", T0, T0)], T0 + LAG)
    e.ingest([_alarm("102", 1, "raised", T0 + 7, T0 + 7)], T0 + 7 + LAG)
    [inc] = store.incidents(e.conn, state="open")
    conn = e.conn
    assert store.acknowledge(conn, "incidents", inc["id"], "王老师", "已通知供电部门，领导小组已知悉", T0 + 120)
    assert store.acknowledge(conn, "alarms", alarm_id("101"), "张老师", "已到场，确认市电中断", T0 + 200)
    assert store.add_note(conn, "incident", inc["id"], "王老师", "measure", "两考场改由备用电源供电", T0 + 300)
    assert store.add_note(conn, "alarm", alarm_id("101"), "张老师", "spare", "启用备用UPS，编号 UPS-07", T0 + 310)
    e.ingest([_alarm("101", 2, "cleared", T0 + 905, T0)], T0 + 905 + LAG)
    e.ingest([_alarm("102", 2, "cleared", T0 + 1003, T0 + 7)], T0 + 1003 + LAG)
    assert store.incidents(e.conn)[0]["state"] == "closed"
    e.conn.close()
    return str(inc["id"])
