"""Prometheus endpoint of the agent: current readings, active alarms, collector and uplink health.

A custom collector builds every family at scrape time from the agent's live view, so there is no state
carried between scrapes and no stale series: a device that vanished from the view vanishes here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from examwatch import __version__
from examwatch.collectors.base import Health
from examwatch.edge.config import Config
from examwatch.kernel.catalog import METRICS
from examwatch.kernel.config import parse_listen
from examwatch.kernel.model import base_device
from examwatch.rules.schedule import PHASES


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


class AgentCollector(Collector):
    def __init__(self, agent: AgentView) -> None:
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily]:
        a = self.agent
        site, room = a.cfg.agent.site, a.cfg.agent.room
        kinds = {d.name: d.kind for d in a.cfg.devices}
        now = time.time()

        info = InfoMetricFamily("examwatch_agent", "the agent's identity", labels=["site", "room"])
        info.add_metric([site, room], {"version": __version__, "room_kind": a.cfg.agent.kind})
        yield info

        families: dict[str, GaugeMetricFamily] = {}
        age = GaugeMetricFamily(
            "examwatch_device_reading_age_seconds",
            "seconds since the device's newest reading",
            labels=["site", "room", "device", "kind"],
        )
        newest: dict[tuple[str, str], float] = {}  # (device, kind) -> its newest reading's time
        for r in list(a.current.values()):
            fam = families.get(r.metric)
            if fam is None:
                meta = METRICS[r.metric]
                fam = families[r.metric] = GaugeMetricFamily(
                    f"examwatch_{r.metric}", f"{meta.help} ({meta.unit})", labels=["site", "room", "device", "kind"]
                )
            kind = kinds.get(base_device(r.device), "host")
            fam.add_metric([site, room, r.device, kind], r.value)
            newest[(r.device, kind)] = max(r.ts, newest.get((r.device, kind), r.ts))
        for (device, device_kind), ts in newest.items():
            age.add_metric([site, room, device, device_kind], max(0.0, now - ts))
        yield from families.values()
        yield age

        active = GaugeMetricFamily(
            "examwatch_alarm_active", "1 while the alarm fires", labels=["site", "room", "rule", "level", "device"]
        )
        for e in list(a.active.values()):
            active.add_metric([site, room, e.rule, str(e.level), e.device], 1.0)
        yield active

        ids = [site, room]
        success = GaugeMetricFamily(
            "examwatch_collector_success",
            "1 if the device's last poll or message succeeded",
            labels=["site", "room", "collector", "device"],
        )
        duration = GaugeMetricFamily(
            "examwatch_collector_duration_seconds",
            "duration of the device's last poll",
            labels=["site", "room", "collector", "device"],
        )
        errors = CounterMetricFamily(
            "examwatch_collector_errors",
            "failed polls by reason",
            labels=["site", "room", "collector", "device", "reason"],
        )
        for name, h in list(a.health.devices.items()):
            success.add_metric([*ids, h.collector, name], 1.0 if h.online else 0.0)
            duration.add_metric([*ids, h.collector, name], h.last_duration)
            for reason, n in list(h.errors.items()):
                errors.add_metric([*ids, h.collector, name, reason], n)
        yield success
        yield duration
        yield errors

        dropped = CounterMetricFamily(
            "examwatch_input_dropped",
            "input refused (malformed payloads, unknown topics, a full queue)",
            labels=["site", "room", "source", "reason"],
        )
        for (source, reason), n in list(a.health.dropped.items()):
            dropped.add_metric([*ids, source, reason], n)
        yield dropped

        phase = GaugeMetricFamily(
            "examwatch_agent_phase", "1 for the exam phase the room is in now", labels=["site", "room", "phase"]
        )
        current = a.phase(now)
        for name in PHASES:
            phase.add_metric([*ids, name], 1.0 if name == current else 0.0)
        yield phase

        # The outbox's fill is a reading of the host device (examwatch_outbox_used_ratio, for the rules too):
        # a second family of the same name would make the whole scrape invalid exposition text.
        outbox = a.outbox_stats()
        dropped_total = CounterMetricFamily(
            "examwatch_outbox_dropped", "readings messages given up over the disk budget", labels=["site", "room"]
        )
        dropped_total.add_metric(ids, outbox["dropped"])
        yield dropped_total
        up = a.uplink_health()
        if up is not None:
            yield _gauge(
                "examwatch_uplink_connected",
                "1 while connected to the county broker",
                ids,
                1.0 if up.connected else 0.0,
            )
            yield _gauge(
                "examwatch_uplink_pending_messages", "messages waiting for the county broker", ids, float(up.pending)
            )
        fb = a.fallback
        if fb is not None:  # [fallback]: what the agent sent to the site channel itself while the county was away
            sent = CounterMetricFamily(
                "examwatch_fallback_sent", "alarms sent straight to the site channel", labels=["site", "room"]
            )
            sent.add_metric(ids, fb.stats["sent"])
            failed = CounterMetricFamily(
                "examwatch_fallback_failed", "direct sends that failed, by reason", labels=["site", "room", "reason"]
            )
            for key, n in list(fb.stats.items()):
                if key.startswith("failed:"):
                    failed.add_metric([*ids, key.removeprefix("failed:")], n)
            yield from (sent, failed)
            yield _gauge(
                "examwatch_fallback_waiting",
                "level-2 alarms waiting to be sent straight to the site",
                ids,
                float(len(fb.waiting)),
            )


def _gauge(name: str, help: str, ids: list[str], value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help, labels=["site", "room"])
    g.add_metric(ids, value)
    return g


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a scrape every 15 s is not news
        pass


def serve(agent: AgentView, listen: str) -> tuple[ThreadingWSGIServer, threading.Thread]:
    """Start the endpoint on ``host:port`` (127.0.0.1 unless configured); returns (server, thread).

    prometheus_client's own ``start_http_server`` polls for its shutdown twice a second, a fifth of an idle
    agent's CPU: this server blocks until a scrape comes, and ``stop`` wakes it to end."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(str(sockaddr[0]), port, make_wsgi_app(registry), Server, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": None}, name="exporter", daemon=True)
    thread.start()
    return server, thread


def stop(server: ThreadingWSGIServer) -> None:
    """``shutdown`` sets the serving loop's flag and waits for it to see it; a connection of our own wakes
    the loop (blocked without a timeout) until it has."""
    shutting = threading.Thread(target=server.shutdown, daemon=True)
    shutting.start()
    while shutting.is_alive():
        with contextlib.suppress(OSError):
            host, port = server.server_address[:2]
            socket.create_connection((str(host), int(port)), timeout=0.5).close()
        shutting.join(0.05)
    server.server_close()
