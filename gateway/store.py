"""The gateway's store: connections, batched writes (the ingest thread) and reads (API, exporter, notifier).

Two engines behind one interface: SQLite (embedded, the default: one file, WAL, one writer, the ingest
thread) and PostgreSQL (``pg.py``: a connection pool; several gateway processes may share it). The SQL is
written once in SQLite's words; ``pg.translate`` and ``schema.render`` say it in PostgreSQL's, and what
cannot be said the same way lives here behind a function (``claim``, ``transaction``). Readers open their
own connections. Everything a batch changes is
written in one transaction, so a gateway killed mid-batch has either stored a message or will get it again
from the broker (it is acknowledged only after the commit).

The ledger is keyed on (agent, epoch, seq): an agent's outbox database has its own random epoch, so a
replaced database's sequence starting again at 1 is new data. ``epochs`` keeps each agent's epochs in the
order first seen (their rank orders the agent's status messages). A message that could not be taken goes
to ``dead_letters`` (payload truncated, newest rows kept) for people to inspect.

The schema is ``schema.MIGRATIONS``; a writer's ``connect`` applies those the database lacks.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from examwatch.gateway import schema
from examwatch.kernel import files

# What people write about an alarm or incident (the records' facts that only people know). "ack" rows are
# written by every acknowledgement; the others come from the duty desk's follow-up notes.
NOTE_CATEGORIES = ("ack", "cause", "measure", "spare", "result", "summary", "close")


SCHEMA_VERSION = schema.LATEST
DEAD_LETTERS_MAX = 10_000  # rows kept, newest
DEAD_LETTER_BYTES = 4096  # of each payload
TIMELINE_LOCK = 7_412_002  # PostgreSQL advisory lock held by every transaction that adds to a timeline


@dataclass(frozen=True)
class Postgres:
    """Where a PostgreSQL store is: a libpq conninfo without the password, which is read from its file."""

    conninfo: str
    password_file: str = ""
    pool_max: int = 20

    def password(self) -> str:
        return files.read_secret(self.password_file).strip() if self.password_file else ""


Where = str | Path | Postgres  # a SQLite file, or a PostgreSQL database


class Db(Protocol):
    """What the gateway asks of a connection, SQLite's (``sqlite3.Connection``) or PostgreSQL's (``pg.Conn``)."""

    @property
    def total_changes(self) -> int: ...
    def execute(self, sql: str, params: Any = ..., /) -> Any: ...
    def executemany(self, sql: str, rows: Any, /) -> Any: ...
    def close(self) -> None: ...


class _Sqlite(sqlite3.Connection):
    dialect = "sqlite"


def dialect(conn: Db) -> str:
    return str(getattr(conn, "dialect", "sqlite"))


def connect(where: Where, *, readonly: bool = False) -> Db:
    """A connection to the store; a writer's brings the schema up to date first (``schema.migrate``)."""
    if isinstance(where, Postgres):
        from examwatch.gateway import pg

        pconn = pg.connect(where.conninfo, where.password(), where.pool_max)
        if not readonly:
            schema.migrate(pconn, "postgresql")
        return pconn
    if readonly:
        conn = sqlite3.connect(f"file:{where}?mode=ro", uri=True, timeout=30, check_same_thread=False, factory=_Sqlite)
    else:
        files.private_db(where)  # 0700 directory, 0600 files, whatever the umask
        # Opened by the gateway's constructor, used by its ingest thread only (one at a time).
        conn = sqlite3.connect(str(where), timeout=30, isolation_level=None, check_same_thread=False, factory=_Sqlite)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        schema.migrate(conn, "sqlite")
    conn.row_factory = sqlite3.Row
    return conn


def change_mark(conn: Db) -> object:
    """A value that changes with every commit of any connection (the desk's cheap "anything new?")."""
    if dialect(conn) == "postgresql":
        return conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    return conn.execute("PRAGMA data_version").fetchone()[0]


def unavailable(err: BaseException) -> bool:
    """Whether ``err`` says the database cannot be reached now (PostgreSQL restarting, the network): retry."""
    if "psycopg" not in sys.modules:
        return False
    import psycopg
    import psycopg_pool

    return isinstance(err, psycopg.OperationalError | psycopg_pool.PoolTimeout)


def received_ranges(conn: Db, agent: str = "") -> dict[tuple[str, int], list[list[int]]]:
    """Per (agent, epoch), the runs of consecutive sequence numbers in the ledger (gaps and islands); of one
    agent only if named."""
    rows = conn.execute(
        "SELECT agent, epoch, MIN(seq), MAX(seq) FROM (SELECT agent, epoch, seq, seq - ROW_NUMBER() OVER "
        f"(PARTITION BY agent, epoch ORDER BY seq) AS g FROM ledger{' WHERE agent = ?' if agent else ''}) AS runs "
        "GROUP BY agent, epoch, g ORDER BY agent, epoch, MIN(seq)",
        [agent] if agent else [],
    ).fetchall()
    out: dict[tuple[str, int], list[list[int]]] = {}
    for who, epoch, lo, hi in rows:
        out.setdefault((who, epoch), []).append([lo, hi])
    return out


def dead_letters(conn: Db, limit: int = 100) -> list[dict[str, Any]]:
    """The newest messages set aside, for people to inspect (``payload`` as stored, truncated)."""
    return dicts(conn.execute("SELECT * FROM dead_letters ORDER BY id DESC LIMIT ?", [limit]))


# --- reads for the API and the exporter (own connection per thread) ---------------------------------------


def dicts(rows: Iterable[Any]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


def alarms(
    conn: Db,
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
    return dicts(conn.execute(sql + " ORDER BY raised_at DESC LIMIT ?", [*args, limit]))


def alarm_timeline(conn: Db, alarm_id: str) -> list[dict[str, Any]]:
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
    conn: Db, *, state: str = "", site: str = "", level: int | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    sql = "SELECT * FROM incidents WHERE 1=1"
    args: list[Any] = []
    if state:
        sql, args = sql + " AND state = ?", [*args, state]
    if site:
        sql, args = sql + " AND site = ?", [*args, site]
    if level is not None:
        sql, args = sql + " AND level = ?", [*args, level]
    return with_timelines(conn, conn.execute(sql + " ORDER BY opened_at DESC LIMIT ?", [*args, limit]))


def with_timelines(conn: Db, rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Incidents as the API gives them: members and active rooms decoded, each with its timeline."""
    out = dicts(rows)
    for inc in out:
        inc["members"], inc["active"] = json.loads(inc["members"]), json.loads(inc["active"])
        inc["timeline"] = [
            {**dict(r), "rooms": json.loads(r["rooms"])}
            for r in conn.execute(
                "SELECT at, what, rooms, level FROM incident_events WHERE incident_id = ? ORDER BY rowid", [inc["id"]]
            )
        ]
    return out


def agents(conn: Db) -> list[dict[str, Any]]:
    return dicts(conn.execute("SELECT * FROM agents ORDER BY agent"))


def latest(conn: Db) -> list[Any]:
    """(agent, device, metric, value, ts) as plain tuples, in key order (the exporter groups by device)."""
    return _tuples(conn, "SELECT agent, device, metric, value, ts FROM latest" + _KEY_ORDER[dialect(conn)])


def latest_values(conn: Db) -> list[Any]:
    """(value, ts) of every ``latest`` row, in the same order as ``latest``: a scrape that knows the keys."""
    return _tuples(conn, "SELECT value, ts FROM latest" + _KEY_ORDER[dialect(conn)])


def latest_count(conn: Db) -> int:
    """How many ``latest`` rows. Rows are only ever added (a value replaces its key's), so in one snapshot an
    unchanged count is an unchanged set of keys."""
    return int(conn.execute("SELECT count(*) FROM latest").fetchone()[0])


def mark(conn: Db, name: str) -> int:
    """The counter ``name`` of table ``marks`` (0 until first counted): it moves with every change of that data."""
    row = conn.execute("SELECT value FROM marks WHERE name = ?", [name]).fetchone()
    return 0 if row is None else int(row[0])


_KEY_ORDER = {"sqlite": "", "postgresql": " ORDER BY agent, device, metric"}  # SQLite's: the table is WITHOUT ROWID


@contextmanager
def snapshot(conn: Db) -> Iterator[Db]:
    """Several reads that see one state of the database (the connections are in autocommit mode)."""
    conn.execute("BEGIN" if dialect(conn) == "sqlite" else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def _tuples(conn: Db, sql: str) -> list[Any]:
    """The rows as plain tuples: a scrape reads 100k+ of them (sqlite3.Row costs more)."""
    if dialect(conn) == "sqlite":
        cur = conn.cursor()  # type: ignore[attr-defined]
        cur.row_factory = None
        return cur.execute(sql).fetchall()
    return conn.execute(sql).fetchall()


def device_kinds(conn: Db) -> dict[str, dict[str, str]]:
    """Per agent, its devices' kinds as its status last named them."""
    out: dict[str, dict[str, str]] = {}
    for agent, device, kind in _tuples(conn, "SELECT agent, device, kind FROM devices"):
        out.setdefault(agent, {})[device] = kind
    return out


def acknowledge(conn: Db, table: str, item_id: str, who: str, note: str, now: float) -> bool:
    """Record who acknowledged an alarm or incident and why (also as an "ack" note); False if there is no such one."""
    assert table in ("alarms", "incidents")
    with transaction(conn):
        cur = conn.execute(
            f"UPDATE {table} SET acked_by = ?, acked_note = ?, acked_at = ? WHERE id = ?", [who, note, now, item_id]
        )
        if cur.rowcount != 1:
            return False
        insert_note(conn, "alarm" if table == "alarms" else "incident", item_id, who, "ack", note, now)
    return True


def add_note(conn: Db, kind: str, item_id: str, who: str, category: str, text: str, now: float) -> bool:
    """A follow-up note (措施, 结果, ...) on an alarm or incident; False if there is no such one."""
    assert kind in ("alarm", "incident") and category in NOTE_CATEGORIES
    with transaction(conn):
        table = "alarms" if kind == "alarm" else "incidents"
        if conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", [item_id]).fetchone() is None:
            return False
        insert_note(conn, kind, item_id, who, category, text, now)
    return True


def insert_note(conn: Db, kind: str, item_id: str, who: str, category: str, text: str, at: float) -> None:
    conn.execute(
        "INSERT INTO notes (kind, item_id, at, who, category, text) VALUES (?, ?, ?, ?, ?, ?)",
        [kind, item_id, at, who, category, text],
    )


def notes(conn: Db, kind: str, item_id: str) -> list[dict[str, Any]]:
    """An alarm's or incident's notes, oldest first."""
    return dicts(
        conn.execute(
            "SELECT at, who, category, text FROM notes WHERE kind = ? AND item_id = ? ORDER BY at, id", [kind, item_id]
        )
    )


@contextmanager
def transaction(conn: Db, *, timeline: bool = False) -> Iterator[Db]:
    """One write transaction (the connections are in autocommit mode: ``with conn`` would not begin one).

    ``timeline``: it adds to a table read in insertion order (alarm_events, incident_events). SQLite has one
    writer at a time anyway; on PostgreSQL such transactions take turns by a lock, so rows become visible in
    the order of their ``rowid`` and a reader's cursor (the notifier's) never passes one still to commit.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        if timeline and dialect(conn) == "postgresql":
            conn.execute("SELECT pg_advisory_xact_lock(?)", [TIMELINE_LOCK])
        yield conn
        conn.execute("COMMIT")
    except BaseException as err:
        try:
            conn.execute("ROLLBACK")
        except Exception:
            if not unavailable(err):  # a lost connection took its transaction with it: nothing to roll back
                raise
        raise


Statements = Sequence[tuple[str, Sequence[Sequence[Any]]]]


def write(conn: Db, statements: Statements) -> None:
    """Run every (sql, rows) with executemany, in the caller's transaction."""
    for sql, rows in statements:
        if rows:
            conn.executemany(sql, rows)


def write_batch(conn: Db, statements: Statements) -> None:
    """Run every (sql, rows) with executemany in one transaction."""
    with transaction(conn):
        write(conn, statements)


def claim(conn: Db, ledger: Sequence[Sequence[Any]]) -> set[tuple[str, int, int]]:
    """Enter messages in the ledger, in the caller's transaction; the (agent, epoch, seq) that were not there.

    The ledger's key is the one guard against storing a message twice, whoever else (another gateway
    process on the same PostgreSQL) is storing it at the same moment: the second waits for the first's
    commit and then finds the key taken.
    """
    if not ledger:
        return set()
    if dialect(conn) == "postgresql":
        cols = list(zip(*ledger, strict=True))
        rows = conn.execute(
            "INSERT INTO ledger (agent, epoch, seq, kind, ts, received) SELECT * FROM unnest(?::text[], ?::bigint[], "
            "?::bigint[], ?::text[], ?::float8[], ?::float8[]) ON CONFLICT DO NOTHING RETURNING agent, epoch, seq",
            [list(c) for c in cols],
        ).fetchall()
        return {(r[0], r[1], r[2]) for r in rows}
    sql = "INSERT OR IGNORE INTO ledger (agent, epoch, seq, kind, ts, received) VALUES (?,?,?,?,?,?)"
    return {(row[0], row[1], row[2]) for row in ledger if conn.execute(sql, row).rowcount}


def prune(conn: Db, cut: float, alarm_cut: float) -> None:
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
