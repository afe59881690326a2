"""The county gateway's TOML config: schema, sample, loading (every error at once, with key path)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import msgspec

from examwatch.kernel import wire
from examwatch.edge.config import BrokerSettings, ConfigError, ConfigIssue, parse
from examwatch.rules.config import Schedule


class Gateway(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    county: str = ""  # display name, e.g. "某某县招办"
    state_dir: str = "/var/lib/examwatch-gateway"  # gateway.db lives here
    retention_days: float = 30.0  # readings and the (agent, seq) ledger older than this are deleted
    alarm_retention_days: float = 365.0  # alarm and incident timelines are kept this long
    batch_max: int = 5000  # messages ingested per transaction at most


class Broker(BrokerSettings, kw_only=True, forbid_unknown_fields=True):
    """The county broker the agents publish to."""

    client_id: str = "examwatch-gateway"
    session_expiry: int = 7 * 24 * 3600  # the broker queues for us this long while we are down
    receive_maximum: int = 2000  # unacknowledged messages the broker may send us at once


class Listen(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:9109"


class Api(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:8080"
    token: str = ""  # bearer token for acknowledgements; or token_file
    token_file: str = ""


class Security(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    keys_file: str = ""  # lines "<site>/<room> <hex key>"; the county's roster of rooms
    keys: dict[str, str] = {}  # or inline: "<site>/<room>" = "<hex key>"
    replay_window: float = 600.0  # s: an already stored message arriving again this much later is a replay
    quiet: float = 600.0  # s without rejections before a room's security alarm clears


class Liveness(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    heartbeat_timeout: float = 90.0  # s without any message from an agent -> offline
    skew_max: float = 5.0  # s between the agent's clock and ours before a clock alarm


class CorrelationRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One fault class: the alarm rules that belong to it and when rooms together make an incident."""

    fault_class: str = msgspec.field(name="class")
    title: str  # Chinese incident title for staff, e.g. "考点多个考场网络中断"
    rules: list[str]  # alarm rule ids (the agents' and the gateway's own) of this class
    min_rooms: int = 2  # rooms of one site with the fault within the window -> level-2 incident
    window: float = 300.0  # s between the rooms' alarms (by the rooms' own timestamps)
    site_share: float = 0.5  # share of the site's rooms -> level 3; 0 disables
    site_rooms: list[str] = []  # rooms whose fault alone is site-wide (e.g. the room that watches the site's power)


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    gateway: Gateway = msgspec.field(default_factory=Gateway)
    broker: Broker = msgspec.field(default_factory=Broker)
    exporter: Listen = msgspec.field(default_factory=Listen)
    api: Api = msgspec.field(default_factory=Api)
    security: Security = msgspec.field(default_factory=Security)
    liveness: Liveness = msgspec.field(default_factory=Liveness)
    schedule: Schedule = msgspec.field(default_factory=Schedule)
    correlation: list[CorrelationRule] = []  # empty: the built-in rules (gateway/correlation.toml)

    def agent_keys(self) -> dict[str, bytes]:
        """The roster: every agent id with its signing key (file entries first, inline ones override)."""
        text = Path(self.security.keys_file).read_text(encoding="utf-8") if self.security.keys_file else ""
        keys = dict(_parse_keys_file(text))
        keys.update({a: wire.parse_key(k) for a, k in self.security.keys.items()})
        return keys

    def api_token(self) -> str:
        if self.api.token_file:
            return Path(self.api.token_file).read_text(encoding="utf-8").strip()
        return self.api.token

    def correlation_rules(self) -> list[CorrelationRule]:
        return self.correlation or builtin_correlation()


class _Builtin(msgspec.Struct, forbid_unknown_fields=True):
    correlation: list[CorrelationRule]


def builtin_correlation() -> list[CorrelationRule]:
    text = resources.files("examwatch.gateway").joinpath("correlation.toml").read_text(encoding="utf-8")
    return msgspec.convert(parse(text, _Builtin), _Builtin).correlation


def _parse_keys_file(text: str) -> list[tuple[str, bytes]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"keys file line {n}: expected '<site>/<room> <hex key>'")
        try:
            out.append((parts[0], wire.parse_key(parts[1])))
        except ValueError as err:
            raise ValueError(f"keys file line {n}: {err}") from None
    return out


def sample_text() -> str:
    return resources.files("examwatch.gateway").joinpath("sample.toml").read_text(encoding="utf-8")


def loads(text: str) -> Config:
    """Parse and validate; raise ``ConfigError`` listing every problem found."""
    cfg = msgspec.convert(parse(text, Config), Config)
    issues = []
    for agent in cfg.security.keys:
        if not re.fullmatch(r"[A-Za-z0-9_-]+/[A-Za-z0-9_-]+", agent):
            issues.append(ConfigIssue(("security", "keys", agent), "agent id must be <site>/<room>"))
        try:
            wire.parse_key(cfg.security.keys[agent])
        except ValueError as err:
            issues.append(ConfigIssue(("security", "keys", agent), str(err)))
    if cfg.security.keys_file:
        try:
            _parse_keys_file(Path(cfg.security.keys_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            issues.append(ConfigIssue(("security", "keys_file"), str(err)))
    for i, rule in enumerate(cfg.correlation):
        if rule.min_rooms < 1:
            issues.append(ConfigIssue(("correlation", i, "min_rooms"), "must be at least 1"))
        if not 0 <= rule.site_share <= 1:
            issues.append(ConfigIssue(("correlation", i, "site_share"), "a share between 0 and 1"))
    for key, value in (("exporter", cfg.exporter.listen), ("api", cfg.api.listen)):
        if not re.fullmatch(r"[^:]*:\d+", value):
            issues.append(ConfigIssue((key, "listen"), "expected host:port"))
    if issues:
        raise ConfigError(issues)
    return cfg


def load(path: str) -> Config:
    with open(path, encoding="utf-8") as f:
        return loads(f.read())


__all__ = ["Config", "CorrelationRule", "builtin_correlation", "load", "loads", "sample_text"]
