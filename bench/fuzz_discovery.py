"""Input generators for bench/fuzz.py: the lists ``examwatch discover`` reads from the room (Zigbee2MQTT's device
list, upsd's UPS list); the helpers are bench/fuzz_inputs.py's."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from bench.fuzz_inputs import Invariant, _dumps, json_scalar, json_value, nested, shaped


def zigbee_bridge() -> st.SearchStrategy[bytes]:
    """Zigbee2MQTT's bridge/devices: entries with odd types, exposes with nested features, names that are no topic."""
    name = st.one_of(st.sampled_from(["door", "noise 1", "a/b", "+", "#", "", "$SYS", "x" * 300]), st.text(max_size=20))
    prop = st.sampled_from(["contact", "noise", "recording", "battery", "state", ""])
    feature = st.recursive(
        st.fixed_dictionaries({}, optional={"property": st.one_of(prop, json_scalar), "name": prop}),
        lambda inner: st.fixed_dictionaries({"features": st.lists(inner, max_size=3)}),
        max_leaves=8,
    )
    definition = st.fixed_dictionaries(
        {},
        optional={
            "model": st.one_of(st.text(max_size=8), json_scalar),
            "exposes": st.one_of(st.lists(feature, max_size=4), json_value),
        },
    )
    entry = st.fixed_dictionaries(
        {},
        optional={
            "friendly_name": st.one_of(name, json_scalar),
            "type": st.sampled_from(["EndDevice", "Router", "Coordinator", 1]),
            "definition": st.one_of(definition, json_value),
            "disabled": json_scalar,
            "interview_completed": json_scalar,
        },
    )
    doc = st.lists(st.one_of(entry, json_scalar), max_size=6).map(_dumps)
    sample = (
        b'[{"type":"Coordinator","friendly_name":"Coordinator"},{"type":"EndDevice","friendly_name":"door",'
        b'"interview_completed":true,"definition":{"model":"MCCGQ11LM","exposes":[{"property":"contact"}]}}]'
    )
    return st.one_of(shaped(doc, [sample]), nested(b"[", b"]"))


def nut_list_ups() -> st.SearchStrategy[str]:
    line = st.one_of(
        st.builds(lambda n, d: f'UPS {n} "{d}"', st.text(max_size=10), st.text(max_size=10)),
        st.sampled_from(['UPS ups1 "x"', 'UPS ups1 "\\"', 'UPS ups1 "\\', "UPS", "BEGIN LIST UPS", ""]),
    )
    return st.lists(line, max_size=80).map("\n".join)


def call_zigbee(parse_bridge_devices: Callable, data: bytes) -> None:
    """The device list as discovery uses it: parsed, mapped to rows; every usable row a valid config entry."""
    import re

    from examwatch.collectors.mqtt import topic_issue
    from examwatch.edge.discover import mqtt, offered

    for row in mqtt.rows(parse_bridge_devices(data), "zigbee2mqtt", offered("mqtt")):
        if row.device and (not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", row.name) or topic_issue(row.device["topic"])):
            raise Invariant(f"unusable entry {row.name[:80]!r} {row.device['topic'][:80]!r}")


def call_list_ups(parse_list_ups: Callable, text: str) -> None:
    found = parse_list_ups(text.split("\n"))
    if len(found) > 64 or any(not name or " " in name for name, _ in found):
        raise Invariant(f"UPS list {found[:3]!r}")
