"""Shared by the rules tests (no tests here): a config built in code and a driver that keeps the engine state."""

from __future__ import annotations

from edge.config import Agent, Config, Device
from edge.model import AlarmEvent, Reading
from rules.config import RuleOverride, Schedule
from rules.engine import RuleEngine, State, build_engine


def config(
    devices: dict[str, str],
    *,
    room_kind: str = "exam_room",
    rules: dict[str, RuleOverride] | None = None,
    schedule: Schedule | None = None,
    interval: float = 10.0,
) -> Config:
    return Config(
        agent=Agent(site="yz1", room="r3", kind=room_kind, site_name="第一中学", room_name="第3考场"),  # type: ignore[arg-type]
        devices=[Device(name=n, kind=k, protocol="test", interval=interval) for n, k in devices.items()],  # type: ignore[arg-type]
        rules=rules or {},
        schedule=schedule or Schedule(),
    )


class Driver:
    """Feeds readings and ticks through one engine the way the runtime does, keeping every event."""

    def __init__(self, cfg: Config, state: State | None = None) -> None:
        self.engine: RuleEngine = build_engine(cfg)
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
