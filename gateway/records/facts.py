"""What the gateway's database knows about an incident, an alarm or an exam day: read once, plain data after.

The only I/O of the records: everything here is read from the store's functions, and the forms (forms.py)
are built from these objects alone. Times are the rooms' own (an alarm's ``raised_at`` and its events'
``at``), never the gateway's receive times; acknowledgements and notes carry the time people wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from examwatch.gateway import duty, store
from examwatch.gateway.config import CorrelationRule

ALARMS_MAX = 500  # alarms one report lists at most (a day of a county); the form says when more were left out


class RecordError(ValueError):
    """A report that cannot be made from what was asked (no such incident, a form that needs an incident, ...)."""


@dataclass(frozen=True)
class Alarm:
    """One alarm occurrence with its transitions (room times) and the notes people wrote on it."""

    row: dict[str, Any]  # the alarms table's row
    events: list[dict[str, Any]]  # store.alarm_timeline
    notes: list[dict[str, Any]]  # store.notes, "ack" first as written
    kind: str = ""  # the device's kind as the room's status named it ("ups"), or ""


@dataclass(frozen=True)
class Event:
    """An incident (rooms together) or a single alarm, as the 首报/续报/终报 and 一级 forms see it."""

    kind: str  # "incident" | "alarm"
    id: str
    site: str
    title: str
    level: int
    state: str  # open / closed (incident); raised / updated / cleared (alarm)
    opened_at: float  # room time
    closed_at: float | None
    rooms: list[str]  # every room involved, in joining order
    active: list[str]  # rooms still with the fault
    alarms: list[Alarm]
    notes: list[dict[str, Any]]  # the incident's own notes (for an alarm: the alarm's)
    changes: list[dict[str, Any]] = field(default_factory=list)  # the incident's opened/joined/escalated/closed
    site_rooms: int = 0  # rooms of the site the gateway knows


@dataclass(frozen=True)
class Day:
    """An exam day (local midnight to midnight): every alarm active in it, the incidents, every note written."""

    day: date
    start: float
    end: float
    alarms: list[Alarm]
    incidents: list[Event]
    notes: list[dict[str, Any]]  # duty.notes_between: kind, item_id, at, who, category, text
    sites: dict[str, list[str]]  # site -> its rooms (the agents table)
    truncated: bool = False


def _alarm(conn: store.Db, row: dict[str, Any], kinds: dict[str, dict[str, str]]) -> Alarm:
    agent = f"{row['site']}/{row['room']}"
    return Alarm(
        row=row,
        events=store.alarm_timeline(conn, row["id"]),
        notes=store.notes(conn, "alarm", row["id"]),
        kind=kinds.get(agent, {}).get(row["device"], ""),
    )


def _site_rooms(conn: store.Db) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in store.agents(conn):
        out.setdefault(a["site"], []).append(a["room"])
    return out


def event(conn: store.Db, item_id: str, rules: list[CorrelationRule]) -> Event:
    """The incident with this id, else the alarm with it; RecordError if neither exists."""
    kinds = store.device_kinds(conn)
    found = duty.incidents_between(conn, 0, 0, incident_id=item_id)
    if found:
        return _incident(conn, found[0], rules, kinds, len(_site_rooms(conn).get(found[0]["site"], [])))
    row = duty.alarm(conn, item_id)
    if row is None:
        raise RecordError(f"没有编号为 {item_id[:200]!r} 的事件或报警")
    a = _alarm(conn, row, kinds)
    return Event(
        kind="alarm",
        id=row["id"],
        site=row["site"],
        title=row["message"],
        level=row["level"],
        state=row["state"],
        opened_at=row["raised_at"],
        closed_at=row["cleared_at"],
        rooms=[row["room"]],
        active=[] if row["state"] == "cleared" else [row["room"]],
        alarms=[a],
        notes=a.notes,
        site_rooms=len(_site_rooms(conn).get(row["site"], [])),
    )


def _incident(
    conn: store.Db,
    inc: dict[str, Any],
    rules: list[CorrelationRule],
    kinds: dict[str, dict[str, str]],
    site_rooms: int,
) -> Event:
    """An incident with the alarms that made it: its rooms' alarms of its fault class, raised within its span."""
    rule = next((r for r in rules if r.fault_class == inc["fault_class"]), None)
    window = rule.window if rule else 0.0
    end = inc["closed_at"] if inc["closed_at"] is not None else float("inf")
    rows = [
        r
        for r in duty.alarms_between(conn, inc["opened_at"] - window, min(end, 2.0**32) + 1, site=inc["site"])
        if r["room"] in inc["members"] and (rule is None or r["rule"] in rule.rules)
    ]
    return Event(
        kind="incident",
        id=inc["id"],
        site=inc["site"],
        title=inc["title"],
        level=inc["level"],
        state=inc["state"],
        opened_at=inc["opened_at"],
        closed_at=inc["closed_at"],
        rooms=list(inc["members"]),
        active=list(inc["active"]),
        alarms=[_alarm(conn, r, kinds) for r in rows[:ALARMS_MAX]],
        notes=store.notes(conn, "incident", inc["id"]),
        changes=inc["timeline"],
        site_rooms=site_rooms,
    )


def day_bounds(day: date, tz: str) -> tuple[float, float]:
    """Local midnight to the next local midnight, as unix times (a DST day is 23 or 25 hours long)."""
    zone = ZoneInfo(tz)
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    nxt = day + timedelta(days=1)
    return start.timestamp(), datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone).timestamp()


def exam_day(conn: store.Db, day: date, tz: str, rules: list[CorrelationRule]) -> Day:
    start, end = day_bounds(day, tz)
    kinds = store.device_kinds(conn)
    rows = duty.alarms_between(conn, start, end)
    sites = _site_rooms(conn)
    incidents = [
        _incident(conn, inc, rules, kinds, len(sites.get(inc["site"], [])))
        for inc in duty.incidents_between(conn, start, end)
    ]
    return Day(
        day=day,
        start=start,
        end=end,
        alarms=[_alarm(conn, r, kinds) for r in rows[:ALARMS_MAX]],
        incidents=incidents,
        notes=duty.notes_between(conn, start, end),
        sites=sites,
        truncated=len(rows) > ALARMS_MAX,
    )
