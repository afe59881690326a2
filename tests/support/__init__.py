"""Shared by the tests (no tests here): accumulators that record what collectors hand over, collectors
running for the length of a block, the rules driven the way the runtime drives them, and waits with a
deadline (blocking and async)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from examwatch.collectors.base import Collector
from examwatch.edge.config import AgentSettings, Config, Device
from examwatch.kernel.model import AlarmEvent, Reading
from examwatch.rules.config import RuleOverride, Schedule
from examwatch.rules.engine import RuleEngine, State, build_engine

POLL = 0.02  # seconds between checks while waiting

What = str | Callable[[], str]  # what is awaited; a callable is asked at the failure (e.g. for the last value)


def door_opened(site: str, room: str, at: float, alarm_id: str = "") -> AlarmEvent:
    """A secrecy-room door alarm as the room's agent raises it (level 2), for tests that sign and send one."""
    return AlarmEvent(
        id=alarm_id or f"{site}/{room}/secrecy_door_open/door1/1",
        site=site,
        room=room,
        rule="secrecy_door_open",
        level=2,
        state="raised",
        device="door1",
        at=at,
        raised_at=at,
        message="保密室门在非规定时间打开",
    )


def alarm(
    agent: str, state: str, at: float, raised_at: float, rule: str = "link_down", n: int = 1, device: str = "sw1"
) -> AlarmEvent:
    """A room's level-1 alarm transition as its agent signs and sends it (a network fault unless told)."""
    site, room = agent.split("/")
    return AlarmEvent(
        id=f"{agent}/{rule}/{device}/{n}",
        site=site,
        room=room,
        rule=rule,
        level=1,
        state=state,
        device=device,
        at=at,
        raised_at=raised_at,
        message="网络中断",
    )


def _timed_out(what: What, timeout: float) -> AssertionError:
    return AssertionError(f"{what() if callable(what) else what} not met within {timeout:g}s")


def until(check: Callable[[], Any], timeout: float = 20.0, what: What = "condition") -> Any:
    """Block until ``check()`` is truthy and return its value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(POLL)
    raise _timed_out(what, timeout)


async def wait_until(check: Callable[[], Any], timeout: float, what: What = "condition") -> Any:
    """``until`` for async tests: the event loop (and the collector under test) runs while we wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(POLL)
    raise _timed_out(what, timeout)


@contextlib.asynccontextmanager
async def running(collector: Collector) -> AsyncIterator[Collector]:
    """The collector's loops run inside the block; after it they are stopped and the collector closed."""
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        yield collector
    finally:
        stop.set()
        await task
        await collector.close()


def run_for(collector: Collector, seconds: float) -> None:
    """From a sync test: run the collector's loops for ``seconds``, then stop and close it."""

    async def go() -> None:
        async with running(collector):
            await asyncio.sleep(seconds)

    asyncio.run(go())


class Recorder:
    """An accumulator that keeps every reading a collector hands over."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def add(self, reading: Reading) -> None:
        self.readings.append(reading)

    def add_all(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)

    def latest(self, device: str, metric: str) -> float | None:
        return next((r.value for r in reversed(self.readings) if r.device == device and r.metric == metric), None)

    def of(self, device: str) -> dict[str, float]:
        """The last value of each metric of one device."""
        return {r.metric: r.value for r in self.readings if r.device == device}

    async def reaches(self, device: str, metric: str, value: float, timeout: float) -> None:
        """Wait until the latest ``metric`` of ``device`` is ``value``; the failure names the last one seen."""
        await wait_until(
            lambda: self.latest(device, metric) == value,
            timeout,
            lambda: f"{device} {metric} == {value} (last {self.latest(device, metric)})",
        )


# --- rules --------------------------------------------------------------------------------------------------


def config(
    devices: dict[str, str],
    *,
    room_kind: str = "exam_room",
    rules: dict[str, RuleOverride] | None = None,
    schedule: Schedule | None = None,
    interval: float = 10.0,
) -> Config:
    """A config built in code: device name -> kind, in room yz1/r3."""
    return Config(
        agent=AgentSettings(site="yz1", room="r3", kind=room_kind, site_name="第一中学", room_name="第3考场"),  # type: ignore[arg-type]
        devices=[Device(name=n, kind=k, protocol="test", interval=interval) for n, k in devices.items()],  # type: ignore[arg-type]
        rules=rules or {},
        schedule=schedule or Schedule(),
    )


class Driver:
    """Feeds readings and ticks through one engine the way the runtime does, keeping every event."""

    def __init__(self, cfg: Config, state: State | None = None) -> None:
        self.engine: RuleEngine = build_engine(cfg.agent, cfg.devices, cfg.rules, cfg.schedule)
        self.state = state if state is not None else self.engine.initial_state()
        self.events: list[AlarmEvent] = []

    def feed(self, device: str, metric: str, value: float, t: float) -> list[AlarmEvent]:
        return self.run([Reading(device, metric, value, t)], t)

    def tick(self, t: float) -> list[AlarmEvent]:
        return self.run([], t)

    def run(self, readings: list[Reading], now: float) -> list[AlarmEvent]:
        self.state, events = self.engine.evaluate(self.state, readings, now)
        self.events += events
        return events

    def active(self) -> dict[tuple[str, str], int]:
        """Open alarms: (rule, device) -> level."""
        return {(e.rule, e.device): e.level for e in self.state.open_alarms()}


class RulesRecorder(Driver):
    """An accumulator that evaluates the rules at each reading, as it arrives: collector -> alarms."""

    def add(self, reading: Reading) -> None:
        self.run([reading], reading.ts)

    def add_all(self, readings: Sequence[Reading]) -> None:
        for r in readings:
            self.add(r)

    @property
    def raised(self) -> list[str]:
        """Ids of the rules raised so far, in order."""
        return [e.rule for e in self.events if e.state == "raised"]

    def raised_on(self, device: str) -> list[str]:
        return [e.rule for e in self.events if e.state == "raised" and e.device == device]
