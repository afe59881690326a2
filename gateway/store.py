"""The gateway's SQLite database: schema, batched writes (ingest thread only) and reads (API, exporter).

WAL, one writer (the ingest thread); readers open their own connections. Everything a batch changes is
written in one transaction, so a gateway killed mid-batch has either stored a message or will get it again
from the broker (it is acknowledged only after the commit).

The ledger is keyed on (agent, epoch, seq): an agent's outbox database has its own random epoch, so a
replaced database's sequence starting again at 1 is new data. ``epochs`` keeps each agent's epochs in the
order first seen (their rank orders the agent's status messages). A message that could not be taken goes
to ``dead_letters`` (payload truncated, newest rows kept) for people to inspect.

The schema's version is ``PRAGMA user_version``; ``connect`` brings an older file up to date (see ``_migrate``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from examwatch.kernel import files

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (agent TEXT PRIMARY KEY, site TEXT NOT NULL, room TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'unknown', last_seen REAL, last_status_ts REAL, skew REAL, phase TEXT,
    floor_seq INTEGER NOT NULL DEFAULT 0, max_seq INTEGER NOT NULL DEFAULT 0, missing INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER, status_key TEXT);
CREATE TABLE IF NOT EXISTS epochs (agent TEXT NOT NULL, epoch INTEGER NOT NULL, rank INTEGER NOT NULL,
    floor_seq INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (agent, epoch)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger (agent TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, ts REAL NOT NULL, received REAL NOT NULL, PRIMARY KEY (agent, epoch, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_received ON ledger (received);
CREATE TABLE IF NOT EXISTS readings (agent TEXT NOT NULL, device TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL NOT NULL, ts REAL NOT NULL, quality TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS readings_ts ON readings (ts);
CREATE TABLE IF NOT EXISTS latest (agent TEXT NOT NULL, device TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL NOT NULL, ts REAL NOT NULL, quality TEXT NOT NULL, PRIMARY KEY (agent, device, metric)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alarms (id TEXT PRIMARY KEY, site TEXT NOT NULL, room TEXT NOT NULL, rule TEXT NOT NULL,
    level INTEGER NOT NULL, state TEXT NOT NULL, device TEXT NOT NULL, message TEXT NOT NULL, raised_at REAL NOT NULL,
    updated_at REAL NOT NULL, cleared_at REAL, source TEXT NOT NULL, acked_by TEXT, acked_note TEXT, acked_at REAL,
    epoch_rank INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS alarms_state ON alarms (state, site);
CREATE TABLE IF NOT EXISTS alarm_events (alarm_id TEXT NOT NULL, at REAL NOT NULL, state TEXT NOT NULL,
    level INTEGER NOT NULL, received REAL NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS alarm_events_id ON alarm_events (alarm_id, at);
CREATE TABLE IF NOT EXISTS incidents (id TEXT PRIMARY KEY, site TEXT NOT NULL, fault_class TEXT NOT NULL,
    title TEXT NOT NULL, level INTEGER NOT NULL, state TEXT NOT NULL, opened_at REAL NOT NULL, closed_at REAL,
    members TEXT NOT NULL, active TEXT NOT NULL, acked_by TEXT, acked_note TEXT, acked_at REAL);
CREATE TABLE IF NOT EXISTS incident_events (incident_id TEXT NOT NULL, at REAL NOT NULL, what TEXT NOT NULL,
    rooms TEXT NOT NULL, level INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS incident_events_id ON incident_events (incident_id, at);
CREATE TABLE IF NOT EXISTS devices (agent TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
    PRIMARY KEY (agent, device)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY, received REAL NOT NULL, reason TEXT NOT NULL,
    agent TEXT NOT NULL, topic TEXT NOT NULL, detail TEXT NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, item_id TEXT NOT NULL, at REAL NOT NULL,
    who TEXT NOT NULL, category TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS notes_item ON notes (kind, item_id, at);
CREATE TABLE IF NOT EXISTS reports (id INTEGER PRIMARY KEY, created REAL NOT NULL, who TEXT NOT NULL,
    form TEXT NOT NULL, scope TEXT NOT NULL, format TEXT NOT NULL, sha256 TEXT NOT NULL, content BLOB NOT NULL);
"""

# What people write about an alarm or incident (the records' facts that only people know). "ack" rows are
# written by every acknowledgement; the others come from the duty desk's follow-up notes.
NOTE_CATEGORIES = ("ack", "cause", "measure", "spare", "result", "summary", "close")


SCHEMA_VERSION = 3  # 0/1: before epochs (main up to issue 7); 2: before notes and reports
DEAD_LETTERS_MAX = 10_000  # rows kept, newest
DEAD_LETTER_BYTES = 4096  # of each payload


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    else:
        files.private_db(path)  # 0700 directory, 0600 files, whatever the umask
        # Opened by the gateway's constructor, used by its ingest thread only (one at a time).
        conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        _migrate(conn)
    conn.row_factory = sqlite3.Row
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a gateway.db of an older schema up to ``SCHEMA_VERSION``, in one transaction.

    Before version 2 the ledger was keyed on (agent, seq) without epochs. Its rows cannot match any
    message from now on (every envelope carries an epoch), so the table is rebuilt empty rather than
    guessed at; the agents and alarms tables gain their new columns (an old alarm's order is (0, 0), so
    any new transition of it applies). Readings, alarms and incidents are kept as they are.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    with transaction(conn):
        ledger = [r[1] for r in conn.execute("PRAGMA table_info(ledger)")]
        if ledger and "epoch" not in ledger:
            conn.execute("DROP TABLE ledger")
        for table, columns in (
            ("agents", ("epoch INTEGER", "status_key TEXT")),
            ("alarms", ("epoch_rank INTEGER NOT NULL DEFAULT 0", "seq INTEGER NOT NULL DEFAULT 0")),
        ):
            have = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            for column in columns:
                if have and column.split()[0] not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def received_ranges(conn: sqlite3.Connection) -> dict[tuple[str, int], list[list[int]]]:
    """Per (agent, epoch), the runs of consecutive sequence numbers in the ledger (gaps and islands)."""
    rows = conn.execute(
        "SELECT agent, epoch, MIN(seq), MAX(seq) FROM (SELECT agent, epoch, seq, seq - ROW_NUMBER() OVER "
        "(PARTITION BY agent, epoch ORDER BY seq) AS g FROM ledger) GROUP BY agent, epoch, g ORDER BY agent, epoch, "
        "MIN(seq)"
    ).fetchall()
    out: dict[tuple[str, int], list[list[int]]] = {}
    for agent, epoch, lo, hi in rows:
        out.setdefault((agent, epoch), []).append([lo, hi])
    return out


def dead_letters(conn: sqlite3.Connection, limit: int = 100) -> list[dict[str, Any]]:
    """The newest messages set aside, for people to inspect (``payload`` as stored, truncated)."""
    return _dicts(conn.execute("SELECT * FROM dead_letters ORDER BY id DESC LIMIT ?", [limit]))


# --- reads for the API and the exporter (own connection per thread) ---------------------------------------


def _dicts(rows: Iterable[sqlite3.Row]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


def alarms(
    conn: sqlite3.Connection,
    *,
    state: str = "",
    level: int | None = None,
    site: str = "",
    room: str = "",
    limit: int = 500,
) -> list[dict[str, Any]]:
    sql = "SELECT * FROM alarms WHERE 1=1"
    args: list[Any] = []
    if state == "active":
        sql += " AND state != 'cleared'"
    elif state:
        sql, args = sql + " AND state = ?", [*args, state]
    if level is not None:
        sql, args = sql + " AND level = ?", [*args, level]
    if site:
        sql, args = sql + " AND site = ?", [*args, site]
    if room:
        sql, args = sql + " AND room = ?", [*args, room]
    return _dicts(conn.execute(sql + " ORDER BY raised_at DESC LIMIT ?", [*args, limit]))


def alarm_timeline(conn: sqlite3.Connection, alarm_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT at, state, level, received, event FROM alarm_events WHERE alarm_id = ? ORDER BY at, rowid", [alarm_id]
    ).fetchall()
    return [
        {
            "at": r["at"],
            "state": r["state"],
            "level": r["level"],
            "received": r["received"],
            "event": json.loads(r["event"]),
        }
        for r in rows
    ]


def incidents(
    conn: sqlite3.Connection, *, state: str = "", site: str = "", level: int | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    sql = "SELECT * FROM incidents WHERE 1=1"
    args: list[Any] = []
    if state:
        sql, args = sql + " AND state = ?", [*args, state]
    if site:
        sql, args = sql + " AND site = ?", [*args, site]
    if level is not None:
        sql, args = sql + " AND level = ?", [*args, level]
    out = _dicts(conn.execute(sql + " ORDER BY opened_at DESC LIMIT ?", [*args, limit]))
    for inc in out:
        inc["members"], inc["active"] = json.loads(inc["members"]), json.loads(inc["active"])
        inc["timeline"] = [
            {**dict(r), "rooms": json.loads(r["rooms"])}
            for r in conn.execute(
                "SELECT at, what, rooms, level FROM incident_events WHERE incident_id = ? ORDER BY rowid", [inc["id"]]
            )
        ]
    return out


def agents(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return _dicts(conn.execute("SELECT * FROM agents ORDER BY agent"))


def latest(conn: sqlite3.Connection) -> list[tuple[str, str, str, float, float]]:
    """(agent, device, metric, value, ts) as plain tuples: a county's scrape reads 100k+ (sqlite3.Row costs more)."""
    cur = conn.cursor()
    cur.row_factory = None
    return cur.execute("SELECT agent, device, metric, value, ts FROM latest").fetchall()


def device_kinds(conn: sqlite3.Connection) -> dict[str, dict[str, str]]:
    """Per agent, its devices' kinds as its status last named them."""
    out: dict[str, dict[str, str]] = {}
    for agent, device, kind in conn.execute("SELECT agent, device, kind FROM devices"):
        out.setdefault(agent, {})[device] = kind
    return out


def acknowledge(conn: sqlite3.Connection, table: str, item_id: str, who: str, note: str, now: float) -> bool:
    """Record who acknowledged an alarm or incident and why (also as an "ack" note); False if there is no such one."""
    assert table in ("alarms", "incidents")
    with transaction(conn):
        cur = conn.execute(
            f"UPDATE {table} SET acked_by = ?, acked_note = ?, acked_at = ? WHERE id = ?", [who, note, now, item_id]
        )
        if cur.rowcount != 1:
            return False
        _insert_note(conn, "alarm" if table == "alarms" else "incident", item_id, who, "ack", note, now)
    return True


def add_note(conn: sqlite3.Connection, kind: str, item_id: str, who: str, category: str, text: str, now: float) -> bool:
    """A follow-up note (措施, 结果, ...) on an alarm or incident; False if there is no such one."""
    assert kind in ("alarm", "incident") and category in NOTE_CATEGORIES
    with transaction(conn):
        table = "alarms" if kind == "alarm" else "incidents"
        if conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", [item_id]).fetchone() is None:
            return False
        _insert_note(conn, kind, item_id, who, category, text, now)
    return True


def _insert_note(
    conn: sqlite3.Connection, kind: str, item_id: str, who: str, category: str, text: str, at: float
) -> None:
    conn.execute(
        "INSERT INTO notes (kind, item_id, at, who, category, text) VALUES (?, ?, ?, ?, ?, ?)",
        [kind, item_id, at, who, category, text],
    )


def notes(conn: sqlite3.Connection, kind: str, item_id: str) -> list[dict[str, Any]]:
    """An alarm's or incident's notes, oldest first."""
    return _dicts(
        conn.execute(
            "SELECT at, who, category, text FROM notes WHERE kind = ? AND item_id = ? ORDER BY at, id", [kind, item_id]
        )
    )


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (the connections are in autocommit mode: ``with conn`` would not begin one)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def write_batch(conn: sqlite3.Connection, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
    """Run every (sql, rows) with executemany in one transaction."""
    with transaction(conn):
        for sql, rows in statements:
            if rows:
                conn.executemany(sql, rows)


def prune(conn: sqlite3.Connection, cut: float, alarm_cut: float) -> None:
    """Retention: the ledger and readings received before ``cut``; cleared alarms, closed incidents and dead
    letters before ``alarm_cut`` (the ledger's floors must be stored first: see Engine.retention)."""
    write_batch(
        conn,
        [
            ("DELETE FROM ledger WHERE received < ?", [(cut,)]),
            ("DELETE FROM readings WHERE ts < ?", [(cut,)]),
            (
                "DELETE FROM alarm_events WHERE alarm_id IN (SELECT id FROM alarms WHERE state = 'cleared' AND "
                "cleared_at < ?)",
                [(alarm_cut,)],
            ),
            ("DELETE FROM alarms WHERE state = 'cleared' AND cleared_at < ?", [(alarm_cut,)]),
            (
                "DELETE FROM incident_events WHERE incident_id IN (SELECT id FROM incidents WHERE state = 'closed' "
                "AND closed_at < ?)",
                [(alarm_cut,)],
            ),
            ("DELETE FROM incidents WHERE state = 'closed' AND closed_at < ?", [(alarm_cut,)]),
            ("DELETE FROM dead_letters WHERE received < ?", [(alarm_cut,)]),
        ],
    )


# --- records ---


def alarms_between(conn: sqlite3.Connection, start: float, end: float, site: str = "") -> list[dict[str, Any]]:
    """Every alarm active at some moment of [start, end) by the rooms' times (a day, an incident), oldest first."""
    sql = "SELECT * FROM alarms WHERE raised_at < ? AND (cleared_at IS NULL OR cleared_at >= ?)"
    args: list[Any] = [end, start]
    if site:
        sql, args = sql + " AND site = ?", [*args, site]
    return _dicts(conn.execute(sql + " ORDER BY raised_at, id", args))


def notes_between(conn: sqlite3.Connection, start: float, end: float) -> list[dict[str, Any]]:
    """Every note written in [start, end), with what it is on, oldest first."""
    return _dicts(
        conn.execute(
            "SELECT kind, item_id, at, who, category, text FROM notes WHERE at >= ? AND at < ? ORDER BY at, id",
            [start, end],
        )
    )


def add_report(
    conn: sqlite3.Connection, created: float, who: str, form: str, scope: str, fmt: str, sha256: str, content: bytes
) -> int:
    """Keep a rendered report with its content's hash (a file whose hash is not here was edited)."""
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO reports (created, who, form, scope, format, sha256, content) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [created, who, form, scope, fmt, sha256, content],
        )
    return int(cur.lastrowid or 0)


def report_by_hash(conn: sqlite3.Connection, sha256: str) -> dict[str, Any] | None:
    """The stored report with this content hash (without its content), or None."""
    row = conn.execute(
        "SELECT id, created, who, form, scope, format, sha256 FROM reports WHERE sha256 = ? ORDER BY id LIMIT 1",
        [sha256],
    ).fetchone()
    return dict(row) if row else None


def incidents_between(
    conn: sqlite3.Connection, start: float, end: float, incident_id: str = ""
) -> list[dict[str, Any]]:
    """Incidents open at some moment of [start, end) (or the one with ``incident_id``, whenever), oldest first,
    shaped as ``incidents()`` shapes them (that one lists the newest, by state, for the API)."""
    if incident_id:
        rows = conn.execute("SELECT * FROM incidents WHERE id = ?", [incident_id])
    else:
        rows = conn.execute(
            "SELECT * FROM incidents WHERE opened_at < ? AND (closed_at IS NULL OR closed_at >= ?) ORDER BY opened_at",
            [end, start],
        )
    out = _dicts(rows)
    for inc in out:
        inc["members"], inc["active"] = json.loads(inc["members"]), json.loads(inc["active"])
        inc["timeline"] = [
            {**dict(r), "rooms": json.loads(r["rooms"])}
            for r in conn.execute(
                "SELECT at, what, rooms, level FROM incident_events WHERE incident_id = ? ORDER BY rowid", [inc["id"]]
            )
        ]
    return out


# --- desk (the duty desk: gateway/desk/) ---


def alarm(conn: sqlite3.Connection, alarm_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM alarms WHERE id = ?", [alarm_id]).fetchone()
    return dict(row) if row else None


def incident(conn: sqlite3.Connection, incident_id: str) -> dict[str, Any] | None:
    """One incident as ``incidents`` gives them (members, active, timeline), or None."""
    row = conn.execute("SELECT site, level FROM incidents WHERE id = ?", [incident_id]).fetchone()
    if row is None:
        return None
    # the newest incidents of its site and level, this one among them (ids are unique, opened_at orders)
    found = conn.execute(
        "SELECT COUNT(*) FROM incidents WHERE site = ? AND level = ? AND opened_at >= "
        "(SELECT opened_at FROM incidents WHERE id = ?)",
        [row["site"], row["level"], incident_id],
    ).fetchone()[0]
    same = incidents(conn, site=row["site"], level=row["level"], limit=found)
    return next((i for i in same if i["id"] == incident_id), None)


def room_alarms(
    conn: sqlite3.Connection, site: str, rooms: Sequence[str], start: float, end: float
) -> list[dict[str, Any]]:
    """The alarms of some rooms of a site that were active at some time between ``start`` and ``end``."""
    marks = ",".join("?" * len(rooms))
    return _dicts(
        conn.execute(
            f"SELECT * FROM alarms WHERE site = ? AND room IN ({marks}) AND raised_at <= ? "
            "AND (cleared_at IS NULL OR cleared_at >= ?) ORDER BY raised_at LIMIT 1000",
            [site, *rooms, end, start],
        )
    )


def close_incident(conn: sqlite3.Connection, incident_id: str, who: str, note: str, now: float) -> bool:
    """People close an open incident: its state, an event and a "close" note in one transaction; False if it is
    not open. Called by the ingest thread only (the incidents' one writer: see Engine.close_incident)."""
    with transaction(conn):
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
        _insert_note(conn, "incident", incident_id, who, "close", note, now)
    return True


def settled(conn: sqlite3.Connection) -> dict[tuple[str, str], float]:
    """Per (site, fault class), when people last closed one of its incidents: faults raised before stay closed."""
    rows = conn.execute(
        "SELECT i.site, i.fault_class, MAX(i.closed_at) FROM incidents i JOIN notes n ON n.kind = 'incident' "
        "AND n.item_id = i.id AND n.category = 'close' WHERE i.state = 'closed' GROUP BY i.site, i.fault_class"
    ).fetchall()
    return {(site, fault_class): at for site, fault_class, at in rows}
