"""``examwatch discover``: the I/O around the probes: arguments, a progress bar (stderr), the summary table
(stdout) and the config draft (``--out``, owner-only: it holds SNMP communities and keys).

The command line of every ``examwatch`` command imports this module for ``add_arguments``; everything else
(the probes, the draft, tqdm for the progress bar) is imported when discovery runs, so the agent loads none.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from examwatch.edge.discover import Found


def add_arguments(p: argparse.ArgumentParser) -> None:
    room = p.add_argument_group("the room (or --config)")
    room.add_argument(
        "--config", default="", help="the room's existing agent TOML: its devices are kept, new ones appended"
    )
    room.add_argument("--site", default="", help="site id, when there is no --config")
    room.add_argument("--room", default="", help="room id, when there is no --config")
    room.add_argument("--kind", default="exam_room", choices=["exam_room", "secrecy_room"])
    p.add_argument("--out", default="", help="write the config draft here (mode 0600)")
    p.add_argument(
        "--snmp", action="append", default=[], help="hosts, host:port or a network (192.168.1.0/24); repeatable"
    )
    p.add_argument("--community", action="append", default=[], help="SNMP v2c community to try (default public)")
    p.add_argument("--v3", action="append", default=[], metavar="USER:AUTHPROTO:AUTHKEY:PRIVPROTO:PRIVKEY")
    p.add_argument("--rate", type=float, default=50.0, help="SNMP requests a second at most (default 50)")
    p.add_argument("--concurrency", type=int, default=16, help="SNMP hosts asked at once (default 16)")
    p.add_argument("--serial", action="append", default=[], help="a serial port beyond /dev/serial/by-id/*")
    p.add_argument("--mqtt", default="", help="the room broker HOST[:PORT] (default: --config's [mqtt])")
    p.add_argument("--zigbee-base", default="zigbee2mqtt", help="Zigbee2MQTT's base topic")
    p.add_argument("--isapi", action="append", default=[], metavar="HOST[:PORT]:USER:PASSWORDFILE")
    p.add_argument("--nut", default="127.0.0.1:3493", help="upsd HOST[:PORT] (default the local one); '' skips")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds per question to a device (default 1)")
    p.add_argument("--wait", type=float, default=5.0, help="seconds to wait for Zigbee2MQTT's device list")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds for the SNMP sweep at most")


class _Progress:
    """tqdm on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=sys.stderr, unit="项", desc="discover", disable=None, leave=False)

    def tick(self, what: str = "") -> None:
        if what:
            self.bar.set_postfix_str(what, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _bounded(value: float, low: float, high: float, name: str) -> float:
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{name} {value}: between {low:g} and {high:g}")
    return value


async def _discover(args: argparse.Namespace, broker: Any) -> list[Found]:
    from examwatch.edge.discover import isapi, nut, serial, snmp

    hosts, ranged = snmp.targets(args.snmp)
    credentials = [snmp.Credential({"version": "2c", "community": c}) for c in args.community or ["public"]]
    credentials += [snmp.parse_v3(v) for v in args.v3]
    isapi_targets = [isapi.parse_target(t) for t in args.isapi]
    ports = serial.ports(args.serial)
    progress = _Progress(len(hosts) + len(ports) + (broker is not None) + bool(isapi_targets) + bool(args.nut))
    rows: list[Found] = []
    try:
        if hosts:
            settings = snmp.Settings(credentials, args.timeout, args.rate, args.concurrency)
            rows += await snmp.probe(hosts, ranged, settings, time.monotonic() + args.time_limit, progress.tick)
        rows += await serial.probe(ports, args.timeout, progress.tick)
        if broker is not None:
            from examwatch.edge.discover import mqtt

            rows += await asyncio.to_thread(mqtt.probe, broker, args.zigbee_base, args.wait)
            progress.tick("mqtt")
        if isapi_targets:
            rows += await isapi.probe(isapi_targets, max(args.timeout, 2.0))
            progress.tick("isapi")
        if args.nut:
            rows += await nut.probe(args.nut, max(args.timeout, 2.0))
            progress.tick("nut")
    finally:
        progress.close()
    return rows


def _room(args: argparse.Namespace) -> tuple[str, Any]:
    """The draft's head (the existing config's text, or a minimal one) and the room broker's settings."""
    from examwatch.edge.config import MqttSettings, load, read
    from examwatch.edge.discover import draft as drafting

    if args.config:
        cfg = load(args.config)
        head = read(args.config)
        broker = cfg.mqtt
        client_id = cfg.mqtt.client_id or f"examwatch-{cfg.agent.site}-{cfg.agent.room}"
    else:
        if not args.site or not args.room:
            raise ValueError("give --config (the room's agent TOML) or --site and --room")
        broker, head, client_id = None, "", f"examwatch-{args.site}-{args.room}"
    if args.mqtt:
        host, _, port = args.mqtt.rpartition(":") if ":" in args.mqtt else (args.mqtt, "", "1883")
        base = broker or MqttSettings()
        broker = msgspec.structs.replace(base, host=host, port=int(port))
    if broker is not None:
        broker = msgspec.structs.replace(broker, client_id=client_id)
    if not head:
        head = drafting.agent_head(args.site, args.room, args.kind, (broker.host, broker.port) if broker else None)
    return head, broker


def main(args: argparse.Namespace) -> int:
    from examwatch.edge import logs
    from examwatch.edge.config import ConfigError, loads
    from examwatch.edge.discover import draft as drafting

    logs.configure("error", stream="stderr")  # the table says what the collectors would log
    try:
        _bounded(args.rate, 0.1, 1000, "--rate")
        _bounded(args.timeout, 0.05, 30, "--timeout")
        _bounded(args.wait, 0, 120, "--wait")
        _bounded(args.time_limit, 1, 86400, "--time-limit")
        _bounded(args.concurrency, 1, 256, "--concurrency")
        head, broker = _room(args)
        rows = asyncio.run(_discover(args, broker))
    except ConfigError as err:
        sys.stderr.write(err.report(args.config))
        return 2
    except (ValueError, OSError) as err:
        print(f"discover: {err}", file=sys.stderr)
        return 2
    print(drafting.table(rows))
    if not args.out:
        return 0
    text = drafting.draft(head, rows)
    try:
        loads(text)
    except ConfigError as err:  # a bug of ours: say so rather than hand over a file that will not load
        sys.stderr.write(err.report(args.out))
        return 1
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    print(f"配置草稿已写入 {out}：核对后运行 examwatch config check {out}，再运行 examwatch check")
    return 0


__all__ = ["add_arguments", "main"]
