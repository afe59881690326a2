"""A full disk under the agent: it keeps running and alarming, says so once, and stores everything after.

The state directory is a real 4 MiB tmpfs (root can mount one; CI runs as root). The test fills it while
the agent runs, opens the secrecy-room door, then frees the space.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time

import pytest

from examwatch.simulators.broker import free_port
from tests.support.agent import Watcher, agent_toml, launch_agent, until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)"),
]


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "state"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_the_agent_alarming_and_loses_no_transition(mosquitto, small_disk, tmp_path):
    exporter = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_toml(
            mosquitto.port,
            exporter,
            small_disk,
            room="sec",
            kind="secrecy_room",
            body='[[devices]]\nname = "door"\nkind = "door"\nprotocol = "mqtt"\n'
            'topic = "z2m/door"\nprofile = "zigbee2mqtt_contact"\ninterval = 60\n',
        ),
        encoding="utf-8",
    )
    watcher = Watcher(mosquitto.port)
    agent = launch_agent(config, exporter, mosquitto.port)
    filler = small_disk / "filler"
    try:
        agent.publish("z2m/door", {"contact": True})
        time.sleep(0.5)
        with open(filler, "wb") as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        for _ in range(20):  # readings the disk cannot take
            agent.publish("z2m/door", {"contact": True, "battery": 80})
        agent.publish("z2m/door", {"contact": False})  # the door opens while the disk is full
        assert until(lambda: agent.alarm_exported("secrecy_door_open", 2), 3), "the live view must still alarm"
        assert until(lambda: agent.alarm_exported("agent_store_failed", 1), 15), "the full disk must raise its alarm"
        assert agent.proc.poll() is None
        logged = [json.loads(line) for line in agent.log if line.startswith("{")]
        assert any(x["event"] == "alarm" and x["alarm"]["rule"] == "secrecy_door_open" for x in logged)
        assert sum(x["event"] == "store_failing" for x in logged) == 1  # said once, not per batch
        assert agent.sample("examwatch_input_dropped_total", source="store", reason="disk_full") >= 1

        filler.unlink()  # space again: the backlog is stored and the alarm goes out
        got = watcher.wait(lambda e: e.rule == "secrecy_door_open" and e.state == "raised", timeout=15)
        assert got is not None
        assert until(lambda: not agent.alarm_exported("agent_store_failed", 1), 15)
    finally:
        agent.close()
        watcher.close()
    db = sqlite3.connect(small_disk / "agent.db")
    stored = [r[0] for r in db.execute("SELECT rule FROM alarms WHERE state = 'raised'")]
    assert "secrecy_door_open" in stored and "agent_store_failed" in stored
    assert (
        db.execute("SELECT COUNT(*) FROM readings WHERE device = 'door' AND metric = 'battery_percent'").fetchone()[0]
        >= 20
    )
