"""`examwatch site plan ROSTER.csv --out DIR`: a county's rooms from one roster, every file the week needs.

From the roster (one row per room, columns in ``COLUMNS``, documented in docs/deploy.md) it writes:

    DIR/rooms/<site>/<room>/agent.toml      the room's agent config (passes `config check`; holds its broker password)
    DIR/rooms/<site>/<room>/agent.key       its signing key (hex), kept on re-runs; /etc/examwatch/agent.key on the Pi
    DIR/rooms/<site>/<room>/mqtt.password   its county-broker password, kept on every re-run
    DIR/county/agent-keys                   the gateway's roster: "<site>/<room> <hex key>" ([security] keys_file)
    DIR/county/dynamic-security.json        the county broker's users and roles (mosquitto's dynamic-security
                                            plugin): each room publishes its own topics only and reads nothing;
                                            the gateways read, and subscribe to no share group but theirs
    DIR/county/gateway.password             the gateway's own broker password
    DIR/county/gateway-<n>.password         with ``replicas`` > 1: replica n's (user examwatch-gateway-<n>)
    DIR/county/share-group                  the replicas' share group (``share_group``), kept on re-runs

Every secret is owner-only (0600). A file is written only when its content changes, so a second run changes
nothing; ``rotate`` gives one room a new signing key, in its key file and in the gateway's roster. A roster
with any error writes nothing: every error is reported with its line.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from examwatch.kernel import wire
from examwatch.kernel.wire import TOPIC_ROOT as TOPICS

COLUMNS = ("site", "room", "kind", "site_name", "room_name", "pi_host", "devices")
ROSTER_MAX_BYTES = 2_000_000
ROOMS_MAX = 5000
DEVICES_MAX = 64  # per room
GATEWAY_USER = "examwatch-gateway"
REPLICAS_MAX = 64
DYNSEC = "dynamic-security.json"
DYNSEC_MAX_BYTES = 50_000_000  # ours is ~1 kB a room; a kept file larger than this is not read back
ITERATIONS = 101  # PBKDF2 rounds, mosquitto's own default: every room's login costs the broker this
KEY_ON_PI = "/etc/examwatch/agent.key"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")  # gateway/config.py's share_group
_HOST = re.compile(r"[A-Za-z0-9_.:-]{0,253}")
_DEVICE = re.compile(r"([a-z]+)=([a-z_]+):([^@\s]{1,200})(?:@([A-Za-z0-9_.-]{1,64}))?")

# What a roster entry ``<kind>=<protocol>:<address>[@profile]`` needs beyond it, per protocol (and kind).
_EXTRA = {
    "mqtt": {
        "door": 'profile = "zigbee2mqtt_contact"\ninterval = 3600.0\navailability = true\n',
        "noise": 'profile = "zigbee2mqtt_noise"\ninterval = 30.0\n',
        "recorder": 'profile = "recorder_json"\ninterval = 60.0\navailability = false\n',
    },
    "snmp": {"ups": 'profile = "ups-mib"\n', "switch": 'profile = "if-mib"\n', "nvr": 'profile = "hikvision-nvr"\n'},
}


class PlanError(Exception):
    """The roster is wrong; ``str()`` lists every problem with its line."""


@dataclass(frozen=True)
class Room:
    line: int
    site: str
    room: str
    kind: str
    site_name: str
    room_name: str
    pi_host: str
    devices: tuple[tuple[str, str, str, str], ...]  # (kind, protocol, address, profile)

    @property
    def agent_id(self) -> str:
        return f"{self.site}/{self.room}"

    @property
    def user(self) -> str:
        return broker_user(self.agent_id)


@dataclass
class Plan:
    rooms: list[Room]
    changed: list[Path] = field(default_factory=list)
    new_keys: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)


# --- the roster (pure) --------------------------------------------------------------------------------------


def broker_user(agent_id: str) -> str:
    """A room's user (and client id) on the county broker: ``<site>-<room>``."""
    return agent_id.replace("/", "-", 1)


def gateway_users(replicas: int = 1) -> list[str]:
    """The gateways' broker users: the gateway's, then replica n's ``<gateway>-<n>`` (docs/scaling.md)."""
    if not 1 <= replicas <= REPLICAS_MAX:
        raise PlanError(f"replicas {replicas}: expected 1 to {REPLICAS_MAX}")
    return [GATEWAY_USER, *(f"{GATEWAY_USER}-{n}" for n in range(2, replicas + 1))]


def parse_roster(text: str, replicas: int = 1) -> list[Room]:
    if len(text) > ROSTER_MAX_BYTES:
        raise PlanError(f"roster: larger than {ROSTER_MAX_BYTES} bytes")
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))  # Excel writes a BOM
    header = [h.strip() for h in reader.fieldnames or []]
    if missing := [c for c in COLUMNS if c not in header]:
        raise PlanError(f"roster line 1: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    if unknown := [h for h in header if h not in COLUMNS]:
        raise PlanError(f"roster line 1: unknown column(s) {', '.join(unknown)}; expected {','.join(COLUMNS)}")
    rooms: list[Room] = []
    errors: list[str] = []
    seen: set[str] = set()
    users = {u: f"gateway replica {n}" if n > 1 else "the gateway" for n, u in enumerate(gateway_users(replicas), 1)}
    for row in reader:
        line = reader.line_num
        if len(rooms) >= ROOMS_MAX:
            raise PlanError(f"roster: more than {ROOMS_MAX} rooms")
        cells = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(cells.values()):
            continue
        problems = [f"{key} {cells[key]!r}: 1 to 64 letters, digits, '-' or '_'" for key in ("site", "room")]
        problems = [p for key, p in zip(("site", "room"), problems, strict=True) if not _ID.fullmatch(cells[key])]
        if not _HOST.fullmatch(cells["pi_host"]):  # it goes into a comment line: no line breaks, no quotes
            problems.append(f"pi_host {cells['pi_host'][:80]!r}: a host name or address")
        if cells["kind"] not in ("exam_room", "secrecy_room"):
            problems.append(f"kind {cells['kind']!r}: exam_room or secrecy_room")
        devices, words = [], cells["devices"].split()
        for word in words[:DEVICES_MAX]:
            m = _DEVICE.fullmatch(word)
            if m is None:
                problems.append(f"device {word[:80]!r}: expected <kind>=<protocol>:<address>[@profile]")
            else:
                devices.append((m[1], m[2], m[3], m[4] or ""))
        if len(words) > DEVICES_MAX:
            problems.append(f"more than {DEVICES_MAX} devices")
        room = Room(line, cells["site"], cells["room"], cells["kind"], cells["site_name"], cells["room_name"],
                    cells["pi_host"], tuple(devices))  # fmt: skip
        if not problems:
            if room.agent_id in seen:
                problems.append(f"room {room.agent_id} listed twice")
            elif room.user in users:  # two rooms on one user could speak for each other
                problems.append(f"{room.agent_id} would log in as {room.user}, like {users[room.user]}")
            seen.add(room.agent_id)
            users.setdefault(room.user, room.agent_id)
        errors += [f"roster line {line}: {p}" for p in problems]
        rooms.append(room)
    if errors:
        raise PlanError("\n".join(errors))
    return rooms


def agent_config(room: Room, broker: tuple[str, int, bool], password: str, schedule: str = "") -> str:
    """The room's agent TOML (strings JSON-quoted: a valid TOML basic string); ``schedule``, the county's
    ``[schedule]`` table (exam sessions, secrecy windows), goes at its end as given."""
    q = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731
    host, port, tls = broker
    text = (
        f"# made by `examwatch site plan` for {room.agent_id} (Pi {room.pi_host or '?'}); edit the roster, not this\n"
        f"[agent]\nsite = {q(room.site)}\nroom = {q(room.room)}\nkind = {q(room.kind)}\n"
        f"site_name = {q(room.site_name)}\nroom_name = {q(room.room_name)}\n\n"
        f"[uplink]\nenabled = true\nhost = {q(host)}\nport = {port}\ntls = {'true' if tls else 'false'}\n"
        f"username = {q(room.user)}\npassword = {q(password)}\nsigning_key_file = {q(KEY_ON_PI)}\n"
    )
    counts: dict[str, int] = {}
    for kind, protocol, address, profile in room.devices:
        counts[kind] = counts.get(kind, 0) + 1
        name = f"{kind}{counts[kind]}"
        where = f"topic = {q(address)}\n" if protocol == "mqtt" else f"address = {q(address)}\n"
        extra = _EXTRA.get(protocol, {}).get(kind, "")
        if profile:
            extra = re.sub(r'profile = ".*"\n', "", extra) + f"profile = {q(profile)}\n"
        if protocol == "isapi":
            extra += f"password_file = {q(f'/etc/examwatch/{name}.pass')}\n"
        text += f"\n[[devices]]\nname = {q(name)}\nkind = {q(kind)}\nprotocol = {q(protocol)}\n{where}{extra}"
    return text + (f"\n{schedule.strip()}\n" if schedule.strip() else "")


def dynamic_security(
    rooms: list[str], passwords: dict[str, str], replicas: int, share_group: str, kept: dict[str, Any] | None = None
) -> str:
    """The county broker's dynamic-security file: a client per user in ``passwords``, a role per room.

    Nothing is allowed but what a role grants. A room (``rooms``: agent ids) may publish under its own topics
    and nothing else: no subscription at all, so no share group either. The gateways (and replicas) may
    subscribe to the plain topics (a lone gateway, the leader's statuses) and to ``$share/<share_group>/``,
    no other group, and receive what they subscribed to; they publish nothing. ``kept``: the previous file's
    clients by user, whose salted hash stays while it still matches the password (a re-run changes nothing).
    """
    role_of = {broker_user(agent_id): f"room/{agent_id}" for agent_id in rooms}
    role_of |= dict.fromkeys(gateway_users(replicas), "gateway")
    allow = lambda kind, topic: {"acltype": kind, "topic": topic, "allow": True}  # noqa: E731
    roles = [{"rolename": f"room/{a}", "acls": [allow("publishClientSend", f"{TOPICS}/{a}/#")]} for a in rooms]
    roles.append({
        "rolename": "gateway",
        "acls": [
            allow("subscribePattern", f"{TOPICS}/#"),
            *([allow("subscribePattern", f"$share/{share_group}/{TOPICS}/#")] if share_group else []),
            allow("publishClientReceive", f"{TOPICS}/#"),
        ],
    })  # fmt: skip
    clients = []
    for user, password in passwords.items():
        old = (kept or {}).get(user, {})
        credentials = {k: old.get(k) for k in ("password", "salt", "iterations")}
        if not credentials_match(credentials, password):
            credentials = hash_password(password)
        roles_of_user = [{"rolename": role_of[user]}] if user in role_of else []
        clients.append({"username": user, **credentials, "roles": roles_of_user})
    deny = dict.fromkeys(("publishClientSend", "publishClientReceive", "subscribe"), False)
    doc = {"defaultACLAccess": {**deny, "unsubscribe": True}, "clients": clients, "groups": [], "roles": roles}
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> dict[str, Any]:
    """A dynamic-security client's credentials: PBKDF2-HMAC-SHA512 (mosquitto_passwd's format 7), base64."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def credentials_match(credentials: dict[str, Any], password: str) -> bool:
    iterations, salt, hashed = credentials.get("iterations"), credentials.get("salt"), credentials.get("password")
    if type(iterations) is not int or not 1 <= iterations <= 1_000_000 or not isinstance(salt, str):
        return False
    try:
        again = hash_password(password, base64.b64decode(salt, validate=True), iterations)
    except ValueError:
        return False
    return isinstance(hashed, str) and hmac.compare_digest(again["password"], hashed)


# --- the files (I/O) ----------------------------------------------------------------------------------------


def _secret(path: Path, make: str, valid: Callable[[str], bool] = bool) -> tuple[str, bool]:
    """The secret kept in ``path``, or ``make`` (True: it is new)."""
    if path.is_file():
        kept = path.read_text(encoding="ascii", errors="replace").strip()
        if valid(kept):
            return kept, False
    return make, True


def _is_group(text: str) -> bool:
    return _GROUP.fullmatch(text) is not None


def _valid_key(text: str) -> bool:
    try:
        wire.parse_key(text)
    except ValueError:
        return False
    return True


def plan(
    roster: str,
    out: Path,
    broker: tuple[str, int, bool],
    rotate: str = "",
    schedule: str = "",
    replicas: int = 1,
    share_group: str = "",
) -> Plan:
    """Write (or confirm) every file for ``roster`` under ``out``; see the module's docstring. ``share_group``:
    the replicas' group; empty keeps the one in ``out`` (a random one the first time)."""
    if share_group and not _GROUP.fullmatch(share_group):
        raise PlanError(f"--share-group {share_group[:80]!r}: 1 to 64 letters, digits, '-' or '_'")
    rooms = parse_roster(roster, replicas)
    if rotate and rotate not in {r.agent_id for r in rooms}:
        raise PlanError(f"--rotate {rotate}: no such room in the roster (expected <site>/<room>)")
    result = Plan(rooms)
    files: dict[Path, str] = {}
    keys, passwords = [], {}
    for r in rooms:
        home = out / "rooms" / r.site / r.room
        key, new = _secret(home / "agent.key", secrets.token_hex(32), _valid_key)
        if r.agent_id == rotate:
            key, new = secrets.token_hex(32), False
            result.rotated.append(r.agent_id)
        if new:
            result.new_keys.append(r.agent_id)
        password, _ = _secret(home / "mqtt.password", secrets.token_urlsafe(24))
        passwords[r.user] = password
        keys.append(f"{r.agent_id} {key}\n")
        files |= {
            home / "agent.key": key + "\n",
            home / "mqtt.password": password + "\n",
            home / "agent.toml": agent_config(r, broker, password, schedule),
        }
    county = out / "county"
    for user in gateway_users(replicas):
        path = county / f"{user.replace(GATEWAY_USER, 'gateway', 1)}.password"
        passwords[user], _ = _secret(path, secrets.token_urlsafe(24))
        files[path] = passwords[user] + "\n"
    group = share_group or _secret(county / "share-group", secrets.token_hex(12), _is_group)[0]
    agent_ids = [r.agent_id for r in rooms]
    files |= {
        county / "agent-keys": "".join(keys),
        county / "share-group": group + "\n",
        county / DYNSEC: dynamic_security(agent_ids, passwords, replicas, group, _kept_clients(county / DYNSEC)),
    }
    _check_configs(rooms, files, out)
    for path, text in files.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text or path.stat().st_mode & 0o077:
            _write_private(path, text)
            result.changed.append(path)
    return result


def _write_private(path: Path, text: str) -> None:
    """Owner-only from its first byte, replaced whole (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _kept_clients(path: Path) -> dict[str, Any]:
    """The previous dynamic-security file's clients by user name (its salted hashes); none if unreadable."""
    try:
        if path.stat().st_size > DYNSEC_MAX_BYTES:
            return {}
        clients = json.loads(path.read_text(encoding="utf-8")).get("clients", [])
        return {c["username"]: c for c in clients if isinstance(c, dict) and isinstance(c.get("username"), str)}
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        return {}


def _check_configs(rooms: list[Room], files: dict[Path, str], out: Path) -> None:
    """Every config must pass `config check`; one that does not is the roster's error, reported by line."""
    from examwatch.edge.config import ConfigError, loads

    errors = []
    for r in rooms:
        try:
            loads(files[out / "rooms" / r.site / r.room / "agent.toml"])
        except ConfigError as err:
            errors += [f"roster line {r.line} ({r.agent_id}): {e}" for e in str(err).splitlines() if e.strip()]
    if errors:
        raise PlanError("\n".join(errors))


def summary(p: Plan, out: Path) -> str:
    sites: dict[str, int] = {}
    for r in p.rooms:
        sites[r.site] = sites.get(r.site, 0) + 1
    lines = [
        f"{len(p.rooms)} 个考场/保密室，{len(sites)} 个考点：" + "，".join(f"{s} {n} 间" for s, n in sites.items())
    ]
    lines.append(f"新密钥 {len(p.new_keys)} 个；更换密钥：{', '.join(p.rotated) or '无'}")
    if p.changed:
        lines.append(f"写入 {len(p.changed)} 个文件：")
        lines += [f"  {os.path.relpath(path, out)}" for path in p.changed]
    else:
        lines.append("没有文件需要改动（与上次一致）")
    if p.changed:
        lines.append(
            "下一步：county/dynamic-security.json 装到县级 mosquitto（/var/lib/mosquitto/，属主 mosquitto）并重启"
            " mosquitto，agent-keys 等装到网关，每间的 agent.toml、agent.key 拷到对应树莓派（见 docs/deploy.md）"
        )
    return "\n".join(lines)
