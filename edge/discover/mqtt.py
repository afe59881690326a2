"""MQTT discovery: the room broker's Zigbee2MQTT device list (``zigbee2mqtt/bridge/devices``, retained)
mapped onto the mqtt profiles by what each device exposes or by its model.

The list is outside input: bounded in size (the broker drops a bigger message: MQTT v5 Maximum Packet
Size), in nesting and in count, and read field by field; a device entry we cannot read is a row that says
so, the others are still mapped.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from examwatch.collectors import profiles
from examwatch.collectors.mqtt import topic_issue
from examwatch.edge.discover import ERROR, NONE, OK, Found, device_name, offered

MAX_BRIDGE = 2 * 1024 * 1024  # 200 devices with their exposes are a few hundred KiB
MAX_DEVICES = 1000
MAX_FEATURES = 500  # exposes and their nested features, per device
MAX_NESTING = 8  # a composite's features nest 2-3 levels


class BridgeError(Exception):
    """The device list as a whole cannot be used; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ZigbeeDevice:
    friendly_name: str
    model: str
    vendor: str
    exposes: frozenset[str]  # property names, composites' features included
    problem: str = ""  # why the entry cannot be used (no name, disabled, ...)


def _text(value: Any, limit: int = 128) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _properties(exposes: Any) -> frozenset[str]:
    """Every ``property`` (or ``name``) in an exposes list and its composites' ``features``, bounded."""
    found: set[str] = set()
    stack = [(exposes, 0)]
    seen = 0
    while stack and seen < MAX_FEATURES:
        items, depth = stack.pop()
        if not isinstance(items, list) or depth > MAX_NESTING:
            continue
        for item in items[:MAX_FEATURES]:
            seen += 1
            if not isinstance(item, dict):
                continue
            name = _text(item.get("property")) or _text(item.get("name"))
            if name:
                found.add(name)
            stack.append((item.get("features"), depth + 1))
    return frozenset(found)


def parse_bridge_devices(payload: bytes) -> list[ZigbeeDevice]:
    """Zigbee2MQTT's bridge/devices -> its end devices (the coordinator left out); ``BridgeError`` when the
    message is not such a list."""
    if len(payload) > MAX_BRIDGE:
        raise BridgeError("too_large")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nesting past the parser's stack
        raise BridgeError("not_json") from None
    if not isinstance(doc, list):
        raise BridgeError("not_a_list")
    if len(doc) > MAX_DEVICES:
        raise BridgeError("too_many_devices")
    out = []
    for entry in doc:
        if not isinstance(entry, dict) or entry.get("type") == "Coordinator":
            continue
        name = _text(entry.get("friendly_name"), 256)
        definition = entry.get("definition")
        definition = definition if isinstance(definition, dict) else {}
        problem = ""
        if not name:
            problem = "no friendly_name"
        elif entry.get("disabled") is True:
            problem = "disabled in Zigbee2MQTT"
        elif entry.get("interview_completed") is False or not definition:
            problem = "not interviewed (or unsupported): re-pair it"
        out.append(
            ZigbeeDevice(
                name,
                _text(definition.get("model")),
                _text(definition.get("vendor")),
                _properties(definition.get("exposes")),
                problem,
            )
        )
    return out


def match(device: ZigbeeDevice, offered: list[tuple[str, profiles.Discovery]]) -> tuple[str, profiles.Discovery] | None:
    """The profile for a device (pure): its model named by a profile, else the profile whose exposes it has
    all of (the lowest rank, then the most specific)."""
    by_model = [(n, d) for n, d in offered if device.model and device.model in d.models]
    by_exposes = [(n, d) for n, d in offered if d.exposes and set(d.exposes) <= device.exposes]
    fits = by_model or by_exposes
    return min(fits, key=lambda nd: (nd[1].rank, -len(nd[1].exposes), nd[0])) if fits else None


def rows(devices: list[ZigbeeDevice], base: str, offered: list[tuple[str, profiles.Discovery]]) -> list[Found]:
    """The device list as summary rows and draft entries (pure)."""
    out = []
    for z in devices:
        topic = f"{base}/{z.friendly_name}"
        what = " ".join(filter(None, (z.vendor, z.model))) or "型号未知"
        if z.problem:
            out.append(Found("mqtt", topic, ERROR, f"Zigbee 设备 {what}：{z.problem}"))
            continue
        if problem := topic_issue(topic):
            out.append(
                Found("mqtt", topic, ERROR, f"Zigbee 设备 {what} 的主题不可用（{problem}）：在 Zigbee2MQTT 中改名")
            )
            continue
        found = match(z, offered)
        if found is None:
            exposes = ", ".join(sorted(z.exposes)[:8]) or "无"
            out.append(Found("mqtt", topic, NONE, f"Zigbee 设备 {what}（暴露 {exposes}）：没有对应的 profile"))
            continue
        name, d = found
        device: dict[str, Any] = {"protocol": "mqtt", "topic": topic, "kind": d.kind, "profile": name}
        if d.interval:
            device["interval"] = d.interval
        notes = (d.note,) if d.note else ()
        why = f"Zigbee 设备 {what}，按{'型号' if z.model in d.models else '暴露的属性'}识别"
        out.append(Found("mqtt", topic, OK, why, d.kind, name, device_name(z.friendly_name, d.kind), device, notes))
    return out


def fetch(broker: Any, base: str, wait: float) -> bytes | None:
    """The retained ``<base>/bridge/devices`` from the room broker ([mqtt] settings); None when none came
    within ``wait`` seconds. ``OSError`` when the broker cannot be reached or refuses our login."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from examwatch.kernel.broker import apply_broker_settings

    got: list[bytes] = []
    refused: list[str] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{broker.client_id}-discover", protocol=mqtt.MQTTv5)
    apply_broker_settings(client, broker)

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
            done.set()
        else:
            c.subscribe(f"{base}/bridge/devices", qos=0)

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = MAX_BRIDGE + 1024  # the broker drops a bigger list instead of sending it
    client.connect(broker.host, broker.port, keepalive=30, clean_start=True, properties=props)
    client.loop_start()
    try:
        done.wait(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    if refused:
        raise ConnectionRefusedError(f"the broker refused us: {refused[0]} (check [mqtt] username/password)")
    return got[0] if got else None


def probe(broker: Any, base: str, wait: float) -> list[Found]:
    where = f"{broker.host}:{broker.port} {base}/bridge/devices"
    try:
        payload = fetch(broker, base, wait)
    except OSError as err:
        return [Found("mqtt", where, ERROR, f"房间 MQTT 服务器连不上：{err}")]
    if payload is None:
        return [Found("mqtt", where, NONE, f"{wait:g} 秒内没有设备列表（Zigbee2MQTT 没在运行，或基础主题不是 {base}）")]
    try:
        devices = parse_bridge_devices(payload)
    except BridgeError as err:
        return [Found("mqtt", where, ERROR, f"设备列表无法使用（{err.reason}）：检查 Zigbee2MQTT")]
    return rows(devices, base, offered("mqtt")) or [
        Found("mqtt", where, NONE, "设备列表为空：尚未配对任何 Zigbee 设备")
    ]


__all__ = ["BridgeError", "ZigbeeDevice", "match", "parse_bridge_devices", "probe", "rows"]
