"""The county gateway's TOML config: schema, sample, loading (every error at once, with key path)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from examwatch.gateway.auth import User
from examwatch.gateway.notify import settings as notify
from examwatch.gateway.store import Postgres, Where
from examwatch.kernel import wire
from examwatch.kernel.broker import BrokerSettings
from examwatch.kernel.config import (
    DAY,
    ConfigIssue,
    SessionExpiry,
    Strict,
    check_host,
    parse,
    parse_listen,
    read,
    validated,
)
from examwatch.kernel.files import read_secret
from examwatch.rules.config import Schedule, schedule_issues

# The alarm rules the gateway raises itself (gateway/ingest.py); correlation rules may name them too.
GATEWAY_RULES = ("agent_offline", "clock_skew", "security_rejected")

Days = Annotated[float, msgspec.Meta(ge=0.01, le=3660)]  # retention: a quarter hour .. ten years
Seconds = Annotated[float, msgspec.Meta(ge=0.1, le=DAY)]  # windows and timeouts: a tenth of a second .. a day


class GatewaySettings(Strict, kw_only=True):
    county: str = ""  # display name, e.g. "某某县招办"
    # "county": the rooms' gateway. "aggregate": a province's read-only view of bridged counties (docs/province.md):
    # it stores and shows, never acknowledges or notifies.
    mode: Literal["county", "aggregate"] = "county"
    state_dir: str = "/var/lib/examwatch-gateway"  # gateway.db lives here
    retention_days: Days = 30.0  # readings and the (agent, seq) ledger older than this are deleted
    alarm_retention_days: Days = 365.0  # alarm and incident timelines are kept this long
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 5000  # messages ingested per transaction at most


class Store(Strict, kw_only=True):
    """Where the gateway keeps what it stores: SQLite in state_dir (one gateway), or PostgreSQL (replicas)."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    dsn: str = ""  # postgresql: a libpq connection string or URI without the password; or host, port, ...
    host: str = ""
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 5432
    database: str = "examwatch"
    user: str = "examwatch"
    password_file: str = ""  # the password alone, in a file only its owner reads; never logged
    pool_max: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 20  # connections of this process at most

    def where(self, state_dir: str) -> Where:
        if self.backend == "sqlite":
            return str(Path(state_dir) / "gateway.db")
        from psycopg.conninfo import make_conninfo

        conninfo = self.dsn or make_conninfo(host=self.host, port=self.port, dbname=self.database, user=self.user)
        return Postgres(conninfo, self.password_file, self.pool_max)


class Broker(BrokerSettings, kw_only=True):
    """The county broker the agents publish to."""

    client_id: str = "examwatch-gateway"  # each replica its own (e.g. examwatch-gateway-2)
    # Replicas sharing the county's feed (MQTT v5 shared subscription $share/<group>/...): the same name on
    # each, the one the broker's gateway role allows (site plan's county/share-group); empty: this gateway
    # alone takes every message. Not a secret: the broker refuses any other login's subscription to it.
    share_group: Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""
    session_expiry: SessionExpiry = 7 * 24 * 3600  # the broker queues for us this long while we are down
    # unacknowledged messages the broker may send us at once (MQTT v5: a two-byte number, 0 not allowed)
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 2000


class Listen(Strict, kw_only=True):
    listen: str = "127.0.0.1:9109"


class Api(Strict, kw_only=True):
    listen: str = "127.0.0.1:8080"
    token: str = ""  # bearer token for acknowledgements; or token_file
    token_file: str = ""
    users: list[User] = []  # the duty desk's log-ins (docs/duty-desk.md); none: nobody can log in
    secrecy_rooms: list[str] = []  # "<site>/<room>" of the secrecy rooms (保密室): the desk shows them apart


class Security(Strict, kw_only=True):
    keys_file: str = ""  # lines "<site>/<room> <hex key>"; the county's roster of rooms
    keys: dict[str, str] = {}  # or inline: "<site>/<room>" = "<hex key>"
    quiet: Seconds = 600.0  # s without rejections before a room's security alarm clears


class Liveness(Strict, kw_only=True):
    heartbeat_timeout: Seconds = 90.0  # s without any message from an agent -> offline
    skew_max: Seconds = 5.0  # s between the agent's clock and ours before a clock alarm


class CorrelationRule(Strict, kw_only=True):
    """One fault class: the alarm rules that belong to it and when rooms together make an incident."""

    fault_class: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = msgspec.field(name="class")
    title: Annotated[str, msgspec.Meta(min_length=1)]  # Chinese title for staff, e.g. "考点多个考场网络中断"
    rules: Annotated[list[str], msgspec.Meta(min_length=1)]  # alarm rule ids (the agents' and the gateway's own)
    # rooms of one site with the fault within the window -> level-2 incident
    min_rooms: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    window: Seconds = 300.0  # s between the rooms' alarms (by the rooms' own timestamps)
    site_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5  # share of the site's rooms -> level 3; 0 disables
    site_rooms: list[str] = []  # rooms whose fault alone is site-wide (e.g. the room that watches the site's power)


class Config(Strict, kw_only=True):
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    store: Store = msgspec.field(default_factory=Store)
    broker: Broker = msgspec.field(default_factory=Broker)
    exporter: Listen = msgspec.field(default_factory=Listen)
    api: Api = msgspec.field(default_factory=Api)
    security: Security = msgspec.field(default_factory=Security)
    liveness: Liveness = msgspec.field(default_factory=Liveness)
    schedule: Schedule = msgspec.field(default_factory=Schedule)
    correlation: list[CorrelationRule] = []  # empty: the built-in rules (gateway/correlation.toml)
    channels: list[notify.Channel] = []  # where alarms are sent (docs/channels.md)
    roster: list[notify.Roster] = []  # per site, the channels of each tier
    notify: notify.Notify = msgspec.field(default_factory=notify.Notify)

    def agent_keys(self) -> dict[str, bytes]:
        """The roster: every agent id with its signing key (file entries first, inline ones override)."""
        text = read_secret(self.security.keys_file) if self.security.keys_file else ""
        keys = dict(_parse_keys_file(text))
        keys.update({a: wire.parse_key(k) for a, k in self.security.keys.items()})
        return keys

    def api_token(self) -> str:
        if self.api.token_file:
            return read_secret(self.api.token_file).strip()
        return self.api.token

    def store_where(self) -> Where:
        return self.store.where(self.gateway.state_dir)

    def correlation_rules(self) -> list[CorrelationRule]:
        return self.correlation or builtin_correlation()


class _Builtin(Strict):
    correlation: list[CorrelationRule]


def builtin_correlation() -> list[CorrelationRule]:
    text = resources.files("examwatch.gateway").joinpath("correlation.toml").read_text(encoding="utf-8")
    return msgspec.convert(parse(text, _Builtin), _Builtin).correlation


def _parse_keys_file(text: str) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    lines: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        parts = raw.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"keys file line {n}: expected '<site>/<room> <hex key>'")
        if parts[0] in lines:  # two rooms (two counties' rosters put together) under one id: one would be lost
            raise ValueError(f"keys file line {n}: {parts[0]} already given at line {lines[parts[0]]}")
        lines[parts[0]] = n
        try:
            out.append((parts[0], wire.parse_key(parts[1])))
        except ValueError as err:
            raise ValueError(f"keys file line {n}: {err}") from None
    return out


def sample_text() -> str:
    return resources.files("examwatch.gateway").joinpath("sample.toml").read_text(encoding="utf-8")


def loads(text: str) -> Config:
    """Parse and validate; raise ``ConfigError`` listing every problem found (only that, whatever the text)."""
    return validated(text, Config, lambda raw: msgspec.convert(raw, Config), _semantic_issues)


def _semantic_issues(cfg: Config) -> list[ConfigIssue]:
    issues = []
    for agent in cfg.security.keys:
        if not re.fullmatch(r"[A-Za-z0-9_-]+/[A-Za-z0-9_-]+", agent):
            issues.append(ConfigIssue(("security", "keys", agent), "agent id must be <site>/<room>"))
        try:
            wire.parse_key(cfg.security.keys[agent])
        except ValueError as err:
            issues.append(ConfigIssue(("security", "keys", agent), str(err)))
    if cfg.security.keys_file:
        try:  # a regular file of at most 1 MiB that only its owner can read (a FIFO is refused, never waited on)
            _parse_keys_file(read_secret(cfg.security.keys_file))
        except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
            issues.append(ConfigIssue(("security", "keys_file"), str(err)))
    try:
        check_host(cfg.broker.host)
    except ValueError as err:
        issues.append(ConfigIssue(("broker", "host"), str(err)))
    issues += _correlation_issues(cfg.correlation)
    names = [u.name for u in cfg.api.users]
    issues += [
        ConfigIssue(("api", "users", i, "name"), "user given twice") for i, n in enumerate(names) if n in names[:i]
    ]
    issues += _store_issues(cfg.store)
    ports: dict[int, str] = {}
    for key, value in (("exporter", cfg.exporter.listen), ("api", cfg.api.listen)):
        try:
            _, port = parse_listen(value)
        except ValueError as err:
            issues.append(ConfigIssue((key, "listen"), str(err)))
            continue
        if port and port in ports:
            issues.append(ConfigIssue((key, "listen"), f"port {port} is already the {ports[port]}'s: one port each"))
        ports[port] = key
    issues += [ConfigIssue(path, message) for path, message in schedule_issues(cfg.schedule)]
    issues += [ConfigIssue(path, text) for path, text in notify.check(cfg.channels, cfg.roster, cfg.notify)]
    if cfg.gateway.mode == "aggregate":  # the counties notify and take acknowledgements; the province only looks
        issues += [
            ConfigIssue((key,), f"not in aggregate mode: the counties' gateways {what}")
            for key, what in (("channels", "notify"), ("roster", "notify"))
            if getattr(cfg, key)
        ]
        if cfg.api.token or cfg.api.token_file:
            issues.append(ConfigIssue(("api", "token"), "not in aggregate mode: its API takes no acknowledgements"))
    return issues


def _correlation_issues(rules: list[CorrelationRule]) -> list[ConfigIssue]:
    from examwatch.rules.pack import DEFAULT_RULES

    known = {r.id for r in DEFAULT_RULES} | set(GATEWAY_RULES)
    issues, classes = [], set()
    for i, rule in enumerate(rules):
        if rule.fault_class in classes:
            issues.append(ConfigIssue(("correlation", i, "class"), f"class {rule.fault_class!r} given twice"))
        classes.add(rule.fault_class)
        unknown = [r for r in rule.rules if r not in known]
        if unknown:  # a typo would silently keep a class of faults from ever making an incident
            issues.append(
                ConfigIssue(
                    ("correlation", i, "rules"),
                    f"no such rule: {', '.join(map(repr, unknown[:5]))}; known: {', '.join(sorted(known))}",
                )
            )
    return issues


def _store_issues(st: Store) -> list[ConfigIssue]:
    pg_keys = ("dsn", "host", "password_file")
    if st.backend == "sqlite":
        return [
            ConfigIssue(("store", k), 'only for backend = "postgresql" (sqlite keeps gateway.db in state_dir)')
            for k in pg_keys
            if getattr(st, k)
        ]
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return [ConfigIssue(("store", "backend"), "needs psycopg: pip install 'examwatch[postgresql]'")]
    issues = []
    if bool(st.dsn) == bool(st.host):
        issues.append(ConfigIssue(("store", "dsn"), "postgresql needs either dsn or host (with port, database, user)"))
    if st.dsn:
        try:
            from psycopg.conninfo import conninfo_to_dict

            if "password" in conninfo_to_dict(st.dsn):
                issues.append(ConfigIssue(("store", "dsn"), "no password in the dsn: put it in password_file"))
        except Exception as err:  # psycopg.ProgrammingError on a malformed dsn; never echo it (it may hold secrets)
            issues.append(ConfigIssue(("store", "dsn"), f"not a libpq connection string or URI ({type(err).__name__})"))
    elif st.host and not st.host.startswith("/"):  # a directory is libpq's unix socket
        try:
            check_host(st.host)
        except ValueError as err:
            issues.append(ConfigIssue(("store", "host"), str(err)))
    if st.password_file:
        try:
            read_secret(st.password_file)
        except (OSError, ValueError) as err:
            issues.append(ConfigIssue(("store", "password_file"), str(err)))
    return issues


def load(path: str) -> Config:
    return loads(read(path))


__all__ = ["GATEWAY_RULES", "Config", "CorrelationRule", "Store", "builtin_correlation", "load", "loads", "sample_text"]
