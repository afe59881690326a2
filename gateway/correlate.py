"""Correlation and escalation across the rooms of a site: pure logic, no clock, no I/O.

The same fault class in ``min_rooms`` rooms of one site, raised within ``window`` of each other (by the
rooms' own timestamps) opens one level-2 incident. While it is open, further rooms with the fault join it
and recovered rooms leave its active set; it keeps its id until the last member recovers. A share of the
site's rooms (``site_share``), or a fault in one of ``site_rooms``, makes it level 3. The level never drops
while the incident is open: de-escalating is the leading group's decision, not a sensor's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import msgspec

from examwatch.gateway.config import CorrelationRule


class Fault(msgspec.Struct, frozen=True):
    """One active alarm as correlation sees it."""

    site: str
    room: str
    rule: str
    raised_at: float


class Incident(msgspec.Struct, kw_only=True):
    id: str
    site: str
    fault_class: str
    title: str
    level: int
    opened_at: float  # the earliest raise among the rooms that opened it (room time)
    members: list[str]  # every room that ever joined, in joining order
    active: list[str]  # rooms that still have the fault
    state: str = "open"  # "open" | "closed"
    closed_at: float | None = None


class Change(msgspec.Struct, frozen=True):
    """What happened to an incident in one step: opened, joined, left, escalated, closed."""

    incident: str
    what: str
    rooms: tuple[str, ...] = ()
    level: int = 0


def rule_classes(rules: Iterable[CorrelationRule]) -> dict[str, CorrelationRule]:
    """Alarm rule id -> its fault class's rule."""
    return {r: c for c in rules for r in c.rules}


def correlate(
    incidents: dict[tuple[str, str], Incident],
    faults: Iterable[Fault],
    rules: list[CorrelationRule],
    roster: dict[str, int],
    now: float,
) -> tuple[dict[tuple[str, str], Incident], list[Change], list[Incident]]:
    """One step: open incidents by (site, class) and the active faults in; open incidents, changes, closed ones out."""
    by_rule = rule_classes(rules)
    rooms: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)  # (site, class) -> room -> first raise
    for f in faults:
        rule = by_rule.get(f.rule)
        if rule is None:
            continue
        seen = rooms[(f.site, rule.fault_class)]
        seen[f.room] = min(seen.get(f.room, f.raised_at), f.raised_at)
    out: dict[tuple[str, str], Incident] = {}
    changes: list[Change] = []
    closed: list[Incident] = []
    for rule in rules:
        for site in {s for s, c in rooms if c == rule.fault_class} | {s for s, c in incidents if c == rule.fault_class}:
            key = (site, rule.fault_class)
            active = rooms.get(key, {})
            inc = incidents.get(key)
            if inc is None:
                inc = _open(rule, site, active)
                if inc is None:
                    continue
                changes.append(Change(inc.id, "opened", tuple(inc.active), inc.level))
            else:
                inc = msgspec.structs.replace(inc, members=list(inc.members), active=list(inc.active))
                joined = [
                    r
                    for r in sorted(active, key=lambda r: (active[r], r))
                    if r not in inc.active and active[r] >= inc.opened_at - rule.window
                ]
                left = [r for r in inc.active if r not in active]
                inc.active = [r for r in inc.active if r in active] + joined
                inc.members += [r for r in joined if r not in inc.members]
                if joined:
                    changes.append(Change(inc.id, "joined", tuple(joined), inc.level))
                if left:
                    changes.append(Change(inc.id, "left", tuple(left), inc.level))
                if not inc.active:
                    inc.state, inc.closed_at = "closed", now
                    changes.append(Change(inc.id, "closed", tuple(inc.members), inc.level))
                    closed.append(inc)
                    continue
            level = _level(rule, inc.active, roster.get(site, 0))
            if level > inc.level:
                inc.level = level
                changes.append(Change(inc.id, "escalated", tuple(inc.active), level))
            out[key] = inc
    return out, changes, closed


def unsettled(
    faults: Iterable[Fault], rules: list[CorrelationRule], settled: dict[tuple[str, str], float]
) -> list[Fault]:
    """The faults people have not settled: those of a (site, class) whose incident people closed (the duty
    desk) count again only when raised after that close, so the next step does not open it again."""
    by_rule = rule_classes(rules)
    return [
        f
        for f in faults
        if f.rule not in by_rule or f.raised_at > settled.get((f.site, by_rule[f.rule].fault_class), float("-inf"))
    ]


def _open(rule: CorrelationRule, site: str, active: dict[str, float]) -> Incident | None:
    """An incident if enough rooms raised the fault within the window of each other (or a site-wide room did)."""
    ordered = sorted(active.items(), key=lambda kv: (kv[1], kv[0]))
    group: list[tuple[str, float]] = []
    for i in range(len(ordered)):
        j = i
        while j < len(ordered) and ordered[j][1] - ordered[i][1] <= rule.window:
            j += 1
        if j - i >= rule.min_rooms:
            group = ordered[i:j]
            break
    if not group:
        group = [kv for kv in ordered if kv[0] in rule.site_rooms][:1]
        if not group:
            return None
    opened = group[0][1]
    # Rooms raised before the group but within the window of its start belong to it too.
    members = [r for r, t in ordered if t >= opened - rule.window]
    return Incident(
        id=f"{site}/{rule.fault_class}/{int(opened * 1000)}",
        site=site,
        fault_class=rule.fault_class,
        title=rule.title,
        level=2,
        opened_at=opened,
        members=members,
        active=list(members),
    )


def _level(rule: CorrelationRule, active: list[str], site_rooms: int) -> int:
    if any(r in rule.site_rooms for r in active):
        return 3
    if rule.site_share > 0 and site_rooms and len(active) / site_rooms >= rule.site_share:
        return 3
    return 2


__all__ = ["Change", "Fault", "Incident", "correlate", "rule_classes", "unsettled"]
