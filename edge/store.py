"""The agent's local store: readings, alarm transitions and the uplink outbox in one SQLite file (WAL).

One writer: ``Store`` is used only from the agent's writer thread. Each ``write`` is one transaction that
holds the readings, the alarm transitions they caused and the outbox rows that carry both to the county,
so a kill -9 at any moment leaves either all of a batch or none of it. The uplink reads the outbox through
its own read-only connection (``OutboxReader``) and hands acknowledged sequence numbers back to the writer.

The outbox's sequence numbers belong to the database's ``epoch``, a random number chosen when the database
is created: a database set aside and replaced starts its sequence at 1 again under a new epoch, and the
county takes it as new data. ``boot`` counts the opens of the database (the agent's starts): it orders
the agent's status messages across restarts.
"""

from __future__ import annotations

import contextlib
import gc
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import msgspec

from examwatch.edge import statedir
from examwatch.kernel import files
from examwatch.kernel.model import AlarmEvent, Reading

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
    device TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL, quality TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS readings_ts ON readings (ts);
CREATE TABLE IF NOT EXISTS alarms (alarm_id TEXT NOT NULL, state TEXT NOT NULL, at REAL NOT NULL,
    rule TEXT NOT NULL, level INTEGER NOT NULL, device TEXT NOT NULL, event BLOB NOT NULL, evidence BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS alarms_id ON alarms (alarm_id);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
    created REAL NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

BUSY_TIMEOUT = 30.0  # seconds a connection waits for another's lock
# Page cache per connection, KiB (SQLite's default: 2000). The writer appends and the uplink reads the
# outbox's head: both touch few pages, and the OS caches the file anyway; an unbounded-looking 2 MiB per
# connection is a Pi Zero's memory held for nothing once a few days of readings have passed through it.
CACHE_KIB = 512
_readings = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(AlarmEvent)


class OutboxRow(NamedTuple):
    seq: int
    kind: str  # "readings" | "alarms": the topic's last level
    created: float
    body: bytes


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit: every transaction is an explicit _atomic block. Plain sqlite3, not sqlite_utils: its
    # import (click, pluggy, dateutil) cost the agent about 8 MiB of RSS for a BEGIN and a COMMIT.
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT, isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    return conn


@contextlib.contextmanager
def _atomic(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    conn.execute("BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # an error may already have ended it
            conn.execute("ROLLBACK")
        raise


def identity(conn: sqlite3.Connection) -> tuple[int, int]:
    """(epoch, boot) from the meta table (0 where not set)."""
    rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('epoch', 'boot')").fetchall())
    return rows.get("epoch", 0), rows.get("boot", 0)


class Store:
    def __init__(
        self, path: str | Path, *, retention_s: float = 72 * 3600, outbox_budget_bytes: int = 64 << 20
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = _connect(self.path)
        # kill -9 loses nothing committed in WAL mode even with NORMAL; alarm commits go FULL (see write).
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.retention_s = retention_s
        self.outbox_budget_bytes = outbox_budget_bytes
        self.outbox_dropped = 0  # readings rows given up because the outbox was over its budget
        self._outbox_bytes = self._scalar("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM outbox")
        self._pruned_at = 0.0
        self.epoch, self.boot = self._identity()

    def _identity(self) -> tuple[int, int]:
        """This database's outbox epoch (chosen at creation) and this open's boot number."""
        with _atomic(self.db):
            conn = self.db
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (secrets.randbelow(2**62) + 1,))
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('boot', 1) ON CONFLICT (key) DO UPDATE SET value = value + 1"
            )
        return identity(conn)

    def _scalar(self, sql: str, *args: object) -> int:
        return self.db.execute(sql, args).fetchone()[0]

    def write(
        self,
        readings: Sequence[Reading],
        events: Sequence[AlarmEvent] = (),
        *,
        evidence: dict[str, list[Reading]] | None = None,
        outbox: Sequence[tuple[str, bytes]] = (),
        flush_readings: int = 0,
    ) -> None:
        """Store one batch in one transaction. ``evidence`` maps an alarm id to the readings behind it.

        ``flush_readings`` (messages of at most that many readings) first queues, ahead of ``outbox``, every
        stored reading not yet queued: readings reach the outbox by a cursor over their own table, committed
        with it, so a reading is either stored and later sent or not stored at all, however the agent dies.
        """
        if events:
            # An alarm that was reported raised must survive a power cut too, not only a kill -9.
            self.db.execute("PRAGMA synchronous=FULL")
        with _atomic(self.db):
            conn = self.db
            conn.executemany(
                "INSERT INTO readings (ts, device, metric, value, quality) VALUES (?, ?, ?, ?, ?)",
                [(r.ts, r.device, r.metric, r.value, r.quality) for r in readings],
            )
            conn.executemany(
                "INSERT INTO alarms (alarm_id, state, at, rule, level, device, event, evidence) VALUES "
                "(?,?,?,?,?,?,?,?)",
                [
                    (
                        e.id,
                        e.state,
                        e.at,
                        e.rule,
                        e.level,
                        e.device,
                        msgspec.json.encode(e),
                        _readings.encode((evidence or {}).get(e.id, [])),
                    )
                    for e in events
                ],
            )
            now = time.time()
            if flush_readings:
                outbox = [*self._unsent_readings(flush_readings), *outbox]
            conn.executemany(
                "INSERT INTO outbox (kind, created, body) VALUES (?, ?, ?)", [(k, now, b) for k, b in outbox]
            )
            self._outbox_bytes += sum(len(b) for _, b in outbox)
            if self._outbox_bytes > self.outbox_budget_bytes:
                self._thin_outbox()
        if events:
            self.db.execute("PRAGMA synchronous=NORMAL")
        self._prune(readings[-1].ts if readings else None)

    def _unsent_readings(self, per_message: int) -> list[tuple[str, bytes]]:
        conn = self.db
        row = conn.execute("SELECT value FROM meta WHERE key = 'readings_sent'").fetchone()
        rows = conn.execute(
            "SELECT id, device, metric, value, ts, quality FROM readings WHERE id > ? ORDER BY id",
            (row[0] if row else 0,),
        ).fetchall()
        if not rows:
            return []
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('readings_sent', ?)", (rows[-1][0],))
        batch = [Reading(*r[1:]) for r in rows]
        return [("readings", _readings.encode(batch[i : i + per_message])) for i in range(0, len(batch), per_message)]

    def _thin_outbox(self) -> None:
        """Over budget: drop the oldest readings rows (the county loses detail, never an alarm)."""
        conn = self.db
        excess = self._outbox_bytes - int(self.outbox_budget_bytes * 0.9)  # free a margin, not one row per write
        rows = conn.execute("SELECT seq, LENGTH(body) FROM outbox WHERE kind = 'readings' ORDER BY seq").fetchall()
        doomed, freed = [], 0
        for seq, size in rows:
            if freed >= excess:
                break
            doomed.append((seq,))
            freed += size
        conn.executemany("DELETE FROM outbox WHERE seq = ?", doomed)
        self._outbox_bytes -= freed
        self.outbox_dropped += len(doomed)

    def _prune(self, now: float | None) -> None:
        """Apply the readings retention, at most once a minute."""
        if now is None or now - self._pruned_at < 60:
            return
        self._pruned_at = now
        with _atomic(self.db):
            self.db.execute("DELETE FROM readings WHERE ts < ?", [now - self.retention_s])

    def ack(self, seqs: Iterable[int]) -> None:
        """Delete outbox rows the broker acknowledged."""
        with _atomic(self.db):
            conn = self.db
            freed = 0
            for seq in list(seqs):
                row = conn.execute("DELETE FROM outbox WHERE seq = ? RETURNING LENGTH(body)", (seq,)).fetchone()
                freed += row[0] if row else 0
        self._outbox_bytes -= freed

    @property
    def outbox_used_ratio(self) -> float:
        return self._outbox_bytes / self.outbox_budget_bytes if self.outbox_budget_bytes else 0.0

    def open_alarms(self) -> list[AlarmEvent]:
        """The latest transition of every alarm not yet cleared (to restore the rules engine at start-up)."""
        rows = self.db.execute(
            "SELECT event FROM alarms a WHERE rowid = (SELECT MAX(rowid) FROM alarms b WHERE b.alarm_id = a.alarm_id)"
            " AND state != 'cleared' ORDER BY rowid"
        ).fetchall()
        return [_event_decoder.decode(r[0]) for r in rows]

    def transitions(self, alarm_id: str | None = None) -> list[AlarmEvent]:
        sql, args = "SELECT event FROM alarms", []
        if alarm_id is not None:
            sql, args = sql + " WHERE alarm_id = ?", [alarm_id]
        return [_event_decoder.decode(r[0]) for r in self.db.execute(sql + " ORDER BY rowid", args).fetchall()]

    def close(self) -> None:
        self.db.close()


class Opened(NamedTuple):
    store: Store
    open_alarms: list[AlarmEvent]  # to restore the rules engine
    set_aside: Path | None  # where a corrupt database went (a fresh one was started), else None
    problem: str  # what was wrong with it


_WAL_MAGIC = (0x377F0682, 0x377F0683)


def is_corruption(err: sqlite3.Error) -> bool:
    """A damaged file (SQLITE_CORRUPT, SQLITE_NOTADB), not a busy, full or unreadable disk."""
    return getattr(err, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _damage(path: Path) -> str:
    """What is wrong with the database at ``path`` (quick_check, without opening it for the agent), or ""."""
    try:
        with open(f"{path}-wal", "rb") as f:
            head = f.read(32)
        # SQLite silently ignores a WAL whose header is not its own, and all it held with it. Zeros are a
        # header a power cut kept from being written (nothing committed behind it); anything else is damage.
        if len(head) >= 4 and int.from_bytes(head[:4], "big") not in _WAL_MAGIC and any(head):
            return "the -wal file is not a SQLite write-ahead log"
    except FileNotFoundError:
        pass
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT)
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
        return "" if rows == [("ok",)] else ("quick_check: " + "; ".join(str(r[0]) for r in rows[:3]))[:500]
    except sqlite3.DatabaseError as err:
        if not is_corruption(err):
            raise
        return str(err)
    finally:
        conn.close()


def open_checked(path: str | Path, *, retention_s: float, outbox_budget_bytes: int) -> Opened:
    """Open the agent's database 0600, or set a corrupt one aside (``statedir.set_aside``) and start a fresh
    one: a damaged file must not keep the room without alarms. Other errors (busy, unreadable) raise."""
    path = Path(path)

    def store() -> Store:
        return Store(path, retention_s=retention_s, outbox_budget_bytes=outbox_budget_bytes)

    files.private_db(path)
    problem = _damage(path)
    if not problem:
        try:
            opened = store()
            try:
                return Opened(opened, opened.open_alarms(), None, "")
            except BaseException:
                opened.close()
                raise
        except sqlite3.DatabaseError as err:
            if not is_corruption(err):
                raise
            problem = str(err)
        except msgspec.DecodeError as err:  # an alarm row that is not what the agent wrote
            problem = f"stored alarm unreadable: {err}"
        # A connection left open would, when collected, delete "<path>-wal" by name: the new database's.
        gc.collect()
    aside = statedir.set_aside(path)
    files.private_db(path)
    return Opened(store(), [], aside, problem)


class OutboxReader:
    """The uplink's own read-only view of the outbox (WAL lets it read while the writer writes)."""

    def __init__(self, path: str | Path) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT, check_same_thread=False)
        self.conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")

    def pending(self, after_seq: int = 0, limit: int = 500) -> list[OutboxRow]:
        rows = self.conn.execute(
            "SELECT seq, kind, created, body FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [OutboxRow(*r) for r in rows]

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def unacknowledged(self, acked: Iterable[int]) -> tuple[int, set[int]]:
        """The rows in the outbox, and which of ``acked`` (acknowledged; the writer deletes them a moment
        later) are among them: both from one snapshot."""
        rows, present = self.conn.execute(
            "SELECT COUNT(*), json_group_array(seq) FILTER (WHERE seq IN (SELECT value FROM json_each(?))) FROM outbox",
            (msgspec.json.encode(list(acked)),),
        ).fetchone()
        return rows, set(msgspec.json.decode(present))

    def identity(self) -> tuple[int, int]:
        """(epoch, boot) as the writer set them when it opened the database."""
        return identity(self.conn)

    def close(self) -> None:
        self.conn.close()
