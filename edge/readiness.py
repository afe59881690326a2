"""``examwatch check``: is this room ready for the exam? One pass over everything the agent depends on.

The plans name "spare equipment not tested beforehand" as a risk; the support group (保障组) runs this
before the exam day and after every change. It uses the agent's own parts, not look-alikes: the real
collectors poll each device once, the room broker is asked for each sensor's messages, and the readings
go through the real rule engine, so a recorder at 15 % battery fails here exactly as it would alarm.

Every check is a row (what, ok/warn/fail, a Chinese explanation with what to do). Exit 0 when nothing
failed (warnings allowed), 1 when anything failed, 2 for an invalid config. Nothing secret is printed:
no passwords, community strings or keys (addresses lose any ``user:pass@``).

If an agent is already running (it holds the exporter address), devices on a serial line are not opened
a second time: two readers on one tty steal each other's bytes, and the running agent would see garbage
and raise a false alarm. Their state is read from the running agent's own exporter instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

OK, WARN, FAIL = "ok", "warn", "fail"
STATUS_NAMES = {OK: "通过", WARN: "注意", FAIL: "失败"}

GIB = 1024**3
MIB = 1024**2
DISK_WARN = 1 * GIB  # below this the state directory's disk gets a warning
DISK_FAIL = 200 * MIB  # below this a day of readings and an outage's outbox may not fit
CONNECT_TIMEOUT = 5.0  # seconds for a broker to accept us
# Protocols on a serial line: one reader at a time (see the module doc).
SERIAL_PROTOCOLS = frozenset({"megatec", "modbus_noise"})

# DeviceError reasons (collectors/*.py) in the technician's words.
REASONS = {
    "timeout": "无应答（超时）",
    "unreachable": "网络不通",
    "connection": "连不上",
    "port_unavailable": "串口打不开",
    "port_lost": "串口断开",
    "garbage": "应答无法解析",
    "truncated": "应答不完整",
    "crc": "应答校验错误",
    "invalid_xml": "应答无法解析",
    "unexpected_xml": "应答格式不符",
    "no_such_object": "设备不支持所配置的型号（profile）",
    "profile": "型号（profile）配置有误",
    "config": "地址配置有误",
    "snmp_error": "SNMP 出错",
    "http_401": "用户名或密码错误",
    "http_403": "无权限或设备无此功能",
    "http_404": "设备无此功能（ISAPI 接口不存在）",
    "http_5xx": "设备内部错误",
    "auth": "无权限（账号被拒绝）",
    "stale": "UPS 服务在，但与 UPS 失去联系",
    "modbus_exception": "Modbus 设备返回异常",
}


@dataclass(frozen=True)
class Check:
    id: str  # stable, for scripts: config, device:<name>, broker, alarm:<rule>:<device>, rules, uplink, ...
    item: str  # 检查项
    status: str  # ok | warn | fail
    detail: str  # 说明: what was found and what to do


# --- pure judgements ------------------------------------------------------------------------------------


def public_address(address: str) -> str:
    """An address fit to print: any ``user:password@`` removed."""
    return re.sub(r"(?<=://)[^@/]*@", "", address)


def judge_polled(device: Any, online: bool | None, readings: int, duration: float, reason: str, detail: str) -> Check:
    from examwatch.kernel.model import DEVICE_KIND_NAMES

    item = f"设备 {device.name}（{DEVICE_KIND_NAMES.get(device.kind, device.kind)}，{device.protocol}）"
    if online:
        return Check(f"device:{device.name}", item, OK, f"有应答：{readings} 项读数，用时 {duration:.1f} 秒")
    what = REASONS.get(reason, reason or "无应答")
    why = f"（{detail[:120]}）" if detail else ""
    return Check(
        f"device:{device.name}", item, FAIL,
        f"{what}{why}。请检查设备电源、连线和地址 {public_address(device.address)}；"
        "无法修复时启用备用设备，并记下原设备编号和故障原因",
    )


def judge_sensor(device: Any, readings: list[Any], refused: str, broker_ok: bool, wait: float) -> Check:
    """A push sensor: heard within the window, silent, offline by its availability, or unparseable."""
    from examwatch.kernel.model import DEVICE_KIND_NAMES

    item = f"传感器 {device.name}（{DEVICE_KIND_NAMES.get(device.kind, device.kind)}，mqtt {device.topic}）"
    cid = f"device:{device.name}"
    if not broker_ok:
        return Check(cid, item, FAIL, "房间 MQTT 服务器连不上，无法确认该传感器（见“房间 MQTT 服务器”一行）")
    online = [r for r in readings if r.metric == "device_online"]
    if online and max(online, key=lambda r: r.ts).value == 0:
        return Check(cid, item, FAIL, "传感器报告离线（availability = offline）：检查电池，"
                                      "以及 Zigbee 网关是否在信号范围内，必要时重新配对")
    if readings:
        return Check(cid, item, OK, f"{wait:g} 秒内收到消息（{len(readings)} 项读数，含保留消息）")
    if refused:
        return Check(cid, item, FAIL, f"收到消息但无法使用（{refused}）：检查该设备的 profile 和 fields 配置")
    return Check(cid, item, WARN, f"{wait:g} 秒内没有消息（电池传感器上报较少）：请触发一次（如开关门）"
                                  "或在 Zigbee2MQTT 中确认该设备在线")


def judge_alarms(engine: Any, readings: list[Any], now: float, phase_name: str) -> list[Check]:
    """The alarms the rules would raise on these readings, as failed rows; one ok row when there are none.

    A condition with a ``for`` counts: it holds now, and waiting for its timer would only hide it.
    Availability and silence are left to the device rows, which already say it.
    """
    rules = {r.id: r for r in engine.rules}
    readings = sorted(readings, key=lambda r: r.ts)
    state, events = engine.evaluate(engine.initial_state(), readings, now)
    waiting = max((rules[rule_id].for_ for rule_id, _ in state.pending), default=0.0)
    delayed: set[str] = set()
    if waiting:
        _, later = engine.evaluate(state, [], now + waiting)
        delayed = {e.id for e in later}
        events = events + later
    rows = []
    for e in events:
        rule = rules[e.rule]
        if e.state != "raised" or rule.type == "silent" or rule.metric == "device_online":
            continue
        held = f"（条件持续 {rule.for_:g} 秒后告警）" if e.id in delayed else ""
        rows.append(Check(f"alarm:{e.rule}:{e.device}", f"告警 {e.device}（{e.rule}）", FAIL,
                          f"{e.message}{held}。处置：{e.action}"))
    if not rows:
        rows.append(Check("rules", "告警规则", OK, f"按当前读数不会告警（{len(readings)} 项读数，当前阶段：{phase_name}）"))
    return rows


def judge_state_dir(path: str, exists: bool, writable: bool, free: int | None) -> Check:
    item = f"数据目录 {path}"
    if not writable:
        where = "" if exists else "（目录不存在，且无法在上级目录中创建）"
        return Check("state_dir", item, FAIL, f"不可写{where}：检查权限，或改 [agent].state_dir")
    if free is None:
        return Check("state_dir", item, FAIL, "无法读取剩余空间")
    created = "" if exists else "目录尚不存在，代理启动时创建；"
    space = f"剩余 {free / GIB:.1f} GiB" if free >= GIB else f"剩余 {free / MIB:.0f} MiB"
    if free < DISK_FAIL:
        return Check("state_dir", item, FAIL, f"{created}{space}，不足 200 MiB：清理磁盘或换更大的存储卡")
    if free < DISK_WARN:
        return Check("state_dir", item, WARN, f"{created}{space}，不足 1 GiB：断网时积压的消息可能放不下，建议清理")
    return Check("state_dir", item, OK, f"{created}可写，{space}")


def parse_ntp_synchronized(output: str) -> bool | None:
    """``timedatectl show -p NTPSynchronized --value`` -> True/False, None when it says something else."""
    return {"yes": True, "no": False}.get(output.strip())


def judge_clock(synced: bool) -> Check:
    if synced:
        return Check("clock", "系统时钟", OK, "已与 NTP 同步")
    return Check("clock", "系统时钟", WARN, "未与 NTP 同步：记录的时间可能不准（记录须客观准确），"
                                         "请检查 systemd-timesyncd 或 chrony 及其时间服务器")


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def render_table(checks: list[Check]) -> str:
    """A plain-text table (检查项 / 结果 / 说明) that lines up with Chinese text in a terminal."""
    head = ("检查项", "结果", "说明")
    rows = [(c.item, STATUS_NAMES[c.status], c.detail) for c in checks]
    w0 = max(_width(r[0]) for r in [head, *rows])
    w1 = max(_width(r[1]) for r in [head, *rows])
    lines = [f"{_pad(head[0], w0)}  {_pad(head[1], w1)}  {head[2]}", f"{'-' * w0}  {'-' * w1}  {'-' * 4}"]
    lines += [f"{_pad(a, w0)}  {_pad(b, w1)}  {c}" for a, b, c in rows]
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    if failed:
        verdict = f"结论：未就绪，{failed} 项失败" + (f"，{warned} 项需注意" if warned else "") + "。请按说明处理后重新检查。"
    else:
        verdict = "结论：已就绪" + (f"，{warned} 项需注意" if warned else "") + "。"
    return "\n".join([*lines, "", verdict])


def render_json(agent: str | None, checks: list[Check], code: int) -> str:
    return json.dumps({"agent": agent, "ready": code == 0, "exit_code": code, "checks": [asdict(c) for c in checks]},
                      ensure_ascii=False, indent=2)


def running_agent(page: str) -> str | None:
    """The ``site/room`` of the agent whose exporter page this is, or None when it is not an agent's."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        for family in text_string_to_metric_families(page):
            for s in family.samples:
                if s.name == "examwatch_agent_info":
                    return f"{s.labels.get('site', '')}/{s.labels.get('room', '')}"
    except ValueError:  # not a metrics page at all
        return None
    return None


def readings_from_metrics(text: str, devices: set[str]) -> tuple[list[Any], dict[str, bool]]:
    """A running agent's exporter page -> its current readings of ``devices`` and their last poll's success."""
    from prometheus_client.parser import text_string_to_metric_families

    from examwatch.kernel.catalog import METRICS
    from examwatch.kernel.model import Reading, base_device

    now = time.time()
    readings, success = [], {}
    for family in text_string_to_metric_families(text):
        metric = family.name.removeprefix("examwatch_")
        for s in family.samples:
            device = s.labels.get("device", "")
            if base_device(device) not in devices:
                continue
            if s.name == "examwatch_collector_success":
                success[device] = s.value == 1
            elif metric in METRICS and s.name == family.name:
                readings.append(Reading(device, metric, float(s.value), now))
    return readings, success


# --- I/O: each check talks to the real thing -------------------------------------------------------------


class _Readings:
    """The accumulator: collects what the collectors read (paho's thread adds too; list.append is atomic)."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def add(self, reading: Any) -> None:
        self.items.append(reading)


def _health() -> Any:
    from examwatch.collectors.base import Health

    class CheckHealth(Health):
        """Health that also keeps each device's last error and refused message, for the rows."""

        def __init__(self) -> None:
            super().__init__()
            self.last_error: dict[str, tuple[str, str]] = {}
            self.refused: dict[str, str] = {}

        def failed(self, name: str, collector: str, err: Any, duration: float) -> None:
            self.last_error[name] = (err.reason, err.detail)
            super().failed(name, collector, err, duration)

        def drop(self, source: str, reason: str, **detail: Any) -> None:
            if "device" in detail:
                self.refused[detail["device"]] = reason
            super().drop(source, reason, **detail)

    return CheckHealth()


async def probe_polled(devices: list[Any]) -> tuple[list[Any], list[Check]]:
    """Poll each device once with its real collector, all at once, each within its own timeout."""
    from examwatch import collectors
    acc, health = _Readings(), _health()
    by_protocol: dict[str, list[Any]] = defaultdict(list)
    for d in devices:
        by_protocol[d.protocol].append(d)
    started, polls, rows = [], [], {}
    for protocol, group in by_protocol.items():
        try:
            c = collectors.get(protocol)(group, acc, health)
        except Exception as err:  # noqa: BLE001 - e.g. a profile gone since the config check: the devices' rows say it
            for d in group:
                rows[d.name] = judge_polled(d, False, 0, 0.0, "error", f"{type(err).__name__}: {err}")
            continue
        started.append(c)
        polls += [c.poll_once(d) for d in group]
    try:
        await asyncio.gather(*polls)
    finally:
        for c in started:
            with contextlib.suppress(Exception):  # closing is best effort; the rows are what matter
                await c.close()
    counts: dict[str, int] = defaultdict(int)
    for r in acc.items:
        counts[r.device.split("/", 1)[0]] += r.metric != "device_online"
    for d in devices:
        if d.name in rows:
            continue
        h = health.devices.get(d.name)
        reason, detail = health.last_error.get(d.name, ("", ""))
        rows[d.name] = judge_polled(d, h.online if h else None, counts[d.name], h.last_duration if h else 0.0,
                                    reason, detail)
    return acc.items, [rows[d.name] for d in devices]


async def listen_sensors(cfg: Any, devices: list[Any], wait: float) -> tuple[list[Any], list[Check]]:
    """Connect to the room broker as the agent would and collect up to ``wait`` seconds of sensor messages.

    Retained messages (availability, and state where Zigbee2MQTT retains it) arrive at once; the wait ends
    early once every sensor has been heard.
    """
    from examwatch import collectors
    broker = cfg.mqtt
    # Never the running agent's client id: the broker would drop the agent's own connection for ours.
    base = broker.client_id or f"examwatch-{cfg.agent.site}-{cfg.agent.room}-sensors"
    broker = msgspec.structs.replace(broker, client_id=f"{base}-check")
    acc, health = _Readings(), _health()
    sensor = collectors.get("mqtt")(devices, acc, health, broker=broker)  # type: ignore[call-arg]
    stop = asyncio.Event()
    task = asyncio.create_task(sensor.run(stop))
    loop = asyncio.get_running_loop()
    start = loop.time()
    names = {d.name for d in devices}
    while loop.time() - start < wait:
        heard = {r.device.split("/", 1)[0] for r in acc.items} | set(health.refused)
        if sensor.connected and names <= heard:
            break
        if not sensor.connected and loop.time() - start >= min(wait, CONNECT_TIMEOUT):
            break
        await asyncio.sleep(0.05)
    connected = sensor.connected
    stop.set()
    await task
    await sensor.close()
    where = f"{broker.host}:{broker.port}"
    if connected:
        row = Check("broker", f"房间 MQTT 服务器 {where}", OK, f"已连接，订阅 {len(devices)} 个传感器的主题")
    else:
        row = Check("broker", f"房间 MQTT 服务器 {where}", FAIL,
                    "连不上：检查 mosquitto 是否在运行，以及 [mqtt] 的地址、账号和 TLS 设置")
    items = list(acc.items)
    by_device: dict[str, list[Any]] = defaultdict(list)
    for r in items:
        by_device[r.device.split("/", 1)[0]].append(r)
    rows = [judge_sensor(d, by_device[d.name], health.refused.get(d.name, ""), connected, wait) for d in devices]
    return items, [row, *rows]


def check_uplink(cfg: Any, timeout: float = CONNECT_TIMEOUT) -> list[Check]:
    """The county broker accepts this agent (TLS, credentials) and the signing key loads. Blocking."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from examwatch.edge.config import apply_broker_settings
    from examwatch.kernel.wire import load_key

    up = cfg.uplink
    if not up.enabled:
        return [Check("uplink", "县级上联", WARN, "未启用（[uplink] enabled = false）：告警只在本机，县里看不到；"
                                                 "如需上报县招办，按部署说明启用")]
    rows = []
    try:
        load_key(up.signing_key, up.signing_key_file)
        rows.append(Check("signing_key", "签名密钥", OK, "已读取，格式正确"))
    except (ValueError, OSError) as err:  # neither message repeats the key
        rows.append(Check("signing_key", "签名密钥", FAIL, f"不可用：{err}；按部署说明重新生成或放回密钥文件"))
    item = f"县级上联 {up.host}:{up.port}"
    answer: dict[str, Any] = {}
    got = threading.Event()

    def on_connect(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        answer["reason"] = reason
        got.set()

    # Our own client id and a clean session: the agent's persistent session must stay untouched.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"examwatch-check-{cfg.agent.site}-{cfg.agent.room}",
                         protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    client.connect_timeout = timeout
    try:
        apply_broker_settings(client, up)
        client.connect(up.host, up.port, keepalive=10)
    except (OSError, ValueError) as err:  # refused, unreachable, TLS files or handshake
        rows.insert(0, Check("uplink", item, FAIL, f"连不上：{_os_error(err)}。检查网络、[uplink] 的地址和 TLS 证书设置；"
                                                   "断网期间告警存在本机，恢复后补发"))
        return rows
    client.loop_start()
    try:
        if not got.wait(timeout):
            rows.insert(0, Check("uplink", item, FAIL, f"{timeout:g} 秒内服务器没有回应：检查网络和防火墙"))
        elif answer["reason"].is_failure:
            rows.insert(0, Check("uplink", item, FAIL, f"服务器拒绝连接（{answer['reason']}）：检查 [uplink] 的账号、密码或客户端证书"))
        else:
            rows.insert(0, Check("uplink", item, OK, "已连接" + ("（TLS）" if up.tls else "")))
    finally:
        client.disconnect()
        client.loop_stop()
    return rows


def _os_error(err: Exception) -> str:
    return err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"


def check_state_dir(path: str) -> Check:
    p = Path(path)
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    exists = existing == p
    if exists and not p.is_dir():
        return Check("state_dir", f"数据目录 {path}", FAIL, "这是一个文件，不是目录：改 [agent].state_dir")
    if exists:
        try:  # a real write: os.access says yes to root even on a read-only mount's files
            with tempfile.NamedTemporaryFile(dir=p, prefix=".examwatch-check-"):
                writable = True
        except OSError:
            writable = False
    else:
        writable = existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
    try:
        free: int | None = shutil.disk_usage(existing).free
    except OSError:
        free = None
    return judge_state_dir(path, exists, writable, free)


def check_exporter(listen: str, agent_id: str) -> tuple[Check, str | None]:
    """Whether the exporter address can be bound; if a running agent holds it, also its metrics page."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    item = f"指标端口 {listen}"
    try:
        port = int(port_text)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the exporter's HTTP server does
            s.bind((host, port))
        return Check("exporter", item, OK, "可以绑定"), None
    except ValueError:
        return Check("exporter", item, FAIL, "地址应为 host:port，例如 127.0.0.1:9108"), None
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            return Check("exporter", item, FAIL, f"无法绑定：{_os_error(err)}；改 [exporter].listen"), None
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{probe}:{port}/metrics", timeout=3) as resp:
            page = resp.read().decode("utf-8", errors="replace")
    except (OSError, ValueError):
        page = ""
    running = running_agent(page)
    if running is None:
        return Check("exporter", item, FAIL, "端口已被其他程序占用：停掉该程序，或改 [exporter].listen"), None
    if running != agent_id:
        return Check("exporter", item, FAIL, f"已被另一个考场的代理（{running}）占用：每个代理须用不同端口"), None
    return Check("exporter", item, OK, "本考场的代理正在运行，已在此提供指标"), page


def check_clock() -> Check | None:
    """NTP sync as systemd sees it; skipped when that cannot be read without privileges (no systemd)."""
    exe = shutil.which("timedatectl")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "show", "-p", "NTPSynchronized", "--value"], capture_output=True, text=True,
                             timeout=3, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    synced = parse_ntp_synchronized(out.stdout) if out.returncode == 0 else None
    return None if synced is None else judge_clock(synced)


async def run_checks(cfg: Any, wait: float) -> list[Check]:
    """Every check after the config's, in the order a technician reads them."""
    from examwatch.rules.engine import build_engine
    from examwatch.rules.schedule import PHASE_NAMES, Calendar

    exporter, agent_page = check_exporter(cfg.exporter.listen, cfg.agent_id)
    sensors = [d for d in cfg.devices if d.protocol == "mqtt"]
    shared = [d for d in cfg.devices if d.protocol in SERIAL_PROTOCOLS and agent_page is not None]
    polled = [d for d in cfg.devices if d.protocol != "mqtt" and d not in shared]

    async def nothing() -> tuple[list[Any], list[Check]]:
        return [], []

    uplink = asyncio.create_task(asyncio.to_thread(check_uplink, cfg))
    (polled_readings, polled_rows), (sensor_readings, sensor_rows) = await asyncio.gather(
        probe_polled(polled) if polled else nothing(),
        listen_sensors(cfg, sensors, wait) if sensors else nothing(),
    )
    shared_readings, shared_rows = _from_running_agent(shared, agent_page or "")
    uplink_rows = await uplink

    rows = {r.id: r for r in polled_rows + shared_rows}
    device_rows = [rows[f"device:{d.name}"] for d in cfg.devices if f"device:{d.name}" in rows]
    now = time.time()
    phase = PHASE_NAMES[Calendar(cfg.schedule).phase(now)]
    alarms = judge_alarms(build_engine(cfg.agent, cfg.devices, cfg.rules, cfg.schedule), polled_readings + sensor_readings + shared_readings, now, phase)
    clock = check_clock()
    return [*device_rows, *sensor_rows, *alarms, *uplink_rows, check_state_dir(cfg.agent.state_dir), exporter,
            *([clock] if clock else [])]


def _from_running_agent(devices: list[Any], page: str) -> tuple[list[Any], list[Check]]:
    from examwatch.kernel.model import DEVICE_KIND_NAMES

    if not devices:
        return [], []
    readings, success = readings_from_metrics(page, {d.name for d in devices})
    rows = []
    for d in devices:
        item = f"设备 {d.name}（{DEVICE_KIND_NAMES.get(d.kind, d.kind)}，{d.protocol}）"
        ok = success.get(d.name)
        if ok is None:
            rows.append(Check(f"device:{d.name}", item, WARN, "串口由运行中的代理占用，代理尚未轮询到该设备：稍后重新检查"))
        elif ok:
            rows.append(Check(f"device:{d.name}", item, OK, "有应答（串口由运行中的代理占用，按代理最近一次轮询判断）"))
        else:
            rows.append(Check(f"device:{d.name}", item, FAIL,
                              f"代理最近一次轮询无应答。请检查设备电源、连线和串口 {d.address}；无法修复时启用备用设备"))
    return readings, rows


def main(config_path: str, wait: float, as_json: bool) -> int:
    """``examwatch check --config F [--wait S] [--json]``: print the report; 0 ready, 1 failed, 2 bad config."""
    import structlog

    from examwatch.edge.config import ConfigError, load

    try:
        cfg = load(config_path)
    except (ConfigError, OSError) as err:
        issues = [str(i) for i in err.issues] if isinstance(err, ConfigError) else [f"无法读取：{_os_error(err)}"]
        row = Check("config", f"配置文件 {config_path}", FAIL, f"{len(issues)} 处错误：" + "；".join(issues))
        if as_json:
            print(render_json(None, [row], 2))
        else:
            print(render_table([Check(row.id, row.item, FAIL, f"{len(issues)} 处错误，逐条如下：")]))
            for issue in issues:
                print(f"  {issue}")
        return 2
    config_row = Check("config", f"配置文件 {config_path}", OK, f"有效：{cfg.agent_id}，{len(cfg.devices)} 台设备")
    # The collectors log device state changes; here the table says it, so only errors reach stderr.
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer(ensure_ascii=False)],
        wrapper_class=structlog.make_filtering_bound_logger(40),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    try:
        checks = [config_row, *asyncio.run(run_checks(cfg, wait))]
    finally:
        structlog.configure(**saved)
    code = exit_code(checks)
    print(render_json(cfg.agent_id, checks, code) if as_json else render_table(checks))
    return code


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m examwatch.edge.readiness", description="考前就绪检查")
    p.add_argument("--config", required=True, help="agent TOML file")
    p.add_argument("--wait", type=float, default=15.0, help="seconds to wait for MQTT sensors (default 15)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args()
    sys.exit(main(args.config, args.wait, args.json))
