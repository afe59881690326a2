"""The signed envelope: round trip, and every way a message can be tampered with."""

from __future__ import annotations

import msgspec
import pytest

from examwatch.kernel import wire
from examwatch.kernel.model import AlarmEvent, Reading

KEY = bytes.fromhex("11" * 32)


def alarm() -> AlarmEvent:
    return AlarmEvent(id="s1/r1/ups_on_battery/ups1/1", site="s1", room="r1", rule="ups_on_battery", level=2,
                      state="raised", device="ups1", at=1000.5, raised_at=1000.5, message="市电中断，UPS 供电")


def test_round_trip_keeps_body_bytes_and_verifies():
    body = msgspec.json.encode(alarm())
    env = wire.decode(wire.encode(KEY, "s1/r1", 42, 1700000000.123456, "alarms", body))
    assert (env.agent, env.seq, env.ts, env.kind) == ("s1/r1", 42, 1700000000.123456, "alarms")
    assert bytes(env.body) == body
    assert msgspec.json.decode(env.body, type=AlarmEvent) == alarm()
    assert wire.verify(KEY, env)


def test_readings_body_decodes_as_reading_list():
    body = msgspec.json.encode([Reading("ups1", "ups_charge_percent", 87.0, 1000.0)])
    env = wire.decode(wire.encode(KEY, "s1/r1", 1, 1000.0, "readings", body))
    assert msgspec.json.decode(env.body, type=list[Reading]) == [Reading("ups1", "ups_charge_percent", 87.0, 1000.0)]


@pytest.mark.parametrize("field,value", [("agent", "s1/r2"), ("seq", 43), ("ts", 1.0), ("kind", "readings")])
def test_any_changed_field_breaks_the_signature(field, value):
    env = wire.decode(wire.encode(KEY, "s1/r1", 42, 1000.0, "alarms", b'{"a":1}'))
    assert not wire.verify(KEY, msgspec.structs.replace(env, **{field: value}))


def test_changed_body_wrong_key_and_unsigned_fail():
    env = wire.decode(wire.encode(KEY, "s1/r1", 42, 1000.0, "alarms", b'{"a":1}'))
    assert not wire.verify(KEY, msgspec.structs.replace(env, body=msgspec.Raw(b'{"a":2}')))
    assert not wire.verify(bytes.fromhex("22" * 32), env)
    assert not wire.verify(KEY, msgspec.structs.replace(env, sig=""))


@pytest.mark.parametrize("payload", [b"", b"offline", b"{}", b'{"v":2,"agent":"a/b","seq":1,"ts":1,"kind":"alarms","body":1}',
                                     b'{"v":1,"agent":"a/b","seq":1,"ts":1,"kind":"nonsense","body":1}'])
def test_garbage_is_a_wire_error(payload):
    with pytest.raises(wire.WireError):
        wire.decode(payload)


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
