"""The county broker as deploy/mosquitto/ sets it up (dynamic-security file from `examwatch site plan`), on a
real mosquitto: who may connect as whom, and publish, subscribe or read what. The rooms' credentials are
hostile: a room's box can be opened by anyone in the room."""

from __future__ import annotations

import queue
import re
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from examwatch.simulators.broker import COUNTY_CONF, SHARE_GROUP, CountyBroker, Mosquitto
from tests.support import until
from tests.support.gateway import AgentProc, GatewayProc, start
from tests.test_province import bridge_example

pytestmark = pytest.mark.integration

USERS = {
    "xx-1-101": "pass-101",
    "xx-1-102": "pass-102",
    "examwatch-gateway": "pass-gw",
    "examwatch-gateway-2": "pass-gw2",
    "examwatch-gateway-3": "pass-gw3",
}
GATEWAY_TOPICS = "examwatch/v1/+/+/+"
REFUSED = 135  # SUBACK: not authorized


class Client:
    """A paho MQTT v5 client that waits for each answer and records what it receives."""

    def __init__(self, port: int, user: str, client_id: str, clean_start: bool, password: str | None = None) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, USERS[user] if password is None else password)
        c.on_connect = lambda _c, _u, flags, rc, _p: self.events.put(("connect", (rc, flags.session_present)))
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self.events.put(("disconnect", rc))
        c.on_subscribe = lambda _c, _u, _mid, codes, _p: self.events.put(("subscribe", codes))
        c.on_publish = lambda _c, _u, mid, rc, _p: self.events.put(("publish", rc))
        c.on_message = lambda _c, _u, m: self.received.put(m)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start, properties=props)
        c.loop_start()
        self.client = c
        self.connect_rc, self.session_present = self.wait("connect")

    def wait(self, what: str) -> Any:
        while True:
            kind, value = self.events.get(timeout=10)
            if kind == what:
                return value
            if kind == "disconnect" and what != "disconnect":
                raise ConnectionError(f"disconnected while waiting for {what}: {value}")

    def publish(self, topic: str, payload: bytes) -> Any:
        self.client.publish(topic, payload, qos=1)
        return self.wait("publish")

    def subscribe(self, topic: str) -> Any:
        self.client.subscribe(topic, qos=1)
        return self.wait("subscribe")[0]

    def heard(self, topic: str) -> list[str]:
        """Topics received so far: all the broker sent us before it answered a publish to ``topic``
        (accepted or refused, the answer comes in order on the same stream)."""
        self.publish(topic, b"marker")
        out = []
        while not self.received.empty():
            out.append(self.received.get().topic)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def drain(q: queue.Queue[mqtt.MQTTMessage], n: int) -> list[tuple[str, bytes]]:
    return [(m.topic, m.payload) for m in (q.get(timeout=10) for _ in range(n))]


@pytest.fixture
def county(tmp_path: Path):
    broker = CountyBroker(tmp_path / "county", USERS, rooms=["xx-1/101", "xx-1/102"])
    broker.start()
    yield broker
    broker.stop()


def test_a_room_cannot_take_over_the_gateways_session(county):
    gw = Client(county.port, "examwatch-gateway", "examwatch-gateway", clean_start=True)
    assert gw.subscribe(GATEWAY_TOPICS).value == 1  # granted QoS 1
    gw.close()  # offline: the broker queues for the gateway's session now
    # Room 102's box, opened by someone: the gateway's client id with a clean start used to wipe its
    # session and every message queued in it, and to receive what was meant for the gateway.
    thief = Client(county.port, "xx-1-102", "examwatch-gateway", clean_start=True)
    assert not thief.connect_rc.is_failure and not thief.session_present
    assert thief.subscribe("examwatch/v1/#").value == REFUSED
    room = Client(county.port, "xx-1-101", "examwatch-xx-1-101", clean_start=False)
    for i in range(3):
        assert not room.publish("examwatch/v1/xx-1/101/readings", b"r%d" % i).is_failure
    room.close()
    assert thief.heard("examwatch/v1/xx-1/102/status") == []
    thief.close()
    back = Client(county.port, "examwatch-gateway", "examwatch-gateway", clean_start=False)
    assert back.session_present
    assert drain(back.received, 4) == [
        *(("examwatch/v1/xx-1/101/readings", b"r%d" % i) for i in range(3)),
        ("examwatch/v1/xx-1/102/status", b"marker"),
    ]
    back.close()


def test_a_room_publishes_its_own_topics_only_and_reads_nothing(county):
    gw = Client(county.port, "examwatch-gateway", "examwatch-gateway", clean_start=True)
    gw.subscribe(GATEWAY_TOPICS)
    a = Client(county.port, "xx-1-101", "examwatch-xx-1-101", clean_start=True)
    for topic in ("examwatch/v1/xx-1/102/alarms", "examwatch/v1/xx-1/102/status", "examwatch/v1/other/101/readings"):
        assert a.publish(topic, b"forged").is_failure
    b = Client(county.port, "xx-1-102", "examwatch-xx-1-102", clean_start=True)
    for topic in ("examwatch/v1/#", "examwatch/v1/xx-1/102/#", "examwatch/v1/xx-1/101/#", "#", "$SYS/#"):
        assert a.subscribe(topic).value == REFUSED
    assert not b.publish("examwatch/v1/xx-1/102/alarms", b"b's alarm").is_failure
    assert a.heard("examwatch/v1/xx-1/101/alarms") == []
    heard = gw.heard("examwatch/v1/xx-1/101/alarms")  # the gateway's marker: refused, it may not write
    assert heard == ["examwatch/v1/xx-1/102/alarms", "examwatch/v1/xx-1/101/alarms"]  # b's alarm, a's marker
    a.close()
    b.close()
    gw.close()


def test_wrong_password_and_oversized_packets_are_refused(county):
    bad = Client(county.port, "xx-1-101", "x", clean_start=True, password="guess")
    assert bad.connect_rc.is_failure
    bad.close()
    a = Client(county.port, "xx-1-101", "examwatch-xx-1-101", clean_start=True)
    a.client.publish("examwatch/v1/xx-1/101/readings", b"x" * 300_000, qos=1)
    assert a.wait("disconnect").is_failure  # past max_packet_size: the broker hangs up
    a.client.loop_stop()


def test_every_listener_ties_client_ids_to_user_names():
    """use_username_as_clientid is a listener setting: a listener without it reopens the takeover."""
    listeners: list[list[str]] = []
    for line in COUNTY_CONF.read_text().splitlines():
        words = line.split()
        if words[:1] == ["listener"]:
            listeners.append([])
        elif words and listeners:
            listeners[-1].append(" ".join(words))
    assert len(listeners) == 2
    for settings in listeners:
        assert "use_username_as_clientid true" in settings


SHARED = "$share/{}/examwatch/v1/+/+/readings"


def test_a_gateway_subscribes_to_its_own_share_group_only_and_a_user_without_a_role_to_nothing(county):
    gw = Client(county.port, "examwatch-gateway", "examwatch-gateway", clean_start=True)
    assert gw.subscribe(SHARED.format(SHARE_GROUP)).value == 1
    assert gw.subscribe("examwatch/v1/+/+/status").value == 1  # the leader's statuses: not shared
    for group in ("other", f"{SHARE_GROUP}x", "county"):
        assert gw.subscribe(SHARED.format(group)).value == REFUSED, group
    assert gw.publish("examwatch/v1/xx-1/101/status", b"forged").is_failure  # and writes nothing
    gw.close()
    # Replica 2's user on a broker planned for one gateway (no --replicas): logs in, may do nothing.
    spare = Client(county.port, "examwatch-gateway-2", "examwatch-gateway-2", clean_start=True)
    for topic in (SHARED.format(SHARE_GROUP), GATEWAY_TOPICS):
        assert spare.subscribe(topic).value == REFUSED
    spare.close()


def test_a_room_cannot_join_the_replicas_share_group_and_none_of_the_feed_is_lost(tmp_path):
    """mosquitto's acl_file did not check subscriptions: a room's login in the replicas' share group was
    handed its turn of the county's messages, refused them by the read ACL, and they were gone. With the
    dynamic-security roles its SUBSCRIBE is refused, and every message reaches one replica."""
    broker = CountyBroker(tmp_path / "county", USERS, rooms=["xx-1/101", "xx-1/102"], replicas=3)
    broker.start()
    try:
        members = [Client(broker.port, u, u, clean_start=True) for u in ("examwatch-gateway-2", "examwatch-gateway-3")]
        for m in members:
            assert m.subscribe(SHARED.format(SHARE_GROUP)).value == 1
        hostile = Client(broker.port, "xx-1-102", "xx-1-102", clean_start=True)
        for topic in (SHARED.format(SHARE_GROUP), f"$share/{SHARE_GROUP}/#", SHARED.format("county"), "#"):
            assert hostile.subscribe(topic).value == REFUSED, topic
        room = Client(broker.port, "xx-1-101", "xx-1-101", clean_start=True)
        sent = []
        for i in range(20):  # both rooms, the hostile one's own topics included
            for sender, agent in ((room, "xx-1/101"), (hostile, "xx-1/102")):
                payload = b"%s r%d" % (agent.encode(), i)
                assert not sender.publish(f"examwatch/v1/{agent}/readings", payload).is_failure
                sent.append(payload)
        shares: list[list[bytes]] = []
        for m in members:
            m.publish("examwatch/v1/xx-1/102/status", b"marker")  # refused (gateways do not write): in order
            shares.append([])
            while not m.received.empty():
                shares[-1].append(m.received.get().payload)
        assert sorted(shares[0] + shares[1]) == sorted(sent)  # each message to one replica exactly, none lost
        assert all(shares), "both replicas take their turn"
        assert hostile.heard("examwatch/v1/xx-1/102/status") == [] and room.heard("examwatch/v1/xx-1/101/status") == []
        for c in (*members, room, hostile):
            c.close()
    finally:
        broker.stop()


def test_the_province_bridge_forwards_the_rooms_alarms_past_the_roles(tmp_path):
    """The bridge (deploy/mosquitto/province-bridge.conf) is the broker itself, not a user: no role applies."""
    province = Mosquitto(tmp_path / "province")
    province.start()
    county = CountyBroker(tmp_path / "county", USERS, rooms=["xx-1/101", "xx-1/102"])
    county.conf.write_text(county.conf.read_text() + bridge_example(province.port, "xx"))
    county.start()
    try:
        watcher = Client(province.port, "examwatch-gateway", "province-watcher", clean_start=True)
        assert watcher.subscribe("examwatch/v1/#").value == 1
        room = Client(county.port, "xx-1-101", "xx-1-101", clean_start=True)
        assert not room.publish("examwatch/v1/xx-1/101/alarms", b"door").is_failure
        assert drain(watcher.received, 1) == [("examwatch/v1/xx-1/101/alarms", b"door")]
        room.close()
        watcher.close()
    finally:
        county.stop()
        province.stop()


def test_real_gateway_and_agents_work_through_it_and_a_rooms_credentials_speak_for_it_only(county, procs, tmp_path):
    gw = GatewayProc(tmp_path, county.port, ["xx-1/101", "xx-1/102"])
    login(gw.config, "[broker]", "examwatch-gateway")
    room = AgentProc(tmp_path, "xx-1/101", county.port)
    login(room.config, "[uplink]", "xx-1-101")
    impostor = AgentProc(tmp_path, "xx-1/102", county.port)  # room 102's key, but 101's broker login
    login(impostor.config, "[uplink]", "xx-1-101")
    start(procs, gw, room)
    until(lambda: gw.query("SELECT COUNT(*) FROM readings WHERE agent = 'xx-1/101'")[0][0] > 0, what="101's readings")
    start(procs, impostor)
    denied = re.compile(r"Denied PUBLISH from xx-1-101 .*'examwatch/v1/xx-1/102/readings'")
    until(lambda: denied.search(county.log()), what="the broker refusing the impostor's readings")
    room_rows = gw.query("SELECT COUNT(*) FROM readings WHERE agent = 'xx-1/101'")[0][0]
    until(
        lambda: gw.query("SELECT COUNT(*) FROM readings WHERE agent = 'xx-1/101'")[0][0] > room_rows,
        what="101 still delivering beside the impostor",
    )
    assert gw.query("SELECT COUNT(*) FROM ledger WHERE agent = 'xx-1/102'") == [(0,)]
    # One login on two boxes: each connection takes over the other's session, so the room flaps; seen as
    # repeated uplink_lost in the room's log (a cloned SD card looks the same).
    until(lambda: "uplink_lost" in (room.dir / "log").read_text(), what="the room's uplink taken over")


def login(config: Path, table: str, user: str) -> None:
    """Give a gateway or agent config the broker login of ``user`` (its table's first lines)."""
    text = config.read_text()
    config.write_text(text.replace(f"{table}\n", f'{table}\nusername = "{user}"\npassword = "{USERS[user]}"\n', 1))
