"""The notifier's part of the gateway config: ``[[channels]]``, ``[notify]`` (links, deadlines, damping)
and ``[[roster]]`` (who is reached through which channels, tier by tier)."""

from __future__ import annotations

import math

import msgspec

from examwatch.channels.settings import CHANNEL_TYPES, RATE_LIMITS, Channel, channel_issues
from examwatch.kernel.config import Strict

TIERS = ("technicians", "group_lead", "leading_group", "county_office")  # 技术人员, 保障组组长, 领导小组, 县招办


class Roster(Strict, kw_only=True):
    """Per site (or site = "*" for the county office): the channels that reach each tier."""

    site: str
    technicians: list[str] = []
    group_lead: list[str] = []  # 保障组 / 执行组组长
    leading_group: list[str] = []  # 考点领导小组
    county_office: list[str] = []  # 县招办

    def tier(self, name: str) -> list[str]:
        return list(getattr(self, name))


class Deadlines(Strict, kw_only=True):
    """Seconds after the raise by which someone must acknowledge; each one missed escalates one tier."""

    level1: list[float] = msgspec.field(default_factory=lambda: [300.0, 900.0])  # 一级：5 分钟内反馈
    level2: list[float] = msgspec.field(
        default_factory=lambda: [600.0, 1800.0]
    )  # 二级：10 分钟内上报领导小组，30 分钟内决策
    level3: list[float] = msgspec.field(default_factory=lambda: [300.0, 900.0])

    def of(self, level: int) -> list[float]:
        return {1: self.level1, 2: self.level2}.get(level, self.level3)


class Notify(Strict, kw_only=True):
    ack_url: str = ""  # the gateway API as staff reach it, e.g. "https://gw.example.cn:8080"
    ack_link_hours: float = 24.0  # a message's signed acknowledgement link works this long after the raise
    grafana_url: str = ""  # e.g. "https://grafana.example.cn/d/examwatch-room"; ?var-site=&var-room= appended
    timezone: str = "Asia/Shanghai"
    start_tier: dict[str, str] = msgspec.field(
        default_factory=lambda: {"1": "technicians", "2": "group_lead", "3": "leading_group"}
    )
    deadlines: Deadlines = msgspec.field(default_factory=Deadlines)
    flap_count: int = 4  # an alarm raised this many times ...
    flap_window: float = 600.0  # ... within this many seconds is held as one, with the count
    storm_window: float = 10.0  # s: further rooms raising within this after a sent one go out as one list
    retry_base: float = 5.0  # s before the first retry; doubles per failure
    retry_max: float = 300.0
    failing_after: int = 5  # failed attempts in a row -> the channel is down: a level-1 system alarm
    room_kinds: dict[str, str] = {}  # "<site>/<room>" or "<room>" -> kind (default "exam")


def check(channels: list[Channel], roster: list[Roster], notify: Notify) -> list[tuple[tuple[str | int, ...], str]]:
    """Every problem with the notifier's config, as (key path, message)."""
    issues: list[tuple[tuple[str | int, ...], str]] = []
    names: set[str] = set()
    for i, c in enumerate(channels):
        if not c.name or c.name in names:
            issues.append((("channels", i, "name"), "every channel needs its own name"))
        names.add(c.name)
        issues += [(("channels", i, *key), message) for key, message in channel_issues(c)]
    for i, r in enumerate(roster):
        for t in TIERS:
            for n in r.tier(t):
                if n not in names:
                    issues.append((("roster", i, t), f"no channel named {n!r}"))
    for lv, tier in notify.start_tier.items():
        if lv not in ("1", "2", "3") or tier not in TIERS:
            issues.append((("notify", "start_tier", lv), f"level 1-3 -> one of {', '.join(TIERS)}"))
    for level in (1, 2, 3):
        marks = notify.deadlines.of(level)
        if any(not 0 < m <= 86400 or math.isnan(m) for m in marks) or marks != sorted(marks):
            issues.append((("notify", "deadlines", f"level{level}"), "rising seconds between 0 and 86400"))
    if not 1 <= notify.flap_count <= 100 or not 0 < notify.flap_window <= 86400:
        issues.append((("notify",), "flap_count 1-100, flap_window up to a day"))
    if not 0 <= notify.storm_window <= 600 or not 0 < notify.retry_base <= notify.retry_max <= 86400:
        issues.append((("notify",), "storm_window 0-600 s; 0 < retry_base <= retry_max"))
    if not 0 < notify.ack_link_hours <= 168:
        issues.append((("notify", "ack_link_hours"), "up to 168 hours (a week)"))
    if notify.failing_after < 1:
        issues.append((("notify", "failing_after"), "at least 1"))
    return issues


__all__ = ["CHANNEL_TYPES", "RATE_LIMITS", "TIERS", "Channel", "Deadlines", "Notify", "Roster", "check"]
