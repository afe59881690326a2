"""What staff read: one notification as a title, markdown lines and the alerts it concerns. Pure, Chinese.

A ``Message`` (``examwatch.channels.message``) is rendered here once, stored in the outbox as JSON, and turned
into each platform's payload by the channel modules.
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

import msgspec

from examwatch.channels.message import Item, Message, markdown, plain
from examwatch.gateway import acklink

LEVEL_NAMES = {1: "一级", 2: "二级", 3: "三级"}
DEADLINE_WORDS = {1: ("反馈",), 2: ("上报领导小组", "决策"), 3: ("上报县招办", "决策")}
INCIDENT_WORDS = {
    "opened": "发生",
    "joined": "新增考场",
    "left": "考场恢复",
    "escalated": "升级",
    "closed": "已全部恢复",
    "updated": "考场变化",
}


class Links(msgspec.Struct, frozen=True):
    ack_url: str = ""
    grafana_url: str = ""
    timezone: str = "Asia/Shanghai"
    ack_key: bytes = b""  # the gateway's link key: messages carry a signed acknowledgement link
    ack_ttl: float = 86400.0  # s after the raise the link works

    def clock(self, t: float) -> str:
        return datetime.fromtimestamp(t, ZoneInfo(self.timezone)).strftime("%H:%M")

    def day_clock(self, t: float) -> str:
        return datetime.fromtimestamp(t, ZoneInfo(self.timezone)).strftime("%m-%d %H:%M:%S")

    def ack_lines(self, kind: str, item_id: str, since: float) -> list[str]:
        lines = [f"确认：`examwatch ack {item_id} --who 姓名 --note 处理情况`"]
        if self.ack_url and self.ack_key:
            url = acklink.link(self.ack_url, self.ack_key, kind, item_id, int(since + self.ack_ttl))
            lines.append(f"[点此确认]({url})")
        if self.ack_url:
            path = "alarms/timeline" if kind == "alarm" else "incidents"
            query = urlencode({"id": item_id}) if kind == "alarm" else urlencode({"state": "open"})
            lines.append(f"[处理记录与确认]({self.ack_url.rstrip('/')}/api/v1/{path}?{query})")
        return lines

    def grafana(self, site: str, room: str) -> list[str]:
        if not self.grafana_url:
            return []
        q = urlencode({"var-site": site, **({"var-room": room} if room else {})}, quote_via=quote)
        sep = "&" if "?" in self.grafana_url else "?"
        return [f"[监控面板]({self.grafana_url}{sep}{q})"]


def deadline_line(level: int, raised_at: float, deadlines: list[float], links: Links) -> str:
    words = DEADLINE_WORDS.get(level, DEADLINE_WORDS[3])
    parts = [f"{links.clock(raised_at + d)} 前{w}" for d, w in zip(deadlines, words, strict=False)]
    return "**时限**：请于 " + "，".join(parts) if parts else ""


def alarm_message(
    *,
    key: str,
    kind: str,
    item: Item,
    device: str,
    value: float | None,
    metric: str,
    action: str,
    deadlines: list[float],
    links: Links,
    tier_name: str = "",
    count: int = 0,
) -> Message:
    """A room's alarm raised, updated, cleared, escalated or flapping."""
    lvl = LEVEL_NAMES.get(item.level, f"{item.level}级")
    head = {
        "raised": f"【{lvl}告警】",
        "updated": f"【{lvl}告警·升级】",
        "cleared": "【已恢复】",
        "escalated": f"【{lvl}告警·未确认，逐级上报】",
        "flapping": f"【{lvl}告警·反复】",
    }[kind]
    title = f"{head}{item.site} {item.room}：{item.summary}"
    lines = [f"**考点**：{item.site}　**考场**：{item.room}", f"**设备**：{device}"]
    if value is not None:
        lines.append(f"**读数**：{metric + ' ' if metric else ''}{value:g}")
    lines.append(f"**开始**：{links.day_clock(item.starts_at)}")
    if kind == "cleared":
        lines.append(f"**恢复**：{links.day_clock(item.ends_at or item.starts_at)}")
    else:
        if action:
            lines.append(f"**处置**：{action}")
        if kind == "flapping":
            lines.append(f"**反复**：已告警 {count} 次，期间的告警与恢复合并为本条，不再逐条发送")
        if kind == "escalated" and tier_name:
            lines.append(f"**上报至**：{tier_name}（超时未确认）")
        if d := deadline_line(item.level, item.starts_at, deadlines, links):
            lines.append(d)
        lines += links.ack_lines("alarm", item.id, item.starts_at)
    lines += links.grafana(item.site, item.room)
    lines.append(f"编号：{item.id}")
    return Message(key=key, thread=item.id, kind=kind, level=item.level, title=title, lines=lines, items=[item])


def incident_message(
    *, key: str, what: str, item: Item, rooms: list[str], title: str, deadlines: list[float], links: Links
) -> Message:
    """One update of a cross-room incident (one thread per incident)."""
    lvl = LEVEL_NAMES.get(item.level, f"{item.level}级")
    head = "【已恢复】" if what == "closed" else f"【{lvl}事件·{INCIDENT_WORDS.get(what, what)}】"
    lines = [
        f"**考点**：{item.site}",
        f"**涉及考场**：{'、'.join(rooms) or '无'}",
        f"**开始**：{links.day_clock(item.starts_at)}",
    ]
    if what != "closed":
        if d := deadline_line(item.level, item.starts_at, deadlines, links):
            lines.append(d)
        lines += links.ack_lines("incident", item.id, item.starts_at)
    lines += links.grafana(item.site, "")
    lines.append(f"事件编号：{item.id}")
    return Message(
        key=key,
        thread=item.id,
        kind="incident",
        level=item.level,
        title=f"{head}{item.site}：{title}",
        lines=lines,
        items=[item],
    )


def storm_message(*, key: str, site: str, fault_class: str, items: list[Item], links: Links) -> Message:
    """Many rooms raising together: one message with the list instead of one per room."""
    level = max(i.level for i in items)
    lvl = LEVEL_NAMES.get(level, f"{level}级")
    lines = [f"**考点**：{site}　**共 {len(items)} 个考场**"]
    lines += [f"- {i.room}：{i.summary}（{LEVEL_NAMES.get(i.level, i.level)}）" for i in items[:50]]
    if len(items) > 50:
        lines.append(f"- 另有 {len(items) - 50} 个考场，见监控面板")
    lines.append("请逐一确认：`examwatch ack 编号 --who 姓名`；编号见处理记录")
    lines += links.grafana(site, "")
    return Message(
        key=key,
        thread=f"storm:{site}:{fault_class}",
        kind="storm",
        level=level,
        title=f"【{lvl}告警·批量】{site}：{len(items)} 个考场同时告警",
        lines=lines,
        items=items,
    )


def acked_message(*, key: str, item: Item, who: str, note: str, at: float, links: Links) -> Message:
    lines = [f"**确认人**：{who}　**时间**：{links.day_clock(at)}"]
    if note:
        lines.append(f"**说明**：{note}")
    lines.append(f"编号：{item.id}")
    return Message(
        key=key,
        thread=item.id,
        kind="acked",
        level=item.level,
        title=f"【已确认】{item.site} {item.room}：{item.summary}".replace("  ", " "),
        lines=lines,
        items=[item],
    )


def system_message(*, key: str, thread: str, title: str, text: str, firing: bool, at: float, site: str) -> Message:
    item = Item(
        id=thread,
        site=site,
        room="gateway",
        rule="notify_channel_down",
        level=1,
        firing=firing,
        starts_at=at,
        ends_at=None if firing else at,
        summary=text,
    )
    return Message(key=key, thread=thread, kind="system", level=1, title=title, lines=[text], items=[item])


__all__ = [
    "Item",
    "Links",
    "Message",
    "acked_message",
    "alarm_message",
    "incident_message",
    "markdown",
    "plain",
    "storm_message",
    "system_message",
]
