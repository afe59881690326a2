"""MQTT sensors: Zigbee2MQTT door contacts and noise sensors, availability, and generic JSON devices.

paho-mqtt runs its own network thread; ``on_message`` parses and hands readings to the accumulator, which
is thread-safe. A bad payload is dropped with a counter and one log line per kind of fault; nothing a
sensor sends can stop the collector.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from examwatch.collectors.base import FAIL, OK, WARN, Collector, Context, Finding, register
from examwatch.kernel.catalog import METRICS
from examwatch.edge.config import apply_broker_settings
from examwatch.kernel.model import Reading

log = structlog.get_logger("examwatch.mqtt")

MAX_PAYLOAD = 64 * 1024  # a sensor message is a few hundred bytes; anything near this is not a sensor
CONNECT_TIMEOUT = 5.0  # seconds the readiness probe gives the room broker to accept us


class Field(msgspec.Struct, forbid_unknown_fields=True):
    path: str  # dotted JSON path, list items by index: "storage.free_mb", "disks.0.status"
    metric: str
    scale: float = 1.0
    map: dict[str, float] | None = None  # JSON value (as text: true, false, ok, ...) -> metric value

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}")


class Profile(msgspec.Struct, forbid_unknown_fields=True):
    description: str = ""
    fields: list[Field] = []


class MqttOptions(msgspec.Struct, forbid_unknown_fields=True):
    fields: list[Field] = []  # extra or overriding paths for this device (a generic JSON device needs them)
    availability: bool = True  # also listen on <topic>/availability (Zigbee2MQTT's availability feature)


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
    return json.dumps(value) if isinstance(value, bool) else str(value)


def parse_payload(fields: list[Field], device: str, payload: bytes, now: float) -> list[Reading]:
    """A sensor's JSON state message -> readings. Fields absent from the message are simply not read."""
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError("too_large")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise PayloadError("not_json") from None
    if not isinstance(doc, dict):
        raise PayloadError("not_object")
    readings = []
    for f in fields:
        raw = _lookup(doc, f.path)
        if raw is None:
            continue
        if f.map is not None:
            if _key(raw) not in f.map:
                raise PayloadError("unmapped_value")
            value = f.map[_key(raw)]
        elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw) * f.scale
        else:
            raise PayloadError("wrong_type")
        if not math.isfinite(value):
            raise PayloadError("not_finite")
        readings.append(Reading(device, f.metric, value, now))
    if fields and not readings:
        raise PayloadError("no_known_field")
    return readings


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
    """Listens to the room's local broker; one subscription per sensor topic (and its availability)."""

    protocol = "mqtt"
    Options = MqttOptions
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
        for d in devices:
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

    @classmethod
    def check(cls, device: Any) -> list[tuple[str, str]]:
        issues = [] if device.topic else [("topic", "an MQTT device needs its topic, e.g. zigbee2mqtt/secrecy-door")]
        return issues + super().check(device)

    def handle(self, topic: str, payload: bytes, now: float) -> None:
        """One message from the broker -> readings, or a counted drop. Never raises."""
        route = self.routes.get(topic)
        if route is None:
            self.health.drop("mqtt", "unknown_topic", topic=topic[:200])
            return
        device, fields = route
        try:
            if fields is None:
                readings = [Reading(device.name, "device_online", parse_availability(payload), now)]
            else:
                readings = parse_payload(fields, device.name, payload, now)
        except PayloadError as err:
            self.health.drop("mqtt", err.reason, device=device.name, topic=topic)
            return
        except Exception as err:  # a parser bug must not kill paho's network thread
            self.health.drop("mqtt", "error", device=device.name, error=f"{type(err).__name__}: {err}")
            return
        for r in readings:
            self.acc.add(r)
        self.health.ok(device.name, self.protocol, 0.0, now)

    # --- paho callbacks (paho's network thread) ---

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt_connect_refused", reason=str(reason))
            return
        client.subscribe([(t, 1) for t in self.routes])
        if not self.connected:
            log.info("mqtt_connected", host=self.broker.host, port=self.broker.port, topics=len(self.routes))
        self.connected = True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self.connected:
            log.warning("mqtt_disconnected", reason=str(reason))
        self.connected = False

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.handle(msg.topic, msg.payload, time.time())

    async def run(self, stop: asyncio.Event) -> None:
        b = self.broker
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=b.client_id, protocol=mqtt.MQTTv311)
        apply_broker_settings(client, b)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 30)
        client.connect_async(b.host, b.port, keepalive=30)  # plain connect() raises if the broker is down at boot
        client.loop_start()
        self.client = client
        await stop.wait()

    async def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

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
        return [Finding(FAIL, "连不上：检查 mosquitto 是否在运行，以及 [mqtt] 的地址、账号和 TLS 设置",
                        id="broker", item=item)]

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
            return row(FAIL, "传感器报告离线（availability = offline）：检查电池，"
                             "以及 Zigbee 网关是否在信号范围内，必要时重新配对")
        if readings:
            return row(OK, f"{wait:g} 秒内收到消息（{len(readings)} 项读数，含保留消息）")
        if refused:
            return row(FAIL, f"收到消息但无法使用（{refused}）：检查该设备的 profile 和 fields 配置")
        return row(WARN, f"{wait:g} 秒内没有消息（电池传感器上报较少）：请触发一次（如开关门）"
                         "或在 Zigbee2MQTT 中确认该设备在线")
