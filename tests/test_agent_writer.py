"""The agent's writer thread in-process (no collectors, no uplink): readings are stored a few seconds at a
time, an alarm transition at once with every reading held before it; unchanged self-readings are stored
once a minute while the rules and the live view take them every time."""

from __future__ import annotations

import random
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from examwatch.collectors import Health
from examwatch.edge import runtime
from examwatch.edge.intake import Intake
from examwatch.edge.runtime import SELF_METRICS_KEEP, Agent, across_step
from examwatch.kernel.model import Reading
from tests.support import config, until


def agent_in(state_dir: Path) -> Agent:
    cfg = config({"pen1": "recorder"})
    return Agent(msgspec.structs.replace(cfg, agent=msgspec.structs.replace(cfg.agent, state_dir=str(state_dir))))


def stop(agent: Agent, writer: threading.Thread) -> None:
    agent.stop_event.set()
    agent.intake.wake()
    writer.join(10)
    assert not writer.is_alive()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Agent, threading.Thread]]:
    agent = agent_in(tmp_path)
    writer = threading.Thread(target=agent._writer, daemon=True)
    writer.start()
    assert agent.ready.wait(10)
    try:
        yield agent, writer
    finally:
        stop(agent, writer)


def count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def test_an_alarm_is_stored_at_once_with_every_reading_held_before_it(running, tmp_path: Path) -> None:
    agent, _ = running
    now = time.time()
    for value in (80.0, 60.0, 40.0):  # no alarm: held for the next transaction
        agent.intake.add(Reading("pen1", "battery_percent", value, now))
    until(lambda: agent.current.get(("pen1", "battery_percent")), what="the live view")
    agent.intake.add(Reading("pen1", "battery_percent", 10.0, now))  # recorder_battery_low
    db = tmp_path / "agent.db"
    until(lambda: count(db, "SELECT COUNT(*) FROM alarms WHERE rule = 'recorder_battery_low'"), what="the alarm")
    # committed in the alarm's transaction: a power cut after the alarm went out cannot lose what led to it
    assert count(db, "SELECT COUNT(*) FROM readings WHERE metric = 'battery_percent'") == 4


def test_held_readings_are_stored_when_the_agent_stops(running, tmp_path: Path) -> None:
    agent, writer = running
    agent.intake.add(Reading("pen1", "battery_percent", 80.0, time.time()))
    until(lambda: agent.current.get(("pen1", "battery_percent")), what="the live view")
    stop(agent, writer)
    assert count(tmp_path / "agent.db", "SELECT COUNT(*) FROM readings WHERE metric = 'battery_percent'") == 1


def test_unchanged_self_readings_are_stored_once_a_minute(tmp_path: Path) -> None:
    agent = agent_in(tmp_path)
    own = [Reading("host", "store_ok", 1.0, 0.0), Reading("host", "outbox_used_ratio", 0.001, 0.0)]
    assert agent._own_changed(own, 100.0)  # the first
    assert not agent._own_changed(own, 110.0)
    same = [Reading("host", "store_ok", 1.0, 10.0), Reading("host", "outbox_used_ratio", 0.004, 10.0)]
    assert not agent._own_changed(same, 120.0)  # the outbox's fill moved by less than a percent
    assert agent._own_changed([Reading("host", "store_ok", 0.0, 20.0), own[1]], 130.0)  # a change: at once
    assert not agent._own_changed([Reading("host", "store_ok", 0.0, 30.0), own[1]], 140.0)
    assert agent._own_changed([Reading("host", "store_ok", 0.0, 40.0), own[1]], 130.0 + SELF_METRICS_KEEP)


def test_the_writers_bell_loses_no_ring_among_racing_collectors() -> None:
    """Collectors on their own threads hand readings over while the writer sleeps, wakes and takes: every
    hand-off wakes it. Each collector waits for its reading to be taken before the next, so a single lost
    ring stalls the test (the writer would sleep its minute) instead of being covered by a later ring."""
    intake = Intake(Health())
    hand_offs = 2000
    taken: Counter[str] = Counter()

    def collector(name: str) -> None:
        for i in range(hand_offs):
            intake.add_all([Reading(name, "x", float(i), 0.0)])
            while taken[name] <= i:
                time.sleep(random.random() / 20_000)

    def writer() -> None:
        while sum(taken.values()) < 2 * hand_offs:
            intake.sleep(60)
            while intake.q:
                taken[intake.q.popleft().device] += 1

    threads = [threading.Thread(target=collector, args=(n,), daemon=True) for n in ("a", "b")]
    threads.append(threading.Thread(target=writer, daemon=True))
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: the races happen
    try:
        for t in threads:
            t.start()
        threads[-1].join(40)
    finally:
        sys.setswitchinterval(switching)
    assert taken == {"a": hand_offs, "b": hand_offs}


DAY = 86_400.0


@pytest.mark.parametrize("step", [DAY, -DAY, 1.5])
def test_readings_taken_as_the_clock_steps_move_with_it(step: float) -> None:
    now = 1_000_000.0
    before = Reading("door", "door_open", 0.0, now - step - 0.4)  # stamped on the old clock
    after = Reading("door", "door_open", 0.0, now - 0.1)  # on the new one
    moved = across_step([before, after], step, now)
    assert [r.ts for r in moved] == [pytest.approx(now - 0.4), now - 0.1]


def test_a_sensor_report_stamped_just_before_a_forward_step_is_not_a_day_old(tmp_path: Path, monkeypatch) -> None:
    """The writer takes a door's report stamped on the old clock, then reads the stepped one (CI saw it: the
    report came in with the step): the door is silent 6 s after it, not a day before it at once."""
    cfg = config({"door": "door"}, room_kind="secrecy_room", interval=2.0)  # silent after 3 x 2 s
    agent = Agent(msgspec.structs.replace(cfg, agent=msgspec.structs.replace(cfg.agent, state_dir=str(tmp_path))))
    offset = [0.0]
    monkeypatch.setattr(
        runtime, "time", SimpleNamespace(time=lambda: time.time() + offset[0], monotonic=time.monotonic)
    )
    stamped: list[float] = []
    take = agent._take

    def taken_as_the_clock_steps(wait: float) -> list[Reading]:
        batch = take(wait)
        if not stamped:
            stamped.append(time.time())
            batch.append(Reading("door", "door_open", 0.0, stamped[0]))
            offset[0] = DAY  # after the report, before the writer reads the clock
        return batch

    agent._take = taken_as_the_clock_steps  # type: ignore[method-assign]
    writer = threading.Thread(target=agent._writer, daemon=True)
    writer.start()
    try:
        assert agent.ready.wait(10)
        silent = until(
            lambda: next((e for e in agent.active.values() if e.rule == "secrecy_sensor_silent"), None),
            timeout=15,
            what="the door's silence",
        )
        assert agent._clock_step[0] == pytest.approx(DAY, abs=0.5)
        assert silent.since == pytest.approx(stamped[0] + DAY, abs=0.5)  # the report moved with the step
        assert silent.at - silent.since >= 6
    finally:
        stop(agent, writer)
