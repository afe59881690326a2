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

The devices are grouped and their collectors built by the agent's own bootstrap (edge/bootstrap.py); each
collector probes its devices and judges them (collectors/base.py: ``probe``, ``judge``, ``findings``), so
nothing here knows a protocol. The rows about the agent's surroundings are in edge/checks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from examwatch import collectors
from examwatch.collectors.base import FAIL, OK, WARN, Finding, Health
from examwatch.edge import bootstrap
from examwatch.edge.checks import Check, check_clock, check_exporter, check_state_dir, check_uplink, os_error_text
from examwatch.kernel.model import Reading, base_device

STATUS_NAMES = {OK: "通过", WARN: "注意", FAIL: "失败"}


# --- pure judgements ------------------------------------------------------------------------------------


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
        rows.append(
            Check(
                f"alarm:{e.rule}:{e.device}",
                f"告警 {e.device}（{e.rule}）",
                FAIL,
                f"{e.message}{held}。处置：{e.action}",
            )
        )
    if not rows:
        rows.append(
            Check("rules", "告警规则", OK, f"按当前读数不会告警（{len(readings)} 项读数，当前阶段：{phase_name}）")
        )
    return rows


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
        verdict = (
            f"结论：未就绪，{failed} 项失败" + (f"，{warned} 项需注意" if warned else "") + "。请按说明处理后重新检查。"
        )
    else:
        verdict = "结论：已就绪" + (f"，{warned} 项需注意" if warned else "") + "。"
    return "\n".join([*lines, "", verdict])


def render_json(agent: str | None, checks: list[Check], code: int) -> str:
    return json.dumps(
        {"agent": agent, "ready": code == 0, "exit_code": code, "checks": [asdict(c) for c in checks]},
        ensure_ascii=False,
        indent=2,
    )


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


def _item(noun: str, device: Any, via: str) -> str:
    from examwatch.kernel.model import DEVICE_KIND_NAMES

    return f"{noun} {device.name}（{DEVICE_KIND_NAMES.get(device.kind, device.kind)}，{via}）"


def row(f: Finding) -> Check:
    """A collector's finding as a row; a device's names its kind in Chinese."""
    if f.device is None:
        return Check(f.id, f.item, f.status, f.detail)
    return Check(f"device:{f.device.name}", _item(f.noun, f.device, f.via), f.status, f.detail)


# --- I/O ------------------------------------------------------------------------------------------------


class _Readings:
    """The accumulator: keeps what the collectors read (paho's thread adds too; list.append is atomic)."""

    def __init__(self) -> None:
        self.items: list[Reading] = []

    def add(self, reading: Reading) -> None:
        self.items.append(reading)

    def add_all(self, readings: Sequence[Reading]) -> None:
        self.items.extend(readings)


async def probe_devices(cfg: Any, devices: list[Any], wait: float) -> tuple[list[Reading], list[Check]]:
    """Build the devices' collectors as the agent does and let each probe its devices, all at once; then
    each collector's own rows (the room broker) and its devices' rows, protocol by protocol."""
    acc, health = _Readings(), Health()
    ctx = bootstrap.context(cfg, checking=True)
    built, findings = [], {}
    for protocol, group in bootstrap.by_protocol(devices).items():
        try:
            built.append(bootstrap.build(protocol, group, acc, health, ctx))
        except Exception as err:  # e.g. a profile gone since the config check: the rows say it
            findings[protocol] = [
                collectors.get(protocol).failure(d, "error", f"{type(err).__name__}: {err}") for d in group
            ]
    try:
        await asyncio.gather(*(c.probe(wait) for c in built))
    finally:
        for c in built:
            with contextlib.suppress(Exception):  # closing is best effort; the rows are what matter
                await c.close()
    heard: dict[str, list[Reading]] = defaultdict(list)
    for r in list(acc.items):
        heard[base_device(r.device)].append(r)
    for c in built:
        findings[c.protocol] = c.findings() + [c.judge(d, heard[d.name]) for d in c.devices]
    rows = [row(f) for protocol in bootstrap.by_protocol(devices) for f in findings[protocol]]
    return list(acc.items), rows


async def run_checks(cfg: Any, wait: float) -> list[Check]:
    """Every check after the config's, in the order a technician reads them."""
    from examwatch.rules.engine import build_engine
    from examwatch.rules.schedule import PHASE_NAMES, Calendar

    exporter, agent_page = check_exporter(cfg.exporter.listen, cfg.agent_id)
    shared = [d for d in cfg.devices if agent_page is not None and collectors.get(d.protocol).uses_serial_port]
    probed = [d for d in cfg.devices if d not in shared]

    uplink = asyncio.create_task(asyncio.to_thread(check_uplink, cfg))
    probed_readings, probed_rows = await probe_devices(cfg, probed, wait)
    shared_readings, shared_rows = _from_running_agent(shared, agent_page or "")
    uplink_rows = await uplink

    device_rows = probed_rows + shared_rows
    now = time.time()
    phase = PHASE_NAMES[Calendar(cfg.schedule).phase(now)]
    alarms = judge_alarms(
        build_engine(cfg.agent, cfg.devices, cfg.rules, cfg.schedule), probed_readings + shared_readings, now, phase
    )
    clock = check_clock()
    return [
        *device_rows,
        *alarms,
        *uplink_rows,
        check_state_dir(cfg.agent.state_dir),
        exporter,
        *([clock] if clock else []),
    ]


def _from_running_agent(devices: list[Any], page: str) -> tuple[list[Any], list[Check]]:
    if not devices:
        return [], []
    readings, success = readings_from_metrics(page, {d.name for d in devices})
    rows = []
    for d in devices:
        item = _item("设备", d, d.protocol)
        ok = success.get(d.name)
        if ok is None:
            rows.append(
                Check(f"device:{d.name}", item, WARN, "串口由运行中的代理占用，代理尚未轮询到该设备：稍后重新检查")
            )
        elif ok:
            rows.append(Check(f"device:{d.name}", item, OK, "有应答（串口由运行中的代理占用，按代理最近一次轮询判断）"))
        else:
            rows.append(
                Check(
                    f"device:{d.name}",
                    item,
                    FAIL,
                    f"代理最近一次轮询无应答。请检查设备电源、连线和串口 {d.address}；无法修复时启用备用设备",
                )
            )
    return readings, rows


def main(config_path: str, wait: float, as_json: bool) -> int:
    """``examwatch check --config F [--wait S] [--json]``: print the report; 0 ready, 1 failed, 2 bad config.
    Logging is the caller's to set up (the CLI sends it to stderr: stdout is the report)."""
    from examwatch.edge.config import ConfigError, load

    try:
        cfg = load(config_path)
    except (ConfigError, OSError) as err:
        issues = [str(i) for i in err.issues] if isinstance(err, ConfigError) else [f"无法读取：{os_error_text(err)}"]
        invalid = Check("config", f"配置文件 {config_path}", FAIL, f"{len(issues)} 处错误：" + "；".join(issues))
        if as_json:
            print(render_json(None, [invalid], 2))
        else:
            print(render_table([Check(invalid.id, invalid.item, FAIL, f"{len(issues)} 处错误，逐条如下：")]))
            for issue in issues:
                print(f"  {issue}")
        return 2
    config_row = Check("config", f"配置文件 {config_path}", OK, f"有效：{cfg.agent_id}，{len(cfg.devices)} 台设备")
    checks = [config_row, *asyncio.run(run_checks(cfg, wait))]
    code = exit_code(checks)
    print(render_json(cfg.agent_id, checks, code) if as_json else render_table(checks))
    return code


__all__ = [
    "FAIL",
    "OK",
    "WARN",
    "Check",
    "judge_alarms",
    "main",
    "probe_devices",
    "render_json",
    "render_table",
    "run_checks",
]
