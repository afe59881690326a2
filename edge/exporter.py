"""Prometheus endpoint of the agent: current readings, active alarms, collector and uplink health.

Every family is built at scrape time from the agent's live view, so there is no state carried between
scrapes and no stale series: a device that vanished from the view vanishes here. The text format is the
kernel's writer (``kernel.exposition``, shared with the gateway): the agent does not import prometheus_client.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import structlog

from examwatch import __version__
from examwatch.collectors.base import Health
from examwatch.edge.config import Config
from examwatch.kernel import endpoint
from examwatch.kernel.catalog import METRICS
from examwatch.kernel.exposition import family, labels
from examwatch.kernel.model import base_device
from examwatch.rules.schedule import PHASES

log = structlog.get_logger("examwatch.exporter")


class AgentView(Protocol):
    """What the exporter reads of the running agent (edge.runtime.Agent has it; the exporter never imports it)."""

    cfg: Config
    current: dict[tuple[str, str], Any]  # (device, metric) -> its latest Reading
    active: dict[str, Any]  # alarm id -> its latest AlarmEvent
    health: Health
    fallback: Any  # the [fallback] sender, or None

    def phase(self, now: float) -> str: ...
    def outbox_stats(self) -> dict[str, float]: ...
    def uplink_health(self) -> Any: ...


def page(agent: AgentView) -> str:
    """The scrape: every family built now from the agent's live view (no state between scrapes, no stale
    series: a device that vanished from the view vanishes here), in the text format the kernel writes."""
    a = agent
    site, room = a.cfg.agent.site, a.cfg.agent.room
    kinds = {d.name: d.kind for d in a.cfg.devices}
    now = time.time()
    ids = {"site": site, "room": room}
    out = [
        family(
            "examwatch_agent_info",
            "the agent's identity",
            "gauge",
            [(labels({**ids, "version": __version__, "room_kind": a.cfg.agent.kind}), 1.0)],
        )
    ]

    families: dict[str, list[tuple[str, float]]] = {}
    newest: dict[str, float] = {}  # a device's labels -> its newest reading's time
    for r in list(a.current.values()):
        series = labels({**ids, "device": r.device, "kind": kinds.get(base_device(r.device), "host")})
        families.setdefault(r.metric, []).append((series, r.value))
        newest[series] = max(r.ts, newest.get(series, r.ts))
    for metric, samples in families.items():
        meta = METRICS[metric]
        out.append(family(f"examwatch_{metric}", f"{meta.help} ({meta.unit})", "gauge", samples))
    ages = [(series, max(0.0, now - ts)) for series, ts in newest.items()]
    out.append(
        family("examwatch_device_reading_age_seconds", "seconds since the device's newest reading", "gauge", ages)
    )

    active = [
        (labels({**ids, "rule": e.rule, "level": str(e.level), "device": e.device}), 1.0)
        for e in list(a.active.values())
    ]
    out.append(family("examwatch_alarm_active", "1 while the alarm fires", "gauge", active))

    success, duration, errors = [], [], []
    for name, h in list(a.health.devices.items()):
        device = {**ids, "collector": h.collector, "device": name}
        success.append((labels(device), 1.0 if h.online else 0.0))
        duration.append((labels(device), h.last_duration))
        errors += [(labels({**device, "reason": reason}), n) for reason, n in list(h.errors.items())]
    out.append(
        family("examwatch_collector_success", "1 if the device's last poll or message succeeded", "gauge", success)
    )
    out.append(family("examwatch_collector_duration_seconds", "duration of the device's last poll", "gauge", duration))
    out.append(family("examwatch_collector_errors", "failed polls by reason", "counter", errors))

    dropped = [(labels({**ids, "source": s, "reason": why}), n) for (s, why), n in list(a.health.dropped.items())]
    out.append(
        family(
            "examwatch_input_dropped",
            "input refused (malformed payloads, unknown topics, a full queue)",
            "counter",
            dropped,
        )
    )
    current = a.phase(now)
    phases = [(labels({**ids, "phase": name}), 1.0 if name == current else 0.0) for name in PHASES]
    out.append(family("examwatch_agent_phase", "1 for the exam phase the room is in now", "gauge", phases))

    # The outbox's fill is a reading of the host device (examwatch_outbox_used_ratio, for the rules too):
    # a second family of the same name would make the whole scrape invalid exposition text.
    room_ids = labels(ids)
    outbox = a.outbox_stats()
    out.append(
        family(
            "examwatch_outbox_dropped",
            "readings messages given up over the disk budget",
            "counter",
            [(room_ids, outbox["dropped"])],
        )
    )
    up = a.uplink_health()
    if up is not None:
        connected = 1.0 if up.connected else 0.0
        out.append(
            family(
                "examwatch_uplink_connected", "1 while connected to the county broker", "gauge", [(room_ids, connected)]
            )
        )
        out.append(
            family(
                "examwatch_uplink_pending_messages",
                "messages waiting for the county broker",
                "gauge",
                [(room_ids, float(up.pending))],
            )
        )
    fb = a.fallback
    if fb is not None:  # [fallback]: what the agent sent to the site channel itself while the county was away
        failed = [
            (labels({**ids, "reason": key.removeprefix("failed:")}), n)
            for key, n in list(fb.stats.items())
            if key.startswith("failed:")
        ]
        out += [
            family(
                "examwatch_fallback_sent",
                "alarms sent straight to the site channel",
                "counter",
                [(room_ids, fb.stats["sent"])],
            ),
            family("examwatch_fallback_failed", "direct sends that failed, by reason", "counter", failed),
            family(
                "examwatch_fallback_waiting",
                "level-2 alarms waiting to be sent straight to the site",
                "gauge",
                [(room_ids, float(len(fb.waiting)))],
            ),
        ]
    return "".join(out)


def _page(agent: AgentView) -> bytes | None:
    try:
        return page(agent).encode()
    except Exception as err:  # a bug in a family must not take the endpoint down: say so, once per scrape
        log.error("scrape_failed", error=f"{type(err).__name__}: {err}"[:300])
        return None


def serve(agent: AgentView, listen: str) -> tuple[endpoint.Server, threading.Thread]:
    """Start the endpoint on ``host:port`` (127.0.0.1 unless configured); returns (server, thread)."""
    return endpoint.serve(listen, lambda: _page(agent))


stop = endpoint.stop
