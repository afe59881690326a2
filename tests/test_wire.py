"""The signed envelope: round trip, and every way a message can be tampered with."""

from __future__ import annotations

import json

import msgspec
import pytest

from examwatch.kernel import wire
from examwatch.kernel.model import AlarmEvent, Reading

KEY = bytes.fromhex("11" * 32)


def alarm() -> AlarmEvent:
    return AlarmEvent(
        id="s1/r1/ups_on_battery/ups1/1",
        site="s1",
        room="r1",
        rule="ups_on_battery",
        level=2,
        state="raised",
        device="ups1",
        at=1000.5,
        raised_at=1000.5,
        message="市电中断，UPS 供电",
    )


def test_round_trip_keeps_body_bytes_and_verifies():
    body = msgspec.json.encode(alarm())
    env = wire.decode(wire.encode(KEY, "s1/r1", 42, 1700000000.123456, "alarms", body, epoch=9))
    assert (env.agent, env.epoch, env.seq, env.ts, env.kind) == ("s1/r1", 9, 42, 1700000000.123456, "alarms")
    assert bytes(env.body) == body
    assert msgspec.json.decode(env.body, type=AlarmEvent) == alarm()
    assert wire.verify(KEY, env)


def test_readings_body_decodes_as_reading_list():
    body = msgspec.json.encode([Reading("ups1", "ups_charge_percent", 87.0, 1000.0)])
    env = wire.decode(wire.encode(KEY, "s1/r1", 1, 1000.0, "readings", body, epoch=9))
    assert msgspec.json.decode(env.body, type=list[Reading]) == [Reading("ups1", "ups_charge_percent", 87.0, 1000.0)]


@pytest.mark.parametrize(
    "field,value", [("agent", "s1/r2"), ("epoch", 10), ("seq", 43), ("ts", 1.0), ("kind", "readings")]
)
def test_any_changed_field_breaks_the_signature(field, value):
    env = wire.decode(wire.encode(KEY, "s1/r1", 42, 1000.0, "alarms", b'{"a":1}', epoch=9))
    assert not wire.verify(KEY, msgspec.structs.replace(env, **{field: value}))


def test_changed_body_wrong_key_and_unsigned_fail():
    env = wire.decode(wire.encode(KEY, "s1/r1", 42, 1000.0, "alarms", b'{"a":1}', epoch=9))
    assert not wire.verify(KEY, msgspec.structs.replace(env, body=msgspec.Raw(b'{"a":2}')))
    assert not wire.verify(bytes.fromhex("22" * 32), env)
    assert not wire.verify(KEY, msgspec.structs.replace(env, sig=""))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"offline",
        b"{}",
        b'{"v":2,"agent":"a/b","seq":1,"ts":1,"kind":"alarms","body":1}',
        b'{"v":1,"agent":"a/b","seq":1,"ts":1,"kind":"nonsense","body":1}',
    ],
)
def test_garbage_is_a_wire_error(payload):
    with pytest.raises(wire.WireError):
        wire.decode(payload)


def envelope(raw: bytes = b"[]", **fields: object) -> bytes:
    """An envelope as JSON, its body given raw."""
    env = {"v": 1, "agent": "a/b", "epoch": 1, "seq": 1, "ts": 1000.0, "kind": "readings", "body": "@", **fields}
    return json.dumps(env).encode().replace(b'"@"', raw)


@pytest.mark.parametrize(
    "payload,why",
    [
        (envelope(b"[" * 1000 + b"]" * 1000), "nested more than 8"),  # RecursionError before the bound
        (envelope(b"[" * 9 + b"]" * 9), "nested more than 8"),
        (envelope(b'"' + b"x" * wire.MAX_PAYLOAD + b'"'), "more than"),
        (envelope(seq=2**63), "not an envelope"),  # crashed SQLite's INTEGER bind at the county
        (envelope(seq=wire.SEQ_MAX + 1), "not an envelope"),
        (envelope(seq=-1), "not an envelope"),
        (envelope(epoch=2**62 + 1), "not an envelope"),
        (envelope(b"1e999", ts="@", body=[]), "not an envelope"),  # inf
        (envelope(ts=-5.0), "not an envelope"),
        (envelope(seq=0), "seq 0 for a readings"),
        (envelope(kind="status", seq=3), "seq 3 for a status"),
        (envelope(sig="ab" * 100), "not an envelope"),
    ],
)
def test_out_of_bounds_is_a_wire_error_before_anything_recurses(payload, why):
    with pytest.raises(wire.WireError, match=why):
        wire.decode(payload)


def test_depth_skips_strings_and_escapes():
    assert wire.depth(b"") == 0 and wire.depth(b"{}") == 1 and wire.depth(b"[" * 50 + b"]" * 50) == wire.MAX_DEPTH + 1
    assert wire.depth(b"[[]") == wire.depth(b"][") == wire.MAX_DEPTH + 1  # unbalanced: no parser takes it either
    assert wire.depth(rb'[["[[[[", "\"[[[", "\\", [1]]]') == 3  # brackets inside strings do not count
    assert wire.depth(b'{"v": 1, "body": [["d", "m", 1.0, 2.0, "good"]]}') == 3
    assert wire.decode(envelope(b"[" * 7 + b"]" * 7)).seq == 1  # at the bound: accepted


def test_bodies_are_bounded_too():
    readings = msgspec.json.Decoder(list[Reading])
    for bad in (
        b'[["d", "m", 1e999, 1.0]]',
        b'[["d", "m", 1.0, 1e20]]',
        b'[["", "m", 1.0, 1.0]]',
        b'[["' + b"d" * 200 + b'", "m", 1.0, 1.0]]',
    ):
        with pytest.raises(msgspec.ValidationError):
            readings.decode(bad)
    ev = msgspec.json.decode(msgspec.json.encode(alarm()))
    for field, value in (
        ("level", 7),
        ("at", 1e20),
        ("message", "长" * 3000),
        ("id", ""),
        ("site", None),
        ("state", "gone"),
    ):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(json.dumps({**ev, field: value}).encode(), type=AlarmEvent)
    status = msgspec.json.Decoder(wire.Status)
    with pytest.raises(msgspec.ValidationError):
        status.decode(msgspec.json.encode({"state": "online", "n": 2**63}))
    with pytest.raises(msgspec.ValidationError):
        status.decode(msgspec.json.encode({"state": "asleep"}))


def test_status_order_a_will_outranks_its_connection_and_the_next_connection_outranks_the_will():
    def key(**kw: int) -> tuple[int, int, int]:
        return wire.Status(state="online", **kw).order()

    beats = [key(boot=1, conn=1, n=n) for n in (1, 2, 3)]
    will = key(boot=1, conn=1, n=wire.LAST)
    next_conn, next_boot = key(boot=1, conn=2, n=1), key(boot=2, conn=1, n=1)
    assert sorted([next_boot, will, *reversed(beats), next_conn]) == [*beats, will, next_conn, next_boot]


def test_topics():
    assert wire.topic("s1/r1", "alarms") == "examwatch/v1/s1/r1/alarms"
    assert wire.parse_topic("examwatch/v1/s1/r1/status") == ("s1/r1", "status")
    assert wire.parse_topic("examwatch/v1/s1/r1/other") is None
    assert wire.parse_topic("examwatch/v1/s1/alarms") is None


def test_keys(tmp_path):
    f = tmp_path / "k"
    f.write_text("ab" * 32 + "\n")
    f.chmod(0o600)
    assert wire.load_key("", str(f)) == bytes.fromhex("ab" * 32)
    with pytest.raises(ValueError, match="hex"):
        wire.parse_key("not hex")
    with pytest.raises(ValueError, match="too short"):
        wire.parse_key("abcd")
    with pytest.raises(ValueError, match="no signing key"):
        wire.load_key("", "")
