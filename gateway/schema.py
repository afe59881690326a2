"""The gateway's schema, once for both engines, as numbered migrations recorded in ``schema_migrations``.

Each migration is written in SQLite's words and rendered for PostgreSQL by ``render`` (types, identity keys,
``WITHOUT ROWID``); a table read in insertion order is marked ``/*rowid*/`` (a comment to SQLite, whose
rowid is implicit; a ``rowid`` identity column on PostgreSQL, so the same ``ORDER BY rowid`` works on both).
``migrate`` applies the missing ones in order, each in its own transaction, under a lock (several gateway
processes may start at once on one PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` is its lock). Applying them
again changes nothing.

A SQLite gateway.db from before migrations (``PRAGMA user_version`` 0 to 3) is first brought to version 3
the old way (``_adopt_legacy``) and then counts as migration 1: readings, alarms and incidents are kept.
"""

from __future__ import annotations

import re
import time
from typing import Any

# (number, name, statements): append only; never edit one that has shipped.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial: the ledger by (agent, epoch, seq), readings, alarms, incidents, notes, reports",
        """
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
CREATE TABLE IF NOT EXISTS alarm_events (/*rowid*/ alarm_id TEXT NOT NULL, at REAL NOT NULL, state TEXT NOT NULL,
    level INTEGER NOT NULL, received REAL NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS alarm_events_id ON alarm_events (alarm_id, at);
CREATE TABLE IF NOT EXISTS incidents (id TEXT PRIMARY KEY, site TEXT NOT NULL, fault_class TEXT NOT NULL,
    title TEXT NOT NULL, level INTEGER NOT NULL, state TEXT NOT NULL, opened_at REAL NOT NULL, closed_at REAL,
    members TEXT NOT NULL, active TEXT NOT NULL, acked_by TEXT, acked_note TEXT, acked_at REAL);
CREATE TABLE IF NOT EXISTS incident_events (/*rowid*/ incident_id TEXT NOT NULL, at REAL NOT NULL, what TEXT NOT NULL,
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
""",
    ),
    (
        2,
        "the notifier's outbox, state and timeline (made by the notifier itself before)",
        """
CREATE TABLE IF NOT EXISTS notify_outbox (id INTEGER PRIMARY KEY, channel TEXT NOT NULL, key TEXT NOT NULL,
    thread TEXT NOT NULL, created REAL NOT NULL, message BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL, sending INTEGER NOT NULL DEFAULT 0, sent_at REAL, error TEXT, UNIQUE (channel, key));
CREATE INDEX IF NOT EXISTS notify_outbox_pending ON notify_outbox (channel, sent_at, id);
CREATE TABLE IF NOT EXISTS notify_state (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS notify_timeline (/*rowid*/ thread TEXT NOT NULL, at REAL NOT NULL, what TEXT NOT NULL,
    detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS notify_timeline_thread ON notify_timeline (thread, at);
""",
    ),
    (
        3,
        "a counter per table whose every change a reader must notice cheaply (the exporter: devices' kinds)",
        """
CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
""",
    ),
]

LATEST = MIGRATIONS[-1][0]
MIGRATE_LOCK = 7_412_001  # PostgreSQL advisory lock: one process migrates at a time

_PG = [
    (re.compile(r"\bid INTEGER PRIMARY KEY\b"), "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"/\*rowid\*/ ?"), "rowid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "),
    (re.compile(r"\) WITHOUT ROWID"), ")"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),  # epochs are random 63-bit numbers
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
]


def render(sql: str, dialect: str) -> list[str]:
    """The statements of a migration in the engine's words."""
    if dialect == "postgresql":
        for pattern, replacement in _PG:
            sql = pattern.sub(replacement, sql)
    return [s.strip() for s in sql.split(";") if s.strip()]


def migrate(conn: Any, dialect: str) -> list[int]:
    """Apply the migrations this database lacks, in order, one transaction each; the numbers applied."""
    if dialect == "sqlite":
        _adopt_legacy(conn)
    if _has_table(conn, dialect) and applied(conn) >= LATEST:
        return []  # the usual case: nothing to do, no lock taken
    done = []
    for number, name, sql in MIGRATIONS:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if dialect == "postgresql":
                conn.execute("SELECT pg_advisory_xact_lock(?)", [MIGRATE_LOCK])
            conn.execute(_MIGRATIONS_TABLE)
            if number > applied(conn):  # another process may have applied it while we waited for the lock
                for statement in render(sql, dialect):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                    [number, name, time.time()],
                )
                done.append(number)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return done


_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
    "applied REAL NOT NULL)"
)


def _has_table(conn: Any, dialect: str) -> bool:
    if dialect == "postgresql":
        return conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0] is True
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'").fetchone() is not None


def applied(conn: Any) -> int:
    """The newest migration this database has (0: none)."""
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])


def _adopt_legacy(conn: Any) -> None:
    """A gateway.db from before ``schema_migrations``: to version 3 the old way, then recorded as migration 1.

    Before version 2 the ledger was keyed on (agent, seq) without epochs. Its rows cannot match any message
    from now on (every envelope carries an epoch), so the table is rebuilt empty rather than guessed at; the
    agents and alarms tables gain their new columns (an old alarm's order is (0, 0), so any new transition
    of it applies). Readings, alarms and incidents are kept as they are.
    """
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_migrations" in tables or "agents" not in tables:
        return  # migrated already, or a new file
    conn.execute("BEGIN IMMEDIATE")
    try:
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
        for statement in render(MIGRATIONS[0][2], "sqlite"):
            conn.execute(statement)
        conn.execute(_MIGRATIONS_TABLE)
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied) VALUES (1, ?, ?)",
            [
                f"{MIGRATIONS[0][1]} (adopted from user_version {conn.execute('PRAGMA user_version').fetchone()[0]})",
                time.time(),
            ],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
