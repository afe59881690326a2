"""NUT discovery: a upsd's UPS list (``LIST UPS``), each UPS polled once by the agent's own collector with
every nut profile; the one that reads the most wins (the standard names on a tie), as drivers name some
variables differently (per phase on a three-phase UPS).

upsd's answer is outside input: lines are bounded in length and number, and a line that is not
``UPS <name> "<description>"`` is skipped.
"""

from __future__ import annotations

import asyncio
import re

from examwatch.collectors import profiles
from examwatch.collectors.nut import DEFAULT_PROFILE
from examwatch.edge.discover import ERROR, NONE, OK, Found, Trial, trial

MAX_LINE = 1024
MAX_UPS = 64
_UPS = re.compile(r'UPS ([A-Za-z0-9_.-]{1,64}) "((?:[^"\\]|\\.){0,200})"')


def parse_list_ups(lines: list[str]) -> list[tuple[str, str]]:
    """The lines between ``BEGIN LIST UPS`` and ``END LIST UPS`` -> (name, description), at most MAX_UPS."""
    out = []
    for line in lines:
        m = _UPS.fullmatch(line)
        if m:
            out.append((m.group(1), re.sub(r"\\(.)", r"\1", m.group(2))))
    return out[:MAX_UPS]


async def list_ups(host: str, port: int, timeout: float) -> list[tuple[str, str]]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE), timeout)
    try:
        writer.write(b"LIST UPS\n")
        await writer.drain()
        lines: list[str] = []
        while len(lines) <= MAX_UPS + 2:
            raw = await asyncio.wait_for(reader.readline(), timeout)
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not raw or line == "END LIST UPS" or line.startswith("ERR "):
                break
            lines.append(line)
        return parse_list_ups(lines)
    finally:
        writer.close()


async def probe(server: str, timeout: float) -> list[Found]:
    """Every UPS that the upsd at ``server`` (host[:port]) drives, polled once."""
    host, _, port_text = server.rpartition(":") if ":" in server else (server, "", "3493")
    try:
        names = await list_ups(host, int(port_text), timeout)
    except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as err:
        return [Found("nut", server, NONE, f"没有 NUT 服务（upsd）应答：{type(err).__name__} {err}".strip())]
    if not names:
        return [Found("nut", server, NONE, "upsd 在运行，但没有配置任何 UPS")]
    rows = []
    for name, description in names:
        address = f"{name}@{host}:{port_text}"
        device = {"protocol": "nut", "address": address, "kind": "ups"}
        tried: dict[str, Trial] = {}
        for profile in profiles.names("nut"):
            tried[profile] = await trial({**device, "profile": profile, "timeout": timeout, "retries": 0})
        read = {p: len(t.readings) for p, t in tried.items() if t.ok}
        label = f"NUT UPS {name}（{description or '无描述'}）"
        if read:
            best = max(read, key=lambda p: (read[p], p == DEFAULT_PROFILE))
            others = [f"{p}（{n} 项）" for p, n in read.items() if p != best]
            notes = ("也能读：" + "，".join(others),) if others and best != DEFAULT_PROFILE else ()
            device["profile"] = best
            why = f"{label}：{read[best]} 项读数"
            rows.append(Found("nut", address, OK, why, "ups", best, name, device, notes))
        else:
            t = tried.get(DEFAULT_PROFILE) or next(iter(tried.values()))
            rows.append(Found("nut", address, ERROR, f"{label} 读不到：{t.reason} {t.detail[:80]}".strip()))
    return rows


__all__ = ["parse_list_ups", "probe"]
