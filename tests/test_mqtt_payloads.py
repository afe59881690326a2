"""MQTT payload parsing: the profiles' mappings, and a fuzz run where nothing may escape."""

from __future__ import annotations

import json
import math

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examwatch.collectors.base import Context, Health
from examwatch.collectors.mqtt import Field, MqttCollector, MqttOptions, Profile, parse_availability, parse_payload
from examwatch.collectors.profiles import load
from examwatch.edge.config import Device, Mqtt
from examwatch.kernel.model import Reading
from tests.support import Recorder

CONTACT = load("mqtt", "zigbee2mqtt_contact", Profile).fields


def collector(sink: Recorder, health: Health) -> MqttCollector:
    devices = [
        Device(name="door", kind="door", protocol="mqtt", topic="z2m/door", profile="zigbee2mqtt_contact",
               options=MqttOptions()),
        Device(name="rec", kind="recorder", protocol="mqtt", topic="rec/1", profile="recorder_json",
               options=MqttOptions(fields=[Field(path="batt", metric="battery_percent")], availability=False)),
    ]
    return MqttCollector(devices, sink, health, Context(broker=Mqtt()))


def test_zigbee2mqtt_contact_true_means_closed():
    msg = b'{"battery":91,"contact":true,"linkquality":120,"voltage":3005}'
    got = {r.metric: r.value for r in parse_payload(CONTACT, "door", msg, 5.0)}
    assert got == {"door_open": 0.0, "battery_percent": 91.0, "radio_link_quality": 120.0,
                   "battery_voltage_volts": 3.005}
    assert parse_payload(CONTACT, "door", b'{"contact":false}', 5.0) == [Reading("door", "door_open", 1.0, 5.0)]


def test_availability_both_forms():
    assert parse_availability(b"online") == 1.0
    assert parse_availability(b'{"state":"offline"}') == 0.0


def test_generic_json_paths_and_scale_with_device_override():
    sink, health = Recorder(), Health()
    c = collector(sink, health)
    c.handle("rec/1", json.dumps({"batt": 15, "recording": True, "storage": {"free_mb": 2, "total_mb": 8}}).encode(), 1.0)
    got = {r.metric: r.value for r in sink.readings}
    assert got == {"battery_percent": 15.0, "recording_active": 1.0, "storage_free_bytes": 2 * 2**20,
                   "storage_total_bytes": 8 * 2**20}


def test_bad_payloads_are_dropped_counted_and_never_raise():
    sink, health = Recorder(), Health()
    c = collector(sink, health)
    bad = {
        b"not json": "not_json",
        b"[1,2]": "not_object",
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
    # every message ends as readings or as exactly one counted drop, never as nothing
    assert bool(sink.readings) != (sum(health.dropped.values()) == 1)


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
        assert bool(sink.readings) != (sum(health.dropped.values()) == 1)
        outcomes["readings" if sink.readings else "dropped"] += 1
    assert outcomes["readings"] > 100 and outcomes["dropped"] > 1000  # both paths were exercised
