"""Fault injection with a real mosquitto, real agents and the real gateway process.

Each test ends in a count: what the rooms produced against what the gateway stored. "Produced" is the
agent's own readings table (written in the same transaction as the outbox rows that carry them); rows
still in the agent's outbox at the end are pending, not lost.

The broker outage lasts EXAMWATCH_OUTAGE_S seconds (default 60, the issue's minute; shorter for a quick local run).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from collections import Counter

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from examwatch.kernel import wire
from examwatch.kernel.model import Reading
from tests.support import door_opened, until
from tests.support.gateway import AgentProc, GatewayProc, key_hex, start, until_subscribed

pytestmark = pytest.mark.integration

OUTAGE = float(os.environ.get("EXAMWATCH_OUTAGE_S", "60"))  # the minute; shorten locally with the variable


def _readings(agent: AgentProc, gw: GatewayProc) -> tuple[Counter[tuple], Counter[tuple], Counter[tuple]]:
    produced = Counter(agent.query("SELECT device, metric, ts, value FROM readings"))
    # pending: queued in the outbox, or stored and not yet queued (the next flush, after any restart, takes them)
    pending: Counter[tuple] = Counter(
        agent.query(
            "SELECT device, metric, ts, value FROM readings"
            " WHERE id > COALESCE((SELECT value FROM meta WHERE key = 'readings_sent'), 0)"
        )
    )
    for (body,) in agent.query("SELECT body FROM outbox WHERE kind = 'readings'"):
        pending.update((r.device, r.metric, r.ts, r.value) for r in msgspec.json.decode(body, type=list[Reading]))
    stored = Counter(gw.query("SELECT device, metric, ts, value FROM readings WHERE agent = ?", agent.agent))
    return produced, pending, stored


def account(agent: AgentProc, gw: GatewayProc) -> dict[str, int]:
    """Produced vs stored for one room; asserts nothing lost, nothing twice, and order by sequence.

    A row still pending may have been stored already (acknowledged while the agent stopped, before its
    deletion): it is sent again at the next start and dropped as a duplicate, so it counts as stored.
    """
    produced, pending, stored = _readings(agent, gw)
    assert max(stored.values()) == 1, "a reading stored twice"
    assert not stored - produced, "a reading stored that the room never produced"
    lost = produced - pending - stored
    assert not lost, f"lost {sum(lost.values())} acknowledged readings"
    seqs = [s for (s,) in gw.query("SELECT seq FROM readings WHERE agent = ? ORDER BY rowid", agent.agent)]
    return {
        "produced": sum(produced.values()),
        "stored": sum(stored.values()),
        "pending": sum(pending.values()),
        "in_order": int(seqs == sorted(seqs)),
        "missing": gw.query("SELECT missing FROM agents WHERE agent = ?", agent.agent)[0][0],
    }


def drain_and_stop(agents: list[AgentProc], gw: GatewayProc) -> None:
    for a in agents:
        # caught up: the agent produces every 0.1 s, so a few rows are always on their way
        until(lambda a=a: 0 <= a.outbox() <= 5, timeout=60, what=f"{a.agent} outbox drained")
    for a in agents:
        a.stop()

    def lost(a: AgentProc) -> Counter[tuple]:
        produced, pending, stored = _readings(a, gw)
        return produced - pending - stored

    for a in agents:  # what the agents sent while stopping must be stored too
        until(lambda a=a: not lost(a), timeout=20, what=f"{a.agent} fully stored")


def test_broker_outage_everything_arrives_once_in_order(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101", "s1/102"])
    agents = [AgentProc(tmp_path, a, mosquitto.port) for a in ("s1/101", "s1/102")]
    start(procs, gw, *agents)
    until(lambda: len(gw.query("SELECT DISTINCT agent FROM readings")) == 2, what="readings flowing")
    mosquitto.stop()
    time.sleep(OUTAGE)
    backlog = [a.outbox() for a in agents]
    assert min(backlog) > 0  # the rooms kept producing
    mosquitto.start()
    drain_and_stop(agents, gw)
    counts = {a.agent: account(a, gw) for a in agents}
    print(f"\nbroker outage {OUTAGE:g}s, backlog rows {backlog}: {counts}")
    assert all(c["in_order"] and c["missing"] == 0 and c["stored"] > 0 for c in counts.values())


def test_agent_killed_50_times_while_publishing(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101"])
    start(procs, gw)
    agent = AgentProc(tmp_path, "s1/101", mosquitto.port)
    procs.append(agent)
    rng = random.Random(4)
    kills = 0
    for _ in range(50):
        agent.start()
        time.sleep(rng.uniform(0.6, 1.2))
        agent.stop(signal.SIGKILL)
        kills += 1
        if agent.db.exists():
            conn = sqlite3.connect(agent.db, timeout=30)  # opens, recovers its WAL, and is sound
            assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            conn.close()
    agent.start()
    drain_and_stop([agent], gw)
    counts = account(agent, gw)
    dup = next(
        line.split()[1] for line in gw.metrics().splitlines() if line.startswith("examwatch_gateway_duplicates_total ")
    )
    print(f"\n{kills} SIGKILLs: {counts}, duplicates dropped by the gateway: {dup}")
    assert counts["stored"] > 0 and counts["missing"] == 0


def test_gateway_restarted_mid_stream_loses_nothing(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101", "s1/102"])
    agents = [AgentProc(tmp_path, a, mosquitto.port) for a in ("s1/101", "s1/102")]
    start(procs, gw, *agents)
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        until(lambda: gw.query("SELECT COUNT(*) FROM readings")[0][0] > 0, what="ingesting")
        time.sleep(1.0)
        gw.stop(sig)
        time.sleep(2.0)  # the rooms go on; the broker queues for the gateway's session
        gw.start()
    drain_and_stop(agents, gw)
    counts = {a.agent: account(a, gw) for a in agents}
    print(f"\ngateway restarted 3 times: {counts}")
    assert all(c["missing"] == 0 and c["stored"] > 0 for c in counts.values())


def test_rogue_client_forged_alarms_are_rejected_counted_and_alarmed_replays_are_harmless(mosquitto, procs, tmp_path):
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101", "s1/102"])
    start(procs, gw)
    room_key, other_key = bytes.fromhex(key_hex("s1/101")), bytes.fromhex(key_hex("s1/102"))
    now = time.time()
    ev = door_opened("s1", "101", now)
    body = msgspec.json.encode(ev)
    legit = wire.encode(room_key, "s1/101", 1, now, "alarms", body, epoch=5)
    topic = wire.topic("s1/101", "alarms")
    rogue = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    rogue.connect("127.0.0.1", mosquitto.port)
    rogue.loop_start()
    until_subscribed(gw, rogue)
    replayed = 0
    try:
        rogue.publish(topic, legit, qos=1).wait_for_publish(5)  # the room's own alarm, as it would send it
        until(lambda: gw.get("/api/v1/alarms?site=s1&room=101")["alarms"], what="the real alarm stored")
        sent = Counter()
        cleared = msgspec.json.encode(msgspec.structs.replace(ev, state="cleared", at=now + 1))
        for i in range(5):
            rogue.publish(topic, legit, qos=1).wait_for_publish(5)  # captured and replayed: stored already, harmless
            replayed += 1
            forged = wire.encode(bytes(32), "s1/101", 100 + i, time.time(), "alarms", cleared, epoch=5)  # wrong key
            rogue.publish(topic, forged, qos=1).wait_for_publish(5)
            sent["forged"] += 1
            other = wire.encode(
                other_key, "s1/101", 200 + i, time.time(), "alarms", cleared, epoch=5
            )  # another room's key
            rogue.publish(topic, other, qos=1).wait_for_publish(5)
            sent["forged"] += 1
            env = wire.decode(forged)
            unsigned = msgspec.json.encode(msgspec.structs.replace(env, seq=300 + i, sig=""))
            rogue.publish(topic, unsigned, qos=1).wait_for_publish(5)
            sent["unsigned"] += 1
        rogue.publish(topic, b"\xff garbage", qos=1).wait_for_publish(5)
        sent["malformed"] += 1
    finally:
        rogue.loop_stop()
        rogue.disconnect()

    def rejected() -> dict[str, int]:
        out = {}
        for line in gw.metrics().splitlines():
            if line.startswith("examwatch_gateway_rejected_total{") and 'room="101"' in line:
                out[line.split('reason="')[1].split('"')[0]] = int(float(line.rsplit(" ", 1)[1]))
        return {reason: n for reason, n in out.items() if n}  # every reason is exported, from 0

    until(lambda: rejected() == dict(sent), what=f"rejections counted {dict(sent)}")
    until(
        lambda: f"examwatch_gateway_duplicates_total {float(replayed)}" in gw.metrics(),
        what="replays counted as duplicates",
    )
    assert gw.query("SELECT reason, COUNT(*) FROM dead_letters WHERE agent = 's1/101' GROUP BY reason") == sorted(
        sent.items()
    )
    alarms = {a["rule"]: a for a in gw.get("/api/v1/alarms?state=active&room=101")["alarms"]}
    assert alarms["security_rejected"]["level"] == 2 and "冒用" in alarms["security_rejected"]["message"]
    assert alarms["secrecy_door_open"]["state"] == "raised"  # no forged "cleared" got through
    assert len(gw.get(f"/api/v1/alarms/timeline?id={ev.id}")["timeline"]) == 1
    assert gw.query("SELECT COUNT(*) FROM ledger")[0][0] == 1
    print(
        f"\nrogue sent {sum(sent.values()) + replayed}: {dict(sent)}, {replayed} replayed; gateway rejected "
        f"{rejected()}"
    )
