"""`examwatch check` against a real simulated room, a real mosquitto and the real agent.

One room (snmpsim, upsd/dummy-ups, a Megatec UPS and a Modbus noise meter on pty pairs, an ISAPI camera)
serves the whole module; a test that causes a fault puts it back. Pure judgements (disk space, the clock,
the table, alarms behind a `for`) get plain unit tests below.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from examwatch.cli import main as cli
from examwatch.collectors.base import public_address
from examwatch.edge import checks as surroundings
from examwatch.edge import readiness
from examwatch.edge.checks import GIB, MIB
from examwatch.edge.config import loads
from examwatch.edge.readiness import FAIL, OK, WARN, Check
from examwatch.kernel.model import Reading
from examwatch.rules.engine import build_engine
from examwatch.simulators.broker import free_port, wait_port
from examwatch.simulators.isapi import IsapiSimulator
from examwatch.simulators.room import SimulatedRoom
from tests.support import until
from tests.support.agent import launch_agent

KEY = "ef" * 32


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory):
    r = SimulatedRoom(tmp_path_factory.mktemp("room"))
    r.start()
    yield r
    r.stop()


def agent_toml(
    tmp_path: Path,
    broker: int,
    *,
    devices: str = "",
    uplink: int | None = None,
    extra: str = "",
    exporter: int | None = None,
) -> Path:
    uplink_table = f'[uplink]\nenabled = true\nport = {uplink}\nsigning_key = "{KEY}"\n' if uplink else ""
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[agent]
site = "s1"
room = "r7"
room_name = "第7考场"
state_dir = "{tmp_path / "state"}"
[mqtt]
port = {broker}
[exporter]
listen = "127.0.0.1:{exporter or free_port()}"
{uplink_table}
{extra}
{devices}
""",
        encoding="utf-8",
    )
    return path


def sensor(name: str, kind: str = "door", profile: str = "zigbee2mqtt_contact") -> str:
    return f"""
[[devices]]
name = "{name}"
kind = "{kind}"
protocol = "mqtt"
topic = "zigbee2mqtt/{name}"
profile = "{profile}"
interval = 60
"""


def retain(port: int, messages: dict[str, str]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages.items():
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def run_check(config: Path, wait: float, as_json: bool = False) -> int:
    """`examwatch check` as the command runs it (its logs to stderr: stdout is the report)."""
    return cli(["check", "--config", str(config), "--wait", str(wait), *(["--json"] if as_json else [])])


def check(capsys: pytest.CaptureFixture[str], config: Path, wait: float = 1.0) -> tuple[int, dict[str, dict]]:
    code = run_check(config, wait, as_json=True)
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == code
    return code, {c["id"]: c for c in report["checks"]}


# --- the room ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_healthy_room_is_ready_and_every_device_row_is_ok(mosquitto, room, tmp_path, capsys):
    retain(
        mosquitto.port,
        {"zigbee2mqtt/door1": '{"contact": true, "battery": 90}', "zigbee2mqtt/door1/availability": "online"},
    )
    config = agent_toml(
        tmp_path, mosquitto.port, uplink=mosquitto.port, devices=room.devices_toml(1.0) + sensor("door1")
    )
    code = run_check(config, 5.0, as_json=False)
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].split() == ["检查项", "结果", "说明"]
    assert "结论：已就绪" in out
    for name in ("ups1", "switch1", "nvr1", "ups2", "ups3", "noise1", "cam1", "door1"):
        row = next(line for line in out.splitlines() if f" {name}（" in line)
        assert "通过" in row, row
    assert "失败" not in out
    assert KEY not in out and "sim-pass" not in out and "community" not in out


@pytest.mark.integration
def test_json_has_one_entry_per_check(mosquitto, room, tmp_path, capsys):
    config = agent_toml(
        tmp_path, mosquitto.port, uplink=mosquitto.port, devices=room.devices_toml(1.0) + sensor("door1")
    )
    code, checks = check(capsys, config)
    device_ids = {f"device:{n}" for n in ("ups1", "switch1", "nvr1", "ups2", "ups3", "noise1", "cam1", "door1")}
    assert device_ids | {"config", "broker", "rules", "uplink", "signing_key", "state_dir", "exporter"} <= set(checks)
    assert all(c["status"] in (OK, WARN, FAIL) and c["item"] and c["detail"] for c in checks.values())
    assert checks["device:door1"]["status"] == WARN  # nothing retained for it this time: silent, not failed
    assert code == 0


@pytest.mark.integration
def test_unreachable_device_fails_and_is_named(mosquitto, room, tmp_path, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet:  # a UDP port that never answers
        quiet.bind(("127.0.0.1", 0))
        devices = (
            room.devices_toml(1.0)
            + f"""
[[devices]]
name = "ups9"
kind = "ups"
protocol = "snmp"
address = "127.0.0.1:{quiet.getsockname()[1]}"
community = "secret-community"
profile = "ups-mib"
timeout = 0.5
retries = 0
"""
        )
        config = agent_toml(tmp_path, mosquitto.port, devices=devices)
        code = run_check(config, 1.0, as_json=False)
    out = capsys.readouterr().out
    assert code == 1
    row = next(line for line in out.splitlines() if "ups9" in line)
    assert "失败" in row and "无应答（超时）" in row and "启用备用设备" in row
    assert "secret-community" not in out
    assert sum("  失败  " in line for line in out.splitlines()) == 1  # the other seven still pass


@pytest.mark.integration
def test_stopped_camera_fails(mosquitto, room, tmp_path, capsys):
    spare = IsapiSimulator(password="cam-pass")  # a second camera, switched off before the check
    spare.start()
    spare.stop()
    devices = (
        room.devices_toml(1.0)
        + f"""
[[devices]]
name = "cam2"
kind = "camera"
protocol = "isapi"
address = "http://admin:cam-pass@{spare.address.removeprefix("http://")}"
password = "cam-pass"
timeout = 0.5
retries = 0
"""
    )
    code, checks = check(capsys, agent_toml(tmp_path, mosquitto.port, devices=devices))
    assert code == 1
    assert checks["device:cam2"]["status"] == FAIL and "cam2" in checks["device:cam2"]["item"]
    assert "cam-pass" not in json.dumps(checks)
    assert all(checks[f"device:{n}"]["status"] == OK for n in ("ups1", "ups2", "ups3", "noise1", "cam1"))


@pytest.mark.integration
def test_fault_before_the_exam_fails_with_the_rules_message(mosquitto, room, tmp_path, capsys):
    config = agent_toml(tmp_path, mosquitto.port, devices=room.devices_toml(1.0))
    room.fault("ups_on_battery")
    try:
        code, checks = check(capsys, config)
    finally:
        room.recover("ups_on_battery")
    assert code == 1
    alarm = checks["alarm:ups_on_battery:ups1"]
    assert alarm["status"] == FAIL
    assert "市电中断，UPS 电池供电" in alarm["detail"] and "第7考场" in alarm["detail"]
    assert "联系供电部门" in alarm["detail"]  # the rule's action
    assert checks["device:ups1"]["status"] == OK  # it answers; what it says is the problem


@pytest.mark.integration
def test_running_agent_keeps_its_serial_ports_and_its_exporter(mosquitto, room, tmp_path, capsys):
    exporter = free_port()
    serial = ('protocol = "megatec"', 'protocol = "modbus_noise"')
    devices = "".join(
        f"\n[[devices]]{block}"
        for block in room.devices_toml(0.5).split("[[devices]]")[1:]
        if any(p in block for p in serial)
    )
    config = agent_toml(tmp_path, mosquitto.port, devices=devices, exporter=exporter)
    agent = launch_agent(config, exporter, mosquitto.port, ready=("agent_started",))
    try:
        assert until(
            lambda: (
                "examwatch_collector_success{" in agent.metrics()
                and 'device="ups3"' in agent.metrics()
                and 'device="noise1"' in agent.metrics()
            ),
            10,
        )
        code, checks = check(capsys, config)
        page = agent.metrics()
    finally:
        agent.close()
    assert code == 0, checks
    assert checks["exporter"]["status"] == OK and "正在运行" in checks["exporter"]["detail"]
    for name in ("ups3", "noise1"):
        assert checks[f"device:{name}"]["status"] == OK and "运行中的代理" in checks[f"device:{name}"]["detail"]
    # we never opened the ports, so the agent never saw a garbled answer
    assert "examwatch_collector_errors_total{" not in page


# --- MQTT sensors, uplink, config -----------------------------------------------------------------------


@pytest.mark.integration
def test_sensor_with_retained_offline_availability_fails(mosquitto, tmp_path, capsys):
    retain(
        mosquitto.port,
        {"zigbee2mqtt/door1/availability": "offline", "zigbee2mqtt/noise2/availability": '{"state": "online"}'},
    )
    config = agent_toml(
        tmp_path, mosquitto.port, devices=sensor("door1") + sensor("noise2", "noise", "zigbee2mqtt_noise")
    )
    code, checks = check(capsys, config, wait=3.0)
    assert code == 1
    assert checks["broker"]["status"] == OK
    assert checks["device:door1"]["status"] == FAIL and "离线" in checks["device:door1"]["detail"]
    assert checks["device:noise2"]["status"] == OK


@pytest.mark.integration
def test_silent_sensor_is_a_warning_not_a_failure(mosquitto, tmp_path, capsys):
    config = agent_toml(tmp_path, mosquitto.port, devices=sensor("door1"))
    code = run_check(config, 0.5, as_json=False)
    out = capsys.readouterr().out
    assert code == 0, out
    row = next(line for line in out.splitlines() if "door1" in line)
    assert "注意" in row and "没有消息" in row
    assert "结论：已就绪，2 项需注意" in out  # the sensor, and the uplink that is not enabled


@pytest.mark.integration
def test_sensor_with_unusable_messages_fails(mosquitto, tmp_path, capsys):
    retain(mosquitto.port, {"zigbee2mqtt/door1": "not json"})
    code, checks = check(capsys, agent_toml(tmp_path, mosquitto.port, devices=sensor("door1")), wait=3.0)
    assert code == 1
    assert checks["device:door1"]["status"] == FAIL and "not_json" in checks["device:door1"]["detail"]


@pytest.mark.integration
def test_room_broker_down_fails_the_broker_and_its_sensors(tmp_path, capsys):
    code, checks = check(capsys, agent_toml(tmp_path, free_port(), devices=sensor("door1")), wait=1.0)
    assert code == 1
    assert checks["broker"]["status"] == FAIL and checks["device:door1"]["status"] == FAIL


@pytest.mark.integration
def test_uplink_broker_down_fails(mosquitto, tmp_path, capsys):
    code, checks = check(capsys, agent_toml(tmp_path, mosquitto.port, uplink=free_port()))
    assert code == 1
    assert checks["uplink"]["status"] == FAIL and "连不上" in checks["uplink"]["detail"]
    assert checks["signing_key"]["status"] == OK
    assert KEY not in json.dumps(checks)


def test_uplink_key_file_missing_fails_without_printing_the_password(tmp_path, capsys):
    config = agent_toml(
        tmp_path,
        free_port(),
        extra=f"""
[uplink]
enabled = true
port = {free_port()}
username = "s1-r7"
password = "hunter2-secret"
signing_key_file = "{tmp_path / "missing.key"}"
""",
    )
    code = run_check(config, 0.5, as_json=False)
    out = capsys.readouterr().out
    assert code == 1
    assert "签名密钥" in next(line for line in out.splitlines() if "签名密钥" in line) and "missing.key" in out
    assert "hunter2-secret" not in out


def test_invalid_config_exits_2_listing_every_error(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(
        """
[agent]
site = "s1"
room = "r7"
colour = "blue"
[[devices]]
name = "ups1"
kind = "toaster"
protocol = "snmp"
""",
        encoding="utf-8",
    )
    code = run_check(config, 1.0, as_json=False)
    out = capsys.readouterr().out
    assert code == 2
    assert "agent.colour" in out and "devices[0].kind" in out
    code = run_check(config, 1.0, as_json=True)
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and report["exit_code"] == 2 and [c["id"] for c in report["checks"]] == ["config"]
    assert run_check(tmp_path / "nowhere.toml", 1.0, as_json=False) == 2
    assert "无法读取" in capsys.readouterr().out


def test_exporter_port_taken_by_another_program_fails(tmp_path, capsys):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        row, page = surroundings.check_exporter(f"127.0.0.1:{port}", "s1/r7")
    assert row.status == FAIL and "占用" in row.detail and page is None
    assert surroundings.check_exporter(f"127.0.0.1:{port}", "s1/r7")[0].status == OK
    assert surroundings.check_exporter("127.0.0.1:http", "s1/r7")[0].status == FAIL


def test_state_dir_missing_but_creatable_is_ok_and_a_file_fails(tmp_path):
    assert surroundings.check_state_dir(str(tmp_path / "a" / "b")).status == OK
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "file").write_text("x")
    assert surroundings.check_state_dir(str(tmp_path / "file")).status == FAIL
    assert surroundings.check_state_dir(str(tmp_path)).status == OK


# --- pure judgements ------------------------------------------------------------------------------------


def test_disk_space_thresholds():
    assert surroundings.judge_state_dir("/d", True, True, 5 * GIB).status == OK
    assert surroundings.judge_state_dir("/d", True, True, GIB - 1).status == WARN
    assert surroundings.judge_state_dir("/d", True, True, 200 * MIB).status == WARN
    low = surroundings.judge_state_dir("/d", True, True, 200 * MIB - 1)
    assert low.status == FAIL and "200 MiB" in low.detail
    assert surroundings.judge_state_dir("/d", False, False, 5 * GIB).status == FAIL


def test_ntp_output():
    assert surroundings.parse_ntp_synchronized("yes\n") is True
    assert surroundings.parse_ntp_synchronized("no\n") is False
    assert surroundings.parse_ntp_synchronized("") is None
    assert surroundings.judge_clock(False).status == WARN and surroundings.judge_clock(True).status == OK


def test_addresses_lose_their_credentials():
    assert public_address("http://admin:pw@10.0.0.5/ISAPI") == "http://10.0.0.5/ISAPI"
    assert public_address("10.0.0.5:161") == "10.0.0.5:161"


def test_table_lines_up_chinese_and_gives_the_verdict():
    checks = [
        Check("a", "设备 ups1（UPS，snmp）", OK, "有应答"),
        Check("b", "state", FAIL, "不可写"),
        Check("c", "时钟", WARN, "未同步"),
    ]
    lines = readiness.render_table(checks).splitlines()
    status_at = set()
    for line, word in zip([lines[0], *lines[2:5]], ["结果", "通过", "失败", "注意"], strict=True):
        status_at.add(readiness._width(line[: line.index(word)]))
    assert len(status_at) == 1  # the result column starts at the same place on every row
    assert lines[-1] == "结论：未就绪，1 项失败，1 项需注意。请按说明处理后重新检查。"
    assert readiness.exit_code(checks) == 1 and readiness.exit_code(checks[::2]) == 0


def _engine(devices: str):
    cfg = loads(f'[agent]\nsite = "s1"\nroom = "r7"\n{devices}')
    return build_engine(cfg.agent, cfg.devices, cfg.rules, cfg.schedule)


def test_a_condition_behind_a_for_still_fails_the_check():
    engine = _engine('[[devices]]\nname = "wan"\nkind = "link"\nprotocol = "links"\naddress = "10.0.0.1"\n')
    rows = readiness.judge_alarms(engine, [Reading("wan", "link_up", 0.0, 1000.0)], 1000.5, "考前准备")
    assert [r.id for r in rows] == ["alarm:link_down:wan"]
    assert rows[0].status == FAIL and "网络链路中断" in rows[0].detail and "持续 10 秒" in rows[0].detail


def test_offline_and_silent_devices_are_left_to_their_own_rows():
    engine = _engine(
        '[[devices]]\nname = "rec1"\nkind = "recorder"\nprotocol = "mqtt"\ntopic = "r/rec1"\ninterval = 1\n'
        '[[devices]]\nname = "rec2"\nkind = "recorder"\nprotocol = "mqtt"\ntopic = "r/rec2"\ninterval = 1\n'
    )
    rows = readiness.judge_alarms(
        engine,
        [Reading("rec1", "device_online", 0.0, 1000.0), Reading("rec1", "battery_percent", 15.0, 1000.0)],
        1000.0,
        "考前准备",
    )
    assert [r.id for r in rows] == ["alarm:recorder_battery_low:rec1"]
    assert "录音笔电量低" in rows[0].detail and "启用备用录音笔" in rows[0].detail
    ok = readiness.judge_alarms(engine, [Reading("rec1", "battery_percent", 80.0, 1000.0)], 1000.0, "考前准备")
    assert [(r.id, r.status) for r in ok] == [("rules", OK)]


@pytest.fixture
def password_broker():
    """A county broker that wants a password (mosquitto drops to its own user, so the files are world-readable)."""
    d = Path(tempfile.mkdtemp(prefix="examwatch-check-"))
    d.chmod(0o755)
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(d / "passwd"), "s1-r7", "room-pass"], check=True)
    (d / "passwd").chmod(0o644)
    port = free_port()
    (d / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {d}/passwd\nlog_dest none\n"
    )
    proc = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(d / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.integration
def test_uplink_refusing_the_password_fails_without_printing_it(password_broker, tmp_path, capsys):
    def uplink(password: str) -> str:
        return (
            f'[uplink]\nenabled = true\nport = {password_broker}\nusername = "s1-r7"\n'
            f'password = "{password}"\nsigning_key = "{KEY}"\n'
        )

    code, checks = check(capsys, agent_toml(tmp_path, free_port(), extra=uplink("wrong-pass-123")))
    assert code == 1
    assert checks["uplink"]["status"] == FAIL and "拒绝" in checks["uplink"]["detail"]
    assert "wrong-pass-123" not in json.dumps(checks)
    code, checks = check(capsys, agent_toml(tmp_path, free_port(), extra=uplink("room-pass")))
    assert checks["uplink"]["status"] == OK, checks["uplink"]
    assert code == 0
