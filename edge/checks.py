"""The readiness check's rows about the agent's surroundings: the county uplink, the state directory,
the exporter port, the clock. Each talks to the real thing; the judgements are pure."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from examwatch.collectors.base import FAIL, OK, WARN

GIB = 1024**3
MIB = 1024**2
DISK_WARN = 1 * GIB  # below this the state directory's disk gets a warning
DISK_FAIL = 200 * MIB  # below this a day of readings and an outage's outbox may not fit
CONNECT_TIMEOUT = 5.0  # seconds for the county broker to accept us


@dataclass(frozen=True)
class Check:
    id: str  # stable, for scripts: config, device:<name>, broker, alarm:<rule>:<device>, rules, uplink, ...
    item: str  # 检查项
    status: str  # ok | warn | fail
    detail: str  # 说明: what was found and what to do


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
    return Check(
        "clock",
        "系统时钟",
        WARN,
        "未与 NTP 同步：记录的时间可能不准（记录须客观准确），请检查 systemd-timesyncd 或 chrony 及其时间服务器",
    )


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


def check_uplink(cfg: Any, timeout: float = CONNECT_TIMEOUT) -> list[Check]:
    """The county broker accepts this agent (TLS, credentials) and the signing key loads. Blocking."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from examwatch.edge.config import apply_broker_settings
    from examwatch.kernel.wire import load_key

    up = cfg.uplink
    if not up.enabled:
        return [
            Check(
                "uplink",
                "县级上联",
                WARN,
                "未启用（[uplink] enabled = false）：告警只在本机，县里看不到；如需上报县招办，按部署说明启用",
            )
        ]
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
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"examwatch-check-{cfg.agent.site}-{cfg.agent.room}",
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = on_connect
    client.connect_timeout = timeout
    try:
        apply_broker_settings(client, up)
        client.connect(up.host, up.port, keepalive=10)
    except (OSError, ValueError) as err:  # refused, unreachable, TLS files or handshake
        rows.insert(
            0,
            Check(
                "uplink",
                item,
                FAIL,
                f"连不上：{os_error_text(err)}。检查网络、[uplink] 的地址和 TLS 证书设置；"
                "断网期间告警存在本机，恢复后补发",
            ),
        )
        return rows
    client.loop_start()
    try:
        if not got.wait(timeout):
            rows.insert(0, Check("uplink", item, FAIL, f"{timeout:g} 秒内服务器没有回应：检查网络和防火墙"))
        elif answer["reason"].is_failure:
            rows.insert(
                0,
                Check(
                    "uplink",
                    item,
                    FAIL,
                    f"服务器拒绝连接（{answer['reason']}）：检查 [uplink] 的账号、密码或客户端证书",
                ),
            )
        else:
            rows.insert(0, Check("uplink", item, OK, "已连接" + ("（TLS）" if up.tls else "")))
    finally:
        client.disconnect()
        client.loop_stop()
    return rows


def os_error_text(err: Exception) -> str:
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
            return Check("exporter", item, FAIL, f"无法绑定：{os_error_text(err)}；改 [exporter].listen"), None
    any_ipv4 = host in ("0.0.0.0", "")  # noqa: S104 - which address to probe when the exporter binds every one
    probe = "127.0.0.1" if any_ipv4 else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
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
        out = subprocess.run(
            [exe, "show", "-p", "NTPSynchronized", "--value"], capture_output=True, text=True, timeout=3, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    synced = parse_ntp_synchronized(out.stdout) if out.returncode == 0 else None
    return None if synced is None else judge_clock(synced)


__all__ = [
    "CONNECT_TIMEOUT",
    "FAIL",
    "GIB",
    "MIB",
    "OK",
    "WARN",
    "Check",
    "check_clock",
    "check_exporter",
    "check_state_dir",
    "check_uplink",
    "judge_clock",
    "judge_state_dir",
    "os_error_text",
    "parse_ntp_synchronized",
    "running_agent",
]
