"""Several gateway processes on one PostgreSQL: the leader, and what it learns from the others' writes.

Every replica stores the readings and alarms the broker shares out to it (MQTT v5 shared subscription);
the ledger's key keeps each message stored once (``store.claim``). What must be judged once — liveness,
deadlines, incidents, notifications, retention — is the leader's: the replica holding the PostgreSQL
advisory lock ``LEADER_LOCK`` on a connection of its own. When that process dies its session ends, the
lock is free, and the next replica to try (each tries every second) takes over, starting from what the
database holds. Only the leader subscribes to the rooms' statuses: they are retained, so a new leader
hears every room's last word at once.

The leader learns what the others stored by reading it back each second (``catch_up``): the ledger's
newest rows (a room is heard by whichever replica got its message), the open alarms, the rooms whose
messages were refused for security.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric

from examwatch.gateway import store
from examwatch.gateway.ledger import SECURITY_REASONS, Epoch, Seqs, load_open

if TYPE_CHECKING:
    from examwatch.gateway.ingest import Engine

log = structlog.get_logger("examwatch.gateway.replica")

LEADER_LOCK = 7_412_003  # PostgreSQL advisory lock (session level): held by the leader
LOOK_BACK = 15.0  # s of the ledger read again at each catch-up: another replica's batch may commit late
RECHECK = 30.0  # s between rereading the ledger of the rooms with gaps (a batch committed later than LOOK_BACK)


class Leadership:
    """Whether this process leads: ``held()`` tries to take the lock, or checks it is still ours."""

    def __init__(self, where: store.Postgres) -> None:
        self.where = where
        self._conn: Any = None
        self._held = False

    def held(self) -> bool:
        from examwatch.gateway import pg

        try:
            if self._conn is None or self._conn.closed:
                self._held = False
                self._conn = pg.direct(self.where.conninfo, self.where.password())
            if self._held:
                self._conn.execute("SELECT 1")  # the session (and the lock with it) is still there
            else:
                self._held = bool(self._conn.execute("SELECT pg_try_advisory_lock(%s)", [LEADER_LOCK]).fetchone()[0])
        except Exception as err:  # the server went away: so did our session and its lock
            if self._held:
                log.warning("gateway_leadership_lost", error=f"{type(err).__name__}: {err}"[:200])
            self.close()
        return self._held

    def close(self) -> None:
        self._held = False
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a connection already broken
                self._conn.close()
            self._conn = None


def catch_up(engine: Engine, since: float, recheck: bool = False) -> float:
    """What the other replicas stored since ``since`` (our clock, less ``LOOK_BACK``), into the leader's memory;
    the new ``since``. ``recheck``: also the whole ledger of every room with gaps (a replica that waited out
    a database restart commits messages received long before)."""
    conn, newest = engine.conn, since
    gapped = [g.agent for g in engine.agents.values() if any(e.missing for e in g.epochs.values())] if recheck else []
    for name in gapped:
        for (agent, epoch), runs in store.received_ranges(conn, name).items():
            e = engine.agents[agent].epochs.get(epoch)
            if e is not None and runs != e.seqs.runs:
                e.seqs = Seqs(runs)
                e.seqs.drop_below(e.floor)
                engine._batch.agents.add(agent)
    heard: dict[str, float] = {}
    for agent, epoch, seq, received in conn.execute(
        "SELECT agent, epoch, seq, received FROM ledger WHERE received > ?", [since - LOOK_BACK]
    ):
        a = engine.agents.get(agent)
        if a is None:
            continue
        e = a.epochs.get(epoch)
        if e is None:  # an epoch another replica met first: as it ranked it
            row = conn.execute("SELECT rank, floor_seq FROM epochs WHERE agent = ? AND epoch = ?", [agent, epoch])
            r = row.fetchone()
            e = a.epochs[epoch] = Epoch(r[0], r[1]) if r else Epoch(len(a.epochs))
        if not e.has(seq):
            e.seqs.add(seq)
            engine._batch.agents.add(agent)
        heard[agent] = max(heard.get(agent, 0.0), received)
        newest = max(newest, received)
    engine.open_alarms, engine.gateway_alarms, _ = load_open(conn)
    for agent, received in heard.items():
        a, off = engine.agents[agent], engine.gateway_alarms.get((agent, "agent_offline"))
        # heard after all we knew, and after the room was judged offline (not a message from before its will)
        if received > (a.last_seen or 0.0) and (off is None or received > off.at):
            engine._seen(a, received)
    marks = ",".join("?" * len(SECURITY_REASONS))
    for agent, last in conn.execute(
        f"SELECT agent, MAX(received) FROM dead_letters WHERE reason IN ({marks}) GROUP BY agent",
        sorted(SECURITY_REASONS),
    ):
        engine._security[agent] = max(engine._security.get(agent, 0.0), last)
    return newest


class LeaderCollector:
    """``examwatch_gateway_leader``: 1 on the replica that judges liveness, incidents and notifications."""

    def __init__(self, leading: Any) -> None:
        self.leading = leading  # () -> bool

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "examwatch_gateway_leader", "1 if this gateway process leads (judges liveness, incidents, notifications)"
        )
        g.add_metric([], 1.0 if self.leading() else 0.0)
        yield g
