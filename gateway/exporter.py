"""The gateway's Prometheus endpoint: every room's readings and alarms, incidents, liveness, counters.

Every family is built at scrape time from the database (the exporter's own read-only connection) and the
ingest counters: no state carried between scrapes, so a recovered alarm leaves no stale series, and any
gateway reading the same database answers the same. Readings carry the same labels as the agent's
(``kind`` from the kinds the agent's status names, empty for older agents) and their age, so a panel can
leave out a value from a room that went quiet.

A county is 100k+ series, nearly all per room, and nearly every value changes between two scrapes
(readings arrive every few seconds), so a per-room cache would seldom hit; lines pre-rendered on ingest
would hold only what this process ingested, and replicas sharing the feed each ingest a part: the
database is the one complete view. What changes seldom is the set of series: ``Series`` keeps each
line's text up to its value from one full read, and while the database's shape holds (the number of
``latest`` keys, which only grow, and the devices' kinds' mark) a scrape reads only values and times, in
key order, in one snapshot. The text format is written directly (prometheus_client built a sample object
per series and escaped every label of every sample: 2.6 s at 2,000 rooms), each label value escaped once
(``Labels``), byte for byte what prometheus_client wrote (label names in order, its number format) but
for the ages, in milliseconds; the values are spelt in one msgspec call per page (``numbers``: repr's
digit search cost more than the rest of a line) and the SQLite file is mapped rather than read. A device's
age is one series, since its newest reading (a device is read, or falls silent, as a whole).
Other collectors (the notifier's) still go through prometheus_client, appended to the same page. The
page is served by the endpoint the agent's exporter serves too (``kernel.endpoint``; gzip at level 1).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from operator import add
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest

from examwatch.gateway import store
from examwatch.gateway.ledger import Stats
from examwatch.kernel import endpoint
from examwatch.kernel.catalog import METRICS
from examwatch.kernel.exposition import escape, family, header, numbers
from examwatch.kernel.model import base_device
from examwatch.rules.schedule import PHASES

if TYPE_CHECKING:
    from examwatch.gateway.api import ApiServer
    from examwatch.gateway.mqtt import Subscriber

log = structlog.get_logger("examwatch.gateway.exporter")
MMAP_BYTES = 1 << 30  # address space, not memory: a county's gateway.db is well under it


class Labels:
    """Rendered label sets, each label value escaped once however many series share it.

    Kept from one scrape to the next (a room's labels do not change); a set the last scrape did not use
    is dropped, so rooms and devices that went away do not accumulate.
    """

    def __init__(self) -> None:
        self._rooms: dict[str, str] = {}
        self._devices: dict[tuple[str, str], str] = {}
        self._old_rooms: dict[str, str] = {}
        self._old_devices: dict[tuple[str, str], str] = {}

    def next_scrape(self) -> None:
        self._old_rooms, self._old_devices = self._rooms, self._devices
        self._rooms, self._devices = {}, {}

    def agent(self, agent: str) -> str:
        """``room="...",site="..."`` of an agent id ``site/room`` (both empty for "")."""
        got = self._rooms.get(agent)
        if got is None:
            got = self._old_rooms.get(agent)
            if got is None:
                site, _, room = agent.partition("/")
                got = f'room="{escape(room)}",site="{escape(site)}"'
            self._rooms[agent] = got
        return got

    def device(self, device: str, kind: str) -> str:
        """``device="...",kind="..."``."""
        got = self._devices.get((device, kind))
        if got is None:
            got = self._old_devices.get((device, kind))
            if got is None:
                got = f'device="{escape(device)}",kind="{escape(kind)}"'
            self._devices[(device, kind)] = got
        return got


AGE = "examwatch_device_reading_age_seconds"


class Series:
    """The readings' series as one full read of ``latest`` found them, each line's text up to its value.

    Kept between scrapes while the database's ``shape`` holds (how many keys, and the mark of the devices'
    kinds; nearly always: only a new device or metric adds keys, a status may rename kinds), so a scrape
    reads only the values and times, in the same order, and a line is one concatenation: the rows' keys were
    most of a scrape's read.
    """

    def __init__(self, shape: tuple[int, int], rows: list[Any], kinds: dict[str, dict[str, str]], labels: Labels):
        self.shape = shape
        runs: dict[str, tuple[list[int], list[str]]] = {}  # metric -> its rows and their lines' heads, first read first
        starts: list[tuple[str, int, str]] = []  # each device's agent, first row and age line up to the value
        agent = device = tail = ""
        for i, (row_agent, row_device, metric, _, _) in enumerate(rows):
            if row_device != device or row_agent != agent:
                agent, device = row_agent, row_device
                dev = labels.device(device, kinds.get(agent, {}).get(base_device(device), ""))
                tail = f"{{{dev},{labels.agent(agent)}}} "
                starts.append((agent, i, f"{AGE}{tail}"))
            if metric in METRICS:  # else not in this gateway's catalog (a newer agent's)
                run = runs.setdefault(metric, ([], []))
                run[0].append(i)
                run[1].append(f"examwatch_{metric}{tail}")
        ends = [start for _, start, _ in starts[1:]] + [len(rows)] if starts else []  # where the next device begins
        self.devices = [(a, start, end, line) for (a, start, line), end in zip(starts, ends, strict=True)]
        self.families = [
            (header(f"examwatch_{m}", f"{METRICS[m].help} ({METRICS[m].unit})", "gauge"), *run)
            for m, run in runs.items()
        ]


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
        self._labels = Labels()
        self._series: Series | None = None
        self._rejected: tuple[tuple[int, int], str] = ((-1, -1), "")  # (count, sum) and the family's text

    def _db(self) -> store.Db:
        if self._conn is None:
            self._conn = store.connect(self.db_path, readonly=True)
            if store.dialect(self._conn) == "sqlite":
                # The file mapped rather than read: a scrape reads every latest row, and in WAL mode the writer's
                # every commit empties this connection's page cache, so each scrape would read the file anew.
                self._conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        return self._conn

    def reconnect(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    def render(self) -> str:
        """The gateway's families in the Prometheus text format (version 0.0.4)."""
        with self._lock:
            return "".join(self._render(self._db(), self.clock()))

    def _render(self, db: store.Db, now: float) -> Iterator[str]:
        agents = store.agents(db)
        labels = self._labels
        labels.next_scrape()
        yield from self._readings(db, now, agents, labels)
        yield from self._alarms(db, labels)
        rooms = [(labels.agent(a["agent"]), a) for a in agents]
        yield family(
            "examwatch_gateway_agent_up",
            "1 while the room's agent is online",
            "gauge",
            ((r, 1 if a["status"] == "online" else 0) for r, a in rooms),
        )
        yield family(
            "examwatch_gateway_agent_last_seen_age_seconds",
            "seconds since the agent was last heard",
            "gauge",
            ((r, max(0.0, now - a["last_seen"])) for r, a in rooms if a["last_seen"] is not None),
        )
        yield family(
            "examwatch_gateway_agent_clock_skew_seconds",
            "agent clock minus gateway clock",
            "gauge",
            ((r, a["skew"]) for r, a in rooms if a["skew"] is not None),
        )
        yield family(
            "examwatch_gateway_seq_missing",
            "sequence numbers not (yet) received from the agent",
            "gauge",
            ((r, a["missing"]) for r, a in rooms),
        )
        yield family(
            "examwatch_gateway_agent_phase",
            "1 for the exam phase the room is in (the gateway's schedule, else the agent's)",
            "gauge",
            (
                (f'phase="{name}",{r}', 1 if name == a["phase"] else 0)
                for r, a in rooms
                if a["phase"] is not None
                for name in PHASES
            ),
        )
        yield from self._counters(labels)

    def _readings(self, db: store.Db, now: float, agents: list[dict[str, Any]], labels: Labels) -> Iterator[str]:
        with store.snapshot(db):
            shape = (store.latest_count(db), store.mark(db, "devices"))
            series = self._series
            if series is None or series.shape != shape:
                rows = store.latest(db)
                series = self._series = Series(shape, rows, store.device_kinds(db), labels)
            else:  # the keys are the last full read's: only values and times
                rows = store.latest_values(db)
        values, times = [row[-2] for row in rows], [row[-1] for row in rows]
        texts = numbers(values)
        for head, rows_of, lines in series.families:
            yield head + "\n".join(map(add, lines, [texts[i] for i in rows_of])) + "\n"
        # The age on the room's own clock (its reading times are), so a room with a skewed clock ages right too.
        room_now = {a["agent"]: now + (a["skew"] or 0.0) for a in agents}
        ages = [
            f"{line}{max(0.0, room_now.get(agent, now) - max(times[start:end])):.3f}\n"
            for agent, start, end, line in series.devices
        ]
        yield header(AGE, "seconds since the device's newest reading, by the room's clock", "gauge") + "".join(ages)

    def _alarms(self, db: store.Db, labels: Labels) -> Iterator[str]:
        active: dict[str, int] = {}  # two devices with the same rule: one series per bounded label set
        for a in store.alarms(db, state="active", limit=100_000):
            site, room, rule = escape(a["site"]), escape(a["room"]), escape(a["rule"])
            active[f'level="{a["level"]}",room="{room}",rule="{rule}",site="{site}"'] = 1
        yield family("examwatch_alarm_active", "1 while an alarm fires", "gauge", active.items())
        counts: dict[str, int] = {}
        for i in store.incidents(db, state="open", limit=100_000):
            k = f'class="{escape(i["fault_class"])}",level="{i["level"]}",site="{escape(i["site"])}"'
            counts[k] = counts.get(k, 0) + 1
        yield family(
            "examwatch_gateway_incidents_open", "open cross-room incidents by fault class", "gauge", counts.items()
        )

    def _counters(self, labels: Labels) -> Iterator[str]:
        s = self.stats
        yield family(
            "examwatch_gateway_messages",
            "messages accepted, by kind",
            "counter",
            ((f'kind="{escape(kind)}"', n) for kind, n in list(s.messages.items())),
        )
        yield family("examwatch_gateway_readings", "readings stored", "counter", [("", s.readings)])
        yield family(
            "examwatch_gateway_duplicates", "messages received again and dropped", "counter", [("", s.duplicates)]
        )
        # Every room's counters at 0 from the start (8 series a room) and seldom a change: written again only
        # when a count moved. Counters only grow, so their number and sum tell whether any did.
        rejected = list(s.rejected.items())
        mark = (len(rejected), sum(n for _, n in rejected))
        if self._rejected[0] != mark:
            self._rejected = (
                mark,
                family(
                    "examwatch_gateway_rejected",
                    "messages rejected, by reason and claimed room",
                    "counter",
                    (
                        (f'reason="{escape(reason)}",{labels.agent(agent)}', n)
                        for (reason, agent), n in rejected  # agent "" for a rejection naming no room
                    ),
                ),
            )
        yield self._rejected[1]
        if self.broker is not None:
            yield family(
                "examwatch_gateway_broker_connected",
                "1 while connected and subscribed to the county broker; at 0 no room is heard or judged",
                "gauge",
                [("", 1 if self.broker.connected else 0)],
            )
            yield family(
                "examwatch_gateway_broker_connect_failures",
                "attempts to reach the county broker that failed (unreachable or refused)",
                "counter",
                [("", self.broker.connect_failures)],
            )
            yield family(
                "examwatch_gateway_broker_unacknowledged",
                "messages received from the broker and not yet stored; staying in the thousands: the gateway is "
                "behind (the broker queues the rest for it)",
                "gauge",
                [("", self.broker.unacked)],
            )
        if self.api is not None:
            yield family(
                "examwatch_gateway_api_refused",
                "API requests refused, by reason",
                "counter",
                ((f'reason="{escape(reason)}"', n) for reason, n in list(self.api.refused.items())),
            )


class Exposition:
    """The page Prometheus scrapes: the gateway's families, then any prometheus_client collectors'."""

    def __init__(self, gateway: GatewayCollector, *collectors: Any) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry()
        for collector in collectors:
            self.registry.register(collector)

        self.failing = False

    def page(self) -> bytes | None:
        """The page, or None when it cannot be made (a database that cannot be read): this scrape fails, Prometheus
        shows the target down, the next scrape tries again on a new connection. Logged once until it works again."""
        try:
            page = self.gateway.render().encode() + generate_latest(self.registry)
        except Exception as err:
            self.gateway.reconnect()
            if not self.failing:
                log.warning("scrape_failed", error=repr(err)[:300])
            self.failing = True
            return None
        if self.failing:
            log.info("scrape_recovered")
        self.failing = False
        return page


def serve(listen: str, gateway: GatewayCollector, *collectors: Any) -> tuple[endpoint.Server, threading.Thread]:
    """Start the endpoint on ``host:port`` (127.0.0.1 unless configured); returns (server, thread)."""
    return endpoint.serve(listen, Exposition(gateway, *collectors).page)


stop = endpoint.stop
