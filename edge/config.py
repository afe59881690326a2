"""The agent's TOML config: schema, loading, and validation that reports every error at once.

msgspec structs are the schema. msgspec stops at the first error, and a technician fixing a file on an
exam morning wants all of them, so ``_walk`` checks the parsed TOML against the same structs field by
field, collecting every unknown key, wrong type and missing field with its key path (and line), and only
then converts. A typo must never silently disable a rule: unknown keys and unknown rule ids are errors.
"""

from __future__ import annotations

import re
import socket
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, get_args, get_origin

import msgspec

from examwatch.kernel.model import DeviceKind, RoomKind
from examwatch.rules.config import RuleOverride, Schedule



class Agent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    site: str  # site id (考点), ASCII: it appears in MQTT topics and metric labels
    room: str  # room id (考场 or 保密室)
    kind: RoomKind = "exam_room"
    site_name: str = ""  # display names for alert texts, e.g. "第一中学"
    room_name: str = ""
    state_dir: str = "/var/lib/examwatch"


class BrokerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where an MQTT broker is and how we log in: the sensors' broker, the uplink's, the gateway's."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # empty: the system's CA certificates
    cert_file: str = ""  # client certificate, for brokers that authenticate clients by certificate
    key_file: str = ""


def apply_broker_settings(client: Any, settings: BrokerSettings) -> None:
    """Set up a paho client for ``settings``: login, TLS, and TCP_NODELAY (paho never sets it; without
    it the first messages after connect, a door event or an alarm, can wait ~30 ms in Nagle's buffer)."""
    if settings.username:
        client.username_pw_set(settings.username, settings.password or None)
    if settings.tls:
        client.tls_set(ca_certs=settings.ca_file or None, certfile=settings.cert_file or None,
                       keyfile=settings.key_file or None)
    client.on_socket_open = _nodelay


def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # TLS-wrapped or non-TCP socket


class Mqtt(BrokerSettings, kw_only=True, forbid_unknown_fields=True):
    """The room's local broker, where the sensors (e.g. Zigbee2MQTT) publish."""

    client_id: str = ""  # default: examwatch-<site>-<room>


class Exporter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:9108"


class Store(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    retention_hours: float = 72.0  # readings older than this are deleted; alarm transitions are kept


class Uplink(BrokerSettings, kw_only=True, forbid_unknown_fields=True):
    """The county broker that carries readings and alarms to the gateway (MQTT v5, QoS 1)."""

    enabled: bool = False
    signing_key: str = ""  # per-agent HMAC-SHA256 key (hex); or signing_key_file
    signing_key_file: str = ""
    session_expiry: int = 7 * 24 * 3600  # seconds the broker keeps our session while we are away
    heartbeat: float = 30.0  # seconds between heartbeats on the status topic
    batch_interval: float = 5.0  # readings are sent in batches at most this often; alarms at once
    batch_max: int = 500  # readings per message at most
    outbox_budget_mb: float = 64.0  # disk for unsent messages; past it readings are thinned, alarms never


class Device(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One monitored device. Keys beyond these belong to the protocol's own ``Options``."""

    name: str
    kind: DeviceKind
    protocol: str
    address: str = ""  # host[:port], serial port, or URL, by protocol
    topic: str = ""  # MQTT base topic, e.g. zigbee2mqtt/secrecy-door
    profile: str = ""  # device model: how its data maps onto the canonical metrics
    interval: float = 10.0  # seconds between polls, or the expected interval between reports
    timeout: float = 3.0  # seconds per request
    retries: int = 1
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


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    agent: Agent
    mqtt: Mqtt = msgspec.field(default_factory=Mqtt)
    exporter: Exporter = msgspec.field(default_factory=Exporter)
    store: Store = msgspec.field(default_factory=Store)
    uplink: Uplink = msgspec.field(default_factory=lambda: Uplink())
    devices: list[Device] = []
    rules: dict[str, RuleOverride] = {}
    schedule: Schedule = msgspec.field(default_factory=Schedule)

    @property
    def agent_id(self) -> str:
        return f"{self.agent.site}/{self.agent.room}"


@dataclass(frozen=True)
class ConfigIssue:
    path: tuple[str | int, ...]
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = ".".join(f"[{p}]" if isinstance(p, int) else p for p in self.path).replace(".[", "[") or "(file)"
        return f"{where}{f' (line {self.line})' if self.line else ''}: {self.message}"


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(map(str, issues)))
        self.issues = issues

    def report(self, path: str) -> str:
        """What ``config check`` and a refused start print: the file, then every issue on its own line."""
        return f"{path}: {len(self.issues)} error(s):\n" + "".join(f"  {issue}\n" for issue in self.issues)


def load(path: str) -> Config:
    with open(path, "rb") as f:
        return loads(f.read().decode("utf-8", errors="replace"))


def loads(text: str) -> Config:
    """Parse and validate; raise ``ConfigError`` listing every problem found."""
    raw = parse(text, Config)
    cfg = _build(raw)
    issues = _semantic_issues(cfg)
    if issues:
        raise ConfigError([ConfigIssue(i.path, i.message, _line_of(text, i.path)) for i in issues])
    return cfg


def parse(text: str, schema: type[msgspec.Struct]) -> dict[str, Any]:
    """Parse TOML and check it against ``schema``; every issue at once, with key path and line.

    Returns the raw table; ``msgspec.convert(raw, schema)`` then cannot fail. Other TOML files
    (the gateway's) use this too.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"line (\d+)", str(err))
        raise ConfigError([ConfigIssue((), f"not valid TOML: {err}", int(m.group(1)) if m else None)]) from None
    issues: list[ConfigIssue] = []
    _walk(raw, schema, (), issues)
    if issues:
        raise ConfigError([ConfigIssue(i.path, i.message, _line_of(text, i.path)) for i in issues])
    return raw


def sample_text() -> str:
    """edge/sample.toml with every protocol's own example devices where it says ``# @devices@``."""
    from examwatch import collectors

    text = resources.files("examwatch.edge").joinpath("sample.toml").read_text(encoding="utf-8")
    head, marker, tail = text.partition("# @devices@")
    return head + collectors.sample_blocks().lstrip("\n") + tail.partition("\n")[2] if marker else text


# --- validation ---------------------------------------------------------------------------------------

Path = tuple[str | int, ...]


def _fields(tp: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(tp) if f.encode_name != "options"}


def _walk(value: Any, tp: Any, path: Path, issues: list[ConfigIssue]) -> None:
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if not isinstance(value, dict):
            issues.append(ConfigIssue(path, f"expected a table, got {type(value).__name__}"))
            return
        fields = _fields(tp)
        extension = getattr(tp, "extension_type", None)
        extra = {k: v for k, v in value.items() if k not in fields}
        for k in fields.keys() & value.keys():
            _walk(value[k], fields[k].type, path + (k,), issues)
        for k, f in fields.items():
            if f.required and k not in value:
                issues.append(ConfigIssue(path + (k,), "missing required key"))
        if extension is not None and "protocol" in value:
            ext = extension(value)
            if isinstance(ext, str):
                issues.append(ConfigIssue(path + ("protocol",), ext))
                return
            _walk(extra, ext, path, issues)
        else:
            for k in extra:
                issues.append(ConfigIssue(path + (k,), f"unknown key; expected one of: {', '.join(fields)}"))
    elif origin is list:
        if not isinstance(value, list):
            issues.append(ConfigIssue(path, f"expected an array, got {type(value).__name__}"))
            return
        for i, item in enumerate(value):
            _walk(item, get_args(tp)[0], path + (i,), issues)
    elif origin is dict and get_args(tp)[1] is not Any:
        if not isinstance(value, dict):
            issues.append(ConfigIssue(path, f"expected a table, got {type(value).__name__}"))
            return
        for k, item in value.items():
            _walk(item, get_args(tp)[1], path + (k,), issues)
    else:
        try:
            msgspec.convert(value, tp)
        except msgspec.ValidationError as err:
            issues.append(ConfigIssue(path, str(err).split(" - at ")[0]))


def _build(raw: dict[str, Any]) -> Config:
    devices = []
    for d in raw.get("devices", []):
        fields = _fields(Device)
        device = msgspec.convert({k: v for k, v in d.items() if k in fields}, Device)
        options = msgspec.convert({k: v for k, v in d.items() if k not in fields}, Device.extension_type(d))
        devices.append(msgspec.structs.replace(device, options=options))
    return msgspec.structs.replace(msgspec.convert({**raw, "devices": []}, Config), devices=devices)


def _semantic_issues(cfg: Config) -> list[ConfigIssue]:
    from examwatch import collectors
    from examwatch.rules.pack import DEFAULT_RULES, override_issues

    issues = []
    seen: set[str] = set()
    for i, d in enumerate(cfg.devices):
        if d.name in seen:
            issues.append(ConfigIssue(("devices", i, "name"), f"device name {d.name!r} used twice"))
        seen.add(d.name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", d.name):
            issues.append(ConfigIssue(("devices", i, "name"), "use letters, digits, '-', '_' or '.' only"))
        if d.interval <= 0 or d.timeout <= 0:
            issues.append(ConfigIssue(("devices", i, "interval"), "interval and timeout must be positive"))
        for key, message in collectors.get(d.protocol).check(d):
            issues.append(ConfigIssue(("devices", i, key), message))
    for key in ("site", "room"):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", getattr(cfg.agent, key)):
            issues.append(ConfigIssue(("agent", key), "use letters, digits, '-' or '_' only (it is an MQTT topic level)"))
    known = {r.id for r in DEFAULT_RULES}
    for rule_id in cfg.rules:
        if rule_id not in known:
            issues.append(ConfigIssue(("rules", rule_id), f"no such rule; known: {', '.join(sorted(known))}"))
    issues += [ConfigIssue(path, message) for path, message in override_issues(cfg.rules)]
    up = cfg.uplink
    if up.enabled and not (up.signing_key or up.signing_key_file):
        issues.append(ConfigIssue(("uplink", "signing_key_file"),
                                  "the uplink signs every message: name this agent's key file (or give signing_key)"))
    elif up.enabled and up.signing_key:
        from examwatch.kernel.wire import parse_key

        try:
            parse_key(up.signing_key)
        except ValueError as err:  # the message never repeats the key
            issues.append(ConfigIssue(("uplink", "signing_key"), str(err)))
    for which in ("sessions", "secrecy_windows"):
        for i, w in enumerate(getattr(cfg.schedule, which)):
            if w.end <= w.start:
                issues.append(ConfigIssue(("schedule", which, i, "end"), "end must be after start"))
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(cfg.schedule.timezone)
    except Exception:
        issues.append(ConfigIssue(("schedule", "timezone"), f"unknown time zone {cfg.schedule.timezone!r}"))
    return issues


def _line_of(text: str, path: Path) -> int | None:
    """Best-effort line of a key path in the TOML text (tomllib keeps no positions)."""
    lines = text.splitlines()
    start, table = 0, []
    keys = [p for p in path]
    # Walk down table headers: [a], [a.b], [[a]] (the n-th one for an index).
    while keys:
        head = keys[0]
        if len(keys) > 1 and isinstance(keys[1], int):
            hdr = re.compile(rf"^\s*\[\[\s*{re.escape('.'.join(table + [str(head)]))}\s*\]\]")
            hits = [i for i, l in enumerate(lines) if i >= start and hdr.match(l)]
            if keys[1] >= len(hits):
                return None
            start = hits[keys[1]] + 1
            table, keys = table + [str(head)], keys[2:]
            continue
        hdr = re.compile(rf"^\s*\[\s*{re.escape('.'.join(table + [str(head)]))}\s*\]")
        hit = next((i for i, l in enumerate(lines) if i >= start and hdr.match(l)), None)
        if hit is not None and len(keys) > 1:
            start, table, keys = hit + 1, table + [str(head)], keys[1:]
            continue
        if hit is not None:
            return hit + 1
        kv = re.compile(rf"^\s*{re.escape(str(head))}\s*=")
        for i in range(start, len(lines)):
            if re.match(r"^\s*\[", lines[i]) and i > start:
                break
            if kv.match(lines[i]):
                return i + 1
        return None
    return None


__all__ = ["BrokerSettings", "Config", "ConfigError", "ConfigIssue", "Device", "Uplink", "apply_broker_settings",
           "load", "loads", "parse", "sample_text"]
