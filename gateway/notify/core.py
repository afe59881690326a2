"""Who gets told what, and when: routing, deadlines and escalation, flapping and storms. Pure, no clock.

``Planner.step(events, acks, now)`` takes the new transitions of the gateway's timeline and the
acknowledgements seen, and returns (channel, message) pairs for the outbox and lines for the notifier's
timeline. Its whole state is a msgspec struct, stored with the outbox in one transaction, so a restart
neither repeats nor loses a decision.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from examwatch.gateway.notify import messages as msg
from examwatch.gateway.notify.messages import Item, Links, Message
from examwatch.gateway.notify.settings import TIERS, Channel, Notify, Roster

TIER_NAMES = {
    "technicians": "技术人员",
    "group_lead": "保障组组长",
    "leading_group": "考点领导小组",
    "county_office": "县招办",
}
SYSTEM_RULES = {"security_rejected", "clock_skew", "notify_channel_down"}
MERGE_ABOVE = 3  # more escalations than this for one channel in one step go out as one list


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One new row of the gateway's timeline: an alarm transition or an incident change."""

    kind: str  # "alarm" | "incident"
    id: str
    site: str
    room: str = ""
    rooms: list[str] = []  # an incident's active rooms
    level: int
    what: str  # alarm: raised, updated, cleared; incident: opened, joined, left, escalated, closed
    at: float
    raised_at: float
    rule: str = ""  # alarm rule, or the incident's fault class
    device: str = ""
    metric: str = ""
    value: float | None = None
    message: str = ""  # the alarm's text, or the incident's title
    action: str = ""
    phase: str = ""
    notified: list[str] = []  # channels the room's agent told directly (county unreachable): not again


class Ack(msgspec.Struct, frozen=True):
    at: float
    who: str
    note: str = ""


class Thread(msgspec.Struct, kw_only=True):
    """An open alarm or incident being followed up until someone acknowledges it."""

    last: Event
    fault_class: str
    tier: int
    missed: int = 0  # deadlines passed without acknowledgement
    acked: bool = False
    sent_at: float = 0.0  # when an update of this thread last went out
    pending: bool = False  # an incident's room changes held back (storm window), to go out as one update


class Flap(msgspec.Struct, kw_only=True):
    raises: list[float] = []
    flapping: bool = False
    count: int = 0
    last: Event | None = None


class Storm(msgspec.Struct, kw_only=True):
    opened: float
    held: list[Event] = []


class State(msgspec.Struct, kw_only=True):
    threads: dict[str, Thread] = {}
    flaps: dict[str, Flap] = {}
    storms: dict[str, Storm] = {}


Out = tuple[str, Message]
Line = tuple[str, float, str, str]  # (thread, at, what, detail) for the notifier's timeline


class Planner:
    def __init__(
        self,
        settings: Notify,
        channels: list[Channel],
        roster: list[Roster],
        classes: dict[str, str],
        state: State | None = None,
        ack_key: bytes = b"",
    ) -> None:
        self.s = settings
        self.channels = {c.name: c for c in channels}
        self.roster = roster
        self.classes = classes
        self.state = state or State()
        self.links = Links(
            settings.ack_url, settings.grafana_url, settings.timezone, ack_key, settings.ack_link_hours * 3600
        )
        self._rostered = {n for r in roster for t in TIERS for n in r.tier(t)}

    # --- routing --------------------------------------------------------------------------------------

    def room_kind(self, site: str, room: str) -> str:
        return self.s.room_kinds.get(f"{site}/{room}") or self.s.room_kinds.get(room) or "exam"

    def fault_class(self, ev: Event) -> str:
        if ev.kind == "incident":
            return ev.rule
        if ev.rule in self.classes:
            return self.classes[ev.rule]
        if ev.rule in SYSTEM_RULES:
            return "system"
        return "secrecy" if self.room_kind(ev.site, ev.room) == "secrecy" else "other"

    def start_tier(self, level: int) -> int:
        name = self.s.start_tier.get(str(level)) or self.s.start_tier.get("3", "leading_group")
        return TIERS.index(name) if name in TIERS else 0

    def route(self, ev: Event, fault_class: str, tier: int) -> list[str]:
        """The channels of every tier up to ``tier`` for the event's site (and the county's), plus the
        channels no roster names (an Alertmanager, a county webhook), each through its own filters."""
        names: list[str] = []
        for r in self.roster:
            if r.site in (ev.site, "*"):
                for t in TIERS[: tier + 1]:
                    names += r.tier(t)
        names += [n for n in self.channels if n not in self._rostered]
        kind = self.room_kind(ev.site, ev.room)
        out = []
        for n in dict.fromkeys(names):
            c = self.channels.get(n)
            if c is None or ev.device == f"channel:{n}":
                continue  # a channel's own down alarm cannot reach it: the others carry it
            if (
                (c.levels and ev.level not in c.levels)
                or (c.sites and ev.site not in c.sites)
                or (c.classes and fault_class not in c.classes)
                or (c.room_kinds and ev.room and kind not in c.room_kinds)
                or (c.phases and ev.phase and ev.phase not in c.phases)
            ):
                continue
            out.append(n)
        return out

    # --- one step ---------------------------------------------------------------------------------------

    def step(self, events: Iterable[Event], acks: dict[str, Ack], now: float) -> tuple[list[Out], list[Line]]:
        out: list[Out] = []
        lines: list[Line] = []
        for ev in events:
            if ev.kind == "alarm":
                self._alarm(ev, now, out, lines)
            else:
                self._incident(ev, now, out, lines)
        for tid, ack in acks.items():
            th = self.state.threads.get(tid)
            if th is not None and not th.acked:
                th.acked = True
                m = msg.acked_message(
                    key=f"{tid}:acked",
                    item=self._item(th.last),
                    who=ack.who,
                    note=ack.note,
                    at=ack.at,
                    links=self.links,
                )
                out += self._to(th.last, th.fault_class, th.tier, m)
                lines.append((tid, ack.at, "acked", f"{ack.who}：{ack.note}" if ack.note else ack.who))
        self._deadlines(now, out, lines)
        self._flush_storms(now, out)
        self._flush_incidents(now, out, lines)
        self._end_flaps(now, out, lines)
        return out, lines

    def _to(self, ev: Event, fault_class: str, tier: int, m: Message) -> list[Out]:
        # A raise or level change the room's agent already sent to a channel itself is not sent there again.
        skip = ev.notified if m.kind in ("raised", "updated") and m.thread == ev.id else []
        return [(n, m) for n in self.route(ev, fault_class, tier) if n not in skip]

    def _item(self, ev: Event, firing: bool = True) -> Item:
        return Item(
            id=ev.id,
            site=ev.site,
            room=ev.room or "、".join(ev.rooms),
            rule=ev.rule,
            level=ev.level,
            firing=firing,
            starts_at=ev.raised_at,
            ends_at=None if firing else ev.at,
            summary=ev.message,
        )

    def _alarm_msg(self, ev: Event, kind: str, key: str, tier: int = 0, count: int = 0) -> Message:
        return msg.alarm_message(
            key=key,
            kind=kind,
            item=self._item(ev, kind != "cleared"),
            device=ev.device,
            value=ev.value,
            metric=ev.metric,
            action=ev.action,
            deadlines=self.s.deadlines.of(ev.level),
            links=self.links,
            tier_name=TIER_NAMES[TIERS[tier]],
            count=count,
        )

    def _alarm(self, ev: Event, now: float, out: list[Out], lines: list[Line]) -> None:
        st = self.state
        th = st.threads.get(ev.id)
        if th is not None and (th.last.what, th.last.level, th.last.at) == (ev.what, ev.level, ev.at):
            return  # the same transition stored twice
        fc = self.fault_class(ev)
        if ev.notified and ev.what in ("raised", "updated"):
            lines.append((ev.id, ev.at, "direct", "考场终端已直接通知：" + "、".join(ev.notified)))
        flap_key = f"{ev.site}/{ev.room}/{ev.rule}"
        flap = st.flaps.setdefault(flap_key, Flap())
        flap.last = ev
        if ev.what == "raised":
            flap.raises = [t for t in flap.raises if now - t < self.s.flap_window] + [now]
            flap.count += 1
            if flap.flapping or len(flap.raises) >= self.s.flap_count:
                if not flap.flapping:
                    flap.flapping = True
                    m = self._alarm_msg(ev, "flapping", f"{ev.id}:flapping", count=len(flap.raises))
                    out += self._to(ev, fc, self.start_tier(ev.level), m)
                    lines.append((ev.id, ev.at, "flapping", f"{len(flap.raises)} 次"))
                st.threads.pop(ev.id, None)
                return
            th = st.threads[ev.id] = Thread(last=ev, fault_class=fc, tier=self.start_tier(ev.level))
            storm = st.storms.get(f"{ev.site}/{fc}")
            if storm is not None and now - storm.opened < self.s.storm_window:
                storm.held.append(ev)  # goes out with the others as one list
                lines.append((ev.id, now, "held", "批量告警合并发送"))
                return
            st.storms[f"{ev.site}/{fc}"] = Storm(opened=now)
            sent = self._to(ev, fc, th.tier, self._alarm_msg(ev, "raised", f"{ev.id}:raised:{ev.level}"))
            out += sent
            if sent or not ev.notified:  # all told by the agent already: its "direct" line says so
                lines.append((ev.id, now, "sent", TIER_NAMES[TIERS[th.tier]]))
            return
        if flap.flapping:
            st.threads.pop(ev.id, None)
            return  # held: the end of the flapping says how it ended
        if th is None:
            return  # a transition of an alarm raised before we followed the timeline, or while flapping
        if ev.what == "updated":
            th.last = ev  # "updated" is a level change (ingest stores nothing else as one)
            th.tier = max(th.tier, self.start_tier(ev.level))
            out += self._to(ev, fc, th.tier, self._alarm_msg(ev, "updated", f"{ev.id}:updated:{ev.level}"))
            lines.append((ev.id, now, "sent", f"升为{msg.LEVEL_NAMES.get(ev.level, ev.level)}"))
        elif ev.what == "cleared":
            st.threads.pop(ev.id)
            out += self._to(ev, fc, th.tier, self._alarm_msg(ev, "cleared", f"{ev.id}:cleared"))
            lines.append((ev.id, now, "resolved", ""))

    def _incident(self, ev: Event, now: float, out: list[Out], lines: list[Line]) -> None:
        st = self.state
        th = st.threads.get(ev.id)
        if th is not None and (th.last.what, th.last.level, th.last.at) == (ev.what, ev.level, ev.at):
            return
        if th is None:
            if ev.what == "closed":
                return
            th = st.threads[ev.id] = Thread(last=ev, fault_class=ev.rule, tier=self.start_tier(ev.level))
        th.last = ev
        th.tier = max(th.tier, self.start_tier(ev.level))
        if ev.what in ("joined", "left") and now - th.sent_at < self.s.storm_window:
            th.pending = True  # rooms coming and going within seconds: one update with the rooms as they are
            return
        self._incident_update(th, ev.what, f"{ev.id}:{ev.what}:{ev.at}", now, out, lines)

    def _incident_update(self, th: Thread, what: str, key: str, now: float, out: list[Out], lines: list[Line]) -> None:
        ev = th.last
        m = msg.incident_message(
            key=key,
            what=what,
            item=self._item(ev, what != "closed"),
            rooms=ev.rooms,
            title=ev.message,
            deadlines=self.s.deadlines.of(ev.level),
            links=self.links,
        )
        out += self._to(ev, th.fault_class, th.tier, m)
        lines.append((ev.id, now, "sent", what))
        th.sent_at, th.pending = now, False
        if what == "closed":
            self.state.threads.pop(ev.id)

    def _flush_incidents(self, now: float, out: list[Out], lines: list[Line]) -> None:
        for tid, th in list(self.state.threads.items()):
            if th.pending and now - th.sent_at >= self.s.storm_window:
                self._incident_update(th, "updated", f"{tid}:updated:{th.last.at}", now, out, lines)

    def _deadlines(self, now: float, out: list[Out], lines: list[Line]) -> None:
        """Every deadline missed without acknowledgement: re-send one tier higher; after the last, every
        first-deadline interval at the top."""
        due: dict[str, list[Message]] = {}
        for tid, th in self.state.threads.items():
            if th.acked:
                continue
            marks = self.s.deadlines.of(th.last.level)
            if not marks:
                continue
            while now >= th.last.raised_at + _mark(marks, th.missed):
                th.missed += 1
                th.tier = min(th.tier + 1, len(TIERS) - 1)
                if th.last.kind == "alarm":
                    m = self._alarm_msg(th.last, "escalated", f"{tid}:escalated:{th.missed}", tier=th.tier)
                else:
                    m = msg.incident_message(
                        key=f"{tid}:escalated:{th.missed}",
                        what="escalated",
                        item=self._item(th.last),
                        rooms=th.last.rooms,
                        title=th.last.message,
                        deadlines=marks,
                        links=self.links,
                    )
                for n in self.route(th.last, th.fault_class, th.tier):
                    due.setdefault(n, []).append(m)
                lines.append((tid, now, "escalated", TIER_NAMES[TIERS[th.tier]]))
        for n, ms in due.items():
            if len(ms) > MERGE_ABOVE:
                items = [i for m in ms for i in m.items]
                site = items[0].site
                m = msg.storm_message(
                    key=f"escalated:{now}", site=site, fault_class="escalated", items=items, links=self.links
                )
                out.append((n, msgspec.structs.replace(m, title=f"【超时未确认】{len(items)} 项告警，已逐级上报")))
            else:
                out += [(n, m) for m in ms]

    def _flush_storms(self, now: float, out: list[Out]) -> None:
        for key, storm in list(self.state.storms.items()):
            if now - storm.opened < self.s.storm_window:
                continue
            del self.state.storms[key]
            per_channel: dict[str, list[Item]] = {}
            for ev in storm.held:
                th = self.state.threads.get(ev.id)
                if th is None:
                    continue  # cleared before the list went out: its clear went to the same channels
                for n in self.route(ev, th.fault_class, th.tier):
                    if n not in ev.notified:
                        per_channel.setdefault(n, []).append(self._item(ev))
            site, fc = key.split("/", 1)
            for n, items in per_channel.items():
                out.append(
                    (
                        n,
                        msg.storm_message(
                            key=f"storm:{key}:{storm.opened}", site=site, fault_class=fc, items=items, links=self.links
                        ),
                    )
                )

    def _end_flaps(self, now: float, out: list[Out], lines: list[Line]) -> None:
        for key, flap in list(self.state.flaps.items()):
            if flap.raises and now - flap.raises[-1] < self.s.flap_window:
                continue
            del self.state.flaps[key]
            ev = flap.last
            if not flap.flapping or ev is None:
                continue
            fc = self.fault_class(ev)
            if ev.what == "cleared":
                m = self._alarm_msg(ev, "cleared", f"{ev.id}:cleared", count=flap.count)
                m.lines.insert(0, f"**反复**：期间共告警 {flap.count} 次，现已稳定恢复")
                out += self._to(ev, fc, self.start_tier(ev.level), m)
                lines.append((ev.id, now, "resolved", f"反复 {flap.count} 次后恢复"))
            else:  # still firing: followed up like any open alarm from now on
                self.state.threads[ev.id] = Thread(last=ev, fault_class=fc, tier=self.start_tier(ev.level))


def _mark(marks: list[float], k: int) -> float:
    if k < len(marks):
        return marks[k]
    return marks[-1] + (k - len(marks) + 1) * marks[0]


__all__ = ["Ack", "Event", "Planner", "State", "Thread"]
