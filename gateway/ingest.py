"""The gateway's ingest: check each message, store batches idempotently, keep liveness, alarms and incidents.

Used only from the ingest thread. A message is accepted only if it comes from a room on the roster, is
signed with that room's key, and names the room of the topic it came on. Readings and alarms are
idempotent on (agent, seq): a copy arriving again soon (QoS 1 redelivery, an agent re-sending after a
crash) is counted as a duplicate; one arriving after ``replay_window`` is a replay. Every rejection
is counted by reason, and a room whose identity was used gets a security alarm.

Alarms keep the rooms' own timestamps (``at`` of each transition); ``received`` is ours.

A room's phase is the gateway's schedule's when it has sessions, else the one the agent last reported;
its devices' kinds are the ones its agent's status names (older agents name none).
"""

from __future__ import annotations

import bisect
import sqlite3
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import structlog

from examwatch.gateway import store
from examwatch.gateway.config import Config
from examwatch.gateway.correlate import Fault, Incident, correlate
from examwatch.kernel import wire
from examwatch.kernel.model import DEVICE_KINDS, AlarmEvent, Reading
from examwatch.rules.schedule import Calendar

log = structlog.get_logger("examwatch.gateway")

REASON_NAMES = {"forged": "伪造", "replayed": "重放", "unsigned": "未签名", "malformed": "格式错误"}
SECURITY_REASONS = frozenset(REASON_NAMES)
ROOM_REASONS = (*REASON_NAMES, "bad_body")  # rejections counted against the room they name
ROOMLESS_REASONS = ("unknown_agent", "bad_topic")  # rejections that name no room on the roster
SKEW_SAMPLES = 5


class Message(NamedTuple):
    topic: str
    payload: bytes
    retained: bool
    received: float  # our clock when it arrived


class Seqs:
    """The sequence numbers received from one agent, as sorted disjoint runs [lo, hi]."""

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
class AgentState:
    agent: str
    site: str
    room: str
    status: str = "unknown"  # "online" | "offline" | "unknown" (never heard of since the roster)
    last_seen: float | None = None  # our time of the last live message
    last_status_ts: float = 0.0  # the agent's time of the last status we applied
    phase: str | None = None  # the schedule's phase, else the agent's last reported one
    kinds: dict[str, str] = field(default_factory=dict)  # device -> kind, as the agent's status names them
    floor: int = 0  # sequence numbers at or below this were pruned from the ledger (seen long ago)
    seqs: Seqs = field(default_factory=Seqs)
    skews: deque[float] = field(default_factory=lambda: deque(maxlen=SKEW_SAMPLES))

    @property
    def skew(self) -> float | None:
        # Transit delay only makes the agent look behind; the largest recent sample is the closest to its clock.
        return max(self.skews) if self.skews else None


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


class _Batch:
    """The rows one transaction will write."""

    def __init__(self) -> None:
        self.ledger: list[tuple[Any, ...]] = []
        self.readings: list[tuple[Any, ...]] = []
        self.latest: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self.alarm_events: list[tuple[Any, ...]] = []
        self.alarms: list[tuple[Any, ...]] = []
        self.incidents: dict[str, tuple[Any, ...]] = {}
        self.incident_events: list[tuple[Any, ...]] = []
        self.agents: set[str] = set()
        self.devices: dict[str, dict[str, str]] = {}  # agent -> its devices' kinds, replacing the stored ones

    def statements(self, agents: dict[str, AgentState]) -> list[tuple[str, Sequence[Sequence[Any]]]]:
        agent_rows = []
        for a in (agents[x] for x in sorted(self.agents)):
            agent_rows.append((a.agent, a.site, a.room, a.status, a.last_seen, a.last_status_ts, a.skew, a.phase,
                               a.floor, a.seqs.runs[-1][1] if a.seqs.runs else a.floor, a.seqs.missing(a.floor)))
        return [
            ("INSERT OR IGNORE INTO ledger (agent, seq, kind, ts, received) VALUES (?,?,?,?,?)", self.ledger),
            ("INSERT INTO readings (agent, device, metric, value, ts, quality, seq) VALUES (?,?,?,?,?,?,?)", self.readings),
            (("INSERT INTO latest (agent, device, metric, value, ts, quality) VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE "
             "SET value = excluded.value, ts = excluded.ts, quality = excluded.quality WHERE excluded.ts >= latest.ts"),
             list(self.latest.values())),
            ("INSERT INTO alarm_events (alarm_id, at, state, level, received, seq, event) VALUES (?,?,?,?,?,?,?)",
             self.alarm_events),
            # A transition older than the one stored (out of order after an outage) joins the timeline only.
            (("INSERT INTO alarms (id, site, room, rule, level, state, device, message, raised_at, updated_at, cleared_at,"
             " source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET level = excluded.level, "
             "state = excluded.state, message = excluded.message, updated_at = excluded.updated_at, "
             "cleared_at = excluded.cleared_at WHERE excluded.updated_at >= alarms.updated_at"), self.alarms),
            (("INSERT INTO incidents (id, site, fault_class, title, level, state, opened_at, closed_at, members, active)"
             " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET level = excluded.level, state = excluded.state,"
             " closed_at = excluded.closed_at, members = excluded.members, active = excluded.active"),
             list(self.incidents.values())),
            ("INSERT INTO incident_events (incident_id, at, what, rooms, level) VALUES (?,?,?,?,?)", self.incident_events),
            ("DELETE FROM devices WHERE agent = ?", [(agent,) for agent in self.devices]),
            ("INSERT INTO devices (agent, device, kind) VALUES (?,?,?)",
             [(agent, device, kind) for agent, kinds in self.devices.items() for device, kind in kinds.items()]),
            (("INSERT INTO agents (agent, site, room, status, last_seen, last_status_ts, skew, phase, floor_seq, max_seq,"
             " missing) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (agent) DO UPDATE SET status = excluded.status, "
             "last_seen = excluded.last_seen, last_status_ts = excluded.last_status_ts, skew = excluded.skew, "
             "phase = excluded.phase, floor_seq = excluded.floor_seq, max_seq = excluded.max_seq, "
             "missing = excluded.missing"), agent_rows),
        ]


_readings = msgspec.json.Decoder(list[Reading])
_alarm = msgspec.json.Decoder(AlarmEvent)
_status = msgspec.json.Decoder(wire.Status)
_json = msgspec.json.Encoder()


class Engine:
    def __init__(self, cfg: Config, conn: sqlite3.Connection, keys: dict[str, bytes]) -> None:
        self.cfg = cfg
        self.conn = conn
        self.keys = keys
        self.rules = cfg.correlation_rules()
        self.calendar = Calendar(cfg.schedule) if cfg.schedule.sessions else None
        self.roster: Counter[str] = Counter(a.split("/", 1)[0] for a in keys)
        self.stats = Stats.for_roster(keys)
        self.agents: dict[str, AgentState] = {}
        self._stored: set[str] = set()  # agents with a row in the agents table
        self._load()
        self._batch = _Batch()
        self._logged: set[tuple[str, str]] = set()
        self._last_retention = 0.0

    # --- state at start-up ----------------------------------------------------------------------------

    def _load(self) -> None:
        rows = {r["agent"]: r for r in self.conn.execute("SELECT * FROM agents")}
        runs = store.received_ranges(self.conn)
        kinds = store.device_kinds(self.conn)
        for agent in sorted(self.keys.keys() | rows.keys()):
            site, room = agent.split("/", 1)
            a = AgentState(agent, site, room)
            if agent in rows:
                r = rows[agent]
                a.status, a.last_seen, a.last_status_ts = r["status"], r["last_seen"], r["last_status_ts"] or 0.0
                a.phase, a.floor = r["phase"], r["floor_seq"]
                if r["skew"] is not None:
                    a.skews.append(r["skew"])
                self._stored.add(agent)
            a.kinds = kinds.get(agent, {})
            a.seqs = Seqs(runs.get(agent, []))
            a.seqs.drop_below(a.floor)
            self.agents[agent] = a
        # Alarms still open (the agents' and ours) and the last transition time of each, for ordering.
        self.open_alarms: dict[str, tuple[Fault, float, str]] = {}  # id -> (fault, updated_at, source)
        self.gateway_alarms: dict[tuple[str, str], AlarmEvent] = {}  # (agent, rule) -> the raise
        for r in self.conn.execute("SELECT * FROM alarms WHERE state != 'cleared'"):
            self.open_alarms[r["id"]] = (Fault(r["site"], r["room"], r["rule"], r["raised_at"]), r["updated_at"], r["source"])
            if r["source"] == "gateway":
                ev = self.conn.execute("SELECT event FROM alarm_events WHERE alarm_id = ? ORDER BY rowid LIMIT 1",
                                       [r["id"]]).fetchone()
                self.gateway_alarms[(f"{r['site']}/{r['room']}", r["rule"])] = _alarm.decode(ev[0])
        self.incidents: dict[tuple[str, str], Incident] = {}
        for r in self.conn.execute("SELECT * FROM incidents WHERE state = 'open'"):
            self.incidents[(r["site"], r["fault_class"])] = Incident(
                id=r["id"], site=r["site"], fault_class=r["fault_class"], title=r["title"], level=r["level"],
                opened_at=r["opened_at"], members=msgspec.json.decode(r["members"]), active=msgspec.json.decode(r["active"]))
        self._security: dict[str, float] = {}  # agent -> our time of its last rejected message

    # --- ingest -------------------------------------------------------------------------------------

    def ingest(self, messages: Iterable[Message], now: float) -> None:
        """Check and store one batch in one transaction (the caller acknowledges the messages after it)."""
        for m in messages:
            self._one(m)
        self._correlate(now)
        self._commit()

    def _one(self, m: Message) -> None:
        where = wire.parse_topic(m.topic)
        if where is None:
            return self._reject("bad_topic", "", m.topic)
        agent, kind = where
        key = self.keys.get(agent)
        if key is None:
            return self._reject("unknown_agent", "", agent)
        try:
            env = wire.decode(m.payload)
        except wire.WireError as err:
            return self._reject("malformed", agent, str(err), m.received)
        if not env.sig:
            return self._reject("unsigned", agent, kind, m.received)
        if env.agent != agent or env.kind != kind or not wire.verify(key, env):
            return self._reject("forged", agent, kind, m.received)
        a = self.agents[agent]
        if kind == "status":
            return self._status(a, env, m)
        if env.seq <= a.floor or env.seq in a.seqs:
            first = self.conn.execute("SELECT received FROM ledger WHERE agent = ? AND seq = ?", [agent, env.seq]).fetchone()
            if first is None or m.received - first[0] > self.cfg.security.replay_window:
                return self._reject("replayed", agent, f"seq {env.seq}", m.received)
            self.stats.duplicates += 1
            return None
        if a.seqs.runs and env.seq > a.seqs.runs[-1][1] + 1:
            log.info("sequence_gap", agent=agent, after=a.seqs.runs[-1][1], got=env.seq)
        a.seqs.add(env.seq)
        self._seen(a, m.received)
        self._batch.ledger.append((agent, env.seq, kind, env.ts, m.received))
        try:
            if kind == "readings":
                self._readings(a, env.seq, _readings.decode(env.body))
            else:
                self._agent_alarm(a, env.seq, _alarm.decode(env.body), bytes(env.body), m.received)
        except msgspec.DecodeError as err:  # signed by the room but unreadable: an agent bug, not an attack
            self._reject("bad_body", agent, str(err))
            return None
        self.stats.messages[kind] += 1
        return None

    def _readings(self, a: AgentState, seq: int, readings: list[Reading]) -> None:
        rows = self._batch.readings
        latest = self._batch.latest
        for r in readings:
            rows.append((a.agent, r.device, r.metric, r.value, r.ts, r.quality, seq))
            k = (a.agent, r.device, r.metric)
            prev = latest.get(k)
            if prev is None or r.ts >= prev[4]:
                latest[k] = (a.agent, r.device, r.metric, r.value, r.ts, r.quality)
        self.stats.readings += len(readings)

    def _agent_alarm(self, a: AgentState, seq: int, ev: AlarmEvent, body: bytes, received: float) -> None:
        self._store_alarm(a, ev, body, received, seq, "agent")

    def _store_alarm(self, a: AgentState, ev: AlarmEvent, body: bytes, received: float, seq: int, source: str) -> None:
        # The room is the signer's, whatever the event says.
        self._batch.alarm_events.append((ev.id, ev.at, ev.state, ev.level, received, seq, body))
        self._batch.alarms.append((ev.id, a.site, a.room, ev.rule, ev.level, ev.state, ev.device, ev.message,
                                   ev.raised_at, ev.at, ev.at if ev.state == "cleared" else None, source))
        prev = self.open_alarms.get(ev.id)
        if prev is not None and ev.at < prev[1]:
            return  # an older transition arriving late: timeline only
        if ev.state == "cleared":
            self.open_alarms.pop(ev.id, None)
        else:
            self.open_alarms[ev.id] = (Fault(a.site, a.room, ev.rule, ev.raised_at), ev.at, source)

    def _status(self, a: AgentState, env: wire.Envelope, m: Message) -> None:
        try:
            st = _status.decode(env.body)
        except msgspec.DecodeError as err:
            return self._reject("bad_body", a.agent, str(err))
        if env.ts <= a.last_status_ts:
            if m.retained:
                return None  # our own last word, delivered again at subscribe: already applied
            if st.state == "online":  # an old "online" again would hide an outage
                return self._reject("replayed", a.agent, "status", m.received)
            # A last will carries the time it was set (connect); it is news all the same.
        a.last_status_ts = max(a.last_status_ts, env.ts)
        # A last will tells the phase of when it was set (at connect), maybe hours ago: only heartbeats say it.
        reported = st.phase if st.state == "online" else None
        a.phase = self.calendar.phase(m.received) if self.calendar else reported or a.phase
        if st.kinds is not None:
            kinds = {d: k for d, k in st.kinds.items() if k in DEVICE_KINDS}  # the label stays bounded
            if kinds != a.kinds:
                a.kinds = self._batch.devices[a.agent] = kinds
        self.stats.messages["status"] += 1
        self._batch.agents.add(a.agent)
        if st.state == "offline":
            if a.status != "offline":
                log.warning("agent_offline", agent=a.agent, reason=st.reason or "lost")
            a.status = "offline"
            what = "代理程序已停止" if st.reason == "shutdown" else "与县级网关失去连接（网络中断或断电）"
            self._raise_gw(a, "agent_offline", self._offline_level(a, m.received), f"考场监测代理离线：{what}", m.received)
            return None
        if not m.retained:
            a.skews.append(env.ts - m.received)
            self._check_skew(a, m.received)
        self._seen(a, m.received if not m.retained else None)
        return None

    def _seen(self, a: AgentState, received: float | None) -> None:
        self._batch.agents.add(a.agent)
        if received is None:
            return
        a.last_seen = max(a.last_seen or 0.0, received)
        if a.status != "online":
            if a.status == "offline":
                log.info("agent_online", agent=a.agent)
            a.status = "online"
            self._clear_gw(a, "agent_offline", "考场监测代理已恢复连接", received)

    def _reject(self, reason: str, agent: str, detail: str, received: float | None = None) -> None:
        self.stats.rejected[(reason, agent)] += 1
        if (reason, agent) not in self._logged:  # once per kind and room: a flood must not flood the log
            self._logged.add((reason, agent))
            log.warning("message_rejected", reason=reason, agent=agent or None, detail=detail[:200])
        if agent and reason in SECURITY_REASONS and received is not None:
            self._security[agent] = received
            a = self.agents[agent]
            if (agent, "security_rejected") not in self.gateway_alarms:
                self._raise_gw(a, "security_rejected", 2,
                               f"收到冒用本考场身份的{REASON_NAMES[reason]}消息，已拒收；请核查网络与设备", received)

    # --- gateway's own alarms -----------------------------------------------------------------------

    def _offline_level(self, a: AgentState, now: float) -> int:
        phase = self.calendar.phase(now) if self.calendar else a.phase
        return 2 if phase == "during" else 1

    def _follow_schedule(self, now: float) -> None:
        """Move every stored room to the schedule's phase when it changes (the exporter reads it from the store)."""
        if self.calendar is None:
            return
        phase = self.calendar.phase(now)
        for agent in self._stored:
            a = self.agents[agent]
            if a.phase != phase:
                a.phase = phase
                self._batch.agents.add(agent)

    def _raise_gw(self, a: AgentState, rule: str, level: int, message: str, now: float, value: float | None = None) -> None:
        current = self.gateway_alarms.get((a.agent, rule))
        if current is not None and current.level >= level:
            return
        state = "updated" if current is not None else "raised"
        ev = AlarmEvent(id=current.id if current else f"{a.agent}/{rule}/gateway/{int(now * 1000)}", site=a.site,
                        room=a.room, rule=rule, level=level, state=state, device="agent", value=value, at=now,
                        raised_at=current.raised_at if current else now, message=message)
        self.gateway_alarms[(a.agent, rule)] = ev
        self._store_alarm(a, ev, _json.encode(ev), now, 0, "gateway")

    def _clear_gw(self, a: AgentState, rule: str, message: str, now: float) -> None:
        current = self.gateway_alarms.pop((a.agent, rule), None)
        if current is None:
            return
        ev = msgspec.structs.replace(current, state="cleared", at=now, message=message)
        self._store_alarm(a, ev, _json.encode(ev), now, 0, "gateway")

    def _check_skew(self, a: AgentState, now: float) -> None:
        skew, bound = a.skew, self.cfg.liveness.skew_max
        if skew is None:
            return
        if abs(skew) > bound:
            self._raise_gw(a, "clock_skew", 1, f"考场代理时钟偏差 {skew:+.1f} 秒，超过 {bound:g} 秒：记录时间不可信，请校时",
                           now, value=skew)
        elif abs(skew) <= bound / 2:
            self._clear_gw(a, "clock_skew", "考场代理时钟已校准", now)

    # --- periodic -----------------------------------------------------------------------------------

    def tick(self, now: float, broker_up_since: float | None) -> None:
        """Liveness by heartbeat, security alarms that went quiet, level by phase, correlation, retention."""
        timeout = self.cfg.liveness.heartbeat_timeout
        self._follow_schedule(now)
        # Our own link to the broker must have been up for a full bound, or every room would look silent.
        if broker_up_since is not None and now - broker_up_since > timeout:
            for a in self.agents.values():
                if a.status == "online" and (a.last_seen is None or now - a.last_seen > timeout):
                    a.status = "silent"
                    self._batch.agents.add(a.agent)
                    log.warning("agent_silent", agent=a.agent, last_seen=a.last_seen)
                    self._raise_gw(a, "agent_offline", self._offline_level(a, now),
                                   f"考场监测代理 {timeout:g} 秒无心跳：网络中断或设备故障", now)
        for (agent, rule), ev in list(self.gateway_alarms.items()):
            a = self.agents[agent]
            if rule == "agent_offline" and self._offline_level(a, now) > ev.level:
                self._raise_gw(a, rule, self._offline_level(a, now), ev.message, now)
            if rule == "security_rejected" and now - self._security.get(agent, 0.0) > self.cfg.security.quiet:
                self._clear_gw(a, rule, "一段时间内未再收到冒用消息", now)
        self._correlate(now)
        self._commit()
        if now - self._last_retention > 3600:
            self._last_retention = now
            self.retention(now)

    def _correlate(self, now: float) -> None:
        faults = [f for f, _, _ in self.open_alarms.values()]
        self.incidents, changes, closed = correlate(self.incidents, faults, self.rules, dict(self.roster), now)
        if not changes:
            return
        by_id = {i.id: i for i in [*self.incidents.values(), *closed]}
        for c in changes:
            inc = by_id[c.incident]
            log.warning("incident_" + c.what, incident=inc.id, level=c.level, rooms=list(c.rooms))
            self._batch.incident_events.append((inc.id, now, c.what, _json.encode(list(c.rooms)).decode(), c.level))
            self._batch.incidents[inc.id] = (inc.id, inc.site, inc.fault_class, inc.title, inc.level, inc.state,
                                             inc.opened_at, inc.closed_at, _json.encode(inc.members).decode(),
                                             _json.encode(inc.active).decode())

    def _commit(self) -> None:
        batch, self._batch = self._batch, _Batch()
        store.write_batch(self.conn, batch.statements(self.agents))
        self._stored |= batch.agents
        self.stats.batches += 1

    def retention(self, now: float) -> None:
        cut = now - self.cfg.gateway.retention_days * 86400
        alarm_cut = now - self.cfg.gateway.alarm_retention_days * 86400
        floors = dict(self.conn.execute("SELECT agent, MAX(seq) FROM ledger WHERE received < ? GROUP BY agent", [cut]).fetchall())
        for agent, floor in floors.items():
            if agent in self.agents and floor > self.agents[agent].floor:
                self.agents[agent].floor = floor
                self.agents[agent].seqs.drop_below(floor)
                self._batch.agents.add(agent)
        self._commit()  # floors first: a crash between the two leaves nothing replayable
        store.write_batch(self.conn, [
            ("DELETE FROM ledger WHERE received < ?", [(cut,)]),
            ("DELETE FROM readings WHERE ts < ?", [(cut,)]),
            ("DELETE FROM alarm_events WHERE alarm_id IN (SELECT id FROM alarms WHERE state = 'cleared' AND cleared_at < ?)",
             [(alarm_cut,)]),
            ("DELETE FROM alarms WHERE state = 'cleared' AND cleared_at < ?", [(alarm_cut,)]),
            (("DELETE FROM incident_events WHERE incident_id IN (SELECT id FROM incidents WHERE state = 'closed' "
             "AND closed_at < ?)"), [(alarm_cut,)]),
            ("DELETE FROM incidents WHERE state = 'closed' AND closed_at < ?", [(alarm_cut,)]),
        ])


__all__ = ["AgentState", "Engine", "Message", "Seqs", "Stats"]
