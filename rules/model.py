"""The rule model: what one alarm rule says, as data (the pack is TOML, sites override per rule id).

Two kinds of rule:
- ``threshold``: a metric compared with a threshold (``op``); raised once the comparison has held for
  ``for`` seconds; cleared when the value crosses back past ``clear`` (hysteresis) or, without ``clear``,
  as soon as the comparison stops holding. Availability is a threshold on ``device_online``.
- ``silent``: no reading at all from a device for ``silent_intervals`` x its configured interval.

A rule's level depends on the exam phase (``levels``, 0 = off in that phase) and, for the secrecy
room's door, on whether the room is inside a permitted opening window (``outside_windows``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Literal

import msgspec

from examwatch.kernel.config import Strict
from examwatch.kernel.model import RoomKind

Op = Literal["<", "<=", ">", ">=", "==", "!="]

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}

# The plans' standing procedure per response level (DOMAIN.md); a rule's own action comes first.
LEVEL_ACTIONS = {
    1: "5 分钟内反馈执行组组长，24 小时内填写《一级响应处置记录表》",
    2: "暂停该环节、保护现场，10 分钟内报告领导小组",
}


class Rule(Strict, frozen=True, kw_only=True):  # type: ignore[misc]  # msgspec allows frozen over Strict
    id: str
    type: Literal["threshold", "silent"] = "threshold"
    title: str  # what is wrong, in Chinese, e.g. "录音笔电量低"; "{kind}" names the device kind
    action: str = ""  # the plan's suggested action for this fault, in Chinese
    kinds: tuple[str, ...] = ()  # device kinds it applies to; empty = every kind
    except_kinds: tuple[str, ...] = ()
    rooms: tuple[RoomKind, ...] = ()  # room kinds it applies in; empty = every room
    replaces: tuple[str, ...] = ()  # rules that no longer apply to a device this rule applies to
    # threshold rules
    metric: str = ""
    op: Op = ">"
    threshold: float = 0.0
    clear: float | None = None
    for_: float = msgspec.field(default=0.0, name="for")
    # silent rules
    silent_intervals: float = 3.0
    # levels
    level: int = 1
    levels: dict[str, int] = {}  # per phase; phases not listed use ``level``
    outside_windows: bool = False  # off inside the secrecy room's permitted opening windows

    def applies_to(self, kind: str, room_kind: str) -> bool:
        return (
            (not self.kinds or kind in self.kinds)
            and kind not in self.except_kinds
            and (not self.rooms or room_kind in self.rooms)
        )

    def level_in(self, phase: str | None, in_window: bool) -> int:
        if self.outside_windows and in_window:
            return 0
        return self.levels.get(phase, self.level) if phase is not None else self.level

    def holds(self, value: float) -> bool:
        """The raise condition."""
        return OPS[self.op](value, self.threshold)

    def clears(self, value: float) -> bool:
        """Whether a raised alarm clears at this value: past ``clear``, or the condition no longer holds."""
        if self.clear is None:
            return not self.holds(value)
        if self.op in ("<", "<="):
            return value >= self.clear
        return value <= self.clear

    def action_for(self, level: int) -> str:
        return "；".join(a for a in (self.action, LEVEL_ACTIONS.get(level, "")) if a)


def rule_issues(rule: Rule, metrics: AbstractSet[str], kinds: AbstractSet[str], phases: tuple[str, ...]) -> list[str]:
    """What is wrong with one rule (pack entry or overridden), as messages; empty when it is sound."""
    issues = []
    for k in rule.kinds + rule.except_kinds:
        if k not in kinds:
            issues.append(f"unknown device kind {k!r}")
    if rule.type == "threshold":
        if rule.metric not in metrics:
            issues.append(f"unknown metric {rule.metric!r}")
        if not math.isfinite(rule.threshold):
            issues.append("threshold must be a finite number")
        if rule.clear is not None:
            if rule.op in ("==", "!="):
                issues.append("clear needs an ordering op (<, <=, >, >=)")
            # A value that clears must not also raise, or the alarm would flap on it.
            elif rule.holds(rule.clear):
                issues.append(f"clear ({rule.clear}) lies on the raising side of {rule.op} {rule.threshold}")
        if rule.for_ < 0:
            issues.append("for must not be negative")
    elif rule.silent_intervals <= 0:
        issues.append("silent_intervals must be positive")
    for phase, level in rule.levels.items():
        if phase not in phases:
            issues.append(f"unknown phase {phase!r}; known: {', '.join(phases)}")
        if level not in (0, 1, 2):
            issues.append(f"level in phase {phase!r} must be 0 (off), 1 or 2")
    if rule.level not in (0, 1, 2):
        issues.append("level must be 0 (off), 1 or 2 (3 is the gateway's)")
    return issues
