"""Exam phases from the schedule, and the secrecy room's permitted opening windows.

The monitoring plan's timeline (DOMAIN.md): equipment checks in the days before, the sessions, the gaps
between them, shipping the materials after. Schedule times are local wall-clock times (TOML local
datetimes) in the schedule's time zone; they are turned into unix seconds once, so finding the phase of
a moment is a binary search, cheap enough to run on every evaluation.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from examwatch.rules.config import Schedule, Window

# Precedence where two could apply: during > between > after > before > idle.
PHASES = ("before", "during", "between", "after", "idle")

PHASE_NAMES = {"before": "考前准备", "during": "考试中", "between": "场次间隙", "after": "考后", "idle": "非考试期"}


def _unix(moment: datetime, tz: ZoneInfo) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=tz)).timestamp()


def _spans(windows: Sequence[Window], tz: ZoneInfo) -> list[tuple[float, float]]:
    """Windows as sorted, merged (start, end) unix spans."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted((_unix(w.start, tz), _unix(w.end, tz)) for w in windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _inside(spans: list[tuple[float, float]], starts: list[float], now: float) -> bool:
    i = bisect_right(starts, now) - 1
    return i >= 0 and now < spans[i][1]


class Calendar:
    """A schedule compiled for fast lookups: ``phase(now)`` and ``in_window(now)``."""

    def __init__(self, schedule: Schedule) -> None:
        tz = ZoneInfo(schedule.timezone)
        self._sessions = _spans(schedule.sessions, tz)
        self._starts = [s for s, _ in self._sessions]
        # A session continues the exam of the one before when it starts on the same or the next local
        # day: the gap is then "between" (lunch, the night of a multi-day exam), not "after"/"before".
        days = [(datetime.fromtimestamp(s, tz).date(), datetime.fromtimestamp(e, tz).date()) for s, e in self._sessions]
        self._continues = [False] + [days[i][0] - days[i - 1][1] <= timedelta(days=1) for i in range(1, len(days))]
        self._before = schedule.before_days * 86400
        self._after = schedule.after_hours * 3600
        self._windows = _spans(schedule.secrecy_windows, tz)
        self._window_starts = [s for s, _ in self._windows]
        # every moment at which phase() or in_window() may change, sorted
        edges = {t for s, e in self._sessions for t in (s, e, s - self._before, e + self._after)}
        self._changes = sorted(edges | {t for span in self._windows for t in span})

    def phase(self, now: float) -> str:
        i = bisect_right(self._starts, now) - 1
        if i >= 0 and now < self._sessions[i][1]:
            return "during"
        nxt = i + 1 if i + 1 < len(self._sessions) else None
        if i >= 0 and nxt is not None and self._continues[nxt]:
            return "between"
        if i >= 0 and now < self._sessions[i][1] + self._after:
            return "after"
        if nxt is not None and now >= self._starts[nxt] - self._before:
            return "before"
        return "idle"

    def in_window(self, now: float) -> bool:
        return _inside(self._windows, self._window_starts, now)

    def next_change(self, now: float) -> float:
        """The first moment after ``now`` at which the phase or the secrecy window may change (inf: none)."""
        i = bisect_right(self._changes, now)
        return self._changes[i] if i < len(self._changes) else math.inf


def phase_at(schedule: Schedule, now: float) -> str:
    return Calendar(schedule).phase(now)


def in_window(windows: Sequence[Window], now: float, timezone: str = "Asia/Shanghai") -> bool:
    """Whether ``now`` (unix seconds) falls inside one of the windows (local times in ``timezone``)."""
    spans = _spans(windows, ZoneInfo(timezone))
    return _inside(spans, [s for s, _ in spans], now)
