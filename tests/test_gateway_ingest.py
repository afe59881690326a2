"""The gateway's ingest on each store backend (SQLite, a real PostgreSQL): idempotence, gaps, signing checks,
liveness, skew, incidents."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from examwatch.gateway import store
from examwatch.gateway.config import Config, Liveness, Security
from examwatch.gateway.ingest import Engine, Message, Seqs
from examwatch.kernel import wire
from examwatch.kernel.model import AlarmEvent, Reading
from examwatch.rules.config import Schedule, Window
from tests.support import alarm

KEYS = {f"s1/{r}": bytes([i + 1]) * 32 for i, r in enumerate(["101", "102", "103", "104", "105", "106"])}
T0 = 1_700_000_000.0
EPOCH = 7


def make(where: store.Where, **kw) -> Engine:
    """An engine on ``where`` (a test's tmp_path directory: gw.db in it)."""
    if isinstance(where, Path) and where.is_dir():
        where = where / "gw.db"
    cfg = Config(security=Security(quiet=30.0), liveness=Liveness(heartbeat_timeout=20, skew_max=2), **kw)
    return Engine(cfg, store.connect(where), KEYS)


def readings_msg(
    agent: str, seq: int, t: float, n: int = 3, key: bytes | None = None, retained: bool = False, epoch: int = EPOCH
) -> Message:
    body = msgspec.json.encode([Reading("ups1", "ups_charge_percent", float(seq * 10 + i), t + i) for i in range(n)])
    payload = wire.encode(key or KEYS[agent], agent, seq, t, "readings", body, epoch=epoch)
    return Message(wire.topic(agent, "readings"), payload, retained, t)


def alarm_msg(agent: str, seq: int, ev: AlarmEvent, received: float, signer: str | None = None) -> Message:
    body, signer = msgspec.json.encode(ev), signer or agent
    payload = wire.encode(KEYS[signer], signer, seq, received, "alarms", body, epoch=EPOCH)
    return Message(wire.topic(signer, "alarms"), payload, False, received)


def status_msg(
    agent: str,
    state: str,
    ts: float,
    received: float,
    retained: bool = False,
    phase: str | None = None,
    *,
    conn: int = 1,
    n: int | None = None,
    boot: int = 1,
    epoch: int = EPOCH,
) -> Message:
    """A status at its place (boot, conn, n): a last will is the last of its connection."""
    n = (wire.LAST if state == "offline" else 1) if n is None else n
    body = msgspec.json.encode(
        wire.Status(state=state, reason="lost" if state == "offline" else "", phase=phase, boot=boot, conn=conn, n=n)
    )
    payload = wire.encode(KEYS[agent], agent, 0, ts, "status", body, epoch=epoch)
    return Message(wire.topic(agent, "status"), payload, retained, received)


def count(e: Engine, sql: str, *args) -> int:
    return e.conn.execute(sql, args).fetchone()[0]


def test_idempotent_on_agent_and_seq_and_gaps_reported(store_backend):
    e = make(store_backend)
    msgs = [readings_msg("s1/101", s, T0 + s) for s in (1, 2, 3, 5, 6)]
    e.ingest(msgs, T0 + 10)
    e.ingest(msgs[:2], T0 + 11)  # redelivered copies
    assert count(e, "SELECT COUNT(*) FROM readings") == 15
    assert count(e, "SELECT COUNT(*) FROM ledger") == 5
    assert e.stats.duplicates == 2 and e.stats.readings == 15
    a = store.agents(e.conn)[0]
    assert (a["agent"], a["max_seq"], a["missing"]) == ("s1/101", 6, 1)
    assert e.agents["s1/101"].epochs[EPOCH].seqs.gaps(0) == [(4, 4)]
    e.ingest([readings_msg("s1/101", 4, T0 + 4)], T0 + 12)  # late, after a reconnect: fills the gap
    assert store.agents(e.conn)[0]["missing"] == 0
    latest = {(device, metric): value for _, device, metric, value, _ in store.latest(e.conn)}
    assert latest == {("ups1", "ups_charge_percent"): 62.0}  # the newest by the room's time, not by arrival


def test_state_survives_a_restart(store_backend):
    e = make(store_backend)
    e.ingest([readings_msg("s1/101", s, T0 + s) for s in (1, 2, 4)], T0 + 5)
    e.conn.close()
    e = make(store_backend)
    assert e.agents["s1/101"].epochs[EPOCH].seqs.runs == [[1, 2], [4, 4]]
    e.ingest([readings_msg("s1/101", 2, T0 + 2)], T0 + 6)
    assert e.stats.duplicates == 1 and count(e, "SELECT COUNT(*) FROM ledger") == 3


def test_forged_unsigned_and_wrong_room_are_rejected_with_a_security_alarm_a_replay_is_a_duplicate(store_backend):
    e = make(store_backend)
    good = readings_msg("s1/101", 1, T0)
    e.ingest([good], T0)
    forged = readings_msg("s1/101", 2, T0, key=b"\x99" * 32)
    env = wire.decode(good.payload)
    unsigned = Message(good.topic, msgspec.json.encode(msgspec.structs.replace(env, seq=3, sig="")), False, T0)
    other_room = Message(wire.topic("s1/102", "readings"), good.payload, False, T0)  # 101's message on 102's topic
    garbage = Message(wire.topic("s1/101", "alarms"), b"\x00not json", False, T0)
    e.ingest([forged, unsigned, other_room, garbage], T0 + 1)
    e.ingest([good._replace(received=T0 + 86400)], T0 + 86400)  # captured and sent again a day later: stored already
    assert +e.stats.rejected == {
        ("forged", "s1/101"): 1,
        ("unsigned", "s1/101"): 1,
        ("forged", "s1/102"): 1,
        ("malformed", "s1/101"): 1,
    }
    assert e.stats.duplicates == 1
    assert [r["reason"] for r in store.dead_letters(e.conn)] == ["malformed", "forged", "unsigned", "forged"]
    assert count(e, "SELECT COUNT(*) FROM ledger") == 1
    sec = {a["room"]: a for a in store.alarms(e.conn, state="active") if a["rule"] == "security_rejected"}
    assert set(sec) == {"101", "102"} and sec["101"]["level"] == 2 and "冒用" in sec["101"]["message"]
    e.tick(T0 + 86400 + 200, None)  # quiet for longer than security.quiet
    assert [a["rule"] for a in store.alarms(e.conn, state="active")] == []


def test_unknown_agents_and_topics_are_counted_without_an_alarm(store_backend):
    e = make(store_backend)
    key = b"\x05" * 32
    msg = Message(
        wire.topic("s9/999", "readings"), wire.encode(key, "s9/999", 1, T0, "readings", b"[]", epoch=1), False, T0
    )
    e.ingest([msg, Message("examwatch/v1/x", b"{}", False, T0)], T0)
    assert +e.stats.rejected == {("unknown_agent", ""): 1, ("bad_topic", ""): 1}
    assert store.alarms(e.conn) == []


def test_alarm_timeline_keeps_room_times_and_order_out_of_arrival(store_backend):
    e = make(store_backend)
    raised, cleared = alarm("s1/101", "raised", T0, T0), alarm("s1/101", "cleared", T0 + 50, T0)
    e.ingest([alarm_msg("s1/101", 2, cleared, T0 + 500), alarm_msg("s1/101", 1, raised, T0 + 501)], T0 + 501)
    [row] = store.alarms(e.conn)
    assert row["state"] == "cleared" and row["cleared_at"] == T0 + 50 and row["raised_at"] == T0
    timeline = store.alarm_timeline(e.conn, raised.id)
    assert [(t["state"], t["at"]) for t in timeline] == [("raised", T0), ("cleared", T0 + 50)]


def test_offline_by_will_and_by_silence_level2_in_a_session_and_two_rooms_make_an_incident(store_backend):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("Asia/Shanghai")
    session = Window(
        name="数学",
        start=datetime.fromtimestamp(T0 - 3600, tz).replace(tzinfo=None),
        end=datetime.fromtimestamp(T0 + 3600, tz).replace(tzinfo=None),
    )
    e = make(store_backend, schedule=Schedule(sessions=[session]))
    e.ingest([status_msg(a, "online", T0, T0) for a in KEYS], T0)
    e.ingest([status_msg("s1/101", "offline", T0 - 500, T0 + 5)], T0 + 5)  # last will, set at connect (its time)
    e.tick(T0 + 10, broker_up_since=T0 - 100)
    assert [(a["room"], a["level"]) for a in store.alarms(e.conn, state="active")] == [("101", 2)]
    assert store.incidents(e.conn) == []
    # 102 stops talking: silence past the heartbeat bound (our own link has been up all along)
    e.ingest([status_msg(a, "online", T0 + 15, T0 + 15, n=2) for a in KEYS if a not in ("s1/101", "s1/102")], T0 + 15)
    e.tick(T0 + 30, broker_up_since=T0 - 100)
    [inc] = store.incidents(e.conn, state="open")
    assert (inc["level"], inc["members"], inc["fault_class"]) == (2, ["101", "102"], "network")
    # 102 is back: it leaves; 101 back: the incident closes with both still listed
    e.ingest([status_msg("s1/102", "online", T0 + 31, T0 + 31, conn=2)], T0 + 31)
    e.ingest([status_msg("s1/101", "online", T0 + 32, T0 + 32, conn=2)], T0 + 32)
    [inc] = store.incidents(e.conn)
    assert inc["state"] == "closed" and inc["members"] == ["101", "102"]
    assert [t["what"] for t in inc["timeline"]] == ["opened", "left", "left", "closed"]
    assert store.alarms(e.conn, state="active") == []


def test_silence_is_not_judged_while_our_own_broker_link_is_young(store_backend):
    e = make(store_backend)
    e.ingest([status_msg("s1/101", "online", T0, T0)], T0)
    e.tick(T0 + 100, broker_up_since=T0 + 90)
    e.tick(T0 + 100, broker_up_since=None)
    assert store.alarms(e.conn) == []


def test_a_replayed_status_is_stale_and_changes_nothing_a_retained_copy_is_ignored(store_backend):
    e = make(store_backend)
    first = status_msg("s1/101", "online", T0, T0)
    e.ingest([first, status_msg("s1/101", "online", T0 + 30, T0 + 30, n=2)], T0 + 30)
    e.ingest([first._replace(received=T0 + 40)], T0 + 40)
    e.ingest([status_msg("s1/101", "online", T0 + 30, T0 + 50, retained=True, n=2)], T0 + 50)
    assert +e.stats.rejected == {("stale", "s1/101"): 1}
    assert store.alarms(e.conn) == [] and store.dead_letters(e.conn) == []


def test_clock_skew_alarm_and_recovery(store_backend):
    e = make(store_backend)
    e.ingest([status_msg("s1/101", "online", T0 + 10, T0)], T0)  # agent 10 s ahead
    [a] = store.alarms(e.conn, state="active")
    assert a["rule"] == "clock_skew" and "+10.0" in a["message"]
    assert store.agents(e.conn)[0]["skew"] == pytest.approx(10.0)
    for i in range(1, 6):  # corrected; the old sample ages out of the window of samples
        e.ingest([status_msg("s1/101", "online", T0 + 10 + i, T0 + 10 + i, n=1 + i)], T0 + 10 + i)
    assert store.alarms(e.conn, state="active") == []


def test_a_heartbeat_that_may_have_waited_in_the_broker_does_not_judge_the_room_s_clock(store_backend):
    """Heartbeats received soon after the broker last queued for us (our connect, or a full receive window: we
    were behind) look behind by their wait: 10,000 rooms' clock alarms once came with a backlog."""
    from examwatch.gateway.mqtt import SETTLE

    e = make(store_backend)
    e.clocks.settled_from = T0 + SETTLE  # the broker last queued for us at T0
    late = [status_msg("s1/101", "online", T0 - 60 + i, T0 + i, n=1 + i) for i in range(5)]
    e.ingest(late, T0 + 5)  # each 60 s old: it waited in the queue
    assert store.alarms(e.conn) == [] and store.agents(e.conn)[0]["skew"] is None
    after = T0 + SETTLE + 1  # settled: a clock 60 s behind is the room's own
    e.ingest([status_msg("s1/101", "online", after - 60, after, n=9)], after)
    [a] = store.alarms(e.conn, state="active")
    assert a["rule"] == "clock_skew" and "-60.0" in a["message"]


def test_heartbeats_most_rooms_get_late_do_not_judge_clocks_and_one_room_s_own_lateness_does():
    """Late by the same in most rooms: it is our intake (the broker's queue, our parsing), not their clocks."""
    from examwatch.gateway.ledger import Clocks

    clocks = Clocks(bound=5.0)
    rooms = [f"s1/{i}" for i in range(Clocks.ROOMS)]
    with capture_logs() as logs:
        assert [clocks.judge(r, T0 - 60, T0) for r in rooms][-1] is False  # ten rooms, each 60 s late: ours
        clocks.judge(rooms[0], T0 - 60, T0 + 1)
        assert clocks.late == 60.0
        for i in range(Clocks.RECENT):  # caught up: on time again
            clocks.judge(rooms[i % len(rooms)], T0 + i, T0 + i + 0.2)
    # the change said once each way, not at every heartbeat
    assert [e["event"] for e in logs] == ["heartbeats_late", "heartbeats_on_time"] and clocks.late == 0.0
    assert clocks.judge("s1/0", T0 + 100, T0 + 200) is True  # one room 100 s behind, the others on time: its clock
    few = Clocks(bound=5.0)
    assert few.judge("s1/0", T0 - 60, T0) is True  # one room alone: nothing to tell its clock from our lateness


def test_retention_prunes_and_old_seqs_stay_known(store_backend):
    e = make(store_backend)
    e.ingest([readings_msg("s1/101", s, T0 + s) for s in (1, 2, 3)], T0 + 3)
    e.retention(T0 + 31 * 86400)
    assert count(e, "SELECT COUNT(*) FROM readings") == 0 and count(e, "SELECT COUNT(*) FROM ledger") == 0
    e.conn.close()
    e = make(store_backend)  # the floor survives a restart
    e.ingest([readings_msg("s1/101", 2, T0 + 2)._replace(received=T0 + 31 * 86400)], T0 + 31 * 86400)
    assert e.stats.duplicates == 1 and +e.stats.rejected == {}
    assert count(e, "SELECT COUNT(*) FROM readings") == 0


def test_seqs_runs():
    s = Seqs()
    for n in (1, 2, 3, 7, 5, 6, 10):
        s.add(n)
    assert s.runs == [[1, 3], [5, 7], [10, 10]]
    assert 6 in s and 4 not in s and 11 not in s
    assert s.gaps(0) == [(4, 4), (8, 9)] and s.missing(0) == 3
    s.add(4)
    assert s.runs == [[1, 7], [10, 10]]
    s.drop_below(8)
    assert s.runs == [[10, 10]] and s.missing(8) == 1


# --- the trust boundary --------------------------------------------------------------------------------


def test_poison_messages_are_rejected_set_aside_and_the_rest_of_the_batch_stored(store_backend):
    e = make(store_backend)
    topic = wire.topic("s1/101", "readings")
    nested = (
        b'{"v":1,"agent":"s1/101","epoch":1,"seq":1,"ts":1.0,"kind":"readings","body":'
        + b"[" * 3000
        + b"]" * 3000
        + b"}"
    )
    huge = wire.encode(KEYS["s1/101"], "s1/101", 2**63, T0, "readings", b"[]", epoch=EPOCH)  # signed by the room
    old = wire.encode(KEYS["s1/101"], "s1/101", 5, T0, "readings", b"[]", epoch=0)  # an agent from before epochs
    bad_body = wire.encode(KEYS["s1/101"], "s1/101", 6, T0, "readings", b'[["ups1", "x", 1e999, 1.0]]', epoch=EPOCH)
    e.ingest(
        [
            readings_msg("s1/101", 1, T0),
            *(Message(topic, p, False, T0) for p in (nested, huge, old, bad_body)),
            readings_msg("s1/101", 2, T0 + 1),
        ],
        T0 + 1,
    )
    assert +e.stats.rejected == {("malformed", "s1/101"): 2, ("outdated", "s1/101"): 1, ("bad_body", "s1/101"): 1}
    assert count(e, "SELECT COUNT(*) FROM ledger") == 2 and e.stats.readings == 6
    letters = store.dead_letters(e.conn)
    assert [d["reason"] for d in letters] == ["bad_body", "outdated", "malformed", "malformed"]
    assert (
        letters[-1]["size"] == len(nested) and letters[-1]["payload"] == nested[: store.DEAD_LETTER_BYTES]
    )  # truncated


def test_a_bug_on_one_message_rejects_that_message_only(store_backend, monkeypatch):
    e = make(store_backend)
    real = Engine._readings

    def failing(self, a, seq, readings):
        if seq == 2:
            raise KeyError("a bug")
        return real(self, a, seq, readings)

    monkeypatch.setattr(Engine, "_readings", failing)
    e.ingest([readings_msg("s1/101", s, T0 + s) for s in (1, 2, 3)], T0 + 3)
    assert +e.stats.rejected == {("internal", "s1/101"): 1}
    assert [s for (s,) in e.conn.execute("SELECT seq FROM ledger ORDER BY seq")] == [1, 3]
    assert e.agents["s1/101"].epochs[EPOCH].seqs.runs == [[1, 1], [3, 3]]  # memory agrees with the database
    assert [d["reason"] for d in store.dead_letters(e.conn)] == ["internal"]
    monkeypatch.setattr(Engine, "_readings", real)
    e.ingest([readings_msg("s1/101", 2, T0 + 2)], T0 + 4)  # sent again (the agent re-sends its outbox): taken
    assert count(e, "SELECT COUNT(*) FROM ledger") == 3


def test_a_batch_the_database_refuses_is_written_message_by_message(store_backend):
    e = make(store_backend)
    # a row the database itself refuses (a constraint we did not foresee), from one message of the batch
    if store.dialect(e.conn) == "sqlite":
        e.conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON readings WHEN NEW.value = 21.0 "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    else:
        e.conn.execute("ALTER TABLE readings ADD CONSTRAINT poison CHECK (value <> 21.0)")
    e.ingest([readings_msg("s1/101", s, T0 + s) for s in (1, 2, 3)] + [status_msg("s1/102", "online", T0, T0)], T0 + 3)
    assert [s for (s,) in e.conn.execute("SELECT seq FROM ledger ORDER BY seq")] == [1, 3]
    assert +e.stats.rejected == {("internal", "s1/101"): 1}
    assert [(d["reason"], d["agent"]) for d in store.dead_letters(e.conn)] == [("internal", "s1/101")]
    assert e.agents["s1/101"].epochs[EPOCH].seqs.runs == [[1, 1], [3, 3]]
    assert {a["agent"]: a["status"] for a in store.agents(e.conn)} == {"s1/101": "online", "s1/102": "online"}


def test_a_room_changes_only_its_own_alarms(store_backend):
    e = make(store_backend)
    door = alarm("s1/102", "raised", T0, T0, rule="secrecy_door_open")
    e.ingest([alarm_msg("s1/102", 1, door, T0)], T0)
    clear = msgspec.structs.replace(door, state="cleared", at=T0 + 1)
    as_itself = msgspec.structs.replace(clear, room="101")  # its own room, another room's alarm id
    own_id_other_room = msgspec.structs.replace(alarm("s1/101", "cleared", T0 + 1, T0), room="102")
    e.ingest(
        [
            alarm_msg("s1/102", 1, m, T0 + 1, signer="s1/101")._replace(
                payload=wire.encode(
                    KEYS["s1/101"], "s1/101", seq, T0 + 1, "alarms", msgspec.json.encode(m), epoch=EPOCH
                )
            )
            for seq, m in enumerate([clear, as_itself, own_id_other_room], start=1)
        ],
        T0 + 1,
    )
    assert +e.stats.rejected == {("unauthorized", "s1/101"): 3}
    rows = {(a["room"], a["rule"]): a for a in store.alarms(e.conn, state="active")}
    assert rows[("102", "secrecy_door_open")]["state"] == "raised"
    assert rows[("102", "security_rejected")]["level"] == 2 and ("101", "security_rejected") in rows
    # nor the gateway's own alarms: 101 cannot clear the security alarm raised about it
    sec = rows[("101", "security_rejected")]
    ours = AlarmEvent(
        id=sec["id"],
        site="s1",
        room="101",
        rule="security_rejected",
        level=2,
        state="cleared",
        device="agent",
        at=T0 + 2,
        raised_at=T0 + 1,
        message="x",
    )
    e.ingest([alarm_msg("s1/101", 4, ours, T0 + 2)], T0 + 2)
    assert e.stats.rejected[("unauthorized", "s1/101")] == 4
    assert ("101", "security_rejected") in {(a["room"], a["rule"]) for a in store.alarms(e.conn, state="active")}


def test_alarm_transitions_are_ordered_by_sequence_not_by_the_rooms_clock(store_backend):
    e = make(store_backend)
    ahead = alarm("s1/101", "raised", T0 + 86400, T0 + 86400)  # raised while its clock was a day ahead
    cleared = alarm("s1/101", "cleared", T0 + 60, T0 + 86400)  # cleared after the clock was put right
    e.ingest([alarm_msg("s1/101", 1, ahead, T0), alarm_msg("s1/101", 2, cleared, T0 + 60)], T0 + 60)
    [row] = store.alarms(e.conn)
    assert row["state"] == "cleared" and store.alarms(e.conn, state="active") == []
    assert [t["state"] for t in store.alarm_timeline(e.conn, ahead.id)] == ["cleared", "raised"]  # by the room's times


def test_statuses_are_ordered_by_their_place_not_their_clock(store_backend):
    e = make(store_backend)
    e.ingest([status_msg("s1/101", "online", T0, T0, n=1), status_msg("s1/101", "online", T0 + 1, T0 + 1, n=2)], T0 + 1)
    # a day ahead by its clock, then the right time again: the later heartbeats are news
    e.ingest([status_msg("s1/101", "online", T0 + 86400, T0 + 2, n=3)], T0 + 2)
    e.ingest([status_msg("s1/101", "online", T0 + 3 + i, T0 + 3 + i, n=4 + i) for i in range(6)], T0 + 9)
    assert +e.stats.rejected == {}
    assert store.agents(e.conn)[0]["status"] == "online"
    assert [a["rule"] for a in store.alarms(e.conn, state="active")] == []  # the skew came and went
    # the will of this connection outranks its heartbeats; a captured older will is stale; a new connection outranks it
    old_will = status_msg("s1/101", "offline", T0 - 500, T0 + 10, conn=0)
    e.ingest([old_will], T0 + 10)
    assert e.stats.rejected[("stale", "s1/101")] == 1
    assert store.agents(e.conn)[0]["status"] == "online"
    e.ingest([status_msg("s1/101", "offline", T0, T0 + 11)], T0 + 11)
    assert store.agents(e.conn)[0]["status"] == "offline"
    e.ingest([status_msg("s1/101", "online", T0 + 12, T0 + 12, n=99)], T0 + 12)  # same connection: stale
    assert store.agents(e.conn)[0]["status"] == "offline"
    e.ingest([status_msg("s1/101", "online", T0 + 13, T0 + 13, conn=2)], T0 + 13)
    assert store.agents(e.conn)[0]["status"] == "online"
    # a restarted agent (next boot) and a replaced database (new epoch, boot 1 again) are news
    e.ingest([status_msg("s1/101", "online", T0 + 14, T0 + 14, boot=2)], T0 + 14)
    e.ingest([status_msg("s1/101", "online", T0 + 15, T0 + 15, epoch=99)], T0 + 15)
    e.ingest([status_msg("s1/101", "online", T0 + 16, T0 + 16, boot=5, n=50)], T0 + 16)  # the old database: stale
    assert e.stats.rejected[("stale", "s1/101")] == 3
    assert json.loads(store.agents(e.conn)[0]["status_key"]) == [1, 1, 1, 1]
    assert store.alarms(e.conn, state="active") == []


def test_a_replaced_database_starts_a_new_epoch_of_new_data(store_backend):
    e = make(store_backend)
    e.ingest([readings_msg("s1/101", s, T0 + s) for s in (1, 2, 3)], T0 + 3)
    e.ingest([readings_msg("s1/101", s, T0 + 10 + s, epoch=8) for s in (1, 2)], T0 + 13)
    assert count(e, "SELECT COUNT(*) FROM readings") == 15 and e.stats.duplicates == 0 and +e.stats.rejected == {}
    a = store.agents(e.conn)[0]
    assert (a["epoch"], a["max_seq"], a["missing"]) == (8, 2, 0)
    e.conn.close()
    e = make(store_backend)
    e.ingest([readings_msg("s1/101", 3, T0 + 3), readings_msg("s1/101", 2, T0 + 12, epoch=8)], T0 + 20)
    assert e.stats.duplicates == 2


OLD_SCHEMA = """
CREATE TABLE agents (agent TEXT PRIMARY KEY, site TEXT NOT NULL, room TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'unknown', last_seen REAL, last_status_ts REAL, skew REAL, phase TEXT,
    floor_seq INTEGER NOT NULL DEFAULT 0, max_seq INTEGER NOT NULL DEFAULT 0, missing INTEGER NOT NULL DEFAULT 0);
CREATE TABLE ledger (agent TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, ts REAL NOT NULL,
    received REAL NOT NULL, PRIMARY KEY (agent, seq)) WITHOUT ROWID;
CREATE INDEX ledger_received ON ledger (received);
CREATE TABLE readings (agent TEXT NOT NULL, device TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL NOT NULL, ts REAL NOT NULL, quality TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE alarms (id TEXT PRIMARY KEY, site TEXT NOT NULL, room TEXT NOT NULL, rule TEXT NOT NULL,
    level INTEGER NOT NULL, state TEXT NOT NULL, device TEXT NOT NULL, message TEXT NOT NULL, raised_at REAL NOT NULL,
    updated_at REAL NOT NULL, cleared_at REAL, source TEXT NOT NULL, acked_by TEXT, acked_note TEXT, acked_at REAL);
INSERT INTO alarms (id, site, room, rule, level, state, device, message, raised_at, updated_at, source)
    VALUES ('s1/101/link_down/sw1/1', 's1', '101', 'link_down', 1, 'raised', 'sw1', 'x', 1, 1, 'agent');
INSERT INTO agents (agent, site, room, status, last_seen, last_status_ts)
    VALUES ('s1/101', 's1', '101', 'online', 1, 1);
INSERT INTO ledger VALUES ('s1/101', 1, 'readings', 1, 1);
INSERT INTO readings VALUES ('s1/101', 'ups1', 'ups_charge_percent', 50, 1, 'good', 1);
"""


def test_a_gateway_database_from_before_epochs_is_migrated(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "gw.db")
    old.executescript(OLD_SCHEMA)
    old.close()
    e = make(tmp_path / "gw.db")
    assert count(e, "SELECT MAX(version) FROM schema_migrations") == store.SCHEMA_VERSION
    assert count(e, "SELECT COUNT(*) FROM readings") == 1 and count(e, "SELECT COUNT(*) FROM ledger") == 0
    e.ingest([readings_msg("s1/101", 1, T0), status_msg("s1/101", "online", T0, T0)], T0)
    assert count(e, "SELECT COUNT(*) FROM readings") == 4 and store.agents(e.conn)[0]["epoch"] == EPOCH
    e.ingest([alarm_msg("s1/101", 2, alarm("s1/101", "cleared", T0, 1), T0)], T0)  # an alarm from before: still clears
    assert store.alarms(e.conn, state="active") == []
    e.conn.close()
    assert make(tmp_path / "gw.db").agents["s1/101"].epochs[EPOCH].seqs.runs == [[1, 2]]  # and opens again as it is
