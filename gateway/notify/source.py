"""The notifier's only contact with the gateway's own tables: follow the timeline, see acknowledgements,
and raise or clear the gateway's system alarm for a channel that keeps failing.

Kept in one module so a change of the gateway's schema is adapted here and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import msgspec

from examwatch.gateway import store
from examwatch.gateway.notify.core import Ack, Event
from examwatch.kernel.model import AlarmEvent, AlarmState, Level

_alarm = msgspec.json.Decoder(AlarmEvent)
MAX_EVENT = 64 * 1024  # a stored event larger than this is not ours to parse (ingest bounds it already)


_ALARM_ROWS = (
    "SELECT e.rowid, e.alarm_id, e.at, e.state, e.level, e.event, a.site, a.room, a.rule, a.device, a.message,"
    " a.raised_at FROM alarm_events e JOIN alarms a ON a.id = e.alarm_id"
)


def _alarm_event(r: Any, what: str = "") -> Event:
    ev = None
    if len(r[5]) <= MAX_EVENT:
        try:
            ev = _alarm.decode(r[5])
        except msgspec.DecodeError:
            ev = None
    value = ev.value if ev is not None and ev.value is not None and ev.value == ev.value else None
    return Event(
        kind="alarm",
        id=r[1],
        site=r[6],
        room=r[7],
        level=r[4],
        what=what or r[3],
        at=r[2],
        raised_at=ev.raised_at if ev else r[11],
        rule=r[8],
        device=r[9],
        metric=(ev.metric or "") if ev else "",
        value=value,
        message=ev.message if ev else r[10],
        action=ev.action if ev else "",
        phase=(ev.phase or "") if ev else "",
        notified=list(ev.notified) if ev else [],
    )


def read_new(conn: store.Db, cursors: dict[str, int], limit: int = 2000) -> tuple[list[Event], dict[str, int]]:
    """The transitions stored after ``cursors`` (rowids of alarm_events and incident_events), oldest first,
    with the alarm's or incident's site, room and level; and the cursors after them."""
    cur = dict(cursors)
    events: list[Event] = []
    for r in conn.execute(
        _ALARM_ROWS + " WHERE e.rowid > ? ORDER BY e.rowid LIMIT ?", [cur.get("alarm_events", 0), limit]
    ):
        cur["alarm_events"] = r[0]
        events.append(_alarm_event(r))
    for r in conn.execute(
        "SELECT e.rowid, e.incident_id, e.at, e.what, e.rooms, e.level, i.site, i.fault_class, i.title, i.opened_at"
        " FROM incident_events e JOIN incidents i ON i.id = e.incident_id WHERE e.rowid > ? ORDER BY e.rowid LIMIT ?",
        [cur.get("incident_events", 0), limit],
    ):
        cur["incident_events"] = r[0]
        events.append(
            Event(
                kind="incident",
                id=r[1],
                site=r[6],
                rooms=[str(x) for x in json.loads(r[4])],
                level=r[5],
                what=r[3],
                at=r[2],
                raised_at=r[9],
                rule=r[7],
                message=r[8],
            )
        )
    return events, cur


def open_alarms(conn: store.Db) -> list[Event]:
    """Every alarm still active, as a raise with its latest state: what a notifier started on an existing
    database must still tell (the history before it is not re-sent)."""
    rows = conn.execute(
        _ALARM_ROWS + " WHERE a.state != 'cleared' AND e.rowid = "
        "(SELECT MAX(rowid) FROM alarm_events WHERE alarm_id = a.id) ORDER BY e.rowid"
    )
    return [_alarm_event(r, "raised") for r in rows]


def timeline_end(conn: store.Db) -> dict[str, int]:
    """Where the timeline ends now: a notifier started on an existing database does not re-send history."""
    return {
        t: conn.execute(f"SELECT COALESCE(MAX(rowid), 0) FROM {t}").fetchone()[0]
        for t in ("alarm_events", "incident_events")
    }


def read_acks(conn: store.Db, ids: Iterable[str]) -> dict[str, Ack]:
    ids = list(ids)
    out: dict[str, Ack] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        marks = ",".join("?" * len(chunk))
        for table in ("alarms", "incidents"):
            for r in conn.execute(
                f"SELECT id, acked_at, acked_by, acked_note FROM {table} "
                f"WHERE acked_at IS NOT NULL AND id IN ({marks})",
                chunk,
            ):
                out[r[0]] = Ack(at=r[1], who=r[2] or "", note=r[3] or "")
    return out


def channel_alarm(conn: store.Db, county: str, channel: str, down: bool, reason: str, now: float) -> None:
    """Raise (or clear) the gateway's level-1 system alarm for a channel that keeps failing."""
    rule = "notify_channel_down"
    row = conn.execute(
        "SELECT id, raised_at FROM alarms WHERE rule = ? AND device = ? AND state != 'cleared'",
        [rule, f"channel:{channel}"],
    ).fetchone()
    if down == (row is not None):
        return
    alarm_id = row[0] if row else f"{county}/gateway/{rule}/{channel}/{int(now * 1000)}"
    message = (
        f"通知渠道“{channel}”持续发送失败（{reason}），告警无法送达该群；请检查网络、机器人地址与密钥"
        if down
        else f"通知渠道“{channel}”已恢复，积压的通知正按顺序补发"
    )
    ev = AlarmEvent(
        id=alarm_id,
        site=county,
        room="gateway",
        rule=rule,
        level=Level.MINOR,
        state=AlarmState.RAISED if down else AlarmState.CLEARED,
        device=f"channel:{channel}",
        at=now,
        raised_at=row[1] if row else now,
        message=message,
        action="检查该通知渠道的网络与配置；运行 examwatch gateway test-channel 验证",
    )
    with store.transaction(conn, timeline=True):
        conn.execute(
            "INSERT INTO alarm_events (alarm_id, at, state, level, received, seq, event) VALUES (?,?,?,?,?,?,?)",
            [alarm_id, now, ev.state, 1, now, 0, msgspec.json.encode(ev)],
        )
        conn.execute(
            "INSERT INTO alarms (id, site, room, rule, level, state, device, message, raised_at, updated_at,"
            " cleared_at, source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET"
            " state = excluded.state, message = excluded.message, updated_at = excluded.updated_at,"
            " cleared_at = excluded.cleared_at",
            [
                alarm_id,
                county,
                "gateway",
                rule,
                1,
                ev.state,
                ev.device,
                message,
                ev.raised_at,
                now,
                None if down else now,
                "notify",
            ],
        )
