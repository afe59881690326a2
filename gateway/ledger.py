"""What the gateway knows of each agent, what it has received from it, and the rows one transaction writes.

Pure bookkeeping, no I/O: sequence numbers are kept per (agent, epoch) as sorted disjoint runs; an
agent's epochs are ranked in the order first seen, and its status messages are ordered by
(rank, boot, conn, n) (see ``edge.wire.Status``). ``Rows`` collects what one message (or the gateway's own
work) changes, so a batch can be written whole, or message by message when the whole fails. ``Stats``
counts the messages by kind and the rejections by reason and room; ``load_agents`` and ``load_open`` read
back at start-up what the store holds.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import structlog

from examwatch.gateway import store
from examwatch.gateway.correlate import Fault, Incident
from examwatch.kernel import wire
from examwatch.kernel.model import AlarmEvent

log = structlog.get_logger("examwatch.gateway.ledger")

StatusKey = tuple[int, int, int, int]  # (epoch rank, boot, conn, n)
Order = tuple[int, int]  # an alarm transition's place: (epoch rank, seq) for an agent's, (0, our ms) for ours
OpenAlarms = dict[str, tuple[Fault, Order, str]]  # id -> (fault, order of its last transition, source)
SKEW_SAMPLES = 5
_alarm = msgspec.json.Decoder(AlarmEvent)
_json = msgspec.json.Encoder()


REASON_NAMES = {"forged": "伪造", "unauthorized": "越权", "unsigned": "未签名", "malformed": "格式错误"}
SECURITY_REASONS = frozenset(REASON_NAMES)
# rejections counted against the room they name; "outdated": an agent without outbox epochs (upgrade it),
# "stale": a status not newer than the last applied, "internal": a message our own code failed on
ROOM_REASONS = (*REASON_NAMES, "bad_body", "outdated", "stale", "internal")
ROOMLESS_REASONS = ("unknown_agent", "bad_topic", "internal")  # rejections that name no room on the roster


class Message(NamedTuple):
    topic: str
    payload: bytes
    retained: bool
    received: float  # our clock when it arrived


class Rejected(Exception):
    """A message refused: ``reason`` (a counter label), the room to count it against, and why."""

    def __init__(self, reason: str, agent: str, detail: str, victims: Iterable[str] = ()) -> None:
        super().__init__(detail)
        self.reason, self.agent, self.detail, self.victims = reason, agent, detail, tuple(victims)


@dataclass
class Stats:
    messages: Counter[str] = field(default_factory=Counter)  # accepted, by kind
    readings: int = 0
    duplicates: int = 0
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)  # (reason, agent or "") -> count
    batches: int = 0

    @classmethod
    def for_roster(cls, agents: Iterable[str]) -> Stats:
        """Every label set the counters can take, at 0: PromQL's increase() cannot see a series born at 1."""
        s = cls()
        s.messages.update(dict.fromkeys(wire.KINDS, 0))
        s.rejected.update({(reason, agent): 0 for agent in agents for reason in ROOM_REASONS})
        s.rejected.update({(reason, ""): 0 for reason in ROOMLESS_REASONS})
        return s


class Seqs:
    """The sequence numbers received in one epoch, as sorted disjoint runs [lo, hi]."""

    def __init__(self, runs: list[list[int]] | None = None) -> None:
        self.runs = runs or []

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self.runs, [seq, float("inf")]) - 1
        return i >= 0 and self.runs[i][0] <= seq <= self.runs[i][1]

    def add(self, seq: int) -> None:
        runs = self.runs
        if runs and runs[-1][1] + 1 == seq:  # the usual case: the next one in order
            runs[-1][1] = seq
            return
        i = bisect.bisect_right(runs, [seq, float("inf")])
        runs.insert(i, [seq, seq])
        if i + 1 < len(runs) and runs[i + 1][0] == seq + 1:
            runs[i][1] = runs.pop(i + 1)[1]
        if i > 0 and runs[i - 1][1] + 1 == seq:
            runs[i - 1][1] = runs.pop(i)[1]

    def gaps(self, floor: int, limit: int = 20) -> list[tuple[int, int]]:
        """Missing runs above ``floor`` up to the highest received."""
        out, expect = [], floor + 1
        for lo, hi in self.runs:
            if hi <= floor:
                continue
            if lo > expect:
                out.append((expect, lo - 1))
            expect = max(expect, hi + 1)
        return out[:limit]

    def missing(self, floor: int) -> int:
        top = self.runs[-1][1] if self.runs else floor
        have = sum(hi - max(lo, floor + 1) + 1 for lo, hi in self.runs if hi > floor)
        return max(0, top - floor - have)

    def drop_below(self, floor: int) -> None:
        self.runs = [[max(lo, floor + 1), hi] for lo, hi in self.runs if hi > floor]


@dataclass
class Epoch:
    """One outbox database of an agent: its rank among the agent's epochs, and what arrived from it."""

    rank: int
    floor: int = 0  # sequence numbers at or below this were pruned from the ledger (seen long ago)
    seqs: Seqs = field(default_factory=Seqs)

    def has(self, seq: int) -> bool:
        return seq <= self.floor or seq in self.seqs

    @property
    def top(self) -> int:
        return self.seqs.runs[-1][1] if self.seqs.runs else self.floor

    @property
    def missing(self) -> int:
        return self.seqs.missing(self.floor)


@dataclass
class AgentState:
    agent: str
    site: str
    room: str
    status: str = "unknown"  # "online" | "offline" | "unknown" (never heard of since the roster)
    last_seen: float | None = None  # our time of the last live message
    last_status_ts: float = 0.0  # the agent's time of the last status we applied (data only)
    status_key: StatusKey | None = None  # the place of the last status we applied
    phase: str | None = None  # the schedule's phase, else the agent's last reported one
    kinds: dict[str, str] = field(default_factory=dict)  # device -> kind, as the agent's status names them
    epochs: dict[int, Epoch] = field(default_factory=dict)  # its outbox epochs, in the order first seen
    skews: deque[float] = field(default_factory=lambda: deque(maxlen=SKEW_SAMPLES))

    @property
    def skew(self) -> float | None:
        # Transit delay only makes the agent look behind; the largest recent sample is the closest to its clock.
        return max(self.skews) if self.skews else None

    @property
    def newest(self) -> tuple[int, Epoch] | None:
        return next(reversed(self.epochs.items()), None)

    def row(self) -> tuple[Any, ...]:
        newest = self.newest
        e = newest[1] if newest else Epoch(0)
        return (
            self.agent,
            self.site,
            self.room,
            self.status,
            self.last_seen,
            self.last_status_ts,
            self.skew,
            self.phase,
            e.floor,
            e.top,
            sum(x.missing for x in self.epochs.values()),
            newest[0] if newest else None,
            json.dumps(self.status_key) if self.status_key else None,
        )


def load_agents(conn: store.Db, roster: Iterable[str]) -> tuple[dict[str, AgentState], set[str]]:
    """Every agent of the roster or the store, as the store left it; and those the store has a row for."""
    rows = {r["agent"]: r for r in conn.execute("SELECT * FROM agents")}
    runs = store.received_ranges(conn)
    kinds = store.device_kinds(conn)
    epochs: dict[str, list[Any]] = {}
    for r in conn.execute("SELECT * FROM epochs ORDER BY agent, rank"):
        epochs.setdefault(r["agent"], []).append(r)
    agents: dict[str, AgentState] = {}
    for agent in sorted(set(roster) | rows.keys()):
        site, room = agent.split("/", 1)
        a = AgentState(agent, site, room)
        if agent in rows:
            r = rows[agent]
            a.status, a.last_seen, a.last_status_ts = r["status"], r["last_seen"], r["last_status_ts"] or 0.0
            a.phase = r["phase"]
            a.status_key = tuple(json.loads(r["status_key"])) if r["status_key"] else None
            if r["skew"] is not None:
                a.skews.append(r["skew"])
        a.kinds = kinds.get(agent, {})
        for e in epochs.get(agent, []):
            a.epochs[e["epoch"]] = ep = Epoch(e["rank"], e["floor_seq"], Seqs(runs.get((agent, e["epoch"]), [])))
            ep.seqs.drop_below(ep.floor)
        agents[agent] = a
    return agents, set(rows)


def load_open(
    conn: store.Db,
) -> tuple[OpenAlarms, dict[tuple[str, str], AlarmEvent], dict[tuple[str, str], Incident]]:
    """Alarms still open (the agents' and ours) with their last transition's order, for ordering; the raise of
    each of our own by (agent, rule); the open incidents by (site, fault class).

    Two statements however many alarms are open: a replica's leader reads this every second, and a round trip
    per open alarm (10,000 rooms' clock alarms) once stalled its ingest loop for seconds at every tick.
    """
    open_alarms: OpenAlarms = {}
    gateway_alarms: dict[tuple[str, str], AlarmEvent] = {}
    for r in conn.execute(
        "SELECT a.*, CASE WHEN a.source = 'gateway' THEN (SELECT e.event FROM alarm_events e "
        "WHERE e.alarm_id = a.id ORDER BY e.rowid LIMIT 1) END AS raised_event FROM alarms a WHERE a.state != 'cleared'"
    ):
        fault = Fault(r["site"], r["room"], r["rule"], r["raised_at"])
        open_alarms[r["id"]] = (fault, (r["epoch_rank"], r["seq"]), r["source"])
        if r["source"] == "gateway":
            gateway_alarms[(f"{r['site']}/{r['room']}", r["rule"])] = _alarm.decode(r["raised_event"])
    incidents: dict[tuple[str, str], Incident] = {}
    for r in conn.execute("SELECT * FROM incidents WHERE state = 'open'"):
        incidents[(r["site"], r["fault_class"])] = Incident(
            id=r["id"],
            site=r["site"],
            fault_class=r["fault_class"],
            title=r["title"],
            level=r["level"],
            opened_at=r["opened_at"],
            members=msgspec.json.decode(r["members"]),
            active=msgspec.json.decode(r["active"]),
        )
    return open_alarms, gateway_alarms, incidents


class Clocks:
    """Whether a heartbeat may judge its room's clock: not one that may have waited on its way to us.

    A wait makes the room's clock look behind by it (a backlog once raised every room's clock alarm). Not judged:
    heartbeats received before ``settled_from`` (set by the gateway from its broker link: ``Subscriber.clocks_from``),
    and any while the rooms' recent heartbeats (of ``ROOMS`` rooms at least) are late by more than ``bound`` in
    the median: a lateness most rooms share is ours, not their clocks' (the broker's queue, our parsing).
    """

    ROOMS = 10
    RECENT = 101

    def __init__(self, bound: float) -> None:
        self.bound = bound  # the clock check's bound (liveness.skew_max): late by half of it is late
        self.settled_from = 0.0
        self._recent: deque[tuple[str, float]] = deque(maxlen=self.RECENT)  # (room, received - its timestamp)
        self.late = 0.0  # the median lateness while most rooms' heartbeats are late (0: they are not)

    def judge(self, agent: str, ts: float, received: float) -> bool:
        self._recent.append((agent, received - ts))
        if received <= self.settled_from:
            return False
        if len({a for a, _ in self._recent}) < self.ROOMS:
            return True
        late = sorted(d for _, d in self._recent)[len(self._recent) // 2]
        behind = late > self.bound / 2
        if behind != (self.late > 0):  # a change, logged once: no room's clock is judged meanwhile
            log.warning("heartbeats_late" if behind else "heartbeats_on_time", median_late=round(late, 1))
        self.late = late if behind else 0.0
        return not behind


def newer(key: StatusKey, than: StatusKey | None) -> bool:
    """Whether a status with ``key`` is news after the one applied last (``than``)."""
    return than is None or key > than


class Rows:
    """The rows one transaction writes for one message (or for the gateway's own work)."""

    def __init__(self) -> None:
        self.ledger: list[tuple[Any, ...]] = []
        self.readings: list[tuple[Any, ...]] = []
        self.alarm_events: list[tuple[Any, ...]] = []
        self.alarms: list[tuple[Any, ...]] = []
        self.incidents: dict[str, tuple[Any, ...]] = {}
        self.incident_events: list[tuple[Any, ...]] = []
        self.agents: set[str] = set()
        self.epochs: dict[tuple[str, int], tuple[Any, ...]] = {}  # (agent, epoch) -> (agent, epoch, rank, floor)
        self.devices: dict[str, dict[str, str]] = {}  # agent -> its devices' kinds, replacing the stored ones
        self.dead_letters: list[tuple[Any, ...]] = []

    def alarm(self, ev: AlarmEvent, site: str, room: str, source: str, order: Order) -> None:
        """The alarm's row as this transition leaves it (written only if it is the latest by ``order``)."""
        cleared_at = ev.at if ev.state == "cleared" else None
        row = (ev.id, site, room, ev.rule, ev.level, ev.state, ev.device, ev.message, ev.raised_at, ev.at, cleared_at)
        self.alarms.append((*row, source, *order))

    def incident(self, inc: Incident) -> None:
        members, active = _json.encode(inc.members).decode(), _json.encode(inc.active).decode()
        row = (inc.id, inc.site, inc.fault_class, inc.title, inc.level, inc.state, inc.opened_at, inc.closed_at)
        self.incidents[inc.id] = (*row, members, active)

    def dead_letter(self, received: float, reason: str, agent: str, topic: str, detail: str, payload: bytes) -> None:
        row = (received, reason, agent, topic[:300], detail[:500], len(payload), payload[: store.DEAD_LETTER_BYTES])
        self.dead_letters.append(row)

    def latest(self) -> list[tuple[Any, ...]]:
        """The newest reading per (agent, device, metric) by the room's time.

        The store keeps the newer of it and its own.
        """
        out: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        for r in self.readings:
            prev = out.get(r[:3])
            if prev is None or r[4] >= prev[4]:
                out[r[:3]] = r
        return [r[:6] for r in out.values()]

    def merge(self, other: Rows) -> None:
        for name in ("ledger", "readings", "alarm_events", "alarms", "incident_events", "dead_letters"):
            getattr(self, name).extend(getattr(other, name))
        self.incidents.update(other.incidents)
        self.agents |= other.agents
        self.epochs.update(other.epochs)
        self.devices.update(other.devices)

    def statements(self, agent_rows: list[tuple[Any, ...]]) -> list[tuple[str, Sequence[Sequence[Any]]]]:
        return [
            (
                "INSERT INTO readings (agent, device, metric, value, ts, quality, seq) VALUES (?,?,?,?,?,?,?)",
                self.readings,
            ),
            (
                (
                    "INSERT INTO latest (agent, device, metric, value, ts, quality) VALUES (?,?,?,?,?,?) "
                    "ON CONFLICT (agent, device, metric) DO UPDATE SET value = excluded.value, ts = excluded.ts, "
                    "quality = excluded.quality "
                    "WHERE excluded.ts >= latest.ts"
                ),
                sorted(self.latest()),  # one order for every writer: two gateways never wait on each other in a cycle
            ),
            (
                "INSERT INTO alarm_events (alarm_id, at, state, level, received, seq, event) VALUES (?,?,?,?,?,?,?)",
                self.alarm_events,
            ),
            # A transition before the one stored (out of order after an outage) joins the timeline only; and a
            # row changes only for its own room and source (ingest refuses the rest before it gets here).
            (
                (
                    "INSERT INTO alarms (id, site, room, rule, level, state, device, message, raised_at, updated_at,"
                    " cleared_at, source, epoch_rank, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (id) DO UPDATE SET level = excluded.level, state = excluded.state, "
                    "message = excluded.message, updated_at = excluded.updated_at, "
                    "cleared_at = excluded.cleared_at, epoch_rank = excluded.epoch_rank, seq = excluded.seq "
                    "WHERE (excluded.epoch_rank, excluded.seq) >= (alarms.epoch_rank, alarms.seq) "
                    "AND alarms.site = excluded.site AND alarms.room = excluded.room "
                    "AND alarms.source = excluded.source"
                ),
                self.alarms,
            ),
            (
                (
                    "INSERT INTO incidents (id, site, fault_class, title, level, state, opened_at, closed_at, members,"
                    " active) VALUES (?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (id) DO UPDATE SET level = excluded.level, state = excluded.state,"
                    " closed_at = excluded.closed_at, members = excluded.members, active = excluded.active"
                ),
                list(self.incidents.values()),
            ),
            (
                "INSERT INTO incident_events (incident_id, at, what, rooms, level) VALUES (?,?,?,?,?)",
                self.incident_events,
            ),
            ("DELETE FROM devices WHERE agent = ?", [(agent,) for agent in self.devices]),
            (
                "INSERT INTO devices (agent, device, kind) VALUES (?,?,?)",
                [(agent, device, kind) for agent, kinds in self.devices.items() for device, kind in kinds.items()],
            ),
            (
                "INSERT INTO marks (name, value) VALUES ('devices', 1) "
                "ON CONFLICT (name) DO UPDATE SET value = marks.value + 1",
                [()] if self.devices else [],
            ),
            (
                (
                    "INSERT INTO epochs (agent, epoch, rank, floor_seq) VALUES (?,?,?,?) ON CONFLICT (agent, epoch) "
                    "DO UPDATE SET floor_seq = excluded.floor_seq WHERE excluded.floor_seq > epochs.floor_seq"
                ),
                sorted(self.epochs.values()),
            ),
            (
                (
                    "INSERT INTO agents (agent, site, room, status, last_seen, last_status_ts, skew, phase, floor_seq,"
                    " max_seq, missing, epoch, status_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (agent) DO UPDATE SET "
                    "status = excluded.status, last_seen = excluded.last_seen, "
                    "last_status_ts = excluded.last_status_ts, skew = excluded.skew, phase = excluded.phase, "
                    "floor_seq = excluded.floor_seq, "
                    "max_seq = excluded.max_seq, "
                    "missing = excluded.missing, epoch = excluded.epoch, status_key = excluded.status_key"
                ),
                agent_rows,
            ),
            (
                "INSERT INTO dead_letters (received, reason, agent, topic, detail, size, payload) VALUES "
                "(?,?,?,?,?,?,?)",
                self.dead_letters,
            ),
            (
                "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?",
                [(store.DEAD_LETTERS_MAX,)] if self.dead_letters else [],
            ),
        ]


__all__ = ["AgentState", "Epoch", "Message", "Order", "Rejected", "Rows", "Seqs", "StatusKey", "load_agents", "newer"]
