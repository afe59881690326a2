"""The room agent end to end: a real mosquitto, the real `examwatch agent run` process, real sensors' payloads.

Each test writes a config whose exam schedule sits around the current time, starts the agent, publishes
as Zigbee2MQTT would, and watches the alarms topic and the Prometheus endpoint.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from examwatch.edge.runtime import READINGS_HOLD
from examwatch.simulators.broker import free_port
from tests.support import until
from tests.support.agent import RunningAgent, Watcher, agent_toml, launch_agent

pytestmark = pytest.mark.integration


SENSORS = """
[[devices]]
name = "door"
kind = "door"
protocol = "mqtt"
topic = "z2m/door"
profile = "zigbee2mqtt_contact"
interval = 0.5

[[devices]]
name = "noise"
kind = "noise"
protocol = "mqtt"
topic = "z2m/noise"
profile = "zigbee2mqtt_noise"
interval = 60

[rules.noise_high]
for = 1.0
"""


@pytest.fixture
def start_agent(mosquitto, tmp_path) -> Iterator:
    running: list[RunningAgent] = []
    watcher = Watcher(mosquitto.port)

    def start(env: dict | None = None, **kw) -> RunningAgent:
        exporter_port = free_port()
        path = tmp_path / f"agent{len(running)}.toml"
        path.write_text(
            agent_toml(
                mosquitto.port,
                exporter_port,
                tmp_path / f"state{len(running)}",
                kind=kw.pop("room_kind"),
                room_name="保密室",
                body=SENSORS,
                **kw,
            ),
            encoding="utf-8",
        )
        agent = launch_agent(path, exporter_port, mosquitto.port, env)
        running.append(agent)
        return agent

    start.watcher = watcher  # type: ignore[attr-defined]
    yield start
    watcher.close()
    for a in running:
        a.close()


def test_secrecy_door_open_outside_window_is_level_2_within_a_second_and_clears(start_agent):
    agent = start_agent(room_kind="secrecy_room", windows=[(60, 90)])  # the next window is in an hour
    watcher = start_agent.watcher
    sent = agent.publish("z2m/door", {"contact": False, "battery": 90})
    got = watcher.wait(lambda e: e.rule == "secrecy_door_open" and e.state == "raised", timeout=1.0)
    assert got is not None, "no level-2 alarm published within 1 s"
    arrived, event = got
    assert event.level == 2 and event.device == "door" and event.value == 1.0
    assert "保密室" in event.message and event.action
    assert arrived - sent < 1.0
    assert until(lambda: agent.alarm_exported("secrecy_door_open", 2), timeout=1.0 - (time.monotonic() - sent) + 0.2)
    logged = [json.loads(line) for line in agent.log if '"event": "alarm"' in line]
    assert [(x["alarm"]["rule"], x["alarm"]["level"], x["alarm"]["state"]) for x in logged] == [
        ("secrecy_door_open", 2, "raised")
    ]

    agent.publish("z2m/door", {"contact": True})
    cleared = watcher.wait(lambda e: e.id == event.id and e.state == "cleared", timeout=2.0)
    assert cleared is not None
    assert until(lambda: not agent.alarm_exported("secrecy_door_open", 2), timeout=2.0)


def test_door_opening_inside_a_permitted_window_raises_nothing(start_agent):
    agent = start_agent(room_kind="secrecy_room", windows=[(-10, 20)])
    agent.publish("z2m/door", {"contact": False})
    assert until(lambda: 'examwatch_door_open{device="door",kind="door",room="r1",site="s1"} 1.0' in agent.metrics(), 2)
    # one age per device (its newest reading), not per metric
    ages = [line for line in agent.metrics().splitlines() if line.startswith("examwatch_device_reading_age_seconds{")]
    assert [line.split(" ")[0] for line in ages if 'device="door"' in line] == [
        'examwatch_device_reading_age_seconds{device="door",kind="door",room="r1",site="s1"}'
    ]
    assert start_agent.watcher.wait(lambda e: e.rule == "secrecy_door_open", timeout=1.5) is None
    assert not agent.alarm_exported("secrecy_door_open", 2)


def test_noise_over_the_limit_during_a_session_is_level_1_and_not_between_sessions(start_agent):
    during = start_agent(room_kind="exam_room", sessions=[(-20, 40)])
    for _ in range(4):
        during.publish("z2m/noise", {"noise": 82})
        time.sleep(0.4)
    got = start_agent.watcher.wait(lambda e: e.rule == "noise_high" and e.state == "raised", timeout=2.0)
    assert got is not None and got[1].level == 1 and got[1].phase == "during"
    during.proc.terminate()
    during.proc.wait(10)

    start_agent.watcher.alarms.clear()
    between = start_agent(room_kind="exam_room", sessions=[(-90, -30), (30, 90)])
    for _ in range(5):
        between.publish("z2m/noise", {"noise": 82})
        time.sleep(0.4)
    assert start_agent.watcher.wait(lambda e: e.rule == "noise_high", timeout=1.0) is None


def test_a_sensor_that_falls_silent_raises_the_staleness_alarm(start_agent):
    agent = start_agent(room_kind="secrecy_room", windows=[(-10, 20)])
    last = agent.publish("z2m/door", {"contact": True})
    got = start_agent.watcher.wait(lambda e: e.rule == "secrecy_sensor_silent" and e.device == "door", timeout=5.0)
    assert got is not None and got[1].level == 2
    assert got[0] - last >= 3 * 0.5 - 0.1  # not before its bound: 3 intervals of 0.5 s
    agent.publish("z2m/door", {"contact": True})
    assert start_agent.watcher.wait(lambda e: e.id == got[1].id and e.state == "cleared", timeout=2.0)


def test_availability_offline_raises_an_alarm(start_agent):
    agent = start_agent(room_kind="exam_room", sessions=[(-20, 40)])
    agent.publish("z2m/noise/availability", {"state": "offline"})
    got = start_agent.watcher.wait(
        lambda e: e.device == "noise" and e.state == "raised" and "offline" in e.rule, timeout=2.0
    )
    assert got is not None
    assert until(
        lambda: 'examwatch_device_online{device="noise",kind="noise",room="r1",site="s1"} 0.0' in agent.metrics(), 1.0
    )


def test_sigterm_stops_cleanly_and_a_restart_keeps_the_alarm_open(start_agent, tmp_path):
    agent = start_agent(room_kind="secrecy_room", windows=[(60, 90)])
    agent.publish("z2m/door", {"contact": False})
    assert start_agent.watcher.wait(lambda e: e.rule == "secrecy_door_open", timeout=2.0)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=15) == 0
    assert until(lambda: any('"event": "agent_stopped"' in line for line in agent.log), timeout=2)
    from examwatch.edge.store import Store

    open_alarms = Store(tmp_path / "state0" / "agent.db").open_alarms()
    assert [e.rule for e in open_alarms if e.rule == "secrecy_door_open"] == ["secrecy_door_open"]


def test_systemd_ready_then_watchdog_only_while_healthy(start_agent, tmp_path):
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    agent = start_agent(
        room_kind="exam_room", env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    )
    got = [sock.recv(256).decode() for _ in range(4)]
    assert got[0] == "READY=1"
    assert "WATCHDOG=1" in got[1:]
    assert "examwatch_collector_success{" in agent.metrics()

    # A writer stuck on its disk (here: another process holds the database's write lock) must stop the
    # watchdog although the event loop still runs, so that systemd restarts the agent.
    import sqlite3

    lock = sqlite3.connect(tmp_path / "state0" / "agent.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        agent.publish("z2m/noise", {"noise": 41})
        # the reading is stored within READINGS_HOLD s, where the writer sticks; its heartbeat goes stale 5 s later
        time.sleep(READINGS_HOLD + 6)
        sock.settimeout(0.05)
        while True:  # drop what was sent while it was still fresh
            try:
                sock.recv(256)
            except TimeoutError:
                break
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            while "WATCHDOG=1" not in sock.recv(256).decode():
                pass
        assert agent.proc.poll() is None
    finally:
        lock.execute("ROLLBACK")
    sock.settimeout(5)
    assert "WATCHDOG=1" in [sock.recv(256).decode() for _ in range(4)]


def test_a_reading_that_is_not_a_number_never_enters_the_agent() -> None:
    """The county refuses a whole message holding a NaN; the intake is the last gate every collector passes."""
    from examwatch.collectors.base import Health
    from examwatch.edge.intake import Intake
    from examwatch.kernel.model import Reading

    health = Health()
    intake = Intake(health)
    for value in (float("nan"), float("inf"), 80.0):
        intake.add(Reading("ups", "ups_charge_percent", value, 1.0))
    assert len(intake.q) == 1 and intake.q.popleft().value == 80.0
    assert health.dropped[("intake", "not_finite")] == 2
