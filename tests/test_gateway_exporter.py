"""The gateway's exporter on a real SQLite file fed by the real ingest: what a scrape shows after given messages."""

from __future__ import annotations

import math
import subprocess
import urllib.error
import urllib.request
from datetime import datetime
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from structlog.testing import capture_logs

from examwatch.gateway import store
from examwatch.gateway.desk import views
from examwatch.gateway.exporter import MMAP_BYTES, GatewayCollector, serve, stop
from examwatch.gateway.ingest import Engine, Message
from examwatch.gateway.ledger import ROOM_REASONS, ROOMLESS_REASONS, Stats
from examwatch.kernel import wire
from examwatch.kernel.exposition import escape, family, go_float, number, numbers
from examwatch.kernel.model import Reading
from examwatch.rules.config import Schedule, Window
from examwatch.rules.schedule import PHASES
from tests.support import until
from tests.support.prometheus import PrometheusProc
from tests.test_gateway_ingest import KEYS, T0, alarm, alarm_msg, make, status_msg


def scrape(e: Engine, tmp_path, now: float) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Family name -> {sorted labels: value}, through the text format Prometheus reads."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(
        GatewayCollector(str(tmp_path / "gw.db"), e.stats, clock=lambda: now).render()
    ):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def helps(e: Engine, tmp_path) -> dict[str, str]:
    text = GatewayCollector(str(tmp_path / "gw.db"), e.stats, clock=lambda: T0).render()
    return {fam.name: fam.documentation for fam in text_string_to_metric_families(text)}


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def kinds_status(agent: str, kinds: dict[str, str] | None, ts: float, received: float, n: int = 1) -> Message:
    body = msgspec.json.encode(wire.Status(state="online", kinds=kinds, boot=1, conn=1, n=n))
    return Message(
        wire.topic(agent, "status"), wire.encode(KEYS[agent], agent, 0, ts, "status", body, epoch=1), False, received
    )


def readings(agent: str, seq: int, items: list[Reading], received: float) -> Message:
    body = msgspec.json.encode(items)
    return Message(
        wire.topic(agent, "readings"),
        wire.encode(KEYS[agent], agent, seq, received, "readings", body, epoch=1),
        False,
        received,
    )


def test_readings_carry_kind_unit_and_age_by_the_rooms_clock(tmp_path):
    e = make(tmp_path)
    # 101 names its devices' kinds (one of them not a kind at all); 102 is an older agent that names none.
    e.ingest(
        [
            kinds_status("s1/101", {"ups1": "ups", "sw1": "switch", "odd": "toaster"}, T0, T0),
            kinds_status("s1/102", None, T0, T0),
        ],
        T0,
    )
    e.ingest(
        [
            readings(
                "s1/101",
                1,
                [
                    Reading("ups1", "ups_charge_percent", 80.0, T0 - 10),
                    Reading("ups1", "power_on_battery", 0.0, T0 - 40),  # read earlier: the device's age is its newest
                    Reading("sw1/port3", "link_up", 1.0, T0 - 20),
                    Reading("odd", "door_open", 0.0, T0 - 30),
                ],
                T0,
            ),
            readings("s1/102", 1, [Reading("noise", "noise_db", 55.0, T0 - 5)], T0),
        ],
        T0,
    )
    got = scrape(e, tmp_path, T0 + 100)
    assert got["examwatch_ups_charge_percent"] == {labels(site="s1", room="101", device="ups1", kind="ups"): 80.0}
    assert got["examwatch_link_up"] == {labels(site="s1", room="101", device="sw1/port3", kind="switch"): 1.0}
    assert got["examwatch_door_open"] == {labels(site="s1", room="101", device="odd", kind=""): 0.0}
    assert got["examwatch_noise_db"] == {labels(site="s1", room="102", device="noise", kind=""): 55.0}
    assert got["examwatch_device_reading_age_seconds"] == {
        labels(site="s1", room="101", device="ups1", kind="ups"): 110.0,
        labels(site="s1", room="101", device="sw1/port3", kind="switch"): 120.0,
        labels(site="s1", room="101", device="odd", kind=""): 130.0,
        labels(site="s1", room="102", device="noise", kind=""): 105.0,
    }
    h = helps(e, tmp_path)
    assert h["examwatch_ups_charge_percent"] == "UPS battery charge (percent)"
    assert h["examwatch_link_up"] == "1 while the link or port is up (bool)"

    # The room's clock runs 30 s ahead: its readings are stamped by it, and their age is still true.
    e.ingest([kinds_status("s1/103", {"ups1": "ups"}, T0 + 130, T0 + 100)], T0 + 100)
    e.ingest([readings("s1/103", 1, [Reading("ups1", "ups_charge_percent", 90.0, T0 + 125)], T0 + 100)], T0 + 100)
    age = scrape(e, tmp_path, T0 + 100)["examwatch_device_reading_age_seconds"]
    assert age[labels(site="s1", room="103", device="ups1", kind="ups")] == pytest.approx(5.0)

    # A room that renames its devices replaces its kinds; they survive a gateway restart.
    e.ingest([kinds_status("s1/101", {"ups1": "ups"}, T0 + 200, T0 + 200, n=2)], T0 + 200)
    e.conn.close()
    e = make(tmp_path)
    assert e.agents["s1/101"].kinds == {"ups1": "ups"}
    assert store.device_kinds(e.conn)["s1/101"] == {"ups1": "ups"}
    got = scrape(e, tmp_path, T0 + 200)
    assert got["examwatch_link_up"] == {labels(site="s1", room="101", device="sw1/port3", kind=""): 1.0}


def test_counters_start_at_zero_for_every_roster_room_and_reason(tmp_path):
    e = make(tmp_path)
    got = scrape(e, tmp_path, T0)
    rejected = got["examwatch_gateway_rejected_total"]
    want = {labels(reason=r, site="s1", room=a.split("/")[1]): 0.0 for a in KEYS for r in ROOM_REASONS}
    want |= {labels(reason=r, site="", room=""): 0.0 for r in ROOMLESS_REASONS}
    assert rejected == want
    assert got["examwatch_gateway_messages_total"] == {labels(kind=k): 0.0 for k in ("readings", "alarms", "status")}
    # a room's first forged message: its series goes from 0 to 1, which increase() sees
    good = readings("s1/104", 1, [Reading("ups1", "ups_charge_percent", 1.0, T0)], T0)
    forged = msgspec.structs.replace(wire.decode(good.payload), sig="00" * 32)
    e.ingest([good._replace(payload=msgspec.json.encode(forged))], T0)
    rejected = scrape(e, tmp_path, T0)["examwatch_gateway_rejected_total"]
    assert rejected[labels(reason="forged", site="s1", room="104")] == 1.0
    assert sum(rejected.values()) == 1.0 and len(rejected) == len(want)


def test_open_incidents_carry_their_fault_class(tmp_path):
    e = make(tmp_path)
    e.ingest(
        [
            alarm_msg("s1/101", 1, alarm("s1/101", "raised", T0, T0), T0),
            alarm_msg("s1/102", 1, alarm("s1/102", "raised", T0 + 5, T0 + 5), T0 + 5),
            alarm_msg("s1/103", 1, alarm("s1/103", "raised", T0, T0, rule="noise_high"), T0),
            alarm_msg("s1/104", 1, alarm("s1/104", "raised", T0 + 1, T0 + 1, rule="noise_high"), T0 + 1),
        ],
        T0 + 5,
    )
    got = scrape(e, tmp_path, T0 + 10)["examwatch_gateway_incidents_open"]
    assert got == {
        labels(site="s1", level="2", **{"class": "network"}): 1.0,
        labels(site="s1", level="2", **{"class": "noise"}): 1.0,
    }


def test_phase_from_the_agents_report_or_the_gateways_schedule(tmp_path):
    e = make(tmp_path)
    e.ingest([status_msg("s1/101", "online", T0, T0, phase="during"), status_msg("s1/102", "online", T0, T0)], T0)
    phase = scrape(e, tmp_path, T0)["examwatch_gateway_agent_phase"]
    assert phase == {labels(site="s1", room="101", phase=p): float(p == "during") for p in PHASES}  # 102 said none
    # 101's last will, set when it connected before the session, carries that old phase: the session goes on
    e.ingest([status_msg("s1/101", "offline", T0 - 3000, T0 + 5, phase="before")], T0 + 5)
    phase = scrape(e, tmp_path, T0 + 5)["examwatch_gateway_agent_phase"]
    assert phase[labels(site="s1", room="101", phase="during")] == 1.0
    [offline] = store.alarms(e.conn, state="active")
    assert (offline["rule"], offline["level"]) == ("agent_offline", 2)
    e.conn.close()

    tz = ZoneInfo("Asia/Shanghai")
    session = Window(
        name="数学",
        start=datetime.fromtimestamp(T0 - 3600, tz).replace(tzinfo=None),
        end=datetime.fromtimestamp(T0 + 60, tz).replace(tzinfo=None),
    )
    e = make(tmp_path, schedule=Schedule(sessions=[session], after_hours=1.0))
    e.ingest([status_msg("s1/102", "online", T0 + 1, T0 + 1, phase="idle")], T0 + 1)  # the schedule wins
    e.tick(T0 + 1, None)
    phase = scrape(e, tmp_path, T0 + 1)["examwatch_gateway_agent_phase"]
    assert {k for k, v in phase.items() if v == 1} == {
        labels(site="s1", room=r, phase="during") for r in ("101", "102")
    }
    e.tick(T0 + 120, None)  # the session is over; every room heard of follows at the next tick
    phase = scrape(e, tmp_path, T0 + 120)["examwatch_gateway_agent_phase"]
    assert {k for k, v in phase.items() if v == 1} == {labels(site="s1", room=r, phase="after") for r in ("101", "102")}
    assert len(phase) == 2 * len(PHASES)  # rooms never heard of have no phase series


# Device and rule names are the agents' own (any text up to 128 characters): Chinese, quotes, backslashes,
# line feeds all reach the exporter and must come out exactly as they went in.
HOSTILE = ['录像机"一号"', "c:\\rec\\", "第一行\n第二行", '\\"', "plain"]


def hostile_engine(tmp_path) -> Engine:
    e = make(tmp_path)
    e.ingest([kinds_status("s1/101", {name: "recorder" for name in HOSTILE}, T0, T0)], T0)
    body = [Reading(name, "battery_percent", 50.0 + i, T0 - i) for i, name in enumerate(HOSTILE)]
    e.ingest([readings("s1/101", 1, body, T0)], T0)
    ev = msgspec.structs.replace(alarm("s1/101", "raised", T0, T0), rule='规则"\\\n', id="s1/101/x/1")
    e.ingest([alarm_msg("s1/101", 2, ev, T0)], T0)
    return e


def test_label_values_are_escaped_exactly(tmp_path):
    e = hostile_engine(tmp_path)
    text = GatewayCollector(str(tmp_path / "gw.db"), e.stats, clock=lambda: T0 + 10).render()
    # the text format's three escapes, byte for byte; Chinese as it is
    for name, escaped in [
        ('录像机"一号"', r"录像机\"一号\""),
        ("c:\\rec\\", r"c:\\rec\\"),
        ("第一行\n第二行", r"第一行\n第二行"),
        ('\\"', r"\\\""),
    ]:
        assert f'examwatch_battery_percent{{device="{escaped}",kind="recorder",room="101",site="s1"}}' in text, name
    assert r'rule="规则\"\\\n"' in text
    assert "\n\n" not in text and text.endswith("\n")

    got = scrape(e, tmp_path, T0 + 10)  # through prometheus_client's parser: the same names come back
    assert got["examwatch_battery_percent"] == {
        labels(site="s1", room="101", device=name, kind="recorder"): 50.0 + i for i, name in enumerate(HOSTILE)
    }
    assert got["examwatch_device_reading_age_seconds"] == {
        labels(site="s1", room="101", device=name, kind="recorder"): 10.0 + i for i, name in enumerate(HOSTILE)
    }
    assert got["examwatch_alarm_active"] == {labels(site="s1", room="101", rule='规则"\\\n', level="1"): 1.0}

    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


NUMBERS = [0.0, -0.0, 0.1, 0.1 + 0.2, -2.5, 1e-7, 999_999.9, 1e6, 1_234_567.0, 1e300, -1e300, math.inf, -math.inf]


def test_numbers_are_written_as_prometheus_client_writes_them():
    assert [number(v) for v in NUMBERS] == [floatToGoString(v) for v in NUMBERS]
    assert number(math.nan) == "NaN"
    assert [number(v) for v in (1e6, 1_234_567.0, -math.inf)] == ["1e+06", "1.234567e+06", "-Inf"]


# Every kind of float the fast path and its fallback meet: any double, the bounds of the fast range and their
# neighbours, values with few digits (as most readings have) and with 17 (ratios, random sensors).
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-4, max_value=1e6),
    st.sampled_from([1e-4, math.nextafter(1e-4, 0), math.nextafter(1e6, 0), 1e6, 5e-324, -5e-324, 1e21, 1e16]),
    st.decimals(min_value=-1e7, max_value=1e7, places=3, allow_nan=False).map(float),
    st.integers(min_value=-(2**53), max_value=2**53).map(float),
)


@settings(max_examples=500)
@given(st.lists(FLOATS, max_size=40))
def test_a_pages_numbers_are_written_as_prometheus_client_writes_each(values):
    """The fast path for a page's values (one msgspec call) spells every value as floatToGoString does."""
    assert numbers(values) == [floatToGoString(v) for v in values]


def test_numbers_of_the_catalogs_edge_cases_and_of_none():
    assert numbers([*NUMBERS, math.nan]) == [floatToGoString(v) for v in [*NUMBERS, math.nan]]
    assert numbers([]) == []
    assert numbers([0.25, 1e-5, 2_000_000.5]) == ["0.25", "1e-05", "2.0000005e+06"]


@pytest.mark.parametrize("kind", ["gauge", "counter"])
def test_a_family_is_byte_for_byte_what_prometheus_client_writes(kind):
    """The page is the one the library wrote before (label names in order, its escapes and numbers)."""
    values = [*HOSTILE, "", '考场\\"\n\n', "\t tab", "ünïcode 🙂"]
    samples = [(site, room, v) for site in values for room in values[:3] for v in NUMBERS[: len(values)]]
    cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
    fam = cls("examwatch_x", 'help with "quotes", \\ and\na line feed', labels=["room", "site"])
    for site, room, v in samples:
        fam.add_metric([room, site], v)
    registry = CollectorRegistry()
    registry.register(Static([fam]))
    mine = family(
        "examwatch_x",
        'help with "quotes", \\ and\na line feed',
        kind,
        [(f'room="{escape(room)}",site="{escape(site)}"', v) for site, room, v in samples],
    )
    assert mine == generate_latest(registry).decode()


class Static:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def test_a_real_prometheus_scrapes_the_endpoint(tmp_path):
    """The served page, gzipped as Prometheus asks, with another collector's families after the gateway's."""
    e = hostile_engine(tmp_path)
    extra = Counter("examwatch_notify_sent", "messages a channel confirmed", ["channel"], registry=None)
    extra.labels("值班群").inc(3)
    server, _ = serve("127.0.0.1:0", GatewayCollector(str(tmp_path / "gw.db"), e.stats), extra)
    prom = PrometheusProc(
        tmp_path / "prometheus",
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gw\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.server_address[1]}']\n",
    )
    prom.start()
    try:
        until(lambda: prom.result("examwatch_battery_percent"), 30, "Prometheus scraped the gateway")
        got = prom.by("device", "examwatch_battery_percent")
        assert got == {name: 50.0 + i for i, name in enumerate(HOSTILE)}
        assert list(prom.by("rule", "examwatch_alarm_active")) == ['规则"\\\n']
        assert prom.by("channel", "examwatch_notify_sent_total") == {"值班群": 3.0}
        # every series on the page was taken, none dropped as malformed
        page = server.page().decode()
        series = sum(1 for line in page.splitlines() if not line.startswith("#"))
        assert prom.by("job", "scrape_samples_scraped") == {"gw": float(series)}
    finally:
        prom.stop()
        stop(server)


def test_a_scrape_that_cannot_read_the_database_fails_and_the_next_one_recovers(tmp_path):
    gw = GatewayCollector(str(tmp_path / "gw.db"), Stats())  # no database yet
    server, _ = serve("127.0.0.1:0", gw)
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        with capture_logs() as logs:
            for _ in range(2):  # failing each time, logged once
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(url, timeout=10)
                assert err.value.code == 500
            make(tmp_path)  # the gateway's database appears
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200 and "examwatch_gateway_agent_up" in r.read().decode()
        assert [e["event"] for e in logs if e["event"].startswith("scrape_")] == ["scrape_failed", "scrape_recovered"]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
        assert err.value.code == 404
    finally:
        stop(server)


def test_one_collector_follows_the_writer_as_the_database_grows(tmp_path):
    """The exporter keeps its connection (the file mapped) from scrape to scrape while the writer commits and the
    file grows: each scrape shows every room's newest values and none that were replaced."""
    e = make(tmp_path)
    gw = GatewayCollector(str(tmp_path / "gw.db"), e.stats, clock=lambda: T0 + 1000)
    assert gw._db().execute("PRAGMA mmap_size").fetchone()[0] == MMAP_BYTES
    seq = 0
    for round_ in range(1, 4):
        for agent in KEYS:
            for first in range(0, 200 * round_, 100):
                seq += 1
                items = [
                    Reading(f"ups{i}", "ups_charge_percent", round_ * 1000.0 + i / 8, T0 + round_)
                    for i in range(first, first + 100)
                ]
                e.ingest([readings(agent, seq, items, T0 + round_)], T0 + round_)
        got = {}
        for fam in text_string_to_metric_families(gw.render()):
            for s in fam.samples:
                if s.name == "examwatch_ups_charge_percent":
                    got[(s.labels["site"] + "/" + s.labels["room"], s.labels["device"])] = s.value
        assert got == {(agent, f"ups{i}"): round_ * 1000.0 + i / 8 for agent in KEYS for i in range(200 * round_)}


def test_a_kept_collector_writes_what_a_new_one_would_as_series_come_and_kinds_change(store_backend):
    """The exporter keeps its series' labels between scrapes and reads only values while the keys and kinds hold:
    after every kind of change (new values, a new metric of a device, a new device, a new room, kinds renamed by
    a status) its page is byte for byte a new collector's, which reads everything."""
    e = make(store_backend)
    clock = [T0]
    kept = GatewayCollector(store_backend, e.stats, clock=lambda: clock[0])

    def same() -> str:
        page = kept.render()
        assert page == GatewayCollector(store_backend, e.stats, clock=lambda: clock[0]).render()
        return page

    e.ingest([kinds_status("s1/101", {"ups1": "ups", "sw1": "switch"}, T0, T0)], T0)
    changes = [
        ("s1/101", [Reading("ups1", "ups_charge_percent", 80.0, T0), Reading("sw1/p1", "link_up", 1.0, T0)]),
        ("s1/101", [Reading("ups1", "ups_charge_percent", 70.0, T0 + 1), Reading("sw1/p1", "link_up", 0.0, T0 + 1)]),
        ("s1/101", [Reading("ups1", "power_on_battery", 1.0, T0 + 2)]),  # a new metric of a device
        ("s1/101", [Reading("sw1/p0", "link_up", 1.0, T0 + 3)]),  # a new device, sorted before the others
        ("s1/102", [Reading("noise", "noise_db", 55.0, T0 + 4)]),  # a new room
    ]
    pages = [same()]
    for seq, (agent, items) in enumerate(changes, start=1):
        clock[0] = T0 + seq
        e.ingest([readings(agent, seq, items, T0 + seq)], T0 + seq)
        pages.append(same())
    assert 'examwatch_ups_charge_percent{device="ups1",kind="ups",room="101",site="s1"} 70.0' in pages[2]
    assert 'examwatch_link_up{device="sw1/p0",kind="switch",room="101",site="s1"} 1.0' in pages[4]
    # the same keys, kinds renamed: every label of the room changes though no key did
    e.ingest([kinds_status("s1/101", {"ups1": "ups", "sw1": "link"}, T0 + 9, T0 + 9, n=2)], T0 + 9)
    assert 'examwatch_link_up{device="sw1/p0",kind="link",room="101",site="s1"} 1.0' in same()
    assert len(set(pages)) == len(pages)


def test_the_desks_room_view_shows_the_latest_readings(tmp_path):
    """The duty desk reads the same latest rows as the exporter (plain tuples since the exporter's rewrite)."""
    e = make(tmp_path)
    e.ingest([kinds_status("s1/101", {"ups1": "ups"}, T0, T0)], T0)
    e.ingest([readings("s1/101", 1, [Reading("ups1", "ups_charge_percent", 80.0, T0 - 10)], T0)], T0)
    e.ingest([readings("s1/102", 1, [Reading("noise", "noise_db", 55.0, T0 - 5)], T0)], T0)
    got = views.room(store.connect(tmp_path / "gw.db", readonly=True), "s1/101")
    assert got["devices"] == [
        {"device": "ups1", "kind": "ups", "readings": [{"metric": "ups_charge_percent", "value": 80.0, "ts": T0 - 10}]}
    ]


@given(st.floats())
def test_go_float_is_prometheus_clients_spelling_of_every_float(value):
    """The kernel's writer needs no prometheus_client: its Go-style numbers are the library's, any float."""
    assert go_float(value) == floatToGoString(value)
