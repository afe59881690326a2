"""A gateway that cannot reach its broker says so (log once per change, metrics) and judges no room meanwhile."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from examwatch.simulators.broker import CountyBroker, Mosquitto, free_port
from tests.support import until
from tests.support.gateway import AgentProc, GatewayProc, start

pytestmark = pytest.mark.integration


def sample(gw: GatewayProc, name: str) -> float | None:
    for family in text_string_to_metric_families(gw.metrics()):
        for s in family.samples:
            if s.name == name:
                return s.value
    return None


def failures(gw: GatewayProc) -> float:
    return sample(gw, "examwatch_gateway_broker_connect_failures_total") or 0.0


def status(gw: GatewayProc) -> str | None:
    rooms = gw.get("/api/v1/agents")["agents"]  # a room is listed once heard of
    return rooms[0]["status"] if rooms else None


def test_broker_unreachable_then_up_then_lost(procs, tmp_path):
    port = free_port()  # nothing listens here yet
    gw = GatewayProc(tmp_path, port, ["s1/101"], extra="[liveness]\nheartbeat_timeout = 2.0")
    start(procs, gw)
    until(lambda: failures(gw) >= 2, what="two failed attempts to reach the broker")
    assert sample(gw, "examwatch_gateway_broker_connected") == 0
    assert gw.log().count("gateway_broker_unreachable") == 1  # once per change, not once per retry

    broker = Mosquitto(tmp_path / "broker", port=port)
    broker.start()
    procs.append(broker)
    agent = AgentProc(tmp_path, "s1/101", port, heartbeat=0.5)
    start(procs, agent)
    until(lambda: sample(gw, "examwatch_gateway_broker_connected") == 1, what="connected metric")
    until(lambda: status(gw) == "online", what="room online")
    assert gw.log().count("gateway_broker_connected") == 1

    # Killed (a graceful stop would send every room's last will, which is news from the broker, not silence):
    # the gateway is blind now and must not take its own deafness for the rooms' silence.
    broker.proc.kill()
    broker.proc.wait()
    until(lambda: sample(gw, "examwatch_gateway_broker_connected") == 0, what="disconnected metric")
    lost_at = failures(gw)
    until(lambda: failures(gw) >= lost_at + 3, timeout=40, what="three more failed attempts (> heartbeat_timeout)")
    assert gw.get("/api/v1/alarms?state=active")["alarms"] == []  # no agent_offline while we cannot see
    assert status(gw) == "online"
    log = gw.log()
    assert log.count("gateway_broker_lost") == 1 and log.count("gateway_broker_unreachable") == 2

    broker.start()
    until(lambda: sample(gw, "examwatch_gateway_broker_connected") == 1, timeout=40, what="reconnected")
    assert gw.log().count("gateway_broker_connected") == 2


def test_broker_refusing_the_gateways_login_is_said_once_and_counted(procs, tmp_path):
    county = CountyBroker(tmp_path / "county", {"examwatch-gateway": "right"}, rooms=["s1/101"])
    county.start()
    procs.append(county)
    gw = GatewayProc(tmp_path, county.port, ["s1/101"])
    gw.config.write_text(
        gw.config.read_text().replace("[broker]\n", '[broker]\nusername = "examwatch-gateway"\npassword = "wrong"\n', 1)
    )
    start(procs, gw)
    until(lambda: failures(gw) >= 2, what="two refused attempts")
    assert sample(gw, "examwatch_gateway_broker_connected") == 0
    log = gw.log()
    assert log.count("gateway_broker_refused") == 1 and "wrong" not in log  # the reason, never the password
