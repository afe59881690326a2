"""What a site may say about rules and its exam schedule in the agent's TOML (validated by edge.config).

Numeric ranges are declared beside the fields as msgspec constraints: the config checker reports a value
outside them with its key path, and NaN or infinity never pass a bound.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from examwatch.kernel.config import DAY, Finite, Strict

YEARS = (2000, 2200)  # of an exam session or a secrecy window

# Local wall-clock time of the exam site: a UTC offset would make it incomparable with the others.
LocalTime = Annotated[datetime, msgspec.Meta(tz=False)]


class RuleOverride(Strict, kw_only=True):
    """A site's change to one rule of the pack, under ``[rules.<rule id>]``. Unset fields keep the pack's."""

    enabled: bool | None = None
    threshold: Finite | None = None
    clear: Finite | None = None  # the value at which a raised alarm clears (hysteresis)
    # seconds the condition must hold; a day at most (an exam day)
    for_: Annotated[float, msgspec.Meta(ge=0, le=DAY)] | None = msgspec.field(default=None, name="for")
    level: int | None = None  # 0 (off), 1 or 2: checked with the rule (rules.model.rule_issues)
    levels: dict[str, int] | None = None  # per exam phase; 0 silences the rule in that phase


class Window(Strict, kw_only=True):
    name: str = ""
    start: LocalTime
    end: LocalTime


class Schedule(Strict, kw_only=True):
    """The exam sessions and the secrecy room's permitted opening windows, in local time."""

    timezone: str = "Asia/Shanghai"
    # the "before" phase starts this long before the first session
    before_days: Annotated[float, msgspec.Meta(ge=0, le=60)] = 3.0
    # the "after" phase lasts this long after the last session
    after_hours: Annotated[float, msgspec.Meta(ge=0, le=24 * 30)] = 12.0
    sessions: list[Window] = []
    secrecy_windows: list[Window] = []


def schedule_issues(schedule: Schedule) -> list[tuple[tuple[str | int, ...], str]]:
    """What types cannot see in a schedule (a window that ends before it starts, an unknown time zone),
    as (key path, message); the agent's and the gateway's checkers both report them."""
    from zoneinfo import ZoneInfo

    issues: list[tuple[tuple[str | int, ...], str]] = []
    for which in ("sessions", "secrecy_windows"):
        for i, w in enumerate(getattr(schedule, which)):
            for key, moment in (("start", w.start), ("end", w.end)):
                if not YEARS[0] <= moment.year <= YEARS[1]:  # year 1 overflows the calendar's arithmetic
                    issues.append((("schedule", which, i, key), f"a year between {YEARS[0]} and {YEARS[1]}"))
            if w.end <= w.start:
                issues.append((("schedule", which, i, "end"), "end must be after start"))
    try:
        ZoneInfo(schedule.timezone)
    except Exception:  # ValueError, OSError, ZoneInfoNotFoundError: a name from the file, never a traceback
        issues.append((("schedule", "timezone"), f"unknown time zone {schedule.timezone[:64]!r}; e.g. Asia/Shanghai"))
    return issues
