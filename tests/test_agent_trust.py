"""The room agent against hostile sensor input and a hostile wall clock: a real mosquitto, the real agent.

- one bad field of a sensor message must not cost the door opening in it;
- a wildcard device topic is refused with its key path before the agent runs;
- a huge retained message on a sensor's topic must not reach the agent at all (MQTT v5 Maximum Packet Size);
- the wall clock stepping a day forward and back (a Pi without a real-time clock) must raise the clock
  alarm, nothing false, and never stop heartbeats or readings (libfaketime moves the agent's wall clock).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from examwatch.simulators.broker import free_port
from tests.support import until
from tests.support.agent import Watcher, agent_toml, launch_agent

pytestmark = pytest.mark.integration

DOOR = """
[[devices]]
name = "door"
kind = "door"
protocol = "mqtt"
topic = "z2m/door"
profile = "zigbee2mqtt_contact"
interval = {interval}
"""


def start(mosquitto, tmp_path: Path, body: str, env: dict | None = None, **kw):
    exporter = free_port()
    path = tmp_path / "agent.toml"
    path.write_text(
        agent_toml(
            mosquitto.port, exporter, tmp_path / "state", kind="secrecy_room", room_name="保密室", body=body, **kw
        ),
        encoding="utf-8",
    )
    return launch_agent(path, exporter, mosquitto.port, env)


def test_a_door_opening_survives_a_battery_value_it_cannot_read(mosquitto, tmp_path):
    watcher = Watcher(mosquitto.port)
    agent = start(mosquitto, tmp_path, DOOR.format(interval=60), windows=[(60, 90)])
    try:
        agent.publish("z2m/door", {"contact": False, "battery": "low"})
        got = watcher.wait(lambda e: e.rule == "secrecy_door_open" and e.state == "raised", timeout=5)
        assert got is not None and got[1].value == 1.0 and got[1].level == 2
        assert until(lambda: agent.sample("examwatch_input_dropped_total", source="mqtt", reason="wrong_type") == 1, 3)
    finally:
        agent.close()
        watcher.close()


def test_a_wildcard_topic_is_refused_before_the_agent_runs(mosquitto, tmp_path):
    """A wildcard topic used to pass `config check` and, at run time, stop every sensor of the room. Now the
    agent refuses the file with the key path (systemd's ExecStartPre runs the same check); if a device with
    such a topic ever reached the collector, it alone would be refused (test_mqtt_payloads)."""
    path = tmp_path / "agent.toml"
    body = (
        DOOR.format(interval=60)
        + '[[devices]]\nname = "door107"\nkind = "door"\nprotocol = "mqtt"\ntopic = "z2m107/#"\n'
    )
    path.write_text(agent_toml(mosquitto.port, free_port(), tmp_path / "state", body=body), encoding="utf-8")
    for args in (["config", "check", str(path)], ["agent", "run", "--config", str(path)]):
        done = subprocess.run([sys.executable, "-m", "examwatch", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "devices[1].topic" in done.stderr and "wildcards" in done.stderr
        assert "Traceback" not in done.stderr


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_huge_retained_sensor_message_never_reaches_the_agent(mosquitto, tmp_path):
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    pub.publish("z2m/door", b"{" + b" " * (50 * 1024 * 1024) + b"}", qos=1, retain=True).wait_for_publish(30)
    pub.loop_stop()
    pub.disconnect()
    watcher = Watcher(mosquitto.port)
    agent = start(mosquitto, tmp_path, DOOR.format(interval=60), windows=[(60, 90)])
    try:
        time.sleep(3)  # the broker would have sent the retained message right after the subscription
        assert agent.proc.poll() is None
        assert peak_rss_mb(agent.proc.pid) < 100
        agent.publish("z2m/door", {"contact": False})
        assert watcher.wait(lambda e: e.rule == "secrecy_door_open" and e.state == "raised", timeout=5)
        peak = peak_rss_mb(agent.proc.pid)
        print(f"\nagent peak RSS with a 50 MB retained message on its door's topic: {peak:.0f} MB")
        assert peak < 100
    finally:
        agent.close()
        watcher.close()


# The thread-safe build: with FAKETIME_NO_CACHE, libfaketime.so.1 re-reads the offset on every call without a
# lock, and a thread racing another one now and then gets the unfaked time (measured: a tight loop saw the
# real clock for a moment several times a second while the offset said +1d): the agent's threads could stamp
# readings a day apart. libfaketimeMT serialises the clock and steps it once. (The false silence CI saw here
# was the agent's own: a report taken only once the clock had stepped, see test_agent_writer.)
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"

# libfaketime 0.9.10 with DONT_FAKE_MONOTONIC breaks Python 3.11's time.sleep (clock_nanosleep with an
# absolute monotonic deadline -> EINVAL; wolfcw/libfaketime#426). The agent under test gets a sleep that
# waits on select() instead, only here; everything else (Event.wait, queues, asyncio) works unchanged.
SLEEP_SHIM = """
import select, time
def _sleep(secs):
    if secs < 0:
        raise ValueError("sleep length must be non-negative")
    select.select([], [], [], secs)
time.sleep = _sleep
"""


@pytest.mark.skipif(not os.path.exists(LIBFAKETIME), reason="needs libfaketime (apt-get install faketime)")
def test_the_wall_clock_stepping_a_day_and_back_raises_the_clock_alarm_only_and_heartbeats_go_on(mosquitto, tmp_path):
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SLEEP_SHIM)
    env = {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "DONT_FAKE_MONOTONIC": "1",
        "PYTHONPATH": f"{shim}:{os.getcwd()}",
    }
    # the door reports every 2 s (silent after 12 s); the room is inside its secrecy window now, a day later
    # it is not, so the door stays closed: whatever alarm comes is the clock's
    body = "heartbeat = 1.0\nbatch_interval = 1.0\n" + DOOR.format(interval=4)
    status: list[tuple[float, str]] = []  # (arrival, topic kind) of every status and readings message
    county = mqtt.Client(CallbackAPIVersion.VERSION2)
    county.on_message = lambda c, u, m: status.append((time.monotonic(), m.topic.rsplit("/", 1)[1]))
    county.connect("127.0.0.1", mosquitto.port)
    county.subscribe([("examwatch/v1/+/+/status", 1), ("examwatch/v1/+/+/readings", 1)])
    county.loop_start()
    watcher = Watcher(mosquitto.port)
    agent = start(mosquitto, tmp_path, body, env=env, windows=[(-10, 30)])
    running, reporting = threading.Event(), threading.Event()
    running.set()
    sent: list[float] = []  # when the door reported (monotonic)

    def door() -> None:  # a real sensor: a closed door, reporting every 2 s while ``reporting``, at once on resuming
        while running.is_set():
            if reporting.is_set() and (not sent or time.monotonic() - sent[-1] >= 2):
                agent.publish("z2m/door", {"contact": True, "battery": 90})
                sent.append(time.monotonic())
            time.sleep(0.05)

    def steps_seen() -> int:
        return sum('"event": "clock_jump"' in line for line in agent.log)

    def heard_since(t: float, kind: str, n: int) -> bool:
        return sum(1 for at, k in list(status) if at > t and k == kind) >= n

    sensor = threading.Thread(target=door, daemon=True)
    sensor.start()
    try:
        assert until(lambda: heard_since(0, "status", 1), 5)
        for n, jump in enumerate(("+1d", "+0"), 1):
            reporting.clear()  # the agent's first ticks after the step see no fresh reading: the worst case,
            time.sleep(0.2)
            # but for one report just before the step, at first the door's first (CI saw the agent take it
            # only once the clock had stepped: it dated the door a day back)
            sent.append(agent.publish("z2m/door", {"contact": True, "battery": 90}))
            offset.write_text(f"{jump}\n")
            stepped = time.monotonic()
            assert until(lambda: steps_seen() == n, 5)
            time.sleep(1)
            reporting.set()  # quiet 2-7 s (the writer sees a step within TICK + CHORES_SLACK): well under the 12 s
            got = watcher.wait(lambda e: e.rule == "agent_clock_jump", timeout=5)  # raised at the first step
            assert got is not None and got[1].level == 1 and got[1].value >= 86_000 and "校时" in got[1].action
            # heartbeats and reading batches go on at their pace on the monotonic clock
            assert until(
                lambda: heard_since(stepped, "status", 3) and heard_since(stepped, "readings", 2),
                20,
                lambda: f"heartbeats and readings after the step: {[s for s in status if s[0] > stepped]}",
            )
        time.sleep(13)  # longer than the door's silence limit: a false silence would have come by now
        raised = [e for _, e in watcher.alarms if e.state == "raised"]
        quiet = max(b - a for a, b in pairwise(sent))  # the door's longest pause
        jumps = steps_seen()
        assert jumps == 2, f"the agent saw {jumps} clock steps for the test's 2: the harness's clock is not clean"
        assert {e.rule for e in raised} == {"agent_clock_jump"}, (
            [(e.rule, e.device, e.message) for e in raised],
            f"{quiet=:.1f}",
        )
        # and silence is still watched on time: the door stops, its alarm comes (not in a day)
        reporting.clear()
        got = watcher.wait(lambda e: e.rule == "secrecy_sensor_silent" and e.device == "door", timeout=30)
        assert got is not None and got[1].at - got[1].since >= 12  # counted from its last reading, 3 x 4 s
    finally:
        running.clear()
        agent.close()
        watcher.close()
        county.loop_stop()
        county.disconnect()


def test_the_agent_is_unhealthy_once_a_collector_cannot_read(mosquitto):
    """The systemd watchdog is fed only while healthy(): a dead MQTT loop must stop it (and restart us)."""
    import asyncio

    from examwatch.collectors.base import Context, Health
    from examwatch.collectors.mqtt import MqttCollector
    from examwatch.edge.config import Device, MqttSettings
    from examwatch.edge.runtime import Agent
    from tests.support import Recorder, config, wait_until

    async def scenario() -> None:
        agent = Agent(config({"door": "door"}))
        agent.ready.set()
        door = Device(name="door", kind="door", protocol="mqtt", topic="z2m/door", profile="zigbee2mqtt_contact")
        sensors = MqttCollector(
            [door], Recorder(), Health(), Context(broker=MqttSettings(port=mosquitto.port, client_id="health"))
        )
        stop = asyncio.Event()
        agent._collectors_running = [sensors]
        agent._tasks = [asyncio.create_task(sensors.run(stop))]
        await wait_until(lambda: sensors.connected, 5)
        agent.writer_beat = time.monotonic()
        assert agent.healthy()
        sensors.client.on_message = lambda *_: 1 / 0  # a bug in paho's thread ends its loop
        pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.publish("z2m/door", b"{}")
        pub.disconnect()
        await wait_until(lambda: not sensors.alive(), 5)
        agent.writer_beat = time.monotonic()  # the writer still ticks: only the collector is dead
        assert not agent.healthy()
        stop.set()
        await sensors.close()

    asyncio.run(scenario())
