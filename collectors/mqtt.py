"""MQTT sensors: Zigbee2MQTT door contacts and noise sensors, availability, and generic JSON devices.

paho-mqtt runs its own network thread; ``on_message`` parses and hands readings to the accumulator, which
is thread-safe. A bad field is dropped with a counter and one log line per kind of fault, the message's
other fields are kept; nothing a sensor sends can stop the collector. MQTT v5, so that the CONNECT can
carry a Maximum Packet Size: the broker drops an oversized message (even a retained one) instead of
sending it, and paho never buffers it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from examwatch.collectors import profiles
from examwatch.collectors.base import FAIL, OK, WARN, Collector, Context, Device, DeviceError, Finding, register
from examwatch.kernel.broker import apply_broker_settings
from examwatch.kernel.catalog import METRICS
from examwatch.kernel.config import Finite, Strict
from examwatch.kernel.model import Reading

log = structlog.get_logger("examwatch.mqtt")

MAX_PAYLOAD = 64 * 1024  # a sensor message is a few hundred bytes; anything near this is not a sensor
MAX_PACKET = MAX_PAYLOAD + 8 * 1024  # MQTT v5 Maximum Packet Size we ask the broker for: payload + topic and headers
MAX_DEPTH = 32  # Zigbee2MQTT nests 2-3 levels; json.loads raises RecursionError near 1,000
# JSON strings (skipped; an unterminated one runs to the end, so the scan stays linear) and brackets
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)
CONNECT_TIMEOUT = 5.0  # seconds the readiness probe gives the room broker to accept us
MAX_TOPIC = 256  # characters; Zigbee2MQTT's are "zigbee2mqtt/<friendly name>"


class Field(Strict):
    path: str  # dotted JSON path, list items by index: "storage.free_mb", "disks.0.status"
    metric: str
    scale: Finite = 1.0
    # JSON value as lower-case text (true, false, on, off, open, closed, ok, ...) -> metric value
    map: dict[str, Finite] | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}")
        if self.map is not None:
            self.map = {k.strip().lower(): v for k, v in self.map.items()}


class Profile(Strict):
    description: str = ""
    discover: profiles.Discovery | None = None  # how `examwatch discover` maps a Zigbee2MQTT device onto it
    fields: list[Field] = []


class MqttOptions(Strict):
    fields: list[Field] = []  # extra or overriding paths for this device (a generic JSON device needs them)
    availability: bool = True  # also listen on <topic>/availability (Zigbee2MQTT's availability feature)


def topic_issue(topic: str) -> str | None:
    """What is wrong with a device's topic, or None: it names exactly one device's messages."""
    if not topic:
        return "an MQTT device needs its topic, e.g. zigbee2mqtt/secrecy-door"
    if len(topic) > MAX_TOPIC:
        return f"longer than {MAX_TOPIC} characters"
    if "+" in topic or "#" in topic:
        return "one device's own topic, without wildcards (+ #), e.g. zigbee2mqtt/secrecy-door"
    if "" in topic.split("/"):
        return "an empty level (a leading, trailing or doubled '/')"
    if topic.startswith("$"):
        return "topics beginning with '$' are the broker's own"
    if any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in topic):
        return "a control character in the topic"
    return None


class PayloadError(Exception):
    """A message we cannot use; ``reason`` is the drop counter's label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _lookup(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, dict):
            doc = doc.get(part)
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


def _key(value: Any) -> str:
    """A JSON scalar as a map key: true/false for booleans, the text otherwise, in lower case ("ON" -> "on")."""
    return json.dumps(value) if isinstance(value, bool) else str(value).strip().lower()


def _too_deep(payload: bytes) -> bool:
    if payload.count(b"{") + payload.count(b"[") <= MAX_DEPTH:  # the common case, at C speed
        return False
    depth = 0
    for m in _TOKENS.finditer(payload):
        tok = m.group()
        if tok in (b"{", b"["):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif tok in (b"}", b"]"):
            depth -= 1
    return False


def _value(f: Field, raw: Any) -> float:
    """One field's JSON value -> the metric's value; ``PayloadError`` names why it cannot be used."""
    if f.map is not None and not isinstance(raw, (dict, list)):
        if _key(raw) not in f.map:
            raise PayloadError("unmapped_value")
        value = f.map[_key(raw)]
    elif isinstance(raw, bool):  # a boolean needs a map; True is not 1 by accident
        raise PayloadError("wrong_type")
    elif isinstance(raw, (int, float, str)):
        try:  # Zigbee2MQTT and bridges send some numbers as text: "42.5"
            value = float(raw) * f.scale
        except ValueError:
            raise PayloadError("wrong_type") from None
        except OverflowError:  # an integer beyond any float
            raise PayloadError("not_finite") from None
    else:
        raise PayloadError("wrong_type")
    if not math.isfinite(value):
        raise PayloadError("not_finite")
    return value


def parse_payload(fields: list[Field], device: str, payload: bytes, now: float) -> tuple[list[Reading], list[str]]:
    """A sensor's JSON state message -> (readings of its valid fields, reasons of the rejected ones).

    One bad field never costs the others (a door opening must survive a battery value we cannot read).
    Fields absent from the message are simply not read. ``PayloadError`` only for faults of the whole
    message: too_large, too_deep, not_json, not_object, and no_known_field (nothing a field names is there).
    """
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError("too_large")
    if _too_deep(payload):
        raise PayloadError("too_deep")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise PayloadError("not_json") from None
    if not isinstance(doc, dict):
        raise PayloadError("not_object")
    readings, rejected = [], []
    for f in fields:
        raw = _lookup(doc, f.path)
        if raw is None:
            continue
        try:
            readings.append(Reading(device, f.metric, _value(f, raw), now))
        except PayloadError as err:
            rejected.append(err.reason)
    if fields and not readings and not rejected:
        raise PayloadError("no_known_field")
    return readings, rejected


def parse_availability(payload: bytes) -> float:
    """Zigbee2MQTT availability: ``online``/``offline``, or ``{"state": "online"}`` (newer versions)."""
    text = payload.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            state = json.loads(text).get("state")
        except (ValueError, AttributeError):
            raise PayloadError("not_json") from None
    else:
        state = text
    if state == "online":
        return 1.0
    if state == "offline":
        return 0.0
    raise PayloadError("unknown_availability")


@register
class MqttCollector(Collector):
    """Listens to the room's local broker; one subscription per sensor topic (and its availability).

    A device whose topic cannot work (a wildcard, a topic another device has) is refused at start-up and
    reported offline; the others are read. Nothing in paho's thread may raise: an exception there would
    end the network loop, and with it every sensor of the room. ``alive()`` says whether that loop runs.
    """

    protocol = "mqtt"
    Options = MqttOptions
    reasons = {
        "subscribe_refused": "房间 MQTT 服务器拒绝订阅该主题：检查 mosquitto 的 ACL 中监测代理的读权限",
        "bad_topic": "主题无效（含通配符、空层级或与其他设备重复）：修改该设备的 topic",
    }
    profile_schema = Profile
    default_profile = "generic_json"  # no fields of its own: the device's ``fields`` say it all
    sample = """
[[devices]]                     # example: the secrecy-room door (Zigbee2MQTT contact sensor)
name = "secrecy-door"
kind = "door"
protocol = "mqtt"
topic = "zigbee2mqtt/secrecy-door"
profile = "zigbee2mqtt_contact"
interval = 3600.0               # a Zigbee contact reports on change plus a heartbeat about hourly: set your
                                # model's heartbeat, or the "sensor silent" alarm (3 intervals) fires falsely
availability = true             # also listen on <topic>/availability (online/offline)

[[devices]]                     # example: a noise sensor
name = "noise-1"
kind = "noise"
protocol = "mqtt"
topic = "zigbee2mqtt/noise-1"
profile = "zigbee2mqtt_noise"
interval = 30.0

[[devices]]                     # example: a recorder bridge publishing JSON; fields map JSON paths to metrics
name = "recorder-1"
kind = "recorder"
protocol = "mqtt"
topic = "recorders/recorder-1"
profile = "recorder_json"
interval = 60.0
availability = false
fields = [
    { path = "batt", metric = "battery_percent" },   # example: this model says "batt", not "battery"
]
"""

    def __init__(self, devices: list[Any], acc: Any, health: Any, context: Context | None = None) -> None:
        super().__init__(devices, acc, health, context)
        self.broker = self.context.broker  # the room's [mqtt], its client id settled by the agent
        self.waited = 0.0  # how long the readiness probe listened
        self.routes: dict[str, tuple[Any, list[Field] | None]] = {}
        self.refused: dict[str, str] = {}  # device -> why it is not read
        for d in devices:
            topics = [d.topic] + ([f"{d.topic}/availability"] if (d.options or MqttOptions()).availability else [])
            taken = any(t in self.routes for t in topics)
            problem = topic_issue(d.topic) or ("the topic of another device" if taken else "")
            if problem:
                self._refuse(d, "bad_topic", f"topic {d.topic[:200]!r}: {problem}")
                continue
            opts: MqttOptions = d.options or MqttOptions()
            fields = list(self.load_profile(d.profile or self.default_profile).fields)
            overridden = {f.path for f in opts.fields}
            fields = [f for f in fields if f.path not in overridden] + list(opts.fields)
            self.routes[d.topic] = (d, fields)
            if opts.availability:
                self.routes[f"{d.topic}/availability"] = (d, None)
        self.connected = False
        self.reachable = False  # connected by the end of the readiness probe
        self.client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its topics, until the SUBACK

    def _refuse(self, device: Any, reason: str, detail: str) -> None:
        """A device we cannot read: counted, logged once, and offline, so its offline alarm tells people."""
        self.refused[device.name] = detail
        self.health.drop("mqtt", reason, device=device.name, detail=detail)
        self.health.failed(device.name, self.protocol, DeviceError(reason, detail), 0.0)
        self.acc.add(Reading(device.name, "device_online", 0.0, time.time()))

    def alive(self) -> bool:
        """False once paho's network loop has ended while we did not ask it to."""
        return self._thread is None or self._thread.is_alive()

    @classmethod
    def check(cls, device: Any) -> list[tuple[str, str]]:
        problem = topic_issue(device.topic)
        return ([("topic", problem)] if problem else []) + super().check(device)

    @classmethod
    def check_together(cls, devices: Sequence[tuple[int, Device]]) -> list[tuple[int, str, str]]:
        """One device per topic: a message is routed by its topic, so a second device on one is never read."""
        owner: dict[str, str] = {}
        issues = []
        for i, d in devices:
            opts: MqttOptions = d.options or MqttOptions()
            topics = [d.topic] + ([f"{d.topic}/availability"] if opts.availability else [])
            taken = [t for t in topics if t in owner]
            if taken:
                issues.append((i, "topic", f"{taken[0]!r} is already {owner[taken[0]]}'s: one device per topic"))
            owner.update({t: d.name for t in topics if t not in owner})
        return issues

    def handle(self, topic: str, payload: bytes, now: float) -> None:
        """One message from the broker -> readings, or a counted drop. Never raises."""
        route = self.routes.get(topic)
        if route is None:
            self.health.drop("mqtt", "unknown_topic", topic=topic[:200])
            return
        device, fields = route
        try:
            if fields is not None:
                readings, rejected = parse_payload(fields, device.name, payload, now)
            else:
                readings, rejected = [Reading(device.name, "device_online", parse_availability(payload), now)], []
        except PayloadError as err:
            self.health.drop("mqtt", err.reason, device=device.name, topic=topic)
            return
        except Exception as err:  # a parser bug must not kill paho's network thread
            self.health.drop("mqtt", "error", device=device.name, error=f"{type(err).__name__}: {err}")
            return
        for reason in rejected:
            self.health.drop("mqtt", reason, device=device.name, topic=topic)
        self.acc.add_all(readings)
        self.health.ok(device.name, self.protocol, 0.0, now)

    # --- paho callbacks (paho's network thread; none may raise) ---

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt_connect_refused", reason=str(reason))
            return
        if self.routes:
            try:
                rc, mid = client.subscribe([(t, 1) for t in self.routes])
            except ValueError as err:  # a topic paho will not send; topic_issue() should have caught it
                self.health.drop("mqtt", "subscribe_failed", error=str(err))
            else:
                if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                    self._subscribing[mid] = list(self.routes)
                else:
                    self.health.drop("mqtt", "subscribe_failed", error=mqtt.error_string(rc))
        if not self.connected:
            log.info("mqtt_connected", host=self.broker.host, port=self.broker.port, topics=len(self.routes))
        self.connected = True

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], props: Any) -> None:
        for topic, reason in zip(self._subscribing.pop(mid, []), reasons, strict=False):
            if reason.is_failure and topic in self.routes:  # e.g. the broker's ACL: noted per topic
                device = self.routes[topic][0]
                self.health.drop("mqtt", "subscribe_refused", device=device.name, topic=topic, refusal=str(reason))
                refused = DeviceError("subscribe_refused", f"{topic}: {reason}")
                self.health.failed(device.name, self.protocol, refused, 0.0)
                self.acc.add(Reading(device.name, "device_online", 0.0, time.time()))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self.connected:
            log.warning("mqtt_disconnected", reason=str(reason))
        self.connected = False

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.handle(msg.topic, bytes(msg.payload), time.time())  # paho's bytes: no copy

    def _loop(self, client: mqtt.Client) -> None:
        try:  # select waits up to 5 s (paho's own: 1 s) when nothing comes: a message wakes it; keepalive 30 s
            client.loop_forever(timeout=5.0, retry_first_connection=True)
        except Exception:  # alive() turns False and the agent's health with it
            log.exception("mqtt_loop_failed")

    async def run(self, stop: asyncio.Event) -> None:
        b = self.broker
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=b.client_id, protocol=mqtt.MQTTv5)
        apply_broker_settings(client, b)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 30)
        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = MAX_PACKET  # the broker drops bigger messages instead of sending them to us
        # plain connect() raises if the broker is down at boot
        client.connect_async(b.host, b.port, keepalive=30, clean_start=True, properties=props)
        self.client = client
        self._thread = threading.Thread(target=self._loop, args=(client,), name="mqtt-sensors", daemon=True)
        self._thread.start()
        ended = asyncio.ensure_future(asyncio.to_thread(self._thread.join))  # waits, no polling: a Pi's CPU
        await asyncio.wait([ended, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            log.error("mqtt_loop_stopped", detail="no sensor is read until the agent restarts")

    async def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)

    # --- the readiness probe ---

    async def probe(self, wait: float) -> None:
        """Listen up to ``wait`` seconds. Retained messages (availability, and state where Zigbee2MQTT
        retains it) arrive at once; it ends early once every sensor has been heard, or when the broker
        has not accepted us within ``CONNECT_TIMEOUT``."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.run(stop))
        loop = asyncio.get_running_loop()
        start = loop.time()
        names = {d.name for d in self.devices}
        while loop.time() - start < wait:
            heard = set(self.health.devices) | set(self.health.refused)
            if self.connected and names <= heard:
                break
            if not self.connected and loop.time() - start >= min(wait, CONNECT_TIMEOUT):
                break
            await asyncio.sleep(0.05)
        self.waited = wait
        self.reachable = self.connected
        stop.set()
        await task

    def findings(self) -> list[Finding]:
        item = f"房间 MQTT 服务器 {self.broker.host}:{self.broker.port}"
        if self.reachable:
            return [Finding(OK, f"已连接，订阅 {len(self.devices)} 个传感器的主题", id="broker", item=item)]
        advice = "连不上：检查 mosquitto 是否在运行，以及 [mqtt] 的地址、账号和 TLS 设置"
        return [Finding(FAIL, advice, id="broker", item=item)]

    def judge(self, device: Any, readings: list[Reading]) -> Finding:
        """Heard within the window, silent, offline by its availability, or unparseable."""
        refused = self.health.refused.get(device.name, "")
        wait = self.waited

        def row(status: str, detail: str) -> Finding:
            return Finding(status, detail, device, f"mqtt {device.topic}", "传感器")

        if not self.reachable:
            return row(FAIL, "房间 MQTT 服务器连不上，无法确认该传感器（见“房间 MQTT 服务器”一行）")
        online = [r for r in readings if r.metric == "device_online"]
        if online and max(online, key=lambda r: r.ts).value == 0:
            return row(
                FAIL,
                "传感器报告离线（availability = offline）：检查电池，以及 Zigbee 网关是否在信号范围内，必要时重新配对",
            )
        if readings:
            return row(OK, f"{wait:g} 秒内收到消息（{len(readings)} 项读数，含保留消息）")
        if refused:
            return row(FAIL, f"收到消息但无法使用（{refused}）：检查该设备的 profile 和 fields 配置")
        return row(
            WARN,
            f"{wait:g} 秒内没有消息（电池传感器上报较少）：请触发一次（如开关门）或在 Zigbee2MQTT 中确认该设备在线",
        )
