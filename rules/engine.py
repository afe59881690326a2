"""The rules evaluator: readings and time in, alarm transitions out. Pure: no clock, no I/O, no logging.

Every (rule, device) pair the engine has seen misbehave has a ``Track``: since when its condition has
held and the open alarm, if any. ``evaluate`` never changes the state it is given; it returns a new one
(dicts are copied shallowly, tracks are immutable), so a caller whose transaction fails keeps the old
state and tries again.

Order inside one evaluation: open alarms are re-levelled when the phase or the secrecy window changed,
then readings are applied in order (a raise or clear caused by a reading happens at the reading's time),
then ``for`` timers and silent devices are checked against ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

import msgspec

from examwatch.kernel.catalog import METRICS
from examwatch.kernel.model import DEVICE_KIND_NAMES, AlarmEvent, AlarmState, Level, Reading, base_device
from examwatch.rules.config import RuleOverride, Schedule
from examwatch.rules.model import Rule
from examwatch.rules.pack import effective_rules, override_issues
from examwatch.rules.schedule import PHASE_NAMES, Calendar


class RoomLike(Protocol):
    """What the engine must know of its room (the agent's ``[agent]`` section has it)."""

    @property
    def site(self) -> str: ...
    @property
    def room(self) -> str: ...
    @property
    def kind(self) -> str: ...  # "exam_room" | "secrecy_room"
    @property
    def site_name(self) -> str: ...
    @property
    def room_name(self) -> str: ...


class DeviceLike(Protocol):
    """What the engine must know of a watched device: its kind and how often it should be heard from."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def interval(self) -> float: ...


Key = tuple[str, str]  # (rule id, device or device part)


class Track(msgspec.Struct, frozen=True):
    since: float  # when the condition began to hold (threshold) or the device fell silent
    value: float | None = None  # the latest value while it holds
    alarm: AlarmEvent | None = None  # the open alarm's latest transition


class State(msgspec.Struct, frozen=True):
    started: float | None = None  # the first evaluation: devices never heard count as silent from here
    context: tuple[str, bool] | None = None  # (phase, inside a secrecy window) at the last evaluation
    tracks: dict[Key, Track] = {}
    pending: frozenset[Key] = frozenset()  # tracks whose condition holds but that are not raised yet
    last_seen: dict[str, float] = {}  # device -> time of its latest reading
    silent_due: float = -math.inf  # no device can fall silent before this: skip the sweep until then
    retired: tuple[AlarmEvent, ...] = ()  # restored alarms whose rule or device is gone: cleared next

    def open_alarms(self) -> list[AlarmEvent]:
        return [t.alarm for t in self.tracks.values() if t.alarm is not None]


class _DeviceRules(NamedTuple):
    kind: str
    by_metric: dict[str, tuple[Rule, ...]]
    silent: tuple[Rule, ...]
    silent_after: tuple[float, ...]  # seconds without a reading, per silent rule (same order)
    silent_soonest: float  # the shortest of those


class RuleEngine:
    def __init__(
        self, rules: Sequence[Rule], devices: Iterable[DeviceLike], agent: RoomLike, schedule: Schedule
    ) -> None:
        self._site, self._room = agent.site, agent.room
        self._where = f"{agent.site_name or agent.site} {agent.room_name or agent.room}"
        self._calendar = Calendar(schedule)
        self._rules = {r.id: r for r in rules}
        self._devices: dict[str, _DeviceRules] = {}
        for d in devices:
            applicable = [r for r in rules if r.applies_to(d.kind, agent.kind)]
            replaced = {x for r in applicable for x in r.replaces}
            applicable = [r for r in applicable if r.id not in replaced]
            by_metric: dict[str, tuple[Rule, ...]] = {}
            for r in applicable:
                if r.type == "threshold":
                    by_metric[r.metric] = (*by_metric.get(r.metric, ()), r)
            silent = tuple(r for r in applicable if r.type == "silent")
            after = tuple(r.silent_intervals * d.interval for r in silent)
            self._devices[d.name] = _DeviceRules(d.kind, by_metric, silent, after, min(after, default=math.inf))

    @property
    def rules(self) -> list[Rule]:
        return list(self._rules.values())

    def initial_state(self) -> State:
        return State()

    def restore(self, open_events: Iterable[AlarmEvent]) -> State:
        """Rebuild the open alarms after a restart from their latest stored transitions."""
        tracks: dict[Key, Track] = {}
        retired = []
        for e in open_events:
            if e.state == "cleared":
                continue
            if self._applies(e.rule, e.device, e.metric):
                tracks[(e.rule, e.device)] = Track(
                    since=e.since if e.since is not None else e.raised_at, value=e.value, alarm=e
                )
            else:
                retired.append(e)
        return State(tracks=tracks, retired=tuple(retired))

    def rebase(self, state: State, step: float) -> State:
        """The state after the wall clock stepped by ``step`` seconds (the runtime measured the step
        against the monotonic clock): every remembered time moves with it, so durations (``for``, silence)
        keep counting real seconds and a jump raises nothing. Open alarms keep their historical times."""
        return msgspec.structs.replace(
            state,
            started=None if state.started is None else state.started + step,
            tracks={k: msgspec.structs.replace(t, since=t.since + step) for k, t in state.tracks.items()},
            last_seen={dev: ts + step for dev, ts in state.last_seen.items()},
            silent_due=state.silent_due + step,
        )

    def _applies(self, rule_id: str, device: str, metric: str | None) -> bool:
        d = self._devices.get(base_device(device))
        rule = self._rules.get(rule_id)
        if d is None or rule is None:
            return False
        return rule in d.silent if rule.type == "silent" else rule in d.by_metric.get(metric or "", ())

    def evaluate(self, state: State, readings: Sequence[Reading], now: float) -> tuple[State, list[AlarmEvent]]:
        events: list[AlarmEvent] = []
        tracks = dict(state.tracks)
        pending = set(state.pending)
        last_seen = dict(state.last_seen)
        started = now if state.started is None else state.started
        phase, in_window = context = (self._calendar.phase(now), self._calendar.in_window(now))

        for e in state.retired:
            events.append(self._event(e, "cleared", e.level, now, phase, e.value, "（规则已停用或设备已不在配置中）"))

        if context != state.context:
            for key, t in list(tracks.items()):
                if t.alarm is None:
                    continue
                rule = self._rules[key[0]]
                level = rule.level_in(phase, in_window)
                if level == 0:
                    events.append(
                        self._event(t.alarm, "cleared", t.alarm.level, now, phase, t.value, "（当前时段不告警）")
                    )
                    if rule.type == "silent":
                        del tracks[key]  # the silence sweep raises it again if the device is still silent
                    else:
                        tracks[key] = Track(t.since, t.value)
                        pending.add(key)  # still holds: raised again when its level returns
                elif level != t.alarm.level:
                    e = self._event(t.alarm, "updated", level, now, phase, t.value)
                    tracks[key] = Track(t.since, t.value, e)
                    events.append(e)

        devices = self._devices
        silent_due = state.silent_due
        next_spoke = False  # a device whose silence was the next due has spoken: the next one is later
        for r in readings:
            dev = r.device.partition("/")[0]
            d = devices.get(dev)
            if d is None:
                continue
            # a reading stamped before the clock stepped back, not moved with the step, lies in the future:
            # it was seen now, not then; one stamped before the start of watching (a forward step's, missed)
            # must not date the device back: its silence counts from the start
            ts = min(r.ts, now)
            if ts > last_seen.get(dev, -math.inf) and ts >= started:
                next_spoke = next_spoke or last_seen.get(dev, started) + d.silent_soonest <= silent_due
                last_seen[dev] = ts
                silent_due = min(silent_due, ts + d.silent_soonest)  # its own deadline may be the next
            for rule in d.silent:  # any reading ends a silence
                key = (rule.id, dev)
                silence = tracks.pop(key, None)
                if silence is not None and silence.alarm is not None:
                    events.append(self._event(silence.alarm, "cleared", silence.alarm.level, r.ts, phase, None))
            rules = d.by_metric.get(r.metric)
            if rules is None or r.quality == "bad" or not math.isfinite(r.value):
                continue
            for rule in rules:
                self._step(rule, r, tracks, pending, context, events)

        for key in list(pending):
            t = tracks[key]
            rule = self._rules[key[0]]
            level = rule.level_in(phase, in_window)
            if level and now - t.since >= rule.for_:
                e = self._raise(rule, key[1], level, t.value, t.since, now, phase)
                tracks[key] = Track(t.since, t.value, e)
                pending.discard(key)
                events.append(e)

        if now >= silent_due or context != state.context:
            silent_due = self._sweep_silent(tracks, last_seen, started, now, context, events)
        elif next_spoke:  # else the agent would wake at the old deadline for a sweep that finds nothing
            silent_due = self._next_silence(tracks, last_seen, started, now)

        new = State(started, context, tracks, frozenset(pending), last_seen, silent_due)
        return new, events

    def next_due(self, state: State, now: float) -> float:
        """After an evaluation at ``now``: the first later moment at which one with no readings could change
        anything (a ``for`` timer running out, a device falling silent, the phase or the secrecy window
        changing); inf when nothing is waiting. The agent sleeps until then or until readings come.

        A timer already run out is waiting for its rule's level to return, which only a phase change brings."""
        due = min(state.silent_due, self._calendar.next_change(now))
        for key in state.pending:
            at = state.tracks[key].since + self._rules[key[0]].for_
            if at > now:
                due = min(due, at)
        return due if due > now else now

    def _step(
        self,
        rule: Rule,
        r: Reading,
        tracks: dict[Key, Track],
        pending: set[Key],
        context: tuple[str, bool],
        events: list[AlarmEvent],
    ) -> None:
        key = (rule.id, r.device)
        t = tracks.get(key)
        v = r.value
        if t is not None and t.alarm is not None:
            if rule.clears(v):  # the pack guarantees a clearing value does not hold, so no new run starts
                del tracks[key]
                events.append(self._event(t.alarm, "cleared", t.alarm.level, r.ts, context[0], v))
            else:
                tracks[key] = Track(t.since, v, t.alarm)
        elif rule.holds(v):
            since = r.ts if t is None else t.since
            level = rule.level_in(*context)
            if level and r.ts - since >= rule.for_:
                e = self._raise(rule, r.device, level, v, since, r.ts, context[0])
                tracks[key] = Track(since, v, e)
                pending.discard(key)
                events.append(e)
            else:
                tracks[key] = Track(since, v)
                pending.add(key)
        elif t is not None:
            del tracks[key]
            pending.discard(key)

    def _sweep_silent(
        self,
        tracks: dict[Key, Track],
        last_seen: dict[str, float],
        started: float,
        now: float,
        context: tuple[str, bool],
        events: list[AlarmEvent],
    ) -> float:
        """Raise for devices silent too long; return the earliest moment another one could fall silent.

        Silences clear only when a reading arrives, never here: after a restart a device that was silent
        stays alarmed until it speaks.
        """
        phase = context[0]
        for dev, d in self._devices.items():
            last = last_seen.get(dev, started)
            for rule, limit in zip(d.silent, d.silent_after, strict=True):
                key = (rule.id, dev)
                t = tracks.get(key)
                if now - last >= limit and (t is None or t.alarm is None) and (level := rule.level_in(*context)):
                    e = self._raise(rule, dev, level, None, last, now, phase)
                    tracks[key] = Track(last, None, e)
                    events.append(e)
                # silent with the rule off in this phase: looked at again when the phase changes
        return self._next_silence(tracks, last_seen, started, now)

    def _next_silence(self, tracks: dict[Key, Track], last_seen: dict[str, float], started: float, now: float) -> float:
        """The earliest moment after ``now`` at which a device not yet alarmed as silent falls silent."""
        due = math.inf
        for dev, d in self._devices.items():
            last = last_seen.get(dev, started)
            for rule, limit in zip(d.silent, d.silent_after, strict=True):
                t = tracks.get((rule.id, dev))
                if now - last < limit and (t is None or t.alarm is None):
                    due = min(due, last + limit)
        return due

    # --- the events and their texts ---

    def _title(self, rule: Rule | None, rule_id: str, device: str) -> str:
        d = self._devices.get(base_device(device))
        kind = DEVICE_KIND_NAMES.get(d.kind, d.kind) if d is not None else "设备"
        return rule.title.replace("{kind}", kind) if rule is not None else rule_id

    def _raise(
        self, rule: Rule, device: str, level: int, value: float | None, since: float, at: float, phase: str
    ) -> AlarmEvent:
        if rule.type == "silent":
            d = self._devices[device]
            interval = d.silent_after[d.silent.index(rule)] / rule.silent_intervals
            detail = f"，已 {at - since:.0f} 秒无数据（应每 {interval:g} 秒上报）"
        else:
            detail = _detail(rule.metric, value, rule.threshold)
        return AlarmEvent(
            id=f"{self._site}/{self._room}/{rule.id}/{device}@{round(at * 1000)}",
            site=self._site,
            room=self._room,
            rule=rule.id,
            level=Level(level),
            state=AlarmState.RAISED,
            device=device,
            metric=rule.metric or None,
            value=value,
            at=at,
            raised_at=at,
            since=since,
            phase=phase,
            message=f"【{Level(level).label}】{self._where} {device}：{self._title(rule, rule.id, device)}{detail}",
            action=rule.action_for(level),
        )

    def _event(
        self, prev: AlarmEvent, state: str, level: int, at: float, phase: str, value: float | None, note: str = ""
    ) -> AlarmEvent:
        """A later transition of an open alarm (``updated`` or ``cleared``)."""
        rule = self._rules.get(prev.rule)
        title = self._title(rule, prev.rule, prev.device)
        now_text = (
            f"，当前 {text}" if value is not None and prev.metric and (text := _value_text(prev.metric, value)) else ""
        )
        if state == "updated":
            message = (
                f"【{Level(level).label}】{self._where} {prev.device}：{title}，"
                f"响应级别调整为{Level(level).label}（{PHASE_NAMES[phase]}）"
            )
            action = rule.action_for(level) if rule is not None else prev.action
        else:
            message = f"【已恢复】{self._where} {prev.device}：{title}已恢复{now_text}{note}"
            action = ""
        return msgspec.structs.replace(
            prev, state=state, level=level, at=at, phase=phase, value=value, message=message, action=action
        )


def _value_text(metric: str, v: float) -> str:
    unit = METRICS[metric].unit if metric in METRICS else ""
    if unit == "bool":
        return ""
    if unit == "percent":
        return f"{v:.0f}%"
    if unit == "ratio":
        return f"{v * 100:.0f}%"
    if unit == "seconds":
        return f"{v / 60:.0f} 分钟" if v >= 120 else f"{v:.0f} 秒"
    if unit == "celsius":
        return f"{v:.1f} °C"
    if unit == "decibels":
        return f"{v:.0f} dB"
    if unit == "volts":
        return f"{v:.0f} V"
    if unit == "bytes":
        return f"{v / 1e9:.1f} GB"
    return f"{v:g}"


def _detail(metric: str, value: float | None, threshold: float) -> str:
    if value is None or not (now := _value_text(metric, value)):
        return ""
    return f"，当前 {now}（阈值 {_value_text(metric, threshold)}）"


def build_engine(
    room: RoomLike, devices: Iterable[DeviceLike], overrides: Mapping[str, RuleOverride], schedule: Schedule
) -> RuleEngine:
    """The engine for one room: the default pack with the site's overrides, its devices and schedule."""
    problems = override_issues(dict(overrides))
    if problems:
        raise ValueError("; ".join(f"{'.'.join(path)}: {msg}" for path, msg in problems))
    return RuleEngine(effective_rules(dict(overrides)), devices, room, schedule)


__all__ = ["DeviceLike", "RoomLike", "RuleEngine", "State", "Track", "build_engine"]
