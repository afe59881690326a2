"""Helpers for tests that run the real agent process: launching it, watching the county topics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from examwatch.kernel import wire
from examwatch.kernel.model import AlarmEvent
from examwatch.simulators.broker import wait_port
from tests.support import until

TZ = ZoneInfo("Asia/Shanghai")


def local(delta_minutes: float) -> str:
    t = datetime.now(TZ) + timedelta(minutes=delta_minutes)
    return t.replace(tzinfo=None, microsecond=0).isoformat()


class Watcher:
    """Subscribes to the county topics; records each alarm with the time it arrived."""

    def __init__(self, port: int) -> None:
        self.alarms: list[tuple[float, AlarmEvent]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("examwatch/v1/+/+/alarms", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        env = wire.decode(msg.payload)
        with self.lock:
            self.alarms.append((time.monotonic(), msgspec.json.decode(env.body, type=AlarmEvent)))

    def wait(self, pred, timeout: float) -> tuple[float, AlarmEvent] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for item in self.alarms:
                    if pred(item[1]):
                        return item
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class RunningAgent:
    def __init__(self, proc: subprocess.Popen[str], exporter_port: int, broker_port: int) -> None:
        self.proc = proc
        self.exporter_port = exporter_port
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(iter(proc.stdout.readline, "")), daemon=True).start()
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.pub.connect("127.0.0.1", broker_port)
        self.pub.loop_start()

    def publish(self, topic: str, payload: dict | str) -> float:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.pub.publish(topic, data, qos=1).wait_for_publish(2)
        return time.monotonic()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.exporter_port}/metrics", timeout=2) as r:
            return r.read().decode()

    def close(self) -> None:
        self.pub.loop_stop()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def sample(self, name: str, **labels: str) -> float | None:
        """The value of one exported sample whose labels include ``labels``, or None."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics()):
            for s in family.samples:
                if s.name == name and labels.items() <= s.labels.items():
                    return s.value
        return None

    def alarm_exported(self, rule: str, level: int) -> bool:
        return any(
            line.startswith("examwatch_alarm_active{") and f'rule="{rule}"' in line and f'level="{level}"' in line
            for line in self.metrics().splitlines()
        )


def agent_toml(
    broker_port: int,
    exporter_port: int,
    state_dir: Path,
    *,
    room: str = "r1",
    kind: str = "exam_room",
    room_name: str = "",
    body: str = "",
    sessions=(),
    windows=(),
) -> str:
    """An agent config for the tests: site s1, both brokers on ``broker_port``, a signed uplink, then
    ``body`` (devices, rule overrides) and a schedule of sessions and secrecy windows given in minutes from now."""
    text = (
        f'[agent]\nsite = "s1"\nroom = "{room}"\nkind = "{kind}"\nroom_name = "{room_name}"\n'
        f'state_dir = "{state_dir}"\n[mqtt]\nport = {broker_port}\n[exporter]\nlisten = "127.0.0.1:{exporter_port}"\n'
        f'[uplink]\nenabled = true\nport = {broker_port}\nsigning_key = "{"ab" * 32}"\n{body}\n'
        '[schedule]\ntimezone = "Asia/Shanghai"\n'
    )
    for which, spans in (("sessions", sessions), ("secrecy_windows", windows)):
        for a, b in spans:
            text += f"[[schedule.{which}]]\nstart = {local(a)}\nend = {local(b)}\n"
    return text


def launch_agent(
    config: Path,
    exporter_port: int,
    broker_port: int,
    env: dict | None = None,
    ready: tuple[str, ...] = ("agent_started", "mqtt_connected"),
    umask: int = -1,
) -> RunningAgent:
    """Start `examwatch agent run`; return once it serves metrics and has logged each ``ready`` event
    (by default: listening to its MQTT sensors)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "examwatch", "agent", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        umask=umask,
        env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
    )
    agent = RunningAgent(proc, exporter_port, broker_port)
    try:
        wait_port(exporter_port, timeout=15)
        # publish only once it listens: a sensor message before the subscription would be lost
        until(
            lambda: all(any(f'"event": "{e}"' in line for line in agent.log) for e in ready) or proc.poll() is not None,
            10,
            lambda: f"agent ready: {agent.log}",
        )
        assert proc.poll() is None, agent.log
    except BaseException:
        agent.close()
        raise
    time.sleep(0.1)
    return agent
