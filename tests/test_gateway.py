"""The county gateway end to end: real mosquitto, real agents, the real gateway process, its API and exporter."""

from __future__ import annotations

import pytest

from tests.support import until
from tests.support.gateway import AgentProc, GatewayProc, Link, start

pytestmark = pytest.mark.integration


def test_readings_liveness_api_and_exporter(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101", "s1/102"])
    agents = [AgentProc(tmp_path, a, mosquitto.port) for a in ("s1/101", "s1/102")]
    start(procs, gw, *agents)
    until(lambda: len(gw.query("SELECT DISTINCT agent FROM readings")) == 2, what="readings from both rooms")

    def online() -> list[dict]:
        return [a for a in gw.get("/api/v1/agents")["agents"] if a["status"] == "online"]

    listed = until(lambda: len(online()) == 2 and online(), what="both rooms online")
    assert all(abs(a["skew"]) < 1.0 and a["last_seen"] for a in listed)
    # the agent's status names its devices' kinds: the county labels readings like the room does, and ages them
    # (the host's readings come on the host's own interval, maybe after the room's first readings)
    host = 'examwatch_memory_used_ratio{device="pi",kind="host",room="101",site="s1"}'

    def exported() -> str | None:
        text = gw.metrics()
        return text if host in text else None

    text = until(exported, what="the room's host readings at the county")
    assert 'examwatch_device_reading_age_seconds{device="pi",kind="host",room="101",site="s1"}' in text
    assert 'examwatch_gateway_agent_phase{phase="idle",room="101",site="s1"} 1.0' in text  # no session configured
    assert 'examwatch_gateway_rejected_total{reason="forged",room="102",site="s1"} 0.0' in text
    assert 'examwatch_gateway_agent_up{room="102",site="s1"} 1.0' in text
    assert "examwatch_gateway_readings_total" in text

    agents[0].stop()  # a clean stop says "offline": an alarm for the room
    alarm = until(lambda: gw.get("/api/v1/alarms?state=active&site=s1")["alarms"], what="agent_offline alarm")[0]
    assert (alarm["room"], alarm["rule"], alarm["level"]) == ("101", "agent_offline", 1)  # no session configured
    assert 'examwatch_alarm_active{level="1",room="101",rule="agent_offline",site="s1"} 1.0' in gw.metrics()
    assert gw.get("/api/v1/alarms?level=2")["alarms"] == []

    # acknowledgement needs the token, and records who and why
    assert gw.post("/api/v1/ack", {"alarm": alarm["id"], "who": "张老师", "note": "已派人"}, None)[0] == 401
    assert gw.post("/api/v1/ack", {"alarm": alarm["id"], "who": "张老师"}, "wrong")[0] == 401
    assert gw.post("/api/v1/ack", {"alarm": "nope", "who": "张老师"}, gw.token)[0] == 404
    assert gw.post("/api/v1/ack", {"note": "x"}, gw.token)[0] == 400
    assert gw.post("/api/v1/ack", {"alarm": alarm["id"], "who": "张老师", "note": "已派人"}, gw.token)[0] == 200
    acked = gw.get("/api/v1/alarms?state=active")["alarms"][0]
    assert (acked["acked_by"], acked["acked_note"]) == ("张老师", "已派人")

    agents[0].start()  # back: the alarm clears, its timeline keeps both transitions
    until(lambda: gw.get("/api/v1/alarms?state=active")["alarms"] == [], what="alarm cleared")
    timeline = gw.get(f"/api/v1/alarms/timeline?id={alarm['id']}")["timeline"]
    assert [t["state"] for t in timeline] == ["raised", "cleared"]


def test_two_rooms_lose_their_link_one_level2_incident_a_third_joins(mosquitto, procs, tmp_path):
    roster = [f"s1/{100 + i}" for i in range(1, 9)]  # 8 rooms on the site: 3 down stays below half
    gw = GatewayProc(tmp_path, mosquitto.port, roster, extra="[liveness]\nheartbeat_timeout = 30.0\n")
    start(procs, gw)
    links, agents = {}, {}
    for a in roster[:3]:
        links[a] = Link(mosquitto.port)
        links[a].up()
        procs.append(links[a])
        agents[a] = AgentProc(tmp_path, a, links[a].port)
        start(procs, agents[a])
    until(
        lambda: len([a for a in gw.get("/api/v1/agents")["agents"] if a["status"] == "online"]) == 3,
        what="three rooms online",
    )
    links["s1/101"].cut()
    links["s1/102"].cut()
    inc = until(lambda: gw.get("/api/v1/incidents?state=open")["incidents"], what="incident")
    assert len(inc) == 1
    first = inc[0]
    # members in the order the rooms' alarms arrived: either room's last will may come first
    until(
        lambda: sorted(gw.get("/api/v1/incidents?state=open")["incidents"][0]["members"]) == ["101", "102"],
        what="both rooms in the incident",
    )
    assert (first["level"], first["fault_class"], first["title"]) == (2, "network", "考点多个考场网络中断")
    assert 'examwatch_gateway_incidents_open{class="network",level="2",site="s1"} 1.0' in gw.metrics()
    links["s1/103"].cut()
    until(
        lambda: sorted(gw.get("/api/v1/incidents?state=open")["incidents"][0]["members"]) == ["101", "102", "103"],
        what="third room joins",
    )
    [inc] = gw.get("/api/v1/incidents")["incidents"]
    assert inc["id"] == first["id"] and inc["level"] == 2 and sorted(inc["active"]) == ["101", "102", "103"]
    assert gw.post("/api/v1/ack", {"incident": inc["id"], "who": "李主任", "note": "启用备用链路"}, gw.token)[0] == 200
    for link in links.values():
        link.up()
    closed = until(
        lambda: [i for i in gw.get("/api/v1/incidents")["incidents"] if i["state"] == "closed"],
        timeout=40,
        what="incident closed after the links came back",
    )
    assert closed[0]["id"] == first["id"] and sorted(closed[0]["members"]) == ["101", "102", "103"]
    assert closed[0]["acked_by"] == "李主任"
    assert [t["what"] for t in closed[0]["timeline"]][:2] == ["opened", "joined"]
