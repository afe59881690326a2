"""MQTT payload parsing: the profiles' mappings, and a fuzz run where nothing may escape."""

from __future__ import annotations

import json
import math

import msgspec
import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from examwatch.collectors.base import Context, Health
from examwatch.collectors.mqtt import Field, MqttCollector, MqttOptions, Profile, parse_availability, parse_payload
from examwatch.collectors.profiles import load
from examwatch.edge.config import Device, MqttSettings
from examwatch.kernel.model import Reading
from tests.support import Recorder

CONTACT = load("mqtt", "zigbee2mqtt_contact", Profile).fields


def collector(sink: Recorder, health: Health) -> MqttCollector:
    devices = [
        Device(
            name="door",
            kind="door",
            protocol="mqtt",
            topic="z2m/door",
            profile="zigbee2mqtt_contact",
            options=MqttOptions(),
        ),
        Device(
            name="rec",
            kind="recorder",
            protocol="mqtt",
            topic="rec/1",
            profile="recorder_json",
            options=MqttOptions(fields=[Field(path="batt", metric="battery_percent")], availability=False),
        ),
    ]
    return MqttCollector(devices, sink, health, Context(broker=MqttSettings()))


def test_zigbee2mqtt_contact_true_means_closed():
    msg = b'{"battery":91,"contact":true,"linkquality":120,"voltage":3005}'
    readings, rejected = parse_payload(CONTACT, "door", msg, 5.0)
    assert {r.metric: r.value for r in readings} == {
        "door_open": 0.0,
        "battery_percent": 91.0,
        "radio_link_quality": 120.0,
        "battery_voltage_volts": 3.005,
    }
    assert rejected == []
    assert parse_payload(CONTACT, "door", b'{"contact":false}', 5.0) == ([Reading("door", "door_open", 1.0, 5.0)], [])


def test_one_bad_field_costs_only_itself():
    """The door opening survives a battery value we cannot read; the bad field is reported by reason."""
    readings, rejected = parse_payload(CONTACT, "door", b'{"contact":false,"battery":"low"}', 5.0)
    assert readings == [Reading("door", "door_open", 1.0, 5.0)]
    assert rejected == ["wrong_type"]
    readings, rejected = parse_payload(
        CONTACT,
        "door",
        b'{"contact":"maybe","battery":NaN,"voltage":1e999,"linkquality":' + b"9" * 400 + b',"battery_low":false}',
        5.0,
    )
    assert readings == [Reading("door", "battery_low", 0.0, 5.0)]
    assert sorted(rejected) == ["not_finite", "not_finite", "not_finite", "unmapped_value"]


def test_zigbee2mqtt_conventions_booleans_and_numbers_as_text():
    rec = load("mqtt", "recorder_json", Profile).fields
    as_text = b'{"contact":"false","battery":"42.5","voltage":" 3005 ","battery_low":"true"}'
    got = {r.metric: r.value for r in parse_payload(CONTACT, "door", as_text, 1.0)[0]}
    assert got == {"door_open": 1.0, "battery_percent": 42.5, "battery_voltage_volts": 3.005, "battery_low": 1.0}
    for state, value in ((b'"ON"', 1.0), (b'"off"', 0.0), (b"true", 1.0), (b'"FALSE"', 0.0)):
        assert parse_payload(rec, "rec", b'{"recording":' + state + b"}", 1.0)[0] == [
            Reading("rec", "recording_active", value, 1.0)
        ]
    # a map's keys are matched as lower-case text, however the config spells them
    door = [Field(path="state", metric="door_open", map={"OPEN": 1, "Closed": 0})]
    assert parse_payload(door, "d", b'{"state":"open"}', 1.0)[0] == [Reading("d", "door_open", 1.0, 1.0)]
    assert parse_payload(door, "d", b'{"state":"CLOSED"}', 1.0)[0] == [Reading("d", "door_open", 0.0, 1.0)]
    # a boolean never passes as a number, and a numeric string never as NaN or inf
    assert parse_payload(CONTACT, "door", b'{"battery":true}', 1.0) == ([], ["wrong_type"])
    assert parse_payload(CONTACT, "door", b'{"battery":"nan","voltage":"-inf"}', 1.0) == ([], ["not_finite"] * 2)


def test_whole_message_faults_raise_and_depth_is_bounded_before_parsing():
    import pytest

    from examwatch.collectors.mqtt import MAX_DEPTH, PayloadError

    def reason(payload: bytes) -> str:
        with pytest.raises(PayloadError) as err:
            parse_payload(CONTACT, "door", payload, 1.0)
        return err.value.reason

    assert reason(b"[" * 100_000) == "too_large"
    assert reason(b'{"a":' * 5_000 + b"1" + b"}" * 5_000) == "too_deep"  # json.loads: RecursionError
    assert reason(b'{"contact":true,"x":' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}") == "too_deep"
    # brackets inside strings are text, not nesting
    text = b'{"contact":true,"note":"' + b"[{" * 1_000 + b'"}'
    assert parse_payload(CONTACT, "door", text, 1.0)[0] == [Reading("door", "door_open", 0.0, 1.0)]
    assert reason(b"{nope") == "not_json"
    assert reason(b"[1]") == "not_object"
    assert reason(b'{"other":1}') == "no_known_field"


def test_availability_both_forms():
    assert parse_availability(b"online") == 1.0
    assert parse_availability(b'{"state":"offline"}') == 0.0


def test_generic_json_paths_and_scale_with_device_override():
    sink, health = Recorder(), Health()
    c = collector(sink, health)
    c.handle(
        "rec/1", json.dumps({"batt": 15, "recording": True, "storage": {"free_mb": 2, "total_mb": 8}}).encode(), 1.0
    )
    got = {r.metric: r.value for r in sink.readings}
    assert got == {
        "battery_percent": 15.0,
        "recording_active": 1.0,
        "storage_free_bytes": 2 * 2**20,
        "storage_total_bytes": 8 * 2**20,
    }


def test_bad_payloads_are_dropped_counted_and_never_raise():
    sink, health = Recorder(), Health()
    c = collector(sink, health)
    bad = {
        b"not json": "not_json",
        b"[1,2]": "not_object",
        b"[" * 40 + b"]" * 40: "too_deep",
        b'{"contact":"maybe"}': "unmapped_value",
        b'{"battery":"full"}': "wrong_type",
        b'{"battery":NaN}': "not_finite",
        b'{"other":1}': "no_known_field",
        b"{" + b" " * 70_000 + b"}": "too_large",
    }
    for payload in bad:
        c.handle("z2m/door", payload, 1.0)
    c.handle("z2m/door/availability", b"sideways", 1.0)
    c.handle("somewhere/else", b"{}", 1.0)
    assert sink.readings == []
    assert {reason for (_, reason) in health.dropped} == set(bad.values()) | {"unknown_availability", "unknown_topic"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
keys = st.sampled_from(["contact", "battery", "voltage", "linkquality", "batt", "recording", "storage", "x"])


FUZZED = collector(Recorder(), Health())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    topic=st.sampled_from(["z2m/door", "z2m/door/availability", "rec/1", "other"]),
    payload=st.one_of(
        st.binary(max_size=300),
        st.dictionaries(keys, json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
    ),
)
def test_fuzz_no_exception_escapes_and_every_reading_is_sane(topic, payload):
    sink, health = Recorder(), Health()
    FUZZED.acc, FUZZED.health = sink, health
    FUZZED.handle(topic, payload, 1.0)
    for r in sink.readings:
        assert math.isfinite(r.value)
        msgspec.json.encode(r)  # it must be storable and sendable
    # every message ends as readings or counted drops, never as nothing
    assert sink.readings or sum(health.dropped.values()) >= 1


def test_mutation_fuzz_of_real_payloads():
    """5,000 byte-level mutations of real sensor messages: truncations, flips, splices."""
    import random

    rng = random.Random(2026)
    seeds = [
        (b'{"battery":91,"contact":true,"linkquality":120,"voltage":3005}', "z2m/door"),
        (b'{"state":"online"}', "z2m/door/availability"),
        (b'{"batt":15,"recording":true,"storage":{"free_mb":2,"total_mb":8}}', "rec/1"),
    ]
    outcomes = {"readings": 0, "dropped": 0}
    for _ in range(5000):
        payload, topic = rng.choice(seeds)
        data = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            op, i = rng.random(), rng.randrange(len(data) + 1)
            if op < 0.4 and data:
                data[min(i, len(data) - 1)] = rng.randrange(256)
            elif op < 0.7:
                data = data[:i]
            else:
                data[i:i] = rng.choice([b"e9", b"-", b"NaN", b"[", b"}", b'"', b"\\u0000", b"1" * 400])
        sink, health = Recorder(), Health()
        FUZZED.acc, FUZZED.health = sink, health
        FUZZED.handle(topic, bytes(data), 1.0)
        assert all(math.isfinite(r.value) for r in sink.readings)
        assert sink.readings or sum(health.dropped.values()) >= 1
        outcomes["readings" if sink.readings else "dropped"] += 1
    assert outcomes["readings"] > 100 and outcomes["dropped"] > 1000  # both paths were exercised


def test_a_subscription_the_broker_refuses_takes_that_device_offline_only():
    """mosquitto 2.0 grants what its ACL denies (it filters on delivery), so the SUBACK is fed here."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    sink, health = Recorder(), Health()
    c = collector(sink, health)
    c._subscribing[7] = list(c.routes)
    granted, refused = ReasonCode(PacketTypes.SUBACK, "Granted QoS 1"), ReasonCode(PacketTypes.SUBACK, "Not authorized")
    c._on_subscribe(None, None, 7, [granted, granted, refused], None)  # z2m/door, its availability, rec/1
    assert sink.readings == [Reading("rec", "device_online", 0.0, sink.readings[0].ts)]
    assert health.dropped == {("mqtt", "subscribe_refused"): 1}
    assert health.devices["rec"].online is False and "door" not in health.devices


def test_a_wildcard_or_shared_topic_is_refused_for_its_device_alone():
    from examwatch.collectors.mqtt import topic_issue

    sink, health = Recorder(), Health()
    devices = [
        Device(name=n, kind="door", protocol="mqtt", topic=t, profile="zigbee2mqtt_contact")
        for n, t in (("a", "z2m107/#"), ("b", "z2m/+/door"), ("c", "z2m/c"), ("d", "z2m/c"), ("e", "z2m/e"))
    ]
    c = MqttCollector(devices, sink, health, Context(broker=MqttSettings()))
    assert set(c.routes) == {"z2m/c", "z2m/c/availability", "z2m/e", "z2m/e/availability"}
    assert set(c.refused) == {"a", "b", "d"}
    assert {r.device for r in sink.readings if r.metric == "device_online" and r.value == 0} == {"a", "b", "d"}
    assert health.dropped == {("mqtt", "bad_topic"): 3}
    assert [topic_issue(t) is None for t in ("", "a/#", "a\0b", "z2m/door")] == [False, False, False, True]


def test_a_dead_network_loop_is_seen(mosquitto):
    """An exception in paho's thread ends its loop (and every sensor with it): alive() must say so."""
    import asyncio

    from tests.support import wait_until

    async def scenario() -> None:
        sink, health = Recorder(), Health()
        c = collector(sink, health)
        c.broker = MqttSettings(port=mosquitto.port, client_id="dead-loop")
        stop = asyncio.Event()
        task = asyncio.create_task(c.run(stop))
        await wait_until(lambda: c.connected, 5)
        assert c.alive() and not task.done()
        c.client.on_message = lambda *_: 1 / 0  # a bug in a callback: paho re-raises it in its thread
        pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.publish("z2m/door", b"{}", qos=0)
        pub.disconnect()
        await wait_until(task.done, 5)  # run() returns: the agent's health turns bad
        assert not c.alive()
        stop.set()
        await c.close()

    asyncio.run(scenario())
