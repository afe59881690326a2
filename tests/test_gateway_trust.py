"""The trust boundary end to end: real mosquitto, real agents, the real gateway process, hostile messages.

No message, file, clock or neighbour may stop, silence or fake an alarm: a poison message is set aside and
the gateway keeps storing; a room's key speaks for that room only; old statuses are stale, not news; data
sent again is a duplicate however late; a replaced agent database is new data.
"""

from __future__ import annotations

import time

import msgspec
import paho.mqtt.client as mqtt
import pytest

from examwatch.kernel import wire
from tests.support import door_opened, until
from tests.support.gateway import AgentProc, GatewayProc, key_hex, start, until_subscribed
from tests.test_uplink import Listener

pytestmark = pytest.mark.integration


class Client(Listener):
    """A plain MQTT client on the county broker.

    Keeps what it hears on every county topic, publishes what it is given.
    """

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def heard(self, kind: str) -> list[mqtt.MQTTMessage]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith("/" + kind) and not m.retain]

    stop = Listener.close


def key(agent: str) -> bytes:
    return bytes.fromhex(key_hex(agent))


def counter(gw: GatewayProc, name: str, **labels: str) -> float:
    """One sample of the gateway's exporter (0 when absent)."""
    for line in gw.metrics().splitlines():
        if line.startswith(f"examwatch_gateway_{name}") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def active(gw: GatewayProc, **query: str) -> dict[tuple[str, str], dict]:
    q = "".join(f"&{k}={v}" for k, v in query.items())
    return {(a["room"], a["rule"]): a for a in gw.get(f"/api/v1/alarms?state=active{q}")["alarms"]}


def status_of(gw: GatewayProc, agent: str) -> str:
    return next((a["status"] for a in gw.get("/api/v1/agents")["agents"] if a["agent"] == agent), "")


def stored(gw: GatewayProc, agent: str) -> int:
    return gw.query("SELECT COUNT(*) FROM readings WHERE agent = ?", agent)[0][0]


def test_poison_messages_are_set_aside_and_the_gateway_keeps_storing(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101"])
    agent = AgentProc(tmp_path, "s1/101", mosquitto.port)
    start(procs, gw, agent)
    until(lambda: stored(gw, "s1/101") > 0, what="the room's readings stored")
    rogue = Client(mosquitto.port)
    procs.append(rogue)
    topic = wire.topic("s1/101", "readings")
    nested = (
        b'{"v":1,"agent":"s1/101","epoch":1,"seq":1,"ts":1.0,"kind":"readings","body":'
        + b"[" * 1000
        + b"]" * 1000
        + b"}"
    )
    huge_seq = wire.encode(key("s1/101"), "s1/101", 2**63, time.time(), "readings", b"[]", epoch=1)  # validly signed
    rogue.publish(topic, nested)
    rogue.publish(topic, huge_seq)
    until(lambda: counter(gw, "rejected_total", reason="malformed", room="101") == 2, what="both rejected as malformed")
    assert gw.proc is not None and gw.proc.poll() is None, "the gateway died"
    before = stored(gw, "s1/101")
    until(lambda: stored(gw, "s1/101") > before, what="the next valid readings stored")
    letters = gw.query("SELECT reason, agent, size, payload FROM dead_letters ORDER BY id")
    assert [(r, a) for r, a, _, _ in letters] == [("malformed", "s1/101")] * 2
    assert letters[0][2] == len(nested) and letters[0][3] == nested[:4096] and letters[1][3] == huge_seq
    # acknowledged: a restarted gateway is not handed them again
    gw.stop()
    gw.start()
    before = stored(gw, "s1/101")
    until(lambda: stored(gw, "s1/101") > before, what="storing again after the restart")
    assert gw.query("SELECT COUNT(*) FROM dead_letters")[0][0] == 2
    assert counter(gw, "rejected_total", reason="malformed", room="101") == 0  # a fresh process, nothing again


def test_a_room_key_cannot_clear_another_rooms_alarm(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101", "s1/102"])
    start(procs, gw)
    rogue = Client(mosquitto.port)
    procs.append(rogue)
    until_subscribed(gw, rogue.client)
    now = time.time()
    door = door_opened("s1", "102", now, alarm_id="s1/102/secrecy_door_open/door1@1")
    rogue.publish(
        wire.topic("s1/102", "alarms"),
        wire.encode(key("s1/102"), "s1/102", 1, now, "alarms", msgspec.json.encode(door), epoch=3),
    )
    until(lambda: ("102", "secrecy_door_open") in active(gw), what="102's door alarm")
    # 101's key (stolen, or a faulty agent) signs "cleared" for 102's alarm: as 102, and as itself with 102's id
    for seq, ev in enumerate(
        [
            msgspec.structs.replace(door, state="cleared", at=now + 1),
            msgspec.structs.replace(door, state="cleared", at=now + 1, room="101"),
        ],
        start=1,
    ):
        rogue.publish(
            wire.topic("s1/101", "alarms"),
            wire.encode(key("s1/101"), "s1/101", seq, now + 1, "alarms", msgspec.json.encode(ev), epoch=4),
        )
    until(lambda: counter(gw, "rejected_total", reason="unauthorized", room="101") == 2, what="both refused")
    alarms = active(gw)
    assert alarms[("102", "secrecy_door_open")]["state"] == "raised"
    assert len(gw.get(f"/api/v1/alarms/timeline?id={door.id}")["timeline"]) == 1
    # the room whose alarm was targeted, and the room whose key was used
    assert (
        alarms[("102", "security_rejected")]["level"] == 2 and "越权" in alarms[("102", "security_rejected")]["message"]
    )
    assert ("101", "security_rejected") in alarms
    assert gw.query("SELECT COUNT(*) FROM ledger WHERE agent = 's1/101'")[0][0] == 0
    assert gw.query("SELECT reason FROM dead_letters WHERE agent != ''") == [("unauthorized",), ("unauthorized",)]


def test_replayed_offline_statuses_raise_nothing(mosquitto, procs, tmp_path):
    rooms = ["s1/101", "s1/102"]
    gw = GatewayProc(tmp_path, mosquitto.port, rooms)
    tap = Client(mosquitto.port)
    agents = [AgentProc(tmp_path, a, mosquitto.port) for a in rooms]
    procs.append(tap)
    start(procs, gw, *agents)
    until(lambda: all(status_of(gw, a) == "online" for a in rooms), what="both rooms online")
    for a in agents:  # both stop, cleanly: each says "offline" (captured by the tap), an incident opens
        a.stop()
    until(lambda: gw.get("/api/v1/incidents?state=open")["incidents"], what="the real incident")
    offline = [m for m in tap.heard("status") if b'"offline"' in m.payload]
    assert len(offline) == 2
    for a in agents:
        a.start()
    until(lambda: not active(gw) and not gw.get("/api/v1/incidents?state=open")["incidents"], what="all back")
    stale = sum(counter(gw, "rejected_total", reason="stale", room=r) for r in ("101", "102"))
    for m in offline:  # captured, sent again by someone on the network
        tap.publish(m.topic, m.payload)
    until(
        lambda: sum(counter(gw, "rejected_total", reason="stale", room=r) for r in ("101", "102")) == stale + 2,
        what="the replays counted stale",
    )
    assert active(gw) == {}
    assert gw.get("/api/v1/incidents?state=open")["incidents"] == []
    assert all(status_of(gw, a) == "online" for a in rooms)


def one_room(mosquitto, procs, tmp_path) -> tuple[GatewayProc, Client, AgentProc]:
    """The gateway, a tap on the county topics, and room 101's real agent."""
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101"])
    tap = Client(mosquitto.port)
    agent = AgentProc(tmp_path, "s1/101", mosquitto.port)
    procs.append(tap)
    start(procs, gw, agent)
    return gw, tap, agent


def test_a_future_dated_status_does_not_poison_later_heartbeats(mosquitto, procs, tmp_path):
    gw, tap, _ = one_room(mosquitto, procs, tmp_path)
    until(lambda: len(tap.heard("status")) >= 2, what="heartbeats")
    # the agent's clock jumps a day ahead for one heartbeat (its next place, signed with its key), then is right
    env = wire.decode(tap.heard("status")[-1].payload)
    st = msgspec.json.decode(env.body, type=wire.Status)
    ahead = msgspec.json.encode(msgspec.structs.replace(st, n=st.n + 1))
    tap.publish(
        wire.topic("s1/101", "status"),
        wire.encode(key("s1/101"), "s1/101", 0, time.time() + 86400, "status", ahead, epoch=env.epoch),
    )
    until(lambda: ("101", "clock_skew") in active(gw), what="the skew seen (the timestamp is data)")
    key_then = gw.query("SELECT status_key FROM agents")[0][0]
    until(lambda: gw.query("SELECT status_key FROM agents")[0][0] != key_then, what="later heartbeats applied")
    until(lambda: not active(gw), timeout=30, what="the skew alarm cleared by the right clock")
    assert status_of(gw, "s1/101") == "online"
    assert counter(gw, "rejected_total", room="101", reason="forged") == 0
    assert gw.query("SELECT COUNT(*) FROM alarms WHERE rule = 'security_rejected'")[0][0] == 0


def test_data_sent_again_long_after_is_a_duplicate_never_a_replay(mosquitto, procs, tmp_path):
    gw, tap, agent = one_room(mosquitto, procs, tmp_path)
    until(lambda: len(tap.heard("readings")) >= 3, timeout=60, what="readings sent")
    agent.stop()  # the power cut
    sent = tap.heard("readings")
    until(lambda: gw.query("SELECT COUNT(*) FROM ledger")[0][0] >= len(sent), what="all stored")
    rows = gw.query("SELECT COUNT(*) FROM readings")[0][0]
    dupes = counter(gw, "duplicates_total")
    # whatever the delay (there is no window any more): the same signed rows again, as the agent re-sends its outbox
    for m in sent:
        tap.publish(m.topic, m.payload)
    until(lambda: counter(gw, "duplicates_total") == dupes + len(sent), what="all counted as duplicates")
    assert gw.query("SELECT COUNT(*) FROM readings")[0][0] == rows
    assert gw.query("SELECT COUNT(*) FROM alarms WHERE rule = 'security_rejected'")[0][0] == 0
    assert gw.query("SELECT COUNT(*) FROM dead_letters")[0][0] == 0


def test_a_replaced_agent_database_is_new_data(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101"])
    agent = AgentProc(tmp_path, "s1/101", mosquitto.port)
    start(procs, gw, agent)
    until(lambda: stored(gw, "s1/101") > 0, what="readings stored")
    first = agent.query("SELECT value FROM meta WHERE key = 'epoch'")[0][0]
    until(
        lambda: (gw.query("SELECT MAX(seq) FROM ledger WHERE epoch = ?", first)[0][0] or 0) >= 2,
        timeout=30,
        what="rows stored",
    )
    agent.stop()
    for suffix in ("", "-wal", "-shm"):  # set aside, as the agent does with a corrupt file: a new one starts at seq 1
        f = agent.db.with_name(agent.db.name + suffix)
        if f.exists():
            f.rename(f.with_name(f.name + ".old"))
    agent.start()
    until(lambda: gw.query("SELECT COUNT(*) FROM epochs")[0][0] == 2, what="a new database's rows")
    second = agent.query("SELECT value FROM meta WHERE key = 'epoch'")[0][0]
    assert second != first
    until(
        lambda: gw.query("SELECT COUNT(*) FROM ledger WHERE epoch = ? AND seq <= 2", second)[0][0] == 2,
        timeout=30,
        what="seq 1.. of the new database stored",
    )
    until(
        lambda: gw.query("SELECT epoch FROM agents")[0][0] == second and status_of(gw, "s1/101") == "online",
        what="the room online on its new epoch",
    )
    assert gw.query("SELECT COUNT(*) FROM alarms WHERE rule = 'security_rejected'")[0][0] == 0
    assert gw.query("SELECT COUNT(*) FROM dead_letters")[0][0] == 0
    assert gw.query("SELECT epoch, rank FROM epochs ORDER BY rank") == [(first, 0), (second, 1)]
