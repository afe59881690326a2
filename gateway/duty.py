"""What the people on duty read and write beyond the API's lists: the records' spans of a day or an incident,
the reports kept with their hash, the desk's views, and incidents closed by hand. Both engines (store.Db)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from examwatch.gateway.store import Db, dicts, insert_note, transaction, with_timelines


class NotLeading(RuntimeError):
    """This gateway is a follower replica: incidents are the leader's to close."""


# --- the records (gateway/records/) ---


def alarms_between(conn: Db, start: float, end: float, site: str = "") -> list[dict[str, Any]]:
    """Every alarm active at some moment of [start, end) by the rooms' times (a day, an incident), oldest first."""
    sql = "SELECT * FROM alarms WHERE raised_at < ? AND (cleared_at IS NULL OR cleared_at >= ?)"
    args: list[Any] = [end, start]
    if site:
        sql, args = sql + " AND site = ?", [*args, site]
    return dicts(conn.execute(sql + " ORDER BY raised_at, id", args))


def notes_between(conn: Db, start: float, end: float) -> list[dict[str, Any]]:
    """Every note written in [start, end), with what it is on, oldest first."""
    return dicts(
        conn.execute(
            "SELECT kind, item_id, at, who, category, text FROM notes WHERE at >= ? AND at < ? ORDER BY at, id",
            [start, end],
        )
    )


def add_report(conn: Db, created: float, who: str, form: str, scope: str, fmt: str, sha256: str, content: bytes) -> int:
    """Keep a rendered report with its content's hash (a file whose hash is not here was edited)."""
    with transaction(conn):
        row = conn.execute(
            "INSERT INTO reports (created, who, form, scope, format, sha256, content) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "RETURNING id",
            [created, who, form, scope, fmt, sha256, content],
        ).fetchone()
    return int(row[0])


def report_by_hash(conn: Db, sha256: str) -> dict[str, Any] | None:
    """The stored report with this content hash (without its content), or None."""
    row = conn.execute(
        "SELECT id, created, who, form, scope, format, sha256 FROM reports WHERE sha256 = ? ORDER BY id LIMIT 1",
        [sha256],
    ).fetchone()
    return dict(row) if row else None


def incidents_between(conn: Db, start: float, end: float, incident_id: str = "") -> list[dict[str, Any]]:
    """Incidents open at some moment of [start, end) (or the one with ``incident_id``, whenever), oldest first,
    shaped as ``incidents()`` shapes them (that one lists the newest, by state, for the API)."""
    if incident_id:
        rows = conn.execute("SELECT * FROM incidents WHERE id = ?", [incident_id])
    else:
        rows = conn.execute(
            "SELECT * FROM incidents WHERE opened_at < ? AND (closed_at IS NULL OR closed_at >= ?) ORDER BY opened_at",
            [end, start],
        )
    return with_timelines(conn, rows)


# --- the duty desk (gateway/desk/) and closing by hand (Engine.close_incident) ---


def alarm(conn: Db, alarm_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM alarms WHERE id = ?", [alarm_id]).fetchone()
    return dict(row) if row else None


def incident(conn: Db, incident_id: str) -> dict[str, Any] | None:
    """One incident as ``incidents`` gives them (members, active, timeline), or None."""
    return next(iter(with_timelines(conn, conn.execute("SELECT * FROM incidents WHERE id = ?", [incident_id]))), None)


def room_alarms(conn: Db, site: str, rooms: Sequence[str], start: float, end: float) -> list[dict[str, Any]]:
    """The alarms of some rooms of a site that were active at some time between ``start`` and ``end``."""
    marks = ",".join("?" * len(rooms))
    return dicts(
        conn.execute(
            f"SELECT * FROM alarms WHERE site = ? AND room IN ({marks}) AND raised_at <= ? "
            "AND (cleared_at IS NULL OR cleared_at >= ?) ORDER BY raised_at LIMIT 1000",
            [site, *rooms, end, start],
        )
    )


def close_incident(conn: Db, incident_id: str, who: str, note: str, now: float) -> bool:
    """People close an open incident: its state, an event and a "close" note in one transaction; False if it is
    not open. Called by the ingest thread only (the incidents' one writer: see Engine.close_incident)."""
    with transaction(conn, timeline=True):
        cur = conn.execute(
            "UPDATE incidents SET state = 'closed', closed_at = ? WHERE id = ? AND state = 'open'", [now, incident_id]
        )
        if cur.rowcount != 1:
            return False
        row = conn.execute("SELECT members, level FROM incidents WHERE id = ?", [incident_id]).fetchone()
        conn.execute(
            "INSERT INTO incident_events (incident_id, at, what, rooms, level) VALUES (?, ?, 'closed', ?, ?)",
            [incident_id, now, row["members"], row["level"]],
        )
        insert_note(conn, "incident", incident_id, who, "close", note, now)
    return True


def settled(conn: Db) -> dict[tuple[str, str], float]:
    """Per (site, fault class), when people last closed one of its incidents: faults raised before stay closed."""
    rows = conn.execute(
        "SELECT i.site, i.fault_class, MAX(i.closed_at) FROM incidents i JOIN notes n ON n.kind = 'incident' "
        "AND n.item_id = i.id AND n.category = 'close' WHERE i.state = 'closed' GROUP BY i.site, i.fault_class"
    ).fetchall()
    return {(site, fault_class): at for site, fault_class, at in rows}
