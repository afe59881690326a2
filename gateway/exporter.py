"""The gateway's Prometheus endpoint: every room's readings and alarms, incidents, liveness, counters.

A custom collector builds every family at scrape time from the database (its own read-only connection)
and the ingest counters: no state carried between scrapes, so a recovered alarm leaves no stale series.
Readings carry the same labels as the agent's (``kind`` from the kinds the agent's status names, empty
for older agents) and their age, so a panel can leave out a value from a room that went quiet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from examwatch.gateway import store
from examwatch.gateway.ledger import Stats
from examwatch.kernel.catalog import METRICS
from examwatch.kernel.config import parse_listen
from examwatch.kernel.model import base_device
from examwatch.rules.schedule import PHASES

if TYPE_CHECKING:
    from examwatch.gateway.api import ApiServer
    from examwatch.gateway.mqtt import Subscriber


class GatewayCollector:
    def __init__(
        self,
        db_path: store.Where,
        stats: Stats,
        clock: Callable[[], float] = time.time,
        broker: Subscriber | None = None,
        api: ApiServer | None = None,
    ) -> None:
        self.db_path = db_path
        self.stats = stats
        self.broker = broker  # the Subscriber: its link's state
        self.api = api  # its refused requests
        self.clock = clock
        self._conn: store.Db | None = None
        self._lock = threading.Lock()

    def _db(self) -> store.Db:
        if self._conn is None:
            self._conn = store.connect(self.db_path, readonly=True)
        return self._conn

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect(self._db(), self.clock())

    def _collect(self, db: store.Db, now: float) -> Iterator[Metric]:
        agents = store.agents(db)
        # The age on the room's own clock (its reading times are), so a room with a skewed clock ages right too.
        room_now = {a["agent"]: now + (a["skew"] or 0.0) for a in agents}
        kinds = store.device_kinds(db)
        readings: dict[str, GaugeMetricFamily] = {}
        age = GaugeMetricFamily(
            "examwatch_reading_age_seconds",
            "seconds since the metric was read, by the room's clock",
            labels=["site", "room", "device", "kind", "metric"],
        )
        for r in store.latest(db):
            meta = METRICS.get(r["metric"])
            if meta is None:
                continue
            fam = readings.get(r["metric"])
            if fam is None:
                fam = readings[r["metric"]] = GaugeMetricFamily(
                    f"examwatch_{r['metric']}", f"{meta.help} ({meta.unit})", labels=["site", "room", "device", "kind"]
                )
            site, room = r["agent"].split("/", 1)
            kind = kinds.get(r["agent"], {}).get(base_device(r["device"]), "")
            fam.add_metric([site, room, r["device"], kind], r["value"])
            age.add_metric(
                [site, room, r["device"], kind, r["metric"]], max(0.0, room_now.get(r["agent"], now) - r["ts"])
            )
        yield from readings.values()
        yield age

        active = GaugeMetricFamily(
            "examwatch_alarm_active", "1 while an alarm fires", labels=["site", "room", "rule", "level"]
        )
        seen: set[tuple[str, ...]] = set()
        for a in store.alarms(db, state="active", limit=100_000):
            key = (a["site"], a["room"], a["rule"], str(a["level"]))
            if key not in seen:  # two devices with the same rule: one series per bounded label set
                seen.add(key)
                active.add_metric(list(key), 1)
        yield active

        incidents = GaugeMetricFamily(
            "examwatch_gateway_incidents_open",
            "open cross-room incidents by fault class",
            labels=["site", "level", "class"],
        )
        counts: dict[tuple[str, str, str], int] = {}
        for i in store.incidents(db, state="open", limit=100_000):
            k = (i["site"], str(i["level"]), i["fault_class"])
            counts[k] = counts.get(k, 0) + 1
        for k, n in counts.items():
            incidents.add_metric(list(k), n)
        yield incidents

        up = GaugeMetricFamily(
            "examwatch_gateway_agent_up", "1 while the room's agent is online", labels=["site", "room"]
        )
        last_seen = GaugeMetricFamily(
            "examwatch_gateway_agent_last_seen_age_seconds",
            "seconds since the agent was last heard",
            labels=["site", "room"],
        )
        skew = GaugeMetricFamily(
            "examwatch_gateway_agent_clock_skew_seconds", "agent clock minus gateway clock", labels=["site", "room"]
        )
        missing = GaugeMetricFamily(
            "examwatch_gateway_seq_missing",
            "sequence numbers not (yet) received from the agent",
            labels=["site", "room"],
        )
        phase = GaugeMetricFamily(
            "examwatch_gateway_agent_phase",
            "1 for the exam phase the room is in (the gateway's schedule, else the agent's)",
            labels=["site", "room", "phase"],
        )
        for a in agents:
            labels = [a["site"], a["room"]]
            up.add_metric(labels, 1 if a["status"] == "online" else 0)
            if a["last_seen"] is not None:
                last_seen.add_metric(labels, max(0.0, now - a["last_seen"]))
            if a["skew"] is not None:
                skew.add_metric(labels, a["skew"])
            missing.add_metric(labels, a["missing"])
            if a["phase"] is not None:
                for name in PHASES:
                    phase.add_metric([*labels, name], 1 if name == a["phase"] else 0)
        yield from (up, last_seen, skew, missing, phase)

        s = self.stats
        msgs = CounterMetricFamily("examwatch_gateway_messages", "messages accepted, by kind", labels=["kind"])
        for kind, n in list(s.messages.items()):
            msgs.add_metric([kind], n)
        yield msgs
        yield CounterMetricFamily("examwatch_gateway_readings", "readings stored", value=s.readings)
        yield CounterMetricFamily(
            "examwatch_gateway_duplicates", "messages received again and dropped", value=s.duplicates
        )
        rejected = CounterMetricFamily(
            "examwatch_gateway_rejected",
            "messages rejected, by reason and claimed room",
            labels=["reason", "site", "room"],
        )
        for (reason, agent), n in list(s.rejected.items()):
            site, _, room = agent.partition("/")
            rejected.add_metric([reason, site, room], n)
        yield rejected
        if self.broker is not None:
            yield GaugeMetricFamily(
                "examwatch_gateway_broker_connected",
                "1 while connected and subscribed to the county broker; at 0 no room is heard or judged",
                value=1 if self.broker.connected else 0,
            )
            yield CounterMetricFamily(
                "examwatch_gateway_broker_connect_failures",
                "attempts to reach the county broker that failed (unreachable or refused)",
                value=self.broker.connect_failures,
            )
        if self.api is not None:
            refused = CounterMetricFamily(
                "examwatch_gateway_api_refused", "API requests refused, by reason", labels=["reason"]
            )
            for reason, n in list(self.api.refused.items()):
                refused.add_metric([reason], n)
            yield refused


def serve(listen: str, *collectors: Any) -> tuple[Any, Any]:
    """Start the endpoint on ``host:port`` (127.0.0.1 unless configured); returns (server, thread)."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return start_http_server(port, addr=host, registry=registry)
