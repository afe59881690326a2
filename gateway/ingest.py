"""The gateway's ingest: check each message, store batches idempotently, keep liveness, alarms and incidents.

Used only from the ingest thread. A message is accepted only if it comes from a room on the roster, fits the
wire's bounds, is signed with that room's key, names the room of its topic and changes only that room's data
(an alarm event must be the signer's own, by site, room and id). Freshness is by sequence, never by wall clock:
readings and alarms are idempotent on (agent, epoch, seq), however late a copy arrives; statuses are ordered by
(epoch rank, boot, conn, n) (``wire.Status``), an older one is counted ``stale``. The rooms' timestamps are data
(``at`` of each transition; the clock-skew check); ``received`` is ours. No message can stop the loop: one that
cannot be taken is rejected, counted by reason, set aside in ``dead_letters`` and acknowledged; a room whose
identity was used gets a security alarm; a batch whose commit fails is written message by message. A room's
phase is the gateway's schedule's when it has sessions, else its agent's; its devices' kinds are its status's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
import structlog

from examwatch.gateway import duty, ledger, store
from examwatch.gateway.config import Config
from examwatch.gateway.correlate import Fault, correlate, unsettled
from examwatch.gateway.ledger import (
    REASON_NAMES,
    SECURITY_REASONS,
    AgentState,
    Epoch,
    Message,
    Order,
    Rejected,
    Rows,
    Seqs,
    Stats,
    StatusKey,
    load_agents,
    load_open,
    newer,
)
from examwatch.kernel import wire
from examwatch.kernel.model import DEVICE_KINDS, AlarmEvent, AlarmState, Level, Reading
from examwatch.rules.schedule import Calendar

log = structlog.get_logger("examwatch.gateway")

READINGS_MAX = 5000  # per message (the agent sends uplink.batch_max, 500 by default)
_readings = msgspec.json.Decoder(Annotated[list[Reading], msgspec.Meta(max_length=READINGS_MAX)])
_alarm = msgspec.json.Decoder(AlarmEvent)
_status = msgspec.json.Decoder(wire.Status)
_json = msgspec.json.Encoder()


def _owner(alarm_id: str) -> str:
    """The ``site/room`` an alarm id belongs to: agents' ids and ours start with it."""
    return "/".join(alarm_id.split("/", 2)[:2])


class Engine:
    def __init__(self, cfg: Config, conn: store.Db, keys: dict[str, bytes]) -> None:
        self.cfg = cfg
        self.conn = conn
        self.keys = keys
        self.rules = cfg.correlation_rules()
        self.calendar = Calendar(cfg.schedule) if cfg.schedule.sessions else None
        self.roster: Counter[str] = Counter(a.split("/", 1)[0] for a in keys)
        self.stats = Stats.for_roster(keys)
        self._security: dict[str, float] = {}  # agent -> our time of its last rejected message
        self._load()
        self._batch = Rows()  # the rows of the message in hand (or of the gateway's own work)
        self._parts: list[tuple[Message, Rows]] = []  # the batch so far, message by message
        self._resync = False  # in-memory state may be ahead of the database: reload it after the commit
        self._logged: set[tuple[str, str]] = set()
        self._last_retention = 0.0
        self.role = "alone"  # or a replica's "leader" (judges) or "follower" (only stores): gateway/replica.py
        self.clocks = ledger.Clocks(cfg.liveness.skew_max)  # which heartbeats may judge their rooms' clocks

    # --- state at start-up ----------------------------------------------------------------------------

    def _load(self) -> None:
        self.agents, self._stored = load_agents(self.conn, self.keys)  # _stored: those with a row in the store
        self.open_alarms, self.gateway_alarms, self.incidents = load_open(self.conn)
        self.settled = duty.settled(self.conn)  # (site, class) -> when people last closed one of its incidents

    # --- ingest -------------------------------------------------------------------------------------

    def ingest(self, messages: Iterable[Message], now: float) -> None:
        """Check and store one batch (the caller acknowledges every message after it returns).

        Raises only when the database itself cannot be written (then nothing is acknowledged and the
        broker delivers the batch again); never because of what a message holds.
        """
        for m in messages:
            self._batch = Rows()
            try:
                self._one(m)
            except Rejected as r:
                self._reject(r, m)
            except Exception as err:  # our bug, on this message: it alone is refused and set aside
                log.exception("message_failed", topic=m.topic[:200])
                self._batch, self._resync = Rows(), True
                self._reject(Rejected("internal", self._roster_agent(m.topic), f"{type(err).__name__}: {err}"), m)
            self._parts.append((m, self._batch))
        self._batch = Rows()
        try:
            if self.role != "follower":
                self._correlate(now)
        except Exception:  # correlation is retried at every tick; the messages must be stored regardless
            log.exception("correlation_failed")
        self._commit()

    def _roster_agent(self, topic: str) -> str:
        where = wire.parse_topic(topic)
        return where[0] if where and where[0] in self.agents else ""

    def _one(self, m: Message) -> None:
        where = wire.parse_topic(m.topic)
        if where is None:
            raise Rejected("bad_topic", "", m.topic)
        agent, kind = where
        key = self.keys.get(agent)
        if key is None:
            raise Rejected("unknown_agent", "", agent)
        try:
            env = wire.decode(m.payload)
        except wire.WireError as err:
            raise Rejected("malformed", agent, str(err)) from None
        if not env.sig:
            raise Rejected("unsigned", agent, kind)
        if env.epoch == 0:  # signed the old way, without the epoch: cannot be checked, nor ordered
            raise Rejected("outdated", agent, "envelope without an outbox epoch: upgrade this room's agent")
        if env.agent != agent or env.kind != kind or not wire.verify(key, env):
            raise Rejected("forged", agent, kind)
        a = self.agents[agent]
        if kind == "status":  # a follower has them only briefly after losing the lead: the leader hears them
            return self._status(a, env, m) if self.role != "follower" else None
        epoch = a.epochs.get(env.epoch)
        if epoch is not None and epoch.has(env.seq):
            self.stats.duplicates += 1  # stored already, however long ago: harmless
            return None
        try:
            body: Any = _readings.decode(env.body) if kind == "readings" else _alarm.decode(env.body)
        except msgspec.DecodeError as err:  # signed by the room but unreadable: an agent bug, not an attack
            raise Rejected("bad_body", agent, str(err)) from None
        if kind == "alarms":
            self._authorize(a, body)
        epoch = self._epoch(a, env.epoch)
        if epoch.seqs.runs and env.seq > epoch.top + 1:
            log.info("sequence_gap", agent=agent, epoch=env.epoch, after=epoch.top, got=env.seq)
        epoch.seqs.add(env.seq)
        self._seen(a, m.received)
        self._batch.ledger.append((agent, env.epoch, env.seq, kind, env.ts, m.received))
        if kind == "readings":
            self._readings(a, env.seq, body)
        else:
            self._store_alarm(a, body, bytes(env.body), m.received, (epoch.rank, env.seq), "agent")
        self.stats.messages[kind] += 1
        return None

    def _epoch(self, a: AgentState, epoch: int) -> Epoch:
        """The agent's epoch, ranked after all it had when first seen (a new outbox database)."""
        e = a.epochs.get(epoch)
        if e is None:
            e = a.epochs[epoch] = Epoch(len(a.epochs))
            if a.epochs and len(a.epochs) > 1:
                log.warning("agent_new_epoch", agent=a.agent, epoch=epoch, epochs=len(a.epochs))
            self._batch.epochs[(a.agent, epoch)] = (a.agent, epoch, e.rank, e.floor)
            self._batch.agents.add(a.agent)
        return e

    def _authorize(self, a: AgentState, ev: AlarmEvent) -> None:
        """A room's key changes that room's own alarms only; the gateway's alarms are nobody's but ours."""
        claimed = {f"{ev.site}/{ev.room}", _owner(ev.id)}
        held = self.conn.execute("SELECT site, room, source FROM alarms WHERE id = ?", [ev.id]).fetchone()
        if held is not None:
            claimed.add(f"{held['site']}/{held['room']}")
        ours = self.open_alarms.get(ev.id, (None, (0, 0), "agent"))[2] == "gateway"
        if claimed != {a.agent} or ours or (held and held["source"] != "agent"):
            detail = f"alarm {ev.id[:120]} of {sorted(claimed)} signed by {a.agent}"
            raise Rejected("unauthorized", a.agent, detail, victims=claimed - {a.agent})

    def _readings(self, a: AgentState, seq: int, readings: list[Reading]) -> None:
        self._batch.readings.extend((a.agent, r.device, r.metric, r.value, r.ts, r.quality, seq) for r in readings)
        self.stats.readings += len(readings)

    def _store_alarm(
        self, a: AgentState, ev: AlarmEvent, body: bytes, received: float, order: Order, source: str
    ) -> None:
        """One transition: into the timeline always; into the alarm's state if it is the latest by ``order``.

        An agent's transitions are ordered by its outbox (epoch rank, seq), never by their times (``at`` is
        data: a clock that jumped must not keep a cleared alarm raised); ours by our clock.
        """
        seq = order[1] if source == "agent" else 0
        self._batch.alarm_events.append((ev.id, ev.at, ev.state, ev.level, received, seq, body))
        self._batch.alarm(ev, a.site, a.room, source, order)
        prev = self.open_alarms.get(ev.id)
        if prev is not None and order < prev[1]:
            return  # an older transition arriving late: timeline only
        if ev.state == "cleared":
            self.open_alarms.pop(ev.id, None)
        else:
            self.open_alarms[ev.id] = (Fault(a.site, a.room, ev.rule, ev.raised_at), order, source)

    def _status(self, a: AgentState, env: wire.Envelope, m: Message) -> None:
        try:
            st = _status.decode(env.body)
        except msgspec.DecodeError as err:
            raise Rejected("bad_body", a.agent, str(err)) from None
        known = env.epoch in a.epochs
        key: StatusKey = (a.epochs[env.epoch].rank if known else len(a.epochs), *st.order())
        if not newer(key, a.status_key):
            if not (m.retained and key == a.status_key):  # our own last word, delivered again at subscribe
                raise Rejected("stale", a.agent, f"status {key} not newer than {a.status_key}")
            return None
        self._epoch(a, env.epoch)
        a.status_key, a.last_status_ts = key, env.ts
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
            level = self._offline_level(a, m.received)
            self._raise_gw(a, "agent_offline", level, f"考场监测代理离线：{what}", m.received)
            return None
        if not m.retained and self.clocks.judge(a.agent, env.ts, m.received):  # not one that waited on its way
            a.skews.append(env.ts - m.received)
            self._check_skew(a, m.received)
        self._seen(a, m.received if not m.retained else None)
        return None

    def _seen(self, a: AgentState, received: float | None) -> None:
        self._batch.agents.add(a.agent)
        if received is None or self.role == "follower":  # a room heard by a follower is the leader's to judge
            return
        a.last_seen = max(a.last_seen or 0.0, received)
        if a.status != "online":
            if a.status == "offline":
                log.info("agent_online", agent=a.agent)
            a.status = "online"
            self._clear_gw(a, "agent_offline", "考场监测代理已恢复连接", received)

    def _reject(self, r: Rejected, m: Message) -> None:
        """Count, log once per reason and room, set aside, and raise the security alarm where one is due."""
        self.stats.rejected[(r.reason, r.agent)] += 1
        if (r.reason, r.agent) not in self._logged:  # once per kind and room: a flood must not flood the log
            self._logged.add((r.reason, r.agent))
            log.warning("message_rejected", reason=r.reason, agent=r.agent or None, detail=r.detail[:200])
        if r.reason == "stale":
            return  # an old status: nothing to inspect
        self._batch.dead_letter(m.received, r.reason, r.agent, m.topic, r.detail, m.payload)
        if r.reason in SECURITY_REASONS and r.agent:
            # the room whose key or name was used, and any room whose alarm it tried to change
            for agent in (r.agent, *sorted(v for v in r.victims if v in self.agents)):
                self._security[agent] = m.received
                if (agent, "security_rejected") not in self.gateway_alarms:
                    text = f"收到冒用本考场身份的{REASON_NAMES[r.reason]}消息，已拒收；请核查网络与设备"
                    self._raise_gw(self.agents[agent], "security_rejected", 2, text, m.received)

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

    def _raise_gw(
        self, a: AgentState, rule: str, level: int, message: str, now: float, value: float | None = None
    ) -> None:
        current = self.gateway_alarms.get((a.agent, rule))
        if current is not None and current.level >= level:
            return
        state = AlarmState.UPDATED if current is not None else AlarmState.RAISED
        ev = AlarmEvent(
            id=current.id if current else f"{a.agent}/{rule}/gateway/{int(now * 1000)}",
            site=a.site,
            room=a.room,
            rule=rule,
            level=Level(level),
            state=state,
            device="agent",
            value=value,
            at=now,
            raised_at=current.raised_at if current else now,
            message=message,
        )
        self.gateway_alarms[(a.agent, rule)] = ev
        self._store_alarm(a, ev, _json.encode(ev), now, (0, round(now * 1000)), "gateway")

    def _clear_gw(self, a: AgentState, rule: str, message: str, now: float) -> None:
        current = self.gateway_alarms.pop((a.agent, rule), None)
        if current is None:
            return
        ev = msgspec.structs.replace(current, state="cleared", at=now, message=message)
        self._store_alarm(a, ev, _json.encode(ev), now, (0, round(now * 1000)), "gateway")

    def _check_skew(self, a: AgentState, now: float) -> None:
        skew, bound = a.skew, self.cfg.liveness.skew_max
        if skew is None:
            return
        if abs(skew) > bound:
            text = f"考场代理时钟偏差 {skew:+.1f} 秒，超过 {bound:g} 秒：记录时间不可信，请校时"
            self._raise_gw(a, "clock_skew", 1, text, now, value=skew)
        elif abs(skew) <= bound / 2:
            self._clear_gw(a, "clock_skew", "考场代理时钟已校准", now)

    # --- periodic -----------------------------------------------------------------------------------

    def tick(self, now: float, broker_up_since: float | None) -> None:
        """Liveness by heartbeat, security alarms that went quiet, level by phase, correlation, retention."""
        if self.role == "follower":
            if self.gateway_alarms:  # the security alarms it raised: the leader clears them
                self.open_alarms, self.gateway_alarms, _ = load_open(self.conn)
            return
        timeout = self.cfg.liveness.heartbeat_timeout
        self._follow_schedule(now)
        # Our own link to the broker must have been up for a full bound, or every room would look silent.
        if broker_up_since is not None and now - broker_up_since > timeout:
            for a in self.agents.values():
                if a.status == "online" and (a.last_seen is None or now - a.last_seen > timeout):
                    a.status = "silent"
                    self._batch.agents.add(a.agent)
                    log.warning("agent_silent", agent=a.agent, last_seen=a.last_seen)
                    text = f"考场监测代理 {timeout:g} 秒无心跳：网络中断或设备故障"
                    self._raise_gw(a, "agent_offline", self._offline_level(a, now), text, now)
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
        faults = unsettled([f for f, _, _ in self.open_alarms.values()], self.rules, self.settled)
        self.incidents, changes, closed = correlate(self.incidents, faults, self.rules, dict(self.roster), now)
        if not changes:
            return
        by_id = {i.id: i for i in [*self.incidents.values(), *closed]}
        for c in changes:
            inc = by_id[c.incident]
            log.warning("incident_" + c.what, incident=inc.id, level=c.level, rooms=list(c.rooms))
            self._batch.incident_events.append((inc.id, now, c.what, _json.encode(list(c.rooms)).decode(), c.level))
            self._batch.incident(inc)

    def close_incident(self, incident_id: str, who: str, note: str, now: float) -> bool:
        """People close an open incident (the duty desk); its faults do not open it again (``unsettled``)."""
        key = next((k for k, i in self.incidents.items() if i.id == incident_id), None)
        if key is None or not duty.close_incident(self.conn, incident_id, who, note, now):
            return False
        del self.incidents[key]
        self.settled[key] = now
        return True

    def _commit(self) -> None:
        """Write the batch in one transaction; if that fails, message by message, setting aside what still fails.

        A database out of reach is not the messages' fault: that raises (the caller retries after ``reload``).
        """
        parts, self._parts = [*self._parts, (None, self._batch)], []
        self._batch = Rows()
        try:
            self._write([rows for _, rows in parts])
        except Exception as err:  # a row the database refuses: find the message it came from
            if store.unavailable(err):
                raise
            log.error("batch_commit_failed", error=f"{type(err).__name__}: {err}", messages=len(parts) - 1)
            for m, rows in parts:
                try:
                    self._write([rows])
                except Exception as one:
                    if store.unavailable(one):
                        raise
                    self._resync = True
                    if m is None:
                        log.exception("gateway_rows_failed")  # our own alarms and incidents: derived again later
                        continue
                    self._reject(
                        Rejected("internal", self._roster_agent(m.topic), f"not stored: {type(one).__name__}: {one}"), m
                    )
                    self._write([self._batch])  # the dead letter alone; if even that fails the database is broken
                    self._batch = Rows()
        if self._resync:  # the database is the truth: what memory holds of refused rows goes
            self._resync = False
            self._load()

    def _write(self, parts: list[Rows]) -> None:
        """One transaction: the messages' ledger keys first, then the rows of those not stored already (by
        another gateway process on the same database, that the broker gave the message to before)."""
        whole = Rows()
        timeline = any(p.alarm_events or p.incident_events for p in parts)
        with store.transaction(self.conn, timeline=timeline):
            new = store.claim(self.conn, [row for p in parts for row in p.ledger])
            for p in parts:
                if all(tuple(row[:3]) in new for row in p.ledger):
                    whole.merge(p)
                else:
                    self.stats.duplicates += 1
            agents = sorted(whole.agents) if self.role != "follower" else []  # the leader's to write
            store.write(self.conn, whole.statements([self.agents[a].row() for a in agents]))
        self._stored |= whole.agents
        self.stats.batches += 1

    def reload(self, conn: store.Db) -> None:
        """Start again from what the database holds, on a new connection (after the old one was lost)."""
        self.conn, self._parts, self._batch = conn, [], Rows()
        self._load()

    def retention(self, now: float) -> None:
        cut = now - self.cfg.gateway.retention_days * 86400
        alarm_cut = now - self.cfg.gateway.alarm_retention_days * 86400
        floors = self.conn.execute(
            "SELECT agent, epoch, MAX(seq) FROM ledger WHERE received < ? GROUP BY agent, epoch", [cut]
        ).fetchall()
        for agent, epoch, floor in floors:
            e = self.agents[agent].epochs.get(epoch) if agent in self.agents else None
            if e is not None and floor > e.floor:
                e.floor = floor
                e.seqs.drop_below(floor)
                self._batch.epochs[(agent, epoch)] = (agent, epoch, e.rank, e.floor)
                self._batch.agents.add(agent)
        self._commit()  # floors first: a crash between the two leaves nothing to be taken as new
        store.prune(self.conn, cut, alarm_cut)


__all__ = ["AgentState", "Engine", "Message", "Seqs", "Stats"]
