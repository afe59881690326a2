"""One notification as the channels see it: a title, markdown lines and the alerts it concerns.

Built by the gateway's notifier (``gateway/notify/messages.py``) or by a room agent that cannot reach the
county (``edge/fallback.py``); ``markdown`` and ``plain`` are the two text forms the channel modules use.
"""

from __future__ import annotations

import msgspec


class Item(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One alarm (a room's) or incident a message is about; Alertmanager gets one alert per item."""

    id: str
    site: str
    room: str = ""
    rule: str = ""
    level: int
    firing: bool = True
    starts_at: float
    ends_at: float | None = None
    summary: str = ""


class Message(msgspec.Struct, kw_only=True, omit_defaults=True):
    key: str  # idempotency key: the same transition always makes the same key
    thread: str  # the alarm or incident id: one thread of updates
    kind: str  # raised, updated, cleared, escalated, acked, flapping, storm, incident, system, test
    level: int
    title: str
    lines: list[str] = []  # markdown lines (bold labels, links)
    items: list[Item] = []


def markdown(m: Message) -> str:
    return "\n\n".join([f"### {m.title}", *m.lines])


def plain(m: Message) -> str:
    """The markdown without its marks, for e-mail text and platforms without markdown."""
    out = [m.title]
    for line in m.lines:
        out.append(line.replace("**", "").replace("> ", ""))
    return "\n".join(out)


__all__ = ["Item", "Message", "markdown", "plain"]
