"""Prometheus Alertmanager, API v2: ``POST <url>/api/v2/alerts`` with a list of alerts.

Alertmanager resolves an alert by itself when its ``endsAt`` passes, so a firing alert carries an ``endsAt``
a few re-post intervals ahead and is re-posted while active (``Reposter``); a clear sends ``endsAt`` = the
clear time. Labels identify the alert (same labels = same alert), so every room's alarm keeps its own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from examwatch.channels.base import post_json
from examwatch.channels.message import Item, Message, plain
from examwatch.channels.settings import Channel

SEVERITY = {1: "warning", 2: "critical", 3: "critical"}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert(i: Item, m: Message, now: float, hold: float) -> dict[str, Any]:
    return {
        "labels": {
            "alertname": i.rule or m.kind,
            "site": i.site,
            "room": i.room,
            "level": str(i.level),
            "severity": SEVERITY.get(i.level, "critical"),
            "examwatch_id": i.id,
        },
        "annotations": {"summary": i.summary or m.title, "description": plain(m)[:4000]},
        "startsAt": iso(i.starts_at),
        "endsAt": iso(now + hold if i.firing else (i.ends_at or now)),
    }


def payload(m: Message, now: float, hold: float) -> list[dict[str, Any]]:
    """One alert per item; acknowledgements and summaries of already-sent alarms add nothing here."""
    if m.kind == "acked":
        return []
    return [alert(i, m, now, hold) for i in m.items]


def url(ch: Channel) -> str:
    return ch.url.rstrip("/") + "/api/v2/alerts"


def send(ch: Channel, m: Message, http: Any, now: float) -> None:
    alerts = payload(m, now, 4 * ch.repost_interval)
    if alerts:
        post_json(http, url(ch), alerts)


class Reposter:
    """The alerts still firing, to post again every ``repost_interval`` (rebuilt from the outbox at start)."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch
        self.active: dict[str, tuple[Item, Message]] = {}
        self.last = 0.0

    def sent(self, m: Message) -> None:
        if m.kind == "acked":
            return
        for i in m.items:
            if i.firing:
                self.active[i.id] = (i, m)
            else:
                self.active.pop(i.id, None)

    def due(self, now: float) -> bool:
        return bool(self.active) and now - self.last >= self.ch.repost_interval

    def repost(self, http: Any, now: float) -> None:
        alerts = [alert(i, m, now, 4 * self.ch.repost_interval) for i, m in self.active.values()]
        post_json(http, url(self.ch), alerts)
        self.last = now
