"""SNMP discovery: which hosts answer, with which credentials, and which snmp profile reads each.

A host is first asked for sysObjectID and sysDescr with each credential in turn (v2c communities, then v3
users); the first that answers is kept. Then every snmp profile with a ``[discover]`` table is tried by
the agent's own collector; of those that read the device, a profile whose sysObjectID prefix matches wins,
then the lowest rank (a UPS card also answers IF-MIB). A vendor unknown to every profile but answering
UPS-MIB is therefore a UPS-MIB UPS. Requests are bounded: at most ``rate`` a second, ``concurrency`` hosts
at once, each with a short timeout and no retry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from examwatch.collectors import profiles
from examwatch.edge.discover import ERROR, NONE, OK, Found, offered, trial

SYS_DESCR, SYS_OBJECT_ID = (1, 3, 6, 1, 2, 1, 1, 1, 0), (1, 3, 6, 1, 2, 1, 1, 2, 0)
MAX_HOSTS = 1024  # a room's network is a /24; a /22 at most


@dataclass
class Credential:
    """The snmp [[devices]] keys that authenticate (version, community or the v3 user's); shown without secrets."""

    keys: dict[str, str]

    @property
    def label(self) -> str:
        return f"v3 user {self.keys['user']}" if self.keys.get("version") == "3" else "v2c"


def parse_v3(text: str) -> Credential:
    """``user:authproto:authkey:privproto:privkey`` (trailing parts may be left out: authNoPriv, noAuthNoPriv)."""
    parts = text.split(":")
    if not parts[0] or len(parts) not in (1, 3, 5):
        raise ValueError(f"--v3 {parts[0]!r}...: expected user[:authproto:authkey[:privproto:privkey]]")
    keys = {"version": "3", "user": parts[0]}
    if len(parts) >= 3:
        keys |= {"auth_protocol": parts[1].upper(), "auth_key": parts[2]}
    if len(parts) == 5:
        keys |= {"priv_protocol": parts[3].upper(), "priv_key": parts[4]}
    from examwatch.collectors.snmp import SnmpOptions

    try:
        msgspec.convert(keys, SnmpOptions)
    except msgspec.ValidationError as err:
        raise ValueError(f"--v3 {parts[0]!r}: {err}") from None
    return Credential(keys)


def targets(specs: Iterable[str]) -> tuple[list[str], bool]:
    """Hosts from ``host``, ``host:port`` or a network ``a.b.c.0/24``; also whether any came from a range
    (silent addresses of a range are counted, not listed)."""
    hosts: list[str] = []
    ranged = False
    for spec in specs:
        for item in filter(None, spec.split(",")):
            if "/" in item:
                net = ipaddress.ip_network(item, strict=False)
                if net.num_addresses > MAX_HOSTS + 2:
                    raise ValueError(f"{item}: more than {MAX_HOSTS} addresses; probe the room's own network")
                hosts += [str(h) for h in net.hosts()]
                ranged = True
            else:
                hosts.append(item)
    if len(hosts) > MAX_HOSTS:
        raise ValueError(f"more than {MAX_HOSTS} hosts")
    return list(dict.fromkeys(hosts)), ranged


class RateLimit:
    """At most ``rate`` starts a second, evenly spaced, across every task that shares it."""

    def __init__(self, rate: float) -> None:
        self.gap = 1.0 / rate
        self.next = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            wait = self.next - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            # from the start that really happened: a late wake-up must not let the next start come sooner
            self.next = time.monotonic() + self.gap


@dataclass
class Identity:
    sys_object_id: str
    sys_descr: str
    credential: Credential


@dataclass
class Settings:
    credentials: list[Credential]
    timeout: float = 1.0
    rate: float = 50.0
    concurrency: int = 16
    candidates: list[tuple[str, profiles.Discovery]] = field(default_factory=list)


def choose(sys_object_id: str, read: dict[str, int], offered: list[tuple[str, profiles.Discovery]]) -> str | None:
    """Of the profiles that read the device (name -> readings), the one to use (pure): a sysObjectID
    prefix match first, then the lowest rank, then the most readings."""
    table = dict(offered)

    def claims(name: str) -> bool:
        return any(sys_object_id.startswith(p) for p in table[name].sys_object_id)

    ranked = sorted(read, key=lambda n: (not claims(n), table[n].rank, -read[n], n))
    return ranked[0] if ranked else None


async def identify(host: str, s: Settings, limit: RateLimit) -> Identity | None:
    """sysObjectID and sysDescr with the first credential that gets an answer; None if none does."""
    from pysnmp.hlapi.v3arch.asyncio import ContextData, ObjectIdentity, ObjectType, UdpTransportTarget, get_cmd

    from examwatch.collectors.snmp import SnmpOptions, _address, _auth, _engine, _plain

    address = _address(host)
    for cred in s.credentials:
        await limit.wait()
        target = await UdpTransportTarget.create(address, timeout=s.timeout, retries=0)
        auth = _auth(SnmpOptions(**cred.keys))  # type: ignore[arg-type]
        oids = [ObjectType(ObjectIdentity(o)) for o in (SYS_OBJECT_ID, SYS_DESCR)]
        err, status, _, binds = await get_cmd(_engine(), auth, target, ContextData(), *oids, lookupMib=False)
        if err or status:
            continue
        values = {tuple(name): _plain(value) for name, value in binds}
        oid = values.get(SYS_OBJECT_ID)
        descr = values.get(SYS_DESCR)
        return Identity(str(oid) if oid is not None else "", " ".join(str(descr or "").split())[:120], cred)
    return None


async def probe_host(host: str, s: Settings, limit: RateLimit, listed: bool) -> Found | None:
    """One host's row; None for a silent address of a range."""
    address = host
    try:
        ident = await identify(host, s, limit)
    except Exception as err:  # an unresolvable name, a malformed answer: the host's row, never the run
        return Found("snmp", address, ERROR, f"无法探测：{type(err).__name__}: {str(err)[:120]}")
    if ident is None:
        return Found("snmp", address, NONE, "SNMP 无应答（团体名/v3 用户不对，或未开启 SNMP）") if listed else None
    base = {"protocol": "snmp", "address": host, **ident.credential.keys}
    read: dict[str, int] = {}
    failed: dict[str, str] = {}
    for name, _ in s.candidates:
        await limit.wait()
        t = await trial({**base, "kind": "host", "profile": name, "retries": 0, "timeout": s.timeout * 2})
        if t.ok:
            read[name] = len(t.readings)
        else:
            failed[name] = t.reason or "no readings"
    descr = ident.sys_descr[:60] or "无 sysDescr"
    said = f"sysObjectID {ident.sys_object_id or '（无）'}；{descr}；{ident.credential.label}"
    chosen = choose(ident.sys_object_id, read, s.candidates)
    if chosen is None:
        tried = "，".join(f"{n}: {r}" for n, r in failed.items())
        return Found(
            "snmp", address, NONE, f"有应答（{said}），但没有 profile 能读它（{tried}）：需要为该型号写 profile"
        )
    d = dict(s.candidates)[chosen]
    claimed = [n for n, disc in s.candidates if any(ident.sys_object_id.startswith(p) for p in disc.sys_object_id)]
    how = "sysObjectID 相符" if chosen in claimed else "sysObjectID 未知，按 OID 应答识别"
    notes = [d.note] if d.note else []
    notes += [f"sysObjectID 属于 {n}，但它的 OID 无应答（{failed.get(n, '')}）" for n in claimed if n != chosen]
    if len(read) > 1:
        notes.append("也能读：" + "，".join(f"{n}（{read[n]} 项）" for n in read if n != chosen))
    device = {**base, "kind": d.kind, "profile": chosen}
    return Found(
        "snmp", address, OK, f"{how}，{read[chosen]} 项读数（{said}）", d.kind, chosen, "", device, tuple(notes)
    )


async def probe(
    hosts: list[str], ranged: bool, s: Settings, deadline: float, tick: Callable[[], None] = lambda: None
) -> list[Found]:
    """Every host, at most ``s.concurrency`` at a time; what has not finished by ``deadline`` (monotonic) is
    reported as not finished."""
    s.candidates = s.candidates or offered("snmp")
    limit = RateLimit(s.rate)
    gate = asyncio.Semaphore(s.concurrency)

    async def one(host: str) -> Found | None:
        async with gate:
            try:
                return await probe_host(host, s, limit, listed=not ranged)
            finally:
                tick()

    tasks = {asyncio.ensure_future(one(h)): h for h in hosts}
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    rows: list[Found] = []
    for task, host in tasks.items():
        if task in pending:
            rows.append(Found("snmp", host, ERROR, "未完成：超出总时限（--time-limit）"))
        elif (row := task.result()) is not None:
            rows.append(row)
    silent = len(hosts) - len(rows)
    if ranged and silent:
        rows.append(Found("snmp", f"{silent} 个地址", NONE, "SNMP 无应答（未列出）"))
    return rows


__all__ = ["Credential", "RateLimit", "Settings", "choose", "parse_v3", "probe", "targets"]
