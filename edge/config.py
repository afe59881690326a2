"""The agent's TOML config: schema, loading, and validation that reports every error at once.

msgspec structs are the schema. msgspec stops at the first error, and a technician fixing a file on an
exam morning wants all of them, so ``_walk`` checks the parsed TOML against the same structs field by
field, collecting every unknown key, wrong type and missing field with its key path (and line), and only
then converts. A typo must never silently disable a rule: unknown keys and unknown rule ids are errors.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import re
import socket
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec

from rules.config import DAY, RuleOverride, Schedule, schedule_issues

MAX_BYTES = 1 << 20  # a config file is a few KB; a megabyte is not one (and would be slow to check)
MAX_NESTING = 32  # brackets deep; tomllib recurses per level and a hostile file must not exhaust the stack
MAX_ISSUES = 50  # reported per file: a technician fixes the first ones, and locating each costs a scan

# Ranges, declared once and used beside the fields. A bound also refuses NaN and infinity.
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Interval = Annotated[float, msgspec.Meta(ge=0.01, le=DAY)]  # s between polls or sends: never a busy loop
Timeout = Annotated[float, msgspec.Meta(ge=0.01, le=600)]  # s to wait for one answer
# s the MQTT broker keeps a session while the client is away: a minute at least (a restart), at most
# MQTT v5's 0xFFFFFFFF (never expires)
SessionExpiry = Annotated[int, msgspec.Meta(ge=60, le=0xFFFFFFFF)]

S = TypeVar("S", bound=msgspec.Struct)

DeviceKind = Literal["recorder", "camera", "nvr", "ups", "switch", "link", "door", "noise", "host"]
RoomKind = Literal["exam_room", "secrecy_room"]


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
    port: Port = 1883
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
    # readings older than this are deleted; alarm transitions are kept
    retention_hours: Annotated[float, msgspec.Meta(ge=1, le=24 * 366)] = 72.0


class Uplink(BrokerSettings, kw_only=True, forbid_unknown_fields=True):
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


class Device(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
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
        import collectors

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
    return loads(read(path))


def read(path: str) -> str:
    """A config file's text (``-``: stdin), for checking and running alike: bounded, strictly UTF-8.
    ``ConfigError`` if it is not a config file's text, ``OSError`` if it cannot be read."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_BYTES + 1)
    else:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    return decode(data)


def decode(data: bytes) -> str:
    if len(data) > MAX_BYTES:
        raise ConfigError([ConfigIssue((), f"larger than {MAX_BYTES >> 10} KB: not a config file")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:  # Windows editors save GBK by default
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError([ConfigIssue((), "not UTF-8 text (GBK from a Windows editor?): save the file as UTF-8 "
                                           "(另存为 UTF-8 编码)", line)]) from None


def loads(text: str) -> Config:
    """Parse and validate; raise ``ConfigError`` listing every problem found."""
    return validated(text, Config, _build, _semantic_issues)


def validated(text: str, schema: type[S], build: Callable[[dict[str, Any]], S],
              semantic_issues: Callable[[S], list[ConfigIssue]]) -> S:
    """The agent's and the gateway's checker: ``schema``'s issues and, on the parts that are sound, the
    semantic ones (``semantic_issues`` of the built config) together, so one check shows every error."""
    text = text.removeprefix("\ufeff")
    raw, issues = _checked(text, schema)
    sound = _without(raw, [i.path for i in issues])
    cfg = None
    if sound is not None:
        try:
            cfg = build(sound)
        except msgspec.ValidationError as err:  # a struct's own check that _walk did not reach
            issues = issues or [ConfigIssue((), str(err))]
    if cfg is not None:
        bad = {i.path for i in issues}  # a removed value's default must not be blamed as well
        issues += [i for i in semantic_issues(cfg) if i.path not in bad]
    if issues or cfg is None:
        raise error_at(text, issues)
    return cfg


def parse(text: str, schema: type[msgspec.Struct]) -> dict[str, Any]:
    """Parse TOML and check it against ``schema``; every issue at once, with key path and line.

    Returns the raw table; ``msgspec.convert(raw, schema)`` then cannot fail. Other TOML files
    (the gateway's correlation rules) use this too. Only ``ConfigError`` escapes, whatever the text.
    """
    raw, issues = _checked(text, schema)
    if issues:
        raise error_at(text, issues)
    return raw


def _checked(text: str, schema: type[msgspec.Struct]) -> tuple[dict[str, Any], list[ConfigIssue]]:
    """The TOML table and its issues against ``schema``; ``ConfigError`` if it is not a TOML file at all."""
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Windows Notepad writes one
    if len(text) > MAX_BYTES:
        raise ConfigError([ConfigIssue((), f"larger than {MAX_BYTES >> 10} KB: not a config file")])
    if _nesting(text) > MAX_NESTING:
        raise ConfigError([ConfigIssue((), f"brackets nested more than {MAX_NESTING} deep: not a config file")])
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"line (\d+)", str(err))
        raise ConfigError([ConfigIssue((), f"not valid TOML: {err}", int(m.group(1)) if m else None)]) from None
    except (RecursionError, ValueError, TypeError, OverflowError) as err:  # tomllib's own slips on odd input
        raise ConfigError([ConfigIssue((), f"not valid TOML: {type(err).__name__}: {err}")]) from None
    issues: list[ConfigIssue] = []
    _walk(raw, schema, (), issues)
    return raw, issues


def _without(raw: dict[str, Any], paths: list[Path]) -> dict[str, Any] | None:
    """``raw`` without the values at ``paths`` (their defaults apply), or None where that cannot be done:
    an array item (removing it would renumber the rest) or the whole file."""
    sound = copy.deepcopy(raw)
    for path in paths:
        if not path or not isinstance(path[-1], str):
            return None
        table: Any = sound
        for p in path[:-1]:
            try:
                table = table[p]
            except (KeyError, IndexError, TypeError):
                return None
        if isinstance(table, dict):
            table.pop(path[-1], None)
    return sound


def error_at(text: str, issues: list[ConfigIssue]) -> ConfigError:
    """The error for ``issues``, each with the line of its key path in ``text`` (the first MAX_ISSUES)."""
    shown = [ConfigIssue(i.path, i.message, i.line or _line_of(text, i.path)) for i in issues[:MAX_ISSUES]]
    if len(issues) > MAX_ISSUES:
        shown.append(ConfigIssue((), f"and {len(issues) - MAX_ISSUES} more errors"))
    return ConfigError(shown)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6 address]:port`` -> (host, port); an empty host is 127.0.0.1 (never all
    interfaces by accident), port 0 a free port the system picks (tests). ``ValueError`` says what is wrong."""
    m = re.fullmatch(r"(?:\[([^\]]*)\]|([^:\[\]]*)):(\d{1,5})", listen)
    if m is None:
        raise ValueError('expected host:port, e.g. "127.0.0.1:9108" or "[::1]:9108"')
    v6, host, port = m.group(1), m.group(2), int(m.group(3))
    if v6 is not None:
        try:
            ipaddress.IPv6Address(v6)
        except ValueError:
            raise ValueError(f"{v6[:64]!r} is not an IPv6 address") from None
    elif re.fullmatch(r"[\d.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    elif host and not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", host):
        raise ValueError(f"{host[:64]!r} is not a host name or address")
    if port > 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    return v6 or host or "127.0.0.1", port


def sample_text() -> str:
    return resources.files("edge").joinpath("sample.toml").read_text(encoding="utf-8")


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
        before = len(issues)
        fields = _fields(tp)
        extension = getattr(tp, "extension_type", None)
        extra = {k: v for k, v in value.items() if k not in fields}
        for k in [k for k in value if k in fields]:  # in the file's order, so reports are too
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
            if len(issues) == before and hasattr(tp, "__post_init__"):  # its own checks, once its fields are sound
                _leaf(value, tp, path, issues)
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
        _leaf(value, tp, path, issues)


def _leaf(value: Any, tp: Any, path: Path, issues: list[ConfigIssue]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        issues.append(ConfigIssue(path, f"{value} is not a number we can use: give a finite value"))
        return
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as err:
        message = str(err).split(" - at ")[0]
        if "no timezone component" in message:
            message += ": write the site's local time without an offset, e.g. 2024-06-07T09:00:00"
        issues.append(ConfigIssue(path, message))


def _nesting(text: str) -> int:
    """How deep brackets nest, counted without parsing (brackets in strings count too: a bound, not TOML)."""
    depth = deepest = 0
    for c in re.findall(r"[][{}]", text):
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(0, depth - 1)
    return deepest


def _build(raw: dict[str, Any]) -> Config:
    devices = []
    for d in raw.get("devices", []):
        fields = _fields(Device)
        device = msgspec.convert({k: v for k, v in d.items() if k in fields}, Device)
        options = msgspec.convert({k: v for k, v in d.items() if k not in fields}, Device.extension_type(d))
        devices.append(msgspec.structs.replace(device, options=options))
    return msgspec.structs.replace(msgspec.convert({**raw, "devices": []}, Config), devices=devices)


def _semantic_issues(cfg: Config) -> list[ConfigIssue]:
    from rules.pack import DEFAULT_RULES, override_issues

    issues = _device_issues(cfg.devices)
    for key in ("site", "room"):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", getattr(cfg.agent, key)):
            issues.append(ConfigIssue(("agent", key), "1 to 64 letters, digits, '-' or '_' (it is an MQTT topic level)"))
    try:
        parse_listen(cfg.exporter.listen)
    except ValueError as err:
        issues.append(ConfigIssue(("exporter", "listen"), str(err)))
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
        from edge.wire import parse_key

        try:
            parse_key(up.signing_key)
        except ValueError as err:  # the message never repeats the key
            issues.append(ConfigIssue(("uplink", "signing_key"), str(err)))
    issues += [ConfigIssue(path, message) for path, message in schedule_issues(cfg.schedule)]
    return issues


def _device_issues(devices: list[Device]) -> list[ConfigIssue]:
    """Names, then each protocol's checks of its devices alone and together (e.g. two on one topic)."""
    import collectors

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
        if len(keys) > 1:  # [a.b] or [[a.b]] may stand without an [a] header
            start, table, keys = (start if hit is None else hit + 1), table + [str(head)], keys[1:]
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


__all__ = ["BrokerSettings", "Config", "ConfigError", "ConfigIssue", "Device", "Interval", "Port", "SessionExpiry",
           "Timeout", "Uplink", "apply_broker_settings", "decode", "error_at", "load", "loads", "parse",
           "parse_listen", "read", "sample_text", "validated"]
