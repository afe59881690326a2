"""The agent's store: one transaction per batch, outbox budget, restore, and kill -9 at any moment."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import msgspec

from examwatch.edge.store import OutboxReader, Store
from examwatch.kernel.model import AlarmEvent, Reading


def event(i: int, state: str = "raised") -> AlarmEvent:
    return AlarmEvent(
        id=f"s/r/door/d{i}/1",
        site="s",
        room="r",
        rule="door",
        level=2,
        state=state,
        device=f"d{i}",
        at=100.0 + i,
        raised_at=100.0,
        message="保密室门打开",
    )


def test_write_stores_readings_transitions_and_outbox_together(tmp_path):
    store = Store(tmp_path / "a.db")
    r = Reading("door1", "door_open", 1.0, 100.0)
    store.write(
        [r],
        [event(1)],
        evidence={event(1).id: [r]},
        outbox=[("readings", msgspec.json.encode([r])), ("alarms", msgspec.json.encode(event(1)))],
    )
    reader = OutboxReader(tmp_path / "a.db")
    rows = reader.pending()
    assert [row.kind for row in rows] == ["readings", "alarms"]
    assert rows[0].seq < rows[1].seq
    assert msgspec.json.decode(rows[1].body, type=AlarmEvent) == event(1)
    assert store.transitions(event(1).id) == [event(1)]
    store.ack([rows[0].seq])
    assert [row.seq for row in reader.pending()] == [rows[1].seq]
    # sequence numbers are never reused, even after the rows are gone
    store.ack([rows[1].seq])
    store.write([], outbox=[("readings", b"[]")])
    assert reader.pending()[0].seq > rows[1].seq


def test_open_alarms_are_the_uncleared_ones(tmp_path):
    store = Store(tmp_path / "a.db")
    store.write([], [event(1), event(2)])
    store.write([], [event(1, "cleared")])
    assert [e.id for e in store.open_alarms()] == [event(2).id]


def test_outbox_budget_thins_readings_never_alarms(tmp_path):
    store = Store(tmp_path / "a.db", outbox_budget_bytes=20_000)
    body = b"x" * 1000
    for i in range(50):
        store.write([], [event(i)], outbox=[("readings", body), ("alarms", msgspec.json.encode(event(i)))])
    kinds = [row.kind for row in OutboxReader(tmp_path / "a.db").pending(limit=10_000)]
    assert kinds.count("alarms") == 50
    assert store.outbox_dropped == 50 - kinds.count("readings") > 0
    assert store.outbox_used_ratio <= 1.0


def test_retention_prunes_old_readings(tmp_path):
    store = Store(tmp_path / "a.db", retention_s=3600)
    store.write([Reading("n", "noise_db", 50.0, 1000.0)])
    store.write([Reading("n", "noise_db", 51.0, 1000.0 + 7200)])
    assert [r[0] for r in store.db.execute("SELECT value FROM readings")] == [51.0]


WRITER = textwrap.dedent("""
    import sys
    from examwatch.kernel.model import AlarmEvent, Reading
    from examwatch.edge.store import Store
    store = Store(sys.argv[1])
    i = int(sys.argv[2])
    while True:
        e = AlarmEvent(id=f"s/r/x/d/{i}", site="s", room="r", rule="x", level=1, state="raised", device="d",
                       at=float(i), raised_at=float(i), message="m")
        store.write([Reading("d", "noise_db", float(n), float(i)) for n in range(50)], [e], outbox=[("alarms", b"{}")])
        print(i, flush=True)  # reported raised only after the commit returned
        i += 1
""")


def test_kill_9_at_any_moment_keeps_every_reported_transition(tmp_path):
    db = tmp_path / "k.db"
    rng = random.Random(7)
    reported: set[int] = set()
    start = 0
    for _ in range(15):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(start)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        time.sleep(0.3 + rng.random() * 0.4)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        got = {int(x) for x in out.split()}
        reported |= got
        start = max(reported | {start}) + 1
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
    assert len(reported) > 15
    stored = {int(e.id.rsplit("/", 1)[1]) for e in Store(db).transitions()}
    assert reported <= stored


def test_readings_reach_the_outbox_by_a_cursor_that_survives_a_restart(tmp_path):
    store = Store(tmp_path / "a.db")
    first = [Reading("n", "noise_db", float(i), 100.0 + i) for i in range(5)]
    store.write(first)  # stored, not yet queued
    reader = OutboxReader(tmp_path / "a.db")
    assert reader.pending() == []
    store.write([Reading("n", "noise_db", 9.0, 200.0)], flush_readings=4)
    rows = reader.pending()
    sent = [r for row in rows for r in msgspec.json.decode(row.body, type=list[Reading])]
    assert [len(msgspec.json.decode(row.body)) for row in rows] == [4, 2]  # at most 4 a message
    assert sent == [*first, Reading("n", "noise_db", 9.0, 200.0)]
    store.close()
    again = Store(tmp_path / "a.db")  # a restart neither re-queues nor forgets
    again.write([], flush_readings=4)
    assert len(reader.pending()) == 2
    again.write([Reading("n", "noise_db", 10.0, 300.0)], flush_readings=4)
    assert msgspec.json.decode(reader.pending()[-1].body, type=list[Reading]) == [Reading("n", "noise_db", 10.0, 300.0)]


def test_a_batch_that_fails_midway_leaves_nothing_and_the_store_keeps_working(tmp_path):
    store = Store(tmp_path / "a.db")
    ok = Reading("ups1", "ups_charge_percent", 80.0, time.time())
    try:
        store.write([ok], outbox=[("readings", object())])  # type: ignore[list-item]  # the outbox insert fails
    except sqlite3.Error:
        pass
    else:
        raise AssertionError("an unbindable outbox body was stored")
    assert store.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 0  # rolled back with it
    assert not store.db.in_transaction
    store.write([ok], outbox=[("readings", b"x")])
    assert store.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 1
    store.close()
