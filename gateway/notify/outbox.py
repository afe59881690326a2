"""The durable notification outbox in gateway.db: one row per (channel, message), sent in order per channel.

A row is marked ``sending`` before the channel is called and ``sent`` only after it confirmed; a row found
``sending`` at start-up may have been delivered already (the gateway was killed between the two), so it is
sent again and counted: at most one duplicate per channel per kill. The planner's state, the timeline
cursors and the rows it produced are committed in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from examwatch.gateway import store
from examwatch.gateway.notify.messages import Message

_message = msgspec.json.Decoder(Message)


class Row(msgspec.Struct, frozen=True):
    id: int
    key: str
    message: Message
    attempts: int
    due: float


def connect(where: store.Where) -> store.Db:
    """A connection to the gateway's store, whose migrations made the notifier's tables (``schema``)."""
    return store.connect(where)


def load(conn: store.Db, name: str) -> bytes | None:
    row = conn.execute("SELECT value FROM notify_state WHERE name = ?", [name]).fetchone()
    return row[0] if row else None


def commit_step(
    conn: store.Db,
    state: dict[str, bytes],
    rows: Sequence[tuple[str, Message]],
    lines: Sequence[tuple[str, float, str, str]],
    now: float,
) -> int:
    """Store the planner's state and cursors, its new outbox rows (a key already there is skipped) and its
    timeline lines in one transaction; returns the rows added."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT INTO notify_state (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
            "value = excluded.value",
            list(state.items()),
        )
        before = conn.total_changes
        conn.executemany(
            "INSERT OR IGNORE INTO notify_outbox (channel, key, thread, created, message, due) VALUES (?,?,?,?,?,?)",
            [(ch, m.key, m.thread, now, msgspec.json.encode(m), now) for ch, m in rows],
        )
        added = conn.total_changes - before
        conn.executemany("INSERT INTO notify_timeline (thread, at, what, detail) VALUES (?,?,?,?)", lines)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return added


def head(conn: store.Db, channel: str) -> Row | None:
    """The channel's oldest unsent row: it goes first, whatever its retry time (order per channel)."""
    r = conn.execute(
        "SELECT id, key, message, attempts, due FROM notify_outbox WHERE channel = ? AND sent_at IS NULL "
        "ORDER BY id LIMIT 1",
        [channel],
    ).fetchone()
    return Row(r[0], r[1], _message.decode(r[2]), r[3], r[4]) if r else None


def mark_sending(conn: store.Db, row_id: int) -> None:
    conn.execute("UPDATE notify_outbox SET sending = 1 WHERE id = ?", [row_id])


def mark_sent(conn: store.Db, row_id: int, now: float) -> None:
    conn.execute(
        "UPDATE notify_outbox SET sending = 0, sent_at = ?, attempts = attempts + 1, error = NULL WHERE id = ?",
        [now, row_id],
    )


def mark_failed(conn: store.Db, row_id: int, error: str, due: float) -> None:
    conn.execute(
        "UPDATE notify_outbox SET sending = 0, attempts = attempts + 1, error = ?, due = ? WHERE id = ?",
        [error[:300], due, row_id],
    )


def recover(conn: store.Db) -> dict[str, int]:
    """Rows left ``sending`` by a killed gateway, per channel: they go again (maybe a second time)."""
    found = dict(
        conn.execute("SELECT channel, COUNT(*) FROM notify_outbox WHERE sending = 1 GROUP BY channel").fetchall()
    )
    conn.execute("UPDATE notify_outbox SET sending = 0 WHERE sending = 1")
    return found


def queue_lengths(conn: store.Db) -> dict[str, int]:
    return dict(conn.execute("SELECT channel, COUNT(*) FROM notify_outbox WHERE sent_at IS NULL GROUP BY channel"))


def sent_messages(conn: store.Db, channel: str) -> list[Message]:
    """What the channel has confirmed, oldest first (the Alertmanager sender rebuilds its active alerts)."""
    return [
        _message.decode(r[0])
        for r in conn.execute(
            "SELECT message FROM notify_outbox WHERE channel = ? AND sent_at IS NOT NULL ORDER BY id", [channel]
        )
    ]


def timeline(conn: store.Db, thread: str, limit: int = 1000) -> list[dict[str, Any]]:
    """The notifier's record of one alarm or incident: sent (to which tier), held, told directly by the room's
    agent, escalated, acknowledged (who, note), resolved."""
    return [
        {"at": r[0], "what": r[1], "detail": r[2]}
        for r in conn.execute(
            "SELECT at, what, detail FROM notify_timeline WHERE thread = ? ORDER BY at, rowid LIMIT ?", [thread, limit]
        )
    ]


def notifications(conn: store.Db, thread: str, limit: int = 1000) -> dict[str, Any]:
    """What the notifier did about one alarm or incident (``/api/v1/notifications``): its timeline, and every
    message with its channel, when it was queued and confirmed, the attempts and the last error. Nothing when
    the notifier never ran (no channels configured)."""
    messages = []
    for r in conn.execute(
        "SELECT channel, key, created, sent_at, attempts, error, message FROM notify_outbox "
        "WHERE thread = ? ORDER BY id LIMIT ?",
        [thread, limit],
    ):
        m = _message.decode(r[6])
        messages.append(
            {
                "channel": r[0],
                "key": r[1],
                "kind": m.kind,
                "level": m.level,
                "title": m.title,
                "queued": r[2],
                "sent": r[3],
                "attempts": r[4],
                "error": r[5],
            }
        )
    return {"timeline": timeline(conn, thread, limit), "messages": messages}


def prune(conn: store.Db, before: float) -> None:
    conn.execute("DELETE FROM notify_outbox WHERE sent_at IS NOT NULL AND sent_at < ?", [before])
    conn.execute("DELETE FROM notify_timeline WHERE at < ?", [before])
