"""The agent's TOML config: schema with its ranges beside the fields, loading, and the checks that types
cannot express, all reported at once (the kernel's config base does the checking). A typo must never silently
disable a rule: unknown keys and unknown rule ids are errors; so is a value that cannot work.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from examwatch.channels.settings import Channel, channel_issues
from examwatch.kernel.broker import BrokerSettings, apply_broker_settings
from examwatch.kernel.config import (
    ConfigError,
    ConfigIssue,
    Interval,
    Port,
    SessionExpiry,
    Strict,
    Timeout,
    check_host,
    decode,
    error_at,
    fields_of,
    parse,
    parse_listen,
    read,
    validated,
)
from examwatch.kernel.model import DeviceKind, RoomKind
from examwatch.rules.config import RuleOverride, Schedule, schedule_issues


class AgentSettings(Strict, kw_only=True):
    site: str  # site id (考点), ASCII: it appears in MQTT topics and metric labels
    room: str  # room id (考场 or 保密室)
    kind: RoomKind = "exam_room"
    site_name: str = ""  # display names for alert texts, e.g. "第一中学"
    room_name: str = ""
    state_dir: str = "/var/lib/examwatch"


class MqttSettings(BrokerSettings, kw_only=True):
    """The room's local broker, where the sensors (e.g. Zigbee2MQTT) publish."""

    client_id: str = ""  # default: examwatch-<site>-<room>


class ExporterSettings(Strict, kw_only=True):
    listen: str = "127.0.0.1:9108"


class StoreSettings(Strict, kw_only=True):
    # readings older than this are deleted; alarm transitions are kept
    retention_hours: Annotated[float, msgspec.Meta(ge=1, le=24 * 366)] = 72.0


class UplinkSettings(BrokerSettings, kw_only=True):
    """The county broker that carries readings and alarms to the gateway (MQTT v5, QoS 1)."""

    enabled: bool = False
    signing_key: str = ""  # per-agent HMAC-SHA256 key (hex); or signing_key_file
    signing_key_file: str = ""
    session_expiry: SessionExpiry = 7 * 24 * 3600  # seconds the broker keeps our session while we are away
    # seconds between heartbeats on the status topic
    heartbeat: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 30.0
    batch_interval: Interval = 5.0  # readings are sent in batches at most this often; alarms at once
    # readings per message at most: a message must stay well under the gateway's size bound
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 500
    # disk for unsent messages; past it readings are thinned, alarms never
    outbox_budget_mb: Annotated[float, msgspec.Meta(ge=1, le=100_000)] = 64.0


class FallbackSettings(Strict, kw_only=True):
    """When the county is unreachable: the agent sends its level-2 alarms straight to a site channel itself.

    Off by default. ``channel`` has the keys of one of the gateway's ``[[channels]]``; give it the same
    ``name`` as the gateway's channel for the same group, so the gateway does not send those alarms again.
    """

    enabled: bool = False
    after: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 120.0  # s of uplink down before the agent sends
    per_minute: Annotated[int, msgspec.Meta(ge=1, le=60)] = 10  # direct messages a minute at most
    timezone: str = "Asia/Shanghai"  # for the times in the message
    channel: Channel | None = None


class Device(Strict, kw_only=True):
    """One monitored device. Keys beyond these belong to the protocol's own ``Options``."""

    name: str
    kind: DeviceKind
    protocol: str
    address: str = ""  # host[:port], serial port, or URL, by protocol
    topic: str = ""  # MQTT base topic, e.g. zigbee2mqtt/secrecy-door
    profile: str = ""  # device model: how its data maps onto the canonical metrics
    interval: Interval = 10.0  # seconds between polls, or the expected interval between reports
    timeout: Timeout = 3.0  # seconds per request
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1
    options: Any = None  # the protocol's Options struct, filled from the extra keys

    @staticmethod
    def extension_type(raw: dict[str, Any]) -> type[msgspec.Struct] | str:
        """The struct that validates this device's protocol keys, or an error message."""
        from examwatch import collectors

        protocol = raw.get("protocol")
        try:
            return collectors.get(str(protocol)).Options
        except KeyError:
            return f"unknown protocol {protocol!r}; known: {', '.join(collectors.available())}"


class Config(Strict, kw_only=True):
    agent: AgentSettings
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    exporter: ExporterSettings = msgspec.field(default_factory=ExporterSettings)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    uplink: UplinkSettings = msgspec.field(default_factory=UplinkSettings)
    fallback: FallbackSettings = msgspec.field(default_factory=FallbackSettings)
    devices: list[Device] = []
    rules: dict[str, RuleOverride] = {}
    schedule: Schedule = msgspec.field(default_factory=Schedule)

    @property
    def agent_id(self) -> str:
        return f"{self.agent.site}/{self.agent.room}"


def load(path: str) -> Config:
    return loads(read(path))


def loads(text: str) -> Config:
    """Parse and validate; raise ``ConfigError`` listing every problem found."""
    return validated(text, Config, _build, _semantic_issues)


def sample_text() -> str:
    """edge/sample.toml with every protocol's own example devices where it says ``# @devices@``."""
    from examwatch import collectors

    text = resources.files("examwatch.edge").joinpath("sample.toml").read_text(encoding="utf-8")
    head, marker, tail = text.partition("# @devices@")
    return head + collectors.sample_blocks().lstrip("\n") + tail.partition("\n")[2] if marker else text


# --- validation ---------------------------------------------------------------------------------------


def _build(raw: dict[str, Any]) -> Config:
    devices = []
    for d in raw.get("devices", []):
        fields = fields_of(Device)
        device = msgspec.convert({k: v for k, v in d.items() if k in fields}, Device)
        options = msgspec.convert({k: v for k, v in d.items() if k not in fields}, Device.extension_type(d))
        devices.append(msgspec.structs.replace(device, options=options))
    return msgspec.structs.replace(msgspec.convert({**raw, "devices": []}, Config), devices=devices)


def _semantic_issues(cfg: Config) -> list[ConfigIssue]:
    from examwatch.rules.pack import DEFAULT_RULES, override_issues

    issues = _device_issues(cfg.devices)
    for key in ("site", "room"):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", getattr(cfg.agent, key)):
            issues.append(ConfigIssue(("agent", key), "1 to 64 letters, digits, '-' or '_' (an MQTT topic level)"))
    for path, check, value in (
        (("exporter", "listen"), parse_listen, cfg.exporter.listen),
        (("mqtt", "host"), check_host, cfg.mqtt.host),
        (("uplink", "host"), check_host, cfg.uplink.host),
    ):
        try:
            check(value)
        except ValueError as err:
            issues.append(ConfigIssue(path, str(err)))
    known = {r.id for r in DEFAULT_RULES}
    for rule_id in cfg.rules:
        if rule_id not in known:
            issues.append(ConfigIssue(("rules", rule_id), f"no such rule; known: {', '.join(sorted(known))}"))
    issues += [ConfigIssue(path, message) for path, message in override_issues(cfg.rules)]
    up = cfg.uplink
    if up.enabled and not (up.signing_key or up.signing_key_file):
        issues.append(
            ConfigIssue(
                ("uplink", "signing_key_file"),
                "the uplink signs every message: name this agent's key file (or give signing_key)",
            )
        )
    elif up.enabled and up.signing_key:
        from examwatch.kernel.wire import parse_key

        try:
            parse_key(up.signing_key)
        except ValueError as err:  # the message never repeats the key
            issues.append(ConfigIssue(("uplink", "signing_key"), str(err)))
    issues += [ConfigIssue(path, message) for path, message in schedule_issues(cfg.schedule)]
    issues += _fallback_issues(cfg)
    return issues


def _fallback_issues(cfg: Config) -> list[ConfigIssue]:
    fb = cfg.fallback
    if not fb.enabled:
        return []
    issues = []
    if not cfg.uplink.enabled:
        issues.append(
            ConfigIssue(("fallback", "enabled"), "the fallback stands in for the uplink: enable [uplink] too")
        )
    try:
        ZoneInfo(fb.timezone)
    except (ValueError, ZoneInfoNotFoundError):
        issues.append(ConfigIssue(("fallback", "timezone"), "an IANA time zone, e.g. Asia/Shanghai"))
    if fb.channel is None:
        return [*issues, ConfigIssue(("fallback", "channel"), "name the site channel to send to ([fallback.channel])")]
    if fb.channel.type == "alertmanager":
        issues.append(
            ConfigIssue(("fallback", "channel", "type"), "a group robot, e-mail or webhook (not alertmanager)")
        )
    issues += [ConfigIssue(("fallback", "channel", *key), message) for key, message in channel_issues(fb.channel)]
    return issues


def _device_issues(devices: list[Device]) -> list[ConfigIssue]:
    """Names, then each protocol's checks of its devices alone and together (e.g. two on one topic)."""
    from examwatch import collectors

    issues = []
    seen: set[str] = set()
    by_protocol: dict[str, list[tuple[int, Device]]] = {}
    for i, d in enumerate(devices):
        if d.name in seen:
            issues.append(ConfigIssue(("devices", i, "name"), f"device name {d.name!r} used twice"))
        seen.add(d.name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", d.name):
            issues.append(ConfigIssue(("devices", i, "name"), "1 to 64 letters, digits, '-', '_' or '.'"))
        by_protocol.setdefault(d.protocol, []).append((i, d))
    for protocol, members in by_protocol.items():
        collector = collectors.get(protocol)
        found = [(i, key, message) for i, d in members for key, message in collector.check(d)]
        found += collector.check_together(members)
        issues += [ConfigIssue(("devices", i, key), message) for i, key, message in sorted(found)]
    return issues


__all__ = [
    "BrokerSettings",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "Device",
    "FallbackSettings",
    "Interval",
    "Port",
    "SessionExpiry",
    "Timeout",
    "UplinkSettings",
    "apply_broker_settings",
    "check_host",
    "decode",
    "error_at",
    "load",
    "loads",
    "parse",
    "parse_listen",
    "read",
    "sample_text",
    "validated",
]
