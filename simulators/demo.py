"""`examwatch demo`: a whole exam site on this machine, with a scripted morning of faults.

One county broker, the county gateway, and three rooms of one site, each with its real agent process:
a secrecy room (保密室) whose door is a Zigbee2MQTT contact sensor, and two exam rooms (101, 102) whose
UPSes, switch, NVR, serial UPS, noise meter and camera are simulators speaking SNMP, NUT, Megatec, Modbus
and ISAPI. An exam session is running. The scenario then cuts one room's mains, pulls both rooms' uplink
ports (the gateway makes one level-2 incident of it), opens the secrecy-room door outside its window, and
puts everything right again. Logs and databases stay in the demo folder; Ctrl-C stops it all.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from examwatch.gateway.auth import hash_password
from examwatch.simulators.broker import Mosquitto, free_port, wait_port

SITE = "demo-school"
TZ = ZoneInfo("Asia/Shanghai")


def _port(preferred: int) -> int:
    """The usual port when it is free (so the printed URLs are the documented ones), else any free one."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


@dataclass
class Room:
    room: str
    kind: str
    name: str
    exporter: int
    key: str = field(default_factory=lambda: secrets.token_hex(32))
    field_devices: object | None = None  # a SimulatedRoom for exam rooms
    proc: subprocess.Popen[bytes] | None = None


class DemoSite:
    def __init__(self, workdir: Path, interval: float = 2.0, usual_ports: bool = True) -> None:
        # the documented ports for a person; any free ones for a test (a demo may run beside it)
        port = _port if usual_ports else (lambda _usual: free_port())
        self.dir = Path(workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self.interval = interval
        self.broker = Mosquitto(self.dir / "broker", port=port(18830))
        self.api, self.gateway_metrics = port(8080), port(9109)
        self.rooms = [
            Room("secrecy", "secrecy_room", "保密室", port(9110)),
            Room("101", "exam_room", "第101考场", port(9111)),
            Room("102", "exam_room", "第102考场", port(9112)),
        ]
        self.gateway: subprocess.Popen[bytes] | None = None
        self.desk_user, self.desk_password = "值班员", secrets.token_urlsafe(9)  # the duty desk's demo log-in
        self.door = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-zigbee2mqtt")
        self._door_closed = True
        self._stop = threading.Event()

    # --- start and stop ---

    def start(self) -> None:
        from examwatch.simulators.room import SimulatedRoom

        self.broker.start()
        self._start_gateway()
        for r in self.rooms:
            if r.kind == "exam_room":
                r.field_devices = SimulatedRoom(self.dir / f"devices-{r.room}")
                r.field_devices.start()
            self._start_agent(r)
        self.door.connect("127.0.0.1", self.broker.port)
        self.door.loop_start()
        threading.Thread(target=self._door_heartbeat, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.door.loop_stop()
        for p in [r.proc for r in self.rooms] + [self.gateway]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [r.proc for r in self.rooms] + [self.gateway]:
            if p is not None:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        for r in self.rooms:
            if r.field_devices is not None:
                r.field_devices.stop()  # type: ignore[attr-defined]
        self.broker.stop()

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "examwatch", *args], stdout=out, stderr=out, env=env)

    def _start_gateway(self) -> None:
        gw = self.dir / "gateway"
        gw.mkdir(exist_ok=True)
        keys = gw / "agent-keys"
        keys.write_text("".join(f"{SITE}/{r.room} {r.key}\n" for r in self.rooms), encoding="utf-8")
        keys.chmod(0o600)
        (gw / "gateway.toml").write_text(
            f'[gateway]\ncounty = "演示县招生考试办公室"\nstate_dir = "{gw}"\n'
            f"[broker]\nport = {self.broker.port}\n"
            f'[exporter]\nlisten = "127.0.0.1:{self.gateway_metrics}"\n'
            f'[api]\nlisten = "127.0.0.1:{self.api}"\ntoken = "{secrets.token_hex(16)}"\n'
            f'secrecy_rooms = ["{SITE}/secrecy"]\n'
            f'[[api.users]]\nname = "{self.desk_user}"\nrole = "duty"\n'
            f'password_hash = "{hash_password(self.desk_password)}"\n'
            f'[security]\nkeys_file = "{keys}"\n'
            f"[liveness]\nheartbeat_timeout = 30.0\n"
            f"{self._schedule()}",
            encoding="utf-8",
        )
        self.gateway = self._spawn(["gateway", "run", "--config", str(gw / "gateway.toml")], gw / "log")
        wait_port(self.api, 20)

    def _schedule(self) -> str:
        now = datetime.now(TZ).replace(tzinfo=None, microsecond=0)
        start, end = (now - timedelta(minutes=10)).isoformat(), (now + timedelta(minutes=110)).isoformat()
        return (
            f'[schedule]\ntimezone = "Asia/Shanghai"\n'
            f'[[schedule.sessions]]\nname = "数学"\nstart = {start}\nend = {end}\n'
        )

    def _start_agent(self, r: Room) -> None:
        d = self.dir / f"agent-{r.room}"
        d.mkdir(exist_ok=True)
        key = d / "agent.key"
        key.write_text(r.key + "\n", encoding="utf-8")
        key.chmod(0o600)
        if r.field_devices is not None:
            devices = r.field_devices.devices_toml(self.interval)  # type: ignore[attr-defined]
        else:
            devices = (
                '[[devices]]\nname = "secrecy-door"\nkind = "door"\nprotocol = "mqtt"\n'
                f'topic = "zigbee2mqtt/{r.room}-door"\nprofile = "zigbee2mqtt_contact"\ninterval = 60.0\n'
            )
        (d / "agent.toml").write_text(
            f'[agent]\nsite = "{SITE}"\nroom = "{r.room}"\nkind = "{r.kind}"\nsite_name = "演示中学考点"\n'
            f'room_name = "{r.name}"\nstate_dir = "{d}"\n'
            f"[mqtt]\nport = {self.broker.port}\n"
            f'[exporter]\nlisten = "127.0.0.1:{r.exporter}"\n'
            f'[uplink]\nenabled = true\nport = {self.broker.port}\nsigning_key_file = "{key}"\nheartbeat = 10.0\n'
            f"{devices}\n{self._schedule()}",
            encoding="utf-8",
        )
        r.proc = self._spawn(["agent", "run", "--config", str(d / "agent.toml")], d / "log")
        wait_port(r.exporter, 20)

    def _door_heartbeat(self) -> None:
        while not self._stop.is_set():
            self._publish_door()
            self._stop.wait(20)

    def _publish_door(self) -> None:
        payload = {"contact": self._door_closed, "battery": 97, "voltage": 3025, "linkquality": 132}
        self.door.publish("zigbee2mqtt/secrecy-door", json.dumps(payload), qos=1)

    def set_door(self, closed: bool) -> None:
        self._door_closed = closed
        self._publish_door()

    # --- what the county sees ---

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def room(self, name: str) -> Room:
        return next(r for r in self.rooms if r.room == name)


def _active(site: DemoSite, rule: str, room: str) -> bool:
    return any(
        a.get("rule") == rule and a.get("room") == room for a in site.get("/api/v1/alarms?state=active")["alarms"]
    )


def _incident(site: DemoSite, rooms: set[str]) -> bool:
    return any(rooms <= set(i.get("members", [])) for i in site.get("/api/v1/incidents?state=open")["incidents"])


def _fault(room: str, name: str, undo: bool = False):
    return lambda s: (s.room(room).field_devices.recover if undo else s.room(room).field_devices.fault)(name)


# (pause before, what happens, how, what the county must then see)
STEPS = [
    (
        10,
        "101 考场市电中断（UPS 转电池供电）",
        _fault("101", "ups_on_battery"),
        lambda s: _active(s, "ups_on_battery", "101"),
    ),
    (
        10,
        "101、102 考场上联交换机端口断开：县级网关合并为一个事件（三个房间过半，三级）",
        lambda s: (_fault("101", "switch_port_down")(s), _fault("102", "switch_port_down")(s)),
        lambda s: _incident(s, {"101", "102"}),
    ),
    (
        10,
        "保密室门在非规定时间被打开",
        lambda s: s.set_door(False),
        lambda s: _active(s, "secrecy_door_open", "secrecy"),
    ),
    (
        10,
        "一切恢复：市电、网络、保密室门",
        lambda s: (
            _fault("101", "ups_on_battery", True)(s),
            _fault("101", "switch_port_down", True)(s),
            _fault("102", "switch_port_down", True)(s),
            s.set_door(True),
        ),
        lambda s: not s.get("/api/v1/alarms?state=active")["alarms"],
    ),
]


def _report(site: DemoSite) -> None:
    for a in site.get("/api/v1/alarms?state=active")["alarms"]:
        print(f"    告警 {a.get('room')}: {a.get('message', '')}")
    for i in site.get("/api/v1/incidents?state=open")["incidents"]:
        print(f"    事件 [{i.get('level')}级] {i.get('title')}: {', '.join(sorted(i.get('members', [])))}")


def run_scenario(site: DemoSite, speed: float = 1.0, patience: float = 40.0) -> list[bool]:
    """Play the steps; after each, wait (up to ``patience`` s) until the county sees the outcome."""
    started, seen = time.monotonic(), []
    for pause, what, act, expect in STEPS:
        time.sleep(pause / speed)
        print(f"\n[+{time.monotonic() - started:4.0f}s] {what}", flush=True)
        act(site)
        deadline = time.monotonic() + patience
        while not (ok := expect(site)) and time.monotonic() < deadline:
            time.sleep(0.5)
        seen.append(ok)
        _report(site)
        if not ok:
            print("    （县级网关没有看到预期的结果：见演示目录中的日志）")
    return seen


def main(
    workdir: str = ".examwatch-demo",
    duration: float = 0.0,
    scenario: bool = True,
    speed: float = 1.0,
    usual_ports: bool = True,
) -> int:
    site = DemoSite(Path(workdir), usual_ports=usual_ports)

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # a `kill` stops the site as cleanly as Ctrl-C

    signal.signal(signal.SIGTERM, interrupted)
    print(f"examwatch 演示：一个县、一个考点（{SITE}）、三个房间。文件在 {site.dir}")
    try:
        site.start()
        print(f"  值班台:            http://127.0.0.1:{site.api}/  登录：{site.desk_user} / {site.desk_password}")
        print(f"  县级网关 API:      http://127.0.0.1:{site.api}/api/v1/alarms  /incidents  /agents")
        print(f"  县级网关 Prometheus: http://127.0.0.1:{site.gateway_metrics}/metrics")
        for r in site.rooms:
            print(f"  {r.name} 代理指标:  http://127.0.0.1:{r.exporter}/metrics")
        print(f"  MQTT: mosquitto_sub -p {site.broker.port} -t 'examwatch/v1/#' -v")
        started = time.monotonic()
        ok = True
        if scenario:
            ok = all(run_scenario(site, speed))
            print("\n演示脚本结束。" + ("" if duration else "系统继续运行，Ctrl-C 退出。"), flush=True)
        while not duration or time.monotonic() - started < duration:
            time.sleep(0.5)
        return 0 if ok else 1
    except KeyboardInterrupt:
        pass
    finally:
        print("\n停止中……", flush=True)
        site.stop()
    return 0
