"""What a site may say about rules and its exam schedule in the agent's TOML (validated by edge.config)."""

from __future__ import annotations

from datetime import datetime

import msgspec


class RuleOverride(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A site's change to one rule of the pack, under ``[rules.<rule id>]``. Unset fields keep the pack's."""

    enabled: bool | None = None
    threshold: float | None = None
    clear: float | None = None  # the value at which a raised alarm clears (hysteresis)
    for_: float | None = msgspec.field(default=None, name="for")  # seconds the condition must hold
    level: int | None = None
    levels: dict[str, int] | None = None  # per exam phase; 0 silences the rule in that phase


class Window(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str = ""
    start: datetime
    end: datetime


class Schedule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The exam sessions and the secrecy room's permitted opening windows, in local time."""

    timezone: str = "Asia/Shanghai"
    before_days: float = 3.0  # the "before" phase starts this long before the first session
    after_hours: float = 12.0  # the "after" phase lasts this long after the last session
    sessions: list[Window] = []
    secrecy_windows: list[Window] = []
