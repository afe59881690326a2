"""One room with every field protocol, watched by the real agent: each fault -> its alarm on the county topic.

snmpsim (UPS-MIB UPS, IF-MIB switch, Hikvision NVR), NUT's upsd with dummy-ups, a Megatec UPS and a Modbus
noise meter on pty pairs, and an ISAPI camera, all in one agent process during an exam session. Each fault
is caused on the running simulator; the alarm must be published within one poll interval plus one second
(plus the rule's own `for`, set to 0 here). A device that hangs must not hold up the others.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from examwatch.simulators.broker import free_port
from examwatch.simulators.room import SimulatedRoom
from tests.support.agent import Watcher, agent_toml, launch_agent

pytestmark = pytest.mark.integration

INTERVAL = 1.0

# fault -> (rule, device, level during a session) the default pack raises for it
EXPECTED = {
    "ups_on_battery": ("ups_on_battery", "ups1", 2),
    "ups_charge_low": ("ups_charge_low", "ups1", 2),
    "switch_port_down": ("link_down", None, 1),  # the watched port, filled in below; 2 rooms make it level 2
    "nvr_disk_failed": ("nvr_disk_failed", "nvr1/disk1", 2),
    "nut_on_battery": ("ups_on_battery", "ups2", 2),
    "serial_ups_on_battery": ("ups_on_battery", "ups3", 2),
    "noise_high": ("noise_high", "noise1", 1),
    "camera_disk_error": ("camera_storage_failed", "cam1/disk2", 2),
}


@pytest.fixture
def room(tmp_path: Path):
    r = SimulatedRoom(tmp_path / "room")
    r.start()
    yield r
    r.stop()


def test_every_fault_raises_its_alarm_within_one_interval_plus_a_second(mosquitto, room, tmp_path):
    exporter = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_toml(
            mosquitto.port,
            exporter,
            tmp_path / "state",
            room="r7",
            room_name="第7考场",
            body="[rules.link_down]\nfor = 0\n[rules.noise_high]\nfor = 0\n" + room.devices_toml(INTERVAL),
            sessions=[(-30, 60)],
        ),
        encoding="utf-8",
    )
    watcher = Watcher(mosquitto.port)
    agent = launch_agent(config, exporter, mosquitto.port, ready=("agent_started",))
    try:
        expected = dict(EXPECTED, switch_port_down=("link_down", f"switch1/port{room.monitored_port}", 1))
        # every device answers before any fault: device_online 1 for all seven
        assert _until(
            lambda: (
                agent.metrics().count("examwatch_device_online{") >= 7
                and 'examwatch_device_online{device="cam1"' in agent.metrics()
            ),
            20,
        ), agent.metrics()
        time.sleep(INTERVAL + 0.5)
        baseline = {(e.rule, e.device) for _, e in watcher.alarms if e.state == "raised"}
        assert baseline == set(), baseline  # a healthy room is quiet

        for fault, (rule, device, level) in expected.items():
            caused = time.monotonic()
            room.fault(fault)
            got = watcher.wait(
                lambda e, r=rule, d=device: e.rule == r and e.device == d and e.state == "raised",
                timeout=INTERVAL + 1.0 + 0.5,
            )  # + the time a poll itself takes on a busy machine
            assert got is not None, (
                f"{fault}: no {rule} on {device}; got {[(e.rule, e.device) for _, e in watcher.alarms]}"
            )
            assert got[0] - caused <= INTERVAL + 1.5
            assert got[1].level == level
            room.recover(fault)
            assert watcher.wait(lambda e, i=got[1].id: e.id == i and e.state == "cleared", timeout=INTERVAL + 2)
        # the Chinese text names the room and the device, and carries the plan's action
        sample = next(e for _, e in watcher.alarms if e.rule == "ups_on_battery")
        assert "第7考场" in sample.message and "ups1" in sample.message and "10 分钟内报告领导小组" in sample.action
    finally:
        agent.close()
        watcher.close()


def _until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False
