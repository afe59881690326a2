"""A province over two counties, all real processes on loopback: the figures by Prometheus federation,
the rooms' alarms and statuses by mosquitto bridges into a provincial gateway in read-only aggregate mode.

Each county: its broker, its gateway, its Prometheus (deploy/prometheus/county.yml). The province: a
Prometheus federating both (deploy/prometheus/province.yml), a broker both county brokers bridge into
(deploy/mosquitto/province-bridge.conf), and a gateway with ``mode = "aggregate"`` whose roster is the two
counties' keys files put together. The rooms are played by signed messages published to their county.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from examwatch.kernel import wire
from examwatch.kernel.model import AlarmEvent, Reading
from examwatch.simulators.broker import Mosquitto
from tests.support import door_opened, until
from tests.support.gateway import GatewayProc, key_hex
from tests.support.prometheus import PrometheusProc
from tests.test_gateway_ingest import alarm
from tests.test_grafana import NAME, dashboard, panels

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
COUNTIES = {"county-a": ["a1/r1", "a1/r2"], "county-b": ["b1/r1", "b1/r2", "b2/r1"]}
EPOCH = 11


def prometheus_example(name: str, **replace: str) -> str:
    """An example config of deploy/prometheus/, run as-is but for ports, names and a 1 s interval."""
    text = (ROOT / "deploy" / "prometheus" / name).read_text(encoding="utf-8")
    text = re.sub(r"(scrape_interval|evaluation_interval|scrape_timeout): \d+s", r"\1: 1s", text)
    for old, new in replace.items():
        assert old in text, (name, old)
        text = text.replace(old, new)
    return text


def bridge_example(province_port: int, county: str) -> str:
    """deploy/mosquitto/province-bridge.conf for a test broker: loopback, no TLS, no login."""
    lines = []
    for line in (ROOT / "deploy" / "mosquitto" / "province-bridge.conf").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#") or line.split()[0] in ("bridge_cafile", "remote_password"):
            continue
        lines.append(
            line.replace("province.example:8883", f"127.0.0.1:{province_port}").replace("example-county", county)
        )
    return "\n".join(lines) + "\n"


class Room:
    """A room's agent as the county sees it: signed status, readings and alarms on the room's topics."""

    def __init__(self, agent: str, client: mqtt.Client) -> None:
        self.agent, self.client, self.seq = agent, client, 0
        self.key = bytes.fromhex(key_hex(agent))

    def send(self, kind: str, body: bytes, retain: bool = False) -> None:
        seq = 0 if kind == "status" else self.seq + 1
        self.seq = max(self.seq, seq)
        payload = wire.encode(self.key, self.agent, seq, time.time(), kind, body, epoch=EPOCH)
        self.client.publish(wire.topic(self.agent, kind), payload, qos=1, retain=retain).wait_for_publish(5)

    def online(self) -> None:
        status = wire.Status(state="online", kinds={"rec1": "recorder"}, boot=1, conn=1, n=1)
        self.send("status", msgspec.json.encode(status), retain=True)
        self.send("readings", msgspec.json.encode([Reading("rec1", "battery_percent", 40.0, time.time())]))

    def raise_alarm(self, ev: AlarmEvent) -> None:
        self.send("alarms", msgspec.json.encode(ev))


def stop_or_kill(gw: GatewayProc) -> None:
    """Stop the gateway; one that does not stop in time is killed (and the test fails)."""
    try:
        gw.stop()
    except subprocess.TimeoutExpired:
        if gw.proc is not None:
            gw.proc.kill()
        raise


def subscribed(gw: GatewayProc) -> bool:
    return "examwatch_gateway_broker_connected 1" in gw.metrics()


def rejected(gw: GatewayProc) -> float:
    families = text_string_to_metric_families(gw.metrics())
    return sum(s.value for f in families if f.name == "examwatch_gateway_rejected" for s in f.samples)


@dataclass
class Province:
    counties: dict[str, PrometheusProc]
    prometheus: PrometheusProc
    gateway: GatewayProc
    county_gateways: dict[str, GatewayProc]
    broker: Mosquitto  # the provincial one
    rooms: dict[str, Room]


@pytest.fixture(scope="module")
def province(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Province]:
    work = tmp_path_factory.mktemp("province")
    stoppers: list[Any] = []
    try:
        # the province first: the county brokers' bridges dial it
        broker = Mosquitto(work / "province-broker")
        broker.start()
        stoppers.append(broker.stop)
        keys = work / "province.keys"  # the counties' roster files put together (docs/province.md)
        keys.write_text("".join(f"{a} {key_hex(a)}\n" for rooms in COUNTIES.values() for a in rooms))
        os.chmod(keys, 0o600)
        gateway = GatewayProc(work / "province", broker.port, [], extra=f'[security]\nkeys_file = "{keys}"', token="")
        gateway.config.write_text(
            gateway.config.read_text().replace("[gateway]\n", '[gateway]\nmode = "aggregate"\n', 1)
        )
        gateway.start()
        stoppers.append(lambda: stop_or_kill(gateway))
        until(lambda: subscribed(gateway), 20, "the provincial gateway subscribed")

        county_proms, county_gateways, targets = {}, {}, []
        room_of: dict[str, Room] = {}
        for county, rooms in COUNTIES.items():
            cb = Mosquitto(work / county / "broker")
            cb.conf.write_text(cb.conf.read_text() + bridge_example(broker.port, county))
            cb.start()
            stoppers.append(cb.stop)
            gw = GatewayProc(work / county, cb.port, rooms)
            gw.start()
            stoppers.append(lambda gw=gw: stop_or_kill(gw))
            county_gateways[county] = gw
            prom = PrometheusProc(
                work / county / "prometheus",
                prometheus_example(
                    "county.yml", **{"example-county": county, "127.0.0.1:9109": f"127.0.0.1:{gw.metrics_port}"}
                ),
            )
            prom.check_config()
            prom.start()
            stoppers.append(prom.stop)
            county_proms[county] = prom
            targets.append(f"127.0.0.1:{prom.port}")

            client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            client.connect("127.0.0.1", cb.port)
            client.loop_start()
            stoppers.append(client.loop_stop)
            until(lambda gw=gw: subscribed(gw), 20, f"the {county} gateway subscribed")
            for agent in rooms:
                room_of[agent] = Room(agent, client)
                room_of[agent].online()

        prom = PrometheusProc(
            work / "province-prometheus",
            prometheus_example(
                "province.yml",
                **{'"county-a.example:9090", "county-b.example:9090"': ", ".join(f'"{t}"' for t in targets)},
            ),
        )
        prom.check_config()
        prom.start()
        stoppers.append(prom.stop)

        for agent in ("a1/r1", "b1/r1", "b2/r1"):
            room_of[agent].raise_alarm(alarm(agent, "raised", time.time(), time.time(), rule="recorder_battery_low"))
        room_of["b1/r2"].raise_alarm(door_opened("b1", "r2", time.time()))
        yield Province(county_proms, prom, gateway, county_gateways, broker, room_of)
    finally:
        failed: list[BaseException] = []
        for stop in reversed(stoppers):  # every one, even after one failed: no process left behind
            try:
                stop()
            except Exception as err:  # e.g. a process that does not stop in time
                failed.append(err)
        if failed:
            raise failed[0]


def test_the_example_configs_are_valid() -> None:
    for name in ("county.yml", "province.yml"):
        path = ROOT / "deploy" / "prometheus" / name
        check = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_province_queries_every_countys_figures(province: Province) -> None:
    p = province.prometheus
    rooms = 'count by (county) (examwatch_gateway_agent_up{job="examwatch-gateway"} == 1)'
    want = {county: float(len(agents)) for county, agents in COUNTIES.items()}
    until(lambda: p.by("county", rooms) == want, 40, lambda: f"rooms online by county: {p.by('county', rooms)}")
    level1 = 'sum by (county) (examwatch_alarm_active{level="1"})'
    until(
        lambda: p.by("county", level1) == {"county-a": 1.0, "county-b": 2.0},
        30,
        lambda: f"level-1 alarms by county: {p.by('county', level1)}",
    )
    assert p.by("county", 'sum by (county) (examwatch_alarm_active{level="2"})') == {"county-b": 1.0}
    # the federated series keep the county's own labels (honor_labels): its job, its sites and rooms
    sites = {(s["metric"]["county"], s["metric"]["site"]) for s in p.result("examwatch_gateway_agent_up")}
    assert sites == {("county-a", "a1"), ("county-b", "b1"), ("county-b", "b2")}
    # the readings stay in the county: there, not here
    assert province.counties["county-a"].result("examwatch_battery_percent")
    assert p.result("examwatch_battery_percent") == []
    assert p.result("examwatch_device_reading_age_seconds") == []


def test_the_provincial_gateway_shows_both_counties_and_takes_no_acknowledgement(province: Province) -> None:
    gw = province.gateway
    everyone = sorted(a for rooms in COUNTIES.values() for a in rooms)

    def online() -> list[str]:
        return sorted(a["agent"] for a in gw.get("/api/v1/agents")["agents"] if a["status"] == "online")

    until(lambda: online() == everyone, 30, lambda: f"rooms online at the province: {online()}")

    def active() -> set[tuple[str, str, int]]:
        return {(a["site"], a["room"], a["level"]) for a in gw.get("/api/v1/alarms?state=active")["alarms"]}

    want = {("a1", "r1", 1), ("b1", "r1", 1), ("b2", "r1", 1), ("b1", "r2", 2)}
    until(lambda: active() == want, 30, lambda: f"alarms at the province: {active()}")
    # the alarms came through the bridges as the rooms signed them: none refused, the readings never came
    assert rejected(gw) == 0
    assert gw.query("SELECT COUNT(*) FROM readings") == [(0,)]

    [one] = [a for a in gw.get("/api/v1/alarms?state=active")["alarms"] if a["site"] == "a1"]
    status, body = gw.post("/api/v1/ack", {"alarm": one["id"], "who": "省值班", "note": "看到"}, "x")
    assert status == 403 and "read-only" in body["error"]
    status, _ = gw.post("/api/v1/ack", {"alarm": one["id"], "who": "省值班", "note": "看到"}, None)
    assert status == 403
    status, _ = gw.post("/desk/api/close", {"id": "a1/network/1", "note": "x"}, None)  # the desk's changes too
    assert status == 403
    assert gw.get("/api/v1/alarms?state=active")["alarms"][0]["acked_by"] is None
    assert 'examwatch_gateway_api_refused_total{reason="read_only"} 3.0' in gw.metrics()
    # the county still acknowledges its own
    county = province.county_gateways["county-a"]
    status, _ = county.post("/api/v1/ack", {"alarm": one["id"], "who": "县值班", "note": "处理中"}, "t0ken")
    assert status == 200


# What Grafana would put in for the province dashboard's variables (All: the variables' allValue).
BOARD_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$job": "examwatch-gateway", "$county": ".*", "$site": ".*"}


def board_query(expr: str, **values: str) -> str:
    chosen = {**BOARD_VARS, **{f"${k}": v for k, v in values.items()}}
    for var, value in sorted(chosen.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


def test_the_province_dashboard_answers_by_county(province: Province) -> None:
    p = province.prometheus
    targets = {(panel["title"], t["refId"]): t["expr"] for panel in panels("province") for t in panel["targets"]}
    online = board_query(targets[("在线考场", "A")])
    until(lambda: p.by("county", online) == {"county-a": 2.0, "county-b": 3.0}, 40, lambda: str(p.by("county", online)))
    errors = {k: r.get("error") for k, e in targets.items() if (r := p.query(board_query(e)))["status"] != "success"}
    assert errors == {}

    level2 = {
        (s["metric"]["county"], s["metric"]["site"], s["metric"]["room"])
        for s in p.result(board_query(targets[("二级及以上告警", "A")]))
    }
    assert level2 == {("county-b", "b1", "r2")}
    by_site = {
        (s["metric"]["county"], s["metric"]["site"], s["metric"]["level"]): float(s["value"][1])
        for s in p.result(board_query(targets[("各考点告警（按级别）", "A")]))
    }
    assert by_site == {
        ("county-a", "a1", "1"): 1.0,
        ("county-b", "b1", "1"): 1.0,
        ("county-b", "b1", "2"): 1.0,
        ("county-b", "b2", "1"): 1.0,
    }
    # one county chosen: the panels narrow to it
    assert p.by("county", board_query(targets[("在线考场", "A")], county="county-a")) == {"county-a": 2.0}
    rejected = board_query(targets[("拒收消息", "A")])  # increase() needs two samples of each county
    until(
        lambda: p.by("county", rejected) == {"county-a": 0.0, "county-b": 0.0},
        20,
        lambda: str(p.by("county", rejected)),
    )

    # the template variables, as Grafana asks for them (label_values -> /api/v1/label/<label>/values)
    want = {"job": ["examwatch-gateway"], "county": ["county-a", "county-b"], "site": ["b1", "b2"]}
    for var in dashboard("province")["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
        assert m, var["query"]
        selector = board_query(m.group(1), county="county-b")
        got = p.get(f"/api/v1/label/{m.group(2)}/values", {"match[]": selector})
        assert sorted(got["data"]) == want[var["name"]], (var["name"], got)


def test_the_province_dashboard_names_only_federated_families(province: Province) -> None:
    """A family the province does not federate (a reading) would leave its panel empty for good."""
    federated = re.search(r"__name__=~\"(.+)\"", (ROOT / "deploy/prometheus/province.yml").read_text()).group(1)
    exported = {f.name for f in text_string_to_metric_families(province.county_gateways["county-a"].metrics())}
    names = {n for panel in panels("province") for t in panel["targets"] for n in NAME.findall(t["expr"])}
    assert names
    for name in names:
        assert re.fullmatch(federated, name), name
        assert re.sub(r"_total$", "", name) in exported, name


def test_alarms_raised_while_the_province_is_unreachable_arrive_when_it_is_back(province: Province) -> None:
    """The bridges' sessions: the county broker queues what its rooms raise and hands it on afterwards."""
    gw, room = province.gateway, province.rooms["a1/r2"]
    province.broker.stop()
    room.raise_alarm(door_opened("a1", "r2", time.time(), alarm_id="a1/r2/secrecy_door_open/door1/7"))
    time.sleep(2)  # raised and queued in county A while the province is down
    province.broker.start()

    def seen() -> bool:
        return any(a["room"] == "r2" and a["site"] == "a1" for a in gw.get("/api/v1/alarms?state=active")["alarms"])

    until(seen, 90, "the alarm raised during the outage, at the province")  # the bridge retries after 5..60 s
