"""The notifier's part of the gateway config: ``[[channels]]``, ``[notify]`` (links, deadlines, damping)
and ``[[roster]]`` (who is reached through which channels, tier by tier)."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from examwatch.kernel.config import Strict

CHANNEL_TYPES = ("dingtalk", "wecom", "feishu", "email", "webhook", "alertmanager")
TIERS = ("technicians", "group_lead", "leading_group", "county_office")  # 技术人员, 保障组组长, 领导小组, 县招办
# Messages a minute the platform accepts from one robot (its documentation); 0: no documented limit.
RATE_LIMITS = {"dingtalk": 20, "wecom": 20, "feishu": 100, "email": 0, "webhook": 0, "alertmanager": 0}
MIN_GAPS = {"feishu": 0.2}  # s between two sends: Feishu also allows at most 5 a second


class Channel(Strict, kw_only=True):
    """One place messages go: a group robot, a mailbox list, a webhook or an Alertmanager."""

    name: str
    type: str
    url: str = ""  # robot webhook (with its access_token / key), webhook URL, or Alertmanager base URL
    secret: str = ""  # robot signing secret (DingTalk "SEC...", Feishu), webhook HMAC key; never logged
    secret_file: str = ""
    # e-mail (TLS only: "starttls" or "implicit")
    host: str = ""
    port: int = 0
    tls: str = "starttls"
    username: str = ""
    password: str = ""
    password_file: str = ""
    sender: str = ""
    to: list[str] = []
    ca_file: str = ""  # trust this CA (a county's own) for the mail server or the webhook
    # routing filters: empty means any
    levels: list[int] = []
    sites: list[str] = []
    classes: list[str] = []  # fault classes: network, power, recording, secrecy, noise, system
    room_kinds: list[str] = []  # e.g. exam, secrecy ([notify] room_kinds names them)
    phases: list[str] = []  # exam phases (before, during, ...)
    rate_per_minute: int = -1  # -1: the platform's documented limit
    repost_interval: float = 60.0  # alertmanager: re-post active alerts this often (below its resolve_timeout)
    timeout: float = 10.0

    def secret_value(self) -> str:
        return Path(self.secret_file).read_text(encoding="utf-8").strip() if self.secret_file else self.secret

    def password_value(self) -> str:
        return Path(self.password_file).read_text(encoding="utf-8").strip() if self.password_file else self.password

    def rate(self) -> int:
        return RATE_LIMITS.get(self.type, 0) if self.rate_per_minute < 0 else self.rate_per_minute

    def min_gap(self) -> float:
        return MIN_GAPS.get(self.type, 0.0) if self.rate_per_minute < 0 else 0.0


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
        if c.type not in CHANNEL_TYPES:
            issues.append((("channels", i, "type"), f"one of {', '.join(CHANNEL_TYPES)}"))
        elif c.type == "email":
            if c.tls not in ("starttls", "implicit"):
                issues.append((("channels", i, "tls"), 'e-mail is sent over TLS only: "starttls" or "implicit"'))
            if not c.host or not c.sender or not c.to:
                issues.append((("channels", i), "e-mail needs host, sender and to"))
        elif not c.url.startswith(("https://", "http://")):
            issues.append((("channels", i, "url"), "an http(s) URL"))
        if not 0 < c.timeout <= 120 or not 1 <= c.repost_interval <= 3600 or c.rate_per_minute > 10_000:
            issues.append((("channels", i), "timeout 0-120 s, repost_interval 1-3600 s, rate_per_minute up to 10000"))
        if any(lv not in (1, 2, 3) for lv in c.levels):
            issues.append((("channels", i, "levels"), "levels are 1, 2 or 3"))
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
    if notify.failing_after < 1:
        issues.append((("notify", "failing_after"), "at least 1"))
    return issues


__all__ = ["CHANNEL_TYPES", "RATE_LIMITS", "TIERS", "Channel", "Deadlines", "Notify", "Roster", "check"]
