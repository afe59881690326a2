"""The config draft and the summary table, from discovery's rows (pure).

The draft is the room's existing config (``--config``) with the new devices appended, or a minimal
config for the site and room given on the command line; either way it passes ``examwatch config check``.
A device already in the config (same protocol and address or topic) is not added twice. Comments say
what a human must decide; what answered but fits no profile is listed, commented out, at the end.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections import Counter
from typing import Any

from examwatch.edge.discover import OK, Found
from examwatch.edge.readiness import _pad, _width

RESULT_NAMES = {"ok": "可用", "none": "无匹配", "skipped": "已跳过", "error": "出错"}
_ORDER = ("kind", "protocol", "address", "topic", "profile", "interval")  # then the protocol's own keys


def _value(v: Any) -> str:
    """A TOML value: strings JSON-quoted (a valid TOML basic string), numbers and booleans as they are."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(float(v)) if isinstance(v, float) else str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)


def _key(d: dict[str, Any]) -> tuple[str, str]:
    return d.get("protocol", ""), d.get("topic") or d.get("address", "")


def agent_head(site: str, room: str, kind: str, mqtt: tuple[str, int] | None) -> str:
    """A minimal config for a room without one yet: the uplink is left to `examwatch site plan`."""
    q = _value
    text = f"[agent]\nsite = {q(site)}\nroom = {q(room)}\nkind = {q(kind)}\n"
    if mqtt is not None:
        text += f"\n[mqtt]                          # the room broker (Zigbee2MQTT)\nhost = {q(mqtt[0])}\n"
        text += f"port = {mqtt[1]}\n"
    return text + (
        "\n[uplink]                        # 县级上报：由 `examwatch site plan` 生成的配置提供（签名密钥、账号）\n"
        "enabled = false\n"
    )


def draft(head: str, rows: list[Found], now: float | None = None) -> str:
    """``head`` (the existing config, or ``agent_head``) and a [[devices]] entry per usable row."""
    try:
        existing = tomllib.loads(head).get("devices", [])
    except tomllib.TOMLDecodeError:
        existing = []
    taken = {d.get("name", "") for d in existing if isinstance(d, dict)}
    known = {_key(d) for d in existing if isinstance(d, dict)}
    counts: Counter[str] = Counter()
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(now))
    out = [
        head.rstrip("\n"),
        "",
        f"# --- examwatch discover, {stamp}：请核对标有“请核对”的设备，再运行 examwatch config check ---",
    ]
    left_out = []
    for row in rows:
        if row.result != OK or not row.device:
            left_out.append(row)
            continue
        if _key(row.device) in known:
            out.append(f"# 已在配置中：{row.protocol} {row.address}")
            continue
        known.add(_key(row.device))
        name = row.name if row.name and row.name not in taken else ""
        while not name or name in taken:
            counts[row.kind] += 1
            name = f"{row.kind}{counts[row.kind]}"
        taken.add(name)
        out += ["", f"[[devices]]                     # {row.why}"]
        out += [f"# 请核对：{n}" for n in row.notes]
        out.append(f"name = {_value(name)}")
        keys = [k for k in _ORDER if k in row.device] + sorted(k for k in row.device if k not in _ORDER)
        out += [f"{k} = {_value(row.device[k])}" for k in keys]
    if left_out:
        out += ["", "# 未加入的（供参考）："]
        out += [f"#   {r.protocol} {r.address}：{RESULT_NAMES.get(r.result, r.result)}，{r.why}" for r in left_out]
    return "\n".join(out) + "\n"


def table(rows: list[Found]) -> str:
    """The summary: device, protocol, address, profile, result; lined up with Chinese text."""
    head = ("设备", "协议", "地址", "型号（profile）", "结果", "说明")
    body = [
        (r.kind or "-", r.protocol, r.address, r.profile or "-", RESULT_NAMES.get(r.result, r.result), r.why)
        for r in rows
    ]
    widths = [max(_width(line[i]) for line in [head, *body]) for i in range(5)]
    lines = [
        "  ".join(_pad(c, w) for c, w in zip(line[:5], widths, strict=True)) + "  " + line[5] for line in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ----")
    usable = sum(r.result == OK for r in rows)
    return "\n".join([*lines, "", f"共 {len(rows)} 项，{usable} 个设备可写入配置草稿。"])


__all__ = ["agent_head", "draft", "table"]
