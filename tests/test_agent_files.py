"""The agent's own files, with real agent processes and a real broker: a corrupt database raises a local
alarm (and the agent runs on a fresh one) instead of stopping the agent; two agents cannot share a state
directory; the files are owner-only whatever the umask; a key file others may read is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from examwatch.simulators.broker import free_port
from tests.corrupt_db import CORRUPTIONS, mode, sound_db
from tests.support.agent import Watcher, agent_toml, launch_agent

pytestmark = pytest.mark.integration


def start(mosquitto, tmp_path, state, *, body: str = "", umask: int = -1):
    exporter = free_port()
    config = tmp_path / f"agent-{exporter}.toml"
    config.write_text(agent_toml(mosquitto.port, exporter, state, body=body), encoding="utf-8")
    return launch_agent(config, exporter, mosquitto.port, ready=("agent_started", "uplink_connected"), umask=umask)


def run_agent(config) -> subprocess.CompletedProcess[str]:
    """`examwatch agent run` expected to refuse to start: its exit code and everything it said."""
    return subprocess.run(
        [sys.executable, "-m", "examwatch", "agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_database_alarms_and_the_agent_runs_on_a_fresh_one(mosquitto, tmp_path, corrupt):
    state = tmp_path / "state"
    state.mkdir()
    sound_db(state / "agent.db")
    corrupt(state / "agent.db")
    watcher = Watcher(mosquitto.port)
    agent = start(mosquitto, tmp_path, state)
    try:
        got = watcher.wait(lambda e: e.rule == "agent_store_corrupt", 10)
        assert got is not None, agent.log
        alarm = got[1]
        assert (alarm.state, alarm.level, alarm.device) == ("raised", 1, "host")
        assert "数据库已损坏并另存" in alarm.action and "本地数据库已损坏" in alarm.message
        assert agent.alarm_exported("agent_store_corrupt", 1)
        assert any('"event": "store_corrupt"' in line and "set_aside" in line for line in agent.log)
        assert [p.name[: len("agent.db.corrupt-")] for p in state.glob("agent.db.corrupt-*[0-9]")] == [
            "agent.db.corrupt-"
        ]
        assert agent.proc.poll() is None
    finally:
        agent.close()
    if corrupt is CORRUPTIONS["zeroed_header"]:  # a restart on the sound new database ends the alarm
        agent = start(mosquitto, tmp_path, state)
        try:
            assert watcher.wait(lambda e: e.rule == "agent_store_corrupt" and e.state == "cleared", 10), agent.log
            assert not agent.alarm_exported("agent_store_corrupt", 1)
            assert len(list(state.glob("agent.db.corrupt-*[0-9]"))) == 1  # nothing more set aside
        finally:
            agent.close()
    watcher.close()


def test_a_second_agent_on_the_same_state_dir_refuses_to_start(mosquitto, tmp_path):
    state = tmp_path / "state"
    first = start(mosquitto, tmp_path, state)
    try:
        second, exporter = tmp_path / "second.toml", free_port()
        second.write_text(agent_toml(mosquitto.port, exporter, state, room="r2"), encoding="utf-8")
        refused = run_agent(second)
        assert refused.returncode == 1
        assert f"state dir {state} is in use by another agent (PID {first.proc.pid})" in refused.stdout + refused.stderr
        assert first.proc.poll() is None and first.sample("examwatch_uplink_connected") == 1.0
        first.proc.send_signal(signal.SIGKILL)  # the kernel releases the lock of a killed agent
        first.proc.wait(10)
        launch_agent(second, exporter, mosquitto.port, ready=("agent_started",)).close()
    finally:
        first.close()


def test_files_are_owner_only_under_umask_022_and_loose_ones_tightened(mosquitto, tmp_path):
    state = tmp_path / "state"
    agent = start(mosquitto, tmp_path, state, umask=0o022)
    try:
        assert mode(state) == 0o700
        files = {p.name: mode(p) for p in state.iterdir()}
        assert files == {"agent.db": 0o600, "agent.db-wal": 0o600, "agent.db-shm": 0o600, "agent.lock": 0o600}
        assert not any('"mode_tightened"' in line for line in agent.log)  # created right, nothing to fix
    finally:
        agent.close()
    # files an older version (or a copy) left readable to all are tightened at the next start, with a warning
    state.chmod(0o755)
    (state / "agent.db").chmod(0o644)
    agent = start(mosquitto, tmp_path, state, umask=0o022)
    try:
        assert (mode(state), mode(state / "agent.db")) == (0o700, 0o600)
        warned = [line for line in agent.log if '"mode_tightened"' in line]
        assert len(warned) == 2 and any('"was": "0644"' in line for line in warned), agent.log
    finally:
        agent.close()


def test_a_database_that_cannot_be_opened_stops_the_agent_with_a_clear_error(tmp_path):
    state = tmp_path / "state"
    (state / "agent.db").mkdir(parents=True)  # not corrupt, not a file at all: nothing to set aside
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(free_port(), free_port(), state), encoding="utf-8")
    refused = run_agent(config)
    assert refused.returncode == 1
    assert '"event": "store_open_failed"' in refused.stdout and "unable to open database file" in refused.stdout
    assert "Traceback" not in refused.stdout + refused.stderr
    assert list(state.glob("*.corrupt-*")) == []


def test_a_key_file_others_may_read_is_refused_by_agent_and_gateway(tmp_path):
    key = tmp_path / "agent.key"
    key.write_text("cd" * 32 + "\n")
    key.chmod(0o644)
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_toml(free_port(), free_port(), tmp_path / "state", body=f'signing_key_file = "{key}"'), encoding="utf-8"
    )
    refused = run_agent(config)
    assert refused.returncode == 1
    assert f"permissions 0644 for '{key}' are too open" in refused.stdout + refused.stderr

    gw = tmp_path / "gateway.toml"
    gw.write_text(f'[gateway]\nstate_dir = "{tmp_path / "gw"}"\n[security]\nkeys_file = "{key}"\n', encoding="utf-8")
    refused = subprocess.run(
        [sys.executable, "-m", "examwatch", "gateway", "run", "--config", str(gw)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert refused.returncode == 2
    assert f"permissions 0644 for '{key}' are too open" in refused.stderr
