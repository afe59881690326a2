"""What the duty desk shows, read from the store: the site's rooms and alarms, a room, an incident, and the
incident's timeline as an SVG picture. Reads only; ``timeline_svg`` is pure."""

from __future__ import annotations

import html
from typing import Any

from examwatch.gateway import duty, store

RECENT = 4 * 3600.0  # s: cleared alarms and closed incidents stay on the desk this long
OFFLINE = ("offline", "silent")


def state(conn: store.Db, roster: list[str], secrecy: frozenset[str], now: float) -> dict[str, Any]:
    """The whole desk: every room with its worst active level, the active and recent alarms, the incidents."""
    alarms = store.alarms(conn, limit=1000)
    active = [a for a in alarms if a["state"] != "cleared"]
    recent = [a for a in alarms if a["state"] == "cleared" and (a["cleared_at"] or 0) > now - RECENT]
    worst: dict[str, int] = {}
    for a in active:
        agent = f"{a['site']}/{a['room']}"
        worst[agent] = max(worst.get(agent, 0), a["level"])
    seen = {a["agent"]: a for a in store.agents(conn)}
    rooms = []
    for agent in sorted(set(roster) | set(seen) | set(worst)):
        site, _, room = agent.partition("/")
        status = seen.get(agent, {}).get("status", "unknown")
        rooms.append(
            {
                "agent": agent,
                "site": site,
                "room": room,
                "status": status,
                "offline": status in OFFLINE,
                "secrecy": agent in secrecy,
                "level": worst.get(agent, 0),
            }
        )
    incidents = [
        i for i in store.incidents(conn, limit=200) if i["state"] == "open" or (i["closed_at"] or 0) > now - RECENT
    ]
    return {"now": now, "rooms": rooms, "alarms": active + recent, "incidents": incidents}


def room(conn: store.Db, agent: str) -> dict[str, Any]:
    """A room: its devices with their kinds, the latest reading of each metric, its alarms (newest first)."""
    site, _, name = agent.partition("/")
    kinds = store.device_kinds(conn).get(agent, {})
    readings: list[dict[str, Any]] = [  # store.latest gives plain tuples (a scrape reads 100k+)
        {"device": device, "metric": metric, "value": value, "ts": ts}
        for of, device, metric, value, ts in store.latest(conn)
        if of == agent
    ]
    devices = sorted(set(kinds) | {r["device"] for r in readings})
    return {
        "agent": agent,
        "devices": [
            {
                "device": d,
                "kind": kinds.get(d, ""),
                "readings": [
                    {"metric": r["metric"], "value": r["value"], "ts": r["ts"]} for r in readings if r["device"] == d
                ],
            }
            for d in devices
        ],
        "alarms": store.alarms(conn, site=site, room=name, limit=200),
    }


def incident(conn: store.Db, incident_id: str, now: float) -> dict[str, Any] | None:
    inc = duty.incident(conn, incident_id)
    if inc is None:
        return None
    end = inc["closed_at"] or now
    alarms = duty.room_alarms(conn, inc["site"], inc["members"], inc["opened_at"] - 600, end)
    return {
        "incident": inc,
        "alarms": alarms,
        "notes": store.notes(conn, "incident", incident_id),
        "svg": timeline_svg(inc["members"], alarms, inc["opened_at"], end, now),
    }


def alarm(conn: store.Db, alarm_id: str) -> dict[str, Any] | None:
    a = duty.alarm(conn, alarm_id)
    if a is None:
        return None
    return {"alarm": a, "timeline": store.alarm_timeline(conn, alarm_id), "notes": store.notes(conn, "alarm", alarm_id)}


LEVEL_COLOURS = {1: "#d32f2f", 2: "#f57c00", 3: "#7b1fa2"}


def timeline_svg(rooms: list[str], alarms: list[dict[str, Any]], start: float, end: float, now: float) -> str:
    """Rooms down, time across, each alarm a bar from its raise to its clear (or now). Pure.

    The time marks carry ``data-ts`` (unix s): the page writes them in the reader's time zone."""
    start = min([start, *(a["raised_at"] for a in alarms)])
    end = max(end, start + 60)
    left, width, row, top = 90, 620, 26, 24
    height = top + row * max(len(rooms), 1) + 20

    def x(t: float) -> float:
        return left + (min(max(t, start), end) - start) / (end - start) * width

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {left + width + 40} {height}" class="timeline" '
        f'role="img" aria-label="事件时间线">'
    ]
    for i in range(5):  # time marks
        t = start + (end - start) * i / 4
        parts.append(
            f'<line x1="{x(t):.1f}" y1="{top - 6}" x2="{x(t):.1f}" y2="{height - 18}" stroke="#ccc"/>'
            f'<text x="{x(t):.1f}" y="{top - 10}" font-size="10" text-anchor="middle" data-ts="{t:.0f}">{_hm(t)}</text>'
        )
    for n, r in enumerate(rooms):
        y = top + n * row
        parts.append(f'<text x="4" y="{y + 16}" font-size="12">{html.escape(r)}</text>')
        for a in (a for a in alarms if a["room"] == r):
            x0, x1 = x(a["raised_at"]), x(a["cleared_at"] or now)
            colour = LEVEL_COLOURS.get(a["level"], "#555")
            title = html.escape(f"{a['rule']} {a['device']}: {a['message']}")
            parts.append(
                f'<rect x="{x0:.1f}" y="{y + 4}" width="{max(x1 - x0, 2):.1f}" height="16" fill="{colour}" '
                f'opacity="{0.5 if a["cleared_at"] else 0.9}"><title>{title}</title></rect>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _hm(t: float) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(t))
