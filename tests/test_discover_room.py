"""`examwatch discover` as a technician runs it on a room's Pi: every kind of device on real simulators, the draft
it writes passes `config check`, and an agent started on the draft reads every device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from paho.mqtt import publish

from examwatch.simulators.broker import Mosquitto, free_port
from examwatch.simulators.isapi import IsapiSimulator
from examwatch.simulators.megatec import MegatecSimulator
from examwatch.simulators.modbus_noise import NoiseMeterBus
from examwatch.simulators.nut import NutSimulator
from examwatch.simulators.serial_pty import PtyPair
from examwatch.simulators.snmp import SnmpSimulator
from tests.support import until
from tests.support.agent import agent_toml, launch_agent


def discover(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examwatch", "discover", *args], capture_output=True, text=True, timeout=170
    )


def zigbee(name: str, model: str, *properties: str) -> dict:
    exposes = [{"type": "numeric", "property": p, "name": p} for p in properties]
    return {"type": "EndDevice", "friendly_name": name, "interview_completed": True,
            "definition": {"model": model, "vendor": "Aqara", "exposes": exposes}}  # fmt: skip


def test_the_draft_of_a_whole_room_passes_config_check_and_an_agent_reads_every_device(
    tmp_path: Path, mosquitto: Mosquitto, procs: list
) -> None:
    snmp = SnmpSimulator(tmp_path / "snmp", {"public": "ups"})
    snmp.start()
    procs.append(snmp)
    snmp.set_state("public", "healthy")
    nut = NutSimulator(tmp_path)
    nut.start()
    procs.append(nut)
    isapi = IsapiSimulator()
    isapi.start()
    procs.append(isapi)
    (tmp_path / "nvr.pass").write_text(isapi.password + "\n")
    ups_line, rs485 = PtyPair(tmp_path, "ups"), PtyPair(tmp_path, "rs485")
    ups_line.start()
    procs.append(ups_line)
    rs485.start()
    procs.append(rs485)
    megatec = MegatecSimulator(str(ups_line.device))
    megatec.start()
    procs.append(megatec)
    bus = NoiseMeterBus(str(rs485.device))
    bus.add_meter("generic-float32-input", db=52.5)  # the one layout only its profile reads (a pty has no baud rate)
    bus.start()
    procs.append(bus)
    devices = [{"type": "Coordinator", "friendly_name": "Coordinator"},
               zigbee("secrecy-door", "MCCGQ11LM", "contact", "battery"),
               zigbee("noise-mic", "NS-1", "noise")]  # fmt: skip
    publish.single("zigbee2mqtt/bridge/devices", json.dumps(devices), retain=True, port=mosquitto.port)

    exporter = free_port()
    base = tmp_path / "agent.toml"
    base.write_text(agent_toml(mosquitto.port, exporter, tmp_path / "state"), encoding="utf-8")
    out = tmp_path / "draft.toml"
    done = discover(
        "--config", str(base), "--snmp", snmp.address, "--serial", str(ups_line.agent), "--serial", str(rs485.agent),
        "--isapi", f"{isapi.address}:admin:{tmp_path / 'nvr.pass'}", "--nut", f"127.0.0.1:{nut.port}",
        "--timeout", "0.5", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert "配置草稿已写入" in done.stdout and "可用" in done.stdout
    assert out.stat().st_mode & 0o777 == 0o600  # it holds the SNMP community
    text = out.read_text(encoding="utf-8")
    for expected in ('profile = "ups-mib"', 'protocol = "megatec"', 'profile = "generic-float32-input"',
                     'protocol = "isapi"', 'protocol = "nut"', 'profile = "zigbee2mqtt_contact"',
                     'profile = "zigbee2mqtt_noise"'):  # fmt: skip
        assert expected in text, text
    assert isapi.password not in text  # the password stays in its file
    check = subprocess.run(
        [sys.executable, "-m", "examwatch", "config", "check", str(out)], capture_output=True, text=True
    )
    assert check.returncode == 0 and "7 devices" in check.stdout, check.stdout + check.stderr

    names = [line.split('"')[1] for line in text.splitlines() if line.startswith("name = ")]
    agent = launch_agent(out, exporter, mosquitto.port)
    try:
        agent.publish("zigbee2mqtt/secrecy-door", {"contact": True, "battery": 90})
        agent.publish("zigbee2mqtt/noise-mic", {"noise": 41.5})
        for name in names:
            assert until(lambda: agent.sample("examwatch_collector_success", device=name) == 1.0, 20, name), agent.log
        assert agent.sample("examwatch_noise_db", device="noise1") == 52.5
    finally:
        agent.close()


def test_bad_answers_are_one_clear_line_each_and_discovery_goes_on(tmp_path: Path, mosquitto: Mosquitto) -> None:
    publish.single("zigbee2mqtt/bridge/devices", b"[" * 50_000 + b"garbage", retain=True, port=mosquitto.port)
    snmp = SnmpSimulator(tmp_path / "snmp", {"public": "ups"})
    snmp.start()
    try:
        snmp.set_state("public", "nonsense")
        with PtyPair(tmp_path, "ups") as line:
            megatec = MegatecSimulator(str(line.device))
            megatec.start()
            try:
                done = discover(
                    "--site", "s1", "--room", "r1", "--mqtt", f"127.0.0.1:{mosquitto.port}", "--snmp", snmp.address,
                    "--serial", str(line.agent), "--nut", f"127.0.0.1:{free_port()}", "--wait", "3",
                    "--out", str(tmp_path / "draft.toml"),
                )  # fmt: skip
            finally:
                megatec.stop()
    finally:
        snmp.stop()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any("设备列表无法使用（not_json）" in line for line in lines), done.stdout
    assert any("没有 profile 能读它" in line for line in lines), done.stdout
    assert any("没有 NUT 服务" in line for line in lines), done.stdout
    assert any("Megatec/Q1 UPS 应答" in line for line in lines), done.stdout  # the rest went on
    check = subprocess.run(
        [sys.executable, "-m", "examwatch", "config", "check", str(tmp_path / "draft.toml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and "1 devices" in check.stdout, check.stdout + check.stderr


def test_wrong_arguments_exit_2_with_the_reason() -> None:
    assert "--config" in discover("--snmp", "127.0.0.1").stderr
    wide = discover("--site", "s1", "--room", "r1", "--snmp", "10.0.0.0/8")
    assert wide.returncode == 2 and "more than 1024 addresses" in wide.stderr
    v3 = discover("--site", "s1", "--room", "r1", "--v3", "user:md4:k:aes:p", "--snmp", "127.0.0.1")
    assert v3.returncode == 2 and "--v3" in v3.stderr
    rate = discover("--site", "s1", "--room", "r1", "--rate", "nan")
    assert rate.returncode == 2 and "--rate" in rate.stderr
