"""SNMP (v2c and v3): UPS cards, switches, NVRs and cameras, each model described by a profile.

A profile (``collectors/profiles/snmp/<name>.toml``) names the OIDs to read and gives each canonical
metric as a small arithmetic expression over them, e.g. ``ups_runtime_seconds = "minutes * 60"`` or
``power_on_battery = "source == 5"``. The collector GETs the scalars and bulk-walks the tables (only
their columns, never the whole MIB) through one pysnmp engine per event loop, turns the answer into
plain Python values, and ``parse_snmp`` (pure) evaluates the profile over them.
"""

from __future__ import annotations

import ast
import asyncio
import re
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from examwatch.collectors import profiles
from examwatch.collectors.base import DeviceError, PollingCollector, register
from examwatch.kernel.catalog import METRICS
from examwatch.kernel.model import Reading

# --- profiles -----------------------------------------------------------------------------------------


class Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A conceptual table: column name -> column OID (without index); one part per row."""

    columns: dict[str, str]
    metrics: dict[str, str]
    part: str = "{index}"  # part name per row; {index} is the row index, {index[0]} its first sub-id
    where: str = ""  # rows for which this is false are skipped (e.g. only fixed disks)


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: str = ""
    scalars: dict[str, str] = {}  # name -> full OID (with .0 or the row index)
    metrics: dict[str, str] = {}  # metric -> expression over scalar names
    tables: dict[str, Table] = {}


class Expression:
    """A whitelisted Python expression: numbers, strings, names, arithmetic, comparisons, and/or/not,
    ``x if c else y``, tuples for ``in``, and the functions ``num``, ``min``, ``max``, ``abs``."""

    FUNCTIONS: dict[str, Callable[..., Any]] = {}
    _ALLOWED = (
        ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.Name,
        ast.Load, ast.Constant, ast.Tuple, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod,
        ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
        ast.In, ast.NotIn,
    )  # fmt: skip

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as err:
            raise ValueError(f"not an expression: {text!r} ({err.msg})") from None
        names = set()
        for node in ast.walk(tree):
            if not isinstance(node, self._ALLOWED):
                raise ValueError(f"{type(node).__name__} not allowed in {text!r}")
            if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in self.FUNCTIONS):
                raise ValueError(f"only {', '.join(self.FUNCTIONS)} may be called in {text!r}")
            if isinstance(node, ast.Name):
                names.add(node.id)
        self.names = names - self.FUNCTIONS.keys()
        self._code = compile(tree, f"<{text}>", "eval")

    def __call__(self, values: dict[str, Any]) -> Any:
        return eval(self._code, {"__builtins__": {}, **self.FUNCTIONS}, values)  # noqa: S307 - AST whitelisted


def _num(value: Any) -> float:
    """The first number in a value: device strings like ``"52 PERCENT"`` or ``"0.0 GB"``."""
    if isinstance(value, (int, float)):
        return value
    m = re.search(r"-?\d+(?:\.\d+)?", str(value))
    if m is None:
        raise ValueError(f"no number in {value!r}")
    return float(m.group())


Expression.FUNCTIONS = {"num": _num, "min": min, "max": max, "abs": abs}


@dataclass(frozen=True)
class CompiledTable:
    name: str
    columns: dict[str, tuple[int, ...]]
    metrics: dict[str, Expression]
    part: str
    where: Expression | None


@dataclass(frozen=True)
class CompiledProfile:
    """A validated profile, ready to poll: which OIDs to ask and how to turn them into readings."""

    name: str
    scalars: dict[str, tuple[int, ...]]
    metrics: dict[str, Expression]
    tables: list[CompiledTable]


def _oid(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\.?\d+(\.\d+)+", text):
        raise ValueError(f"not a numeric OID: {text!r}")
    return tuple(int(p) for p in text.strip(".").split("."))


def compile_profile(name: str, profile: Profile) -> CompiledProfile:
    """Check a profile completely (OIDs, metric names, expressions, names they use); raise
    ``ProfileError`` listing every problem, so a technician's typo is caught at load, not at 08:30."""
    problems: list[str] = []

    def expressions(where: str, metrics: dict[str, str], known: Iterable[str]) -> dict[str, Expression]:
        out = {}
        for metric, text in metrics.items():
            if metric not in METRICS:
                problems.append(f"{where}: {metric!r} is not a catalog metric")
                continue
            try:
                expr = out[metric] = Expression(text)
            except ValueError as err:
                problems.append(f"{where}.{metric}: {err}")
                continue
            if unknown := expr.names - set(known):
                problems.append(f"{where}.{metric}: unknown name(s) {', '.join(sorted(unknown))}")
        return out

    def oids(where: str, table: dict[str, str]) -> dict[str, tuple[int, ...]]:
        out = {}
        for key, text in table.items():
            try:
                out[key] = _oid(text)
            except ValueError as err:
                problems.append(f"{where}.{key}: {err}")
        return out

    scalars = oids("scalars", profile.scalars)
    metrics = expressions("metrics", profile.metrics, profile.scalars)
    tables = []
    for tname, t in profile.tables.items():
        where = None
        if t.where:
            try:
                where = Expression(t.where)
                if unknown := where.names - t.columns.keys():
                    problems.append(f"tables.{tname}.where: unknown name(s) {', '.join(sorted(unknown))}")
            except ValueError as err:
                problems.append(f"tables.{tname}.where: {err}")
        tables.append(
            CompiledTable(
                tname,
                oids(f"tables.{tname}.columns", t.columns),
                expressions(f"tables.{tname}.metrics", t.metrics, t.columns),
                t.part,
                where,
            )
        )
    if not metrics and not any(t.metrics for t in tables):
        problems.append("maps no metric at all")
    if problems:
        raise profiles.ProfileError(f"profile snmp/{name}: " + "; ".join(problems))
    return CompiledProfile(name, scalars, metrics, tables)


_compiled: dict[str, CompiledProfile] = {}


def profile_named(name: str) -> CompiledProfile:
    if name not in _compiled:
        _compiled[name] = compile_profile(name, profiles.load("snmp", name, Profile))
    return _compiled[name]


# --- parsing (pure) -----------------------------------------------------------------------------------


class _Index(tuple[int, ...]):
    """A row index: ``{index}`` formats as ``1.0``, ``{index[0]}`` as ``1``."""

    def __str__(self) -> str:
        return ".".join(map(str, self))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


@dataclass
class Parsed:
    readings: list[Reading]
    missing: list[str]  # metrics the device did not answer (noSuchObject) or answered with an unusable value
    answered: int  # values the device did answer


def _evaluate(expr: Expression, values: dict[str, Any]) -> float | None:
    try:
        v = expr(values)
    except (NameError, ZeroDivisionError, TypeError, ValueError):
        return None
    if isinstance(v, bool | int | float):
        return float(v)
    return None


def parse_snmp(
    profile: CompiledProfile,
    device: str,
    values: dict[tuple[int, ...], Any],
    ts: float,
    parts: Iterable[str] = (),
) -> Parsed:
    """Map OID -> value (ints, floats, str; None for noSuchObject/noSuchInstance) onto Readings.

    Scalars become readings of ``device``; each table row becomes readings of ``device/<part>``. A metric
    whose inputs are missing or unusable is left out and listed in ``missing``. ``parts``, when given,
    keeps only those parts (the switch ports that are cabled).
    """
    readings: list[Reading] = []
    missing: list[str] = []
    answered = 0
    scalar_values = {}
    for name, oid in profile.scalars.items():
        v = values.get(oid)
        if v is not None:
            scalar_values[name] = v
            answered += 1
    for metric, expr in profile.metrics.items():
        value = _evaluate(expr, scalar_values)
        if value is None:
            missing.append(metric)
        else:
            readings.append(Reading(device, metric, value, ts))
    wanted = set(parts)
    for table in profile.tables:
        for index, row in _rows(table, values).items():
            answered += len(row)
            if table.where is not None and not _evaluate(table.where, row):
                continue
            part = table.part.format(index=index)
            if wanted and part not in wanted:
                continue
            for metric, expr in table.metrics.items():
                value = _evaluate(expr, row)
                if value is None:
                    missing.append(f"{part}/{metric}")
                else:
                    readings.append(Reading(f"{device}/{part}", metric, value, ts))
    return Parsed(readings, missing, answered)


def _rows(table: CompiledTable, values: dict[tuple[int, ...], Any]) -> dict[_Index, dict[str, Any]]:
    rows: dict[_Index, dict[str, Any]] = {}
    for name, base in table.columns.items():
        n = len(base)
        for oid, v in values.items():
            if v is not None and len(oid) > n and oid[:n] == base:
                rows.setdefault(_Index(oid[n:]), {})[name] = v
    return dict(sorted(rows.items()))


# --- I/O -----------------------------------------------------------------------------------------------


class SnmpOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[[devices]]`` keys of an SNMP device. v3 protocols are named explicitly: pysnmp's own default
    is MD5/DES, which no one should configure by accident."""

    version: Literal["2c", "3"] = "2c"
    community: str = "public"  # v2c; a secret: never logged
    user: str = ""  # v3 user name
    auth_protocol: Literal["SHA", "SHA224", "SHA256", "SHA384", "SHA512", "MD5"] = "SHA"
    auth_key: str = ""  # v3; empty: noAuthNoPriv
    priv_protocol: Literal["AES", "AES192", "AES256", "DES", "3DES"] = "AES"
    priv_key: str = ""  # v3; empty: authNoPriv
    context: str = ""  # v3 context name
    parts: list[str] = []  # parts to watch, e.g. ["port1", "port5"]; empty: every row of the tables
    max_repetitions: int = 25  # rows per GETBULK

    def __repr__(self) -> str:  # a logged Device must not carry the community or the keys
        return f"SnmpOptions(version={self.version!r}, user={self.user!r}, context={self.context!r}, parts={self.parts!r})"


_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


def _engine() -> Any:
    """One SnmpEngine per event loop: creating one costs ~300 ms, and its caches are per engine."""
    from pysnmp.hlapi.v3arch.asyncio import SnmpEngine

    loop = asyncio.get_running_loop()
    engine = _engines.get(loop)
    if engine is None:
        engine = _engines[loop] = SnmpEngine()
    return engine


def _address(address: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[(.+)\](?::(\d+))?|([^:]+)(?::(\d+))?", address)
    if not address or m is None:
        raise DeviceError("config", f"address {address!r}: expected host or host:port")
    host = m.group(1) or m.group(3)
    port = m.group(2) or m.group(4)
    return host, int(port) if port else 161


def _auth(options: SnmpOptions) -> Any:
    from pysnmp.hlapi.v3arch.asyncio import CommunityData, UsmUserData
    from pysnmp.hlapi.v3arch.asyncio import auth as a

    if options.version == "2c":
        return CommunityData(options.community, mpModel=1)
    auth = {
        "MD5": a.usmHMACMD5AuthProtocol,
        "SHA": a.usmHMACSHAAuthProtocol,
        "SHA224": a.usmHMAC128SHA224AuthProtocol,
        "SHA256": a.usmHMAC192SHA256AuthProtocol,
        "SHA384": a.usmHMAC256SHA384AuthProtocol,
        "SHA512": a.usmHMAC384SHA512AuthProtocol,
    }[options.auth_protocol]
    priv = {
        "DES": a.usmDESPrivProtocol,
        "3DES": a.usm3DESEDEPrivProtocol,
        "AES": a.usmAesCfb128Protocol,
        "AES192": a.usmAesCfb192Protocol,
        "AES256": a.usmAesCfb256Protocol,
    }[options.priv_protocol]
    if not options.auth_key:
        return UsmUserData(options.user)
    if not options.priv_key:
        return UsmUserData(options.user, options.auth_key, authProtocol=auth)
    return UsmUserData(options.user, options.auth_key, options.priv_key, authProtocol=auth, privProtocol=priv)


def _plain(value: Any) -> Any:
    """A pysnmp value as a plain Python value; None for noSuchObject/noSuchInstance/endOfMibView."""
    from pyasn1.type import univ
    from pysnmp.proto import rfc1902, rfc1905

    if isinstance(value, (rfc1905.NoSuchObject, rfc1905.NoSuchInstance, rfc1905.EndOfMibView, univ.Null)):
        return None
    if isinstance(value, univ.Integer):  # Integer32, Counter32/64, Gauge32, TimeTicks, Unsigned32
        return int(value)
    if isinstance(value, rfc1902.IpAddress):
        return value.prettyPrint()
    if isinstance(value, univ.OctetString):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, univ.ObjectIdentifier):
        return str(value)
    return value.prettyPrint()


@dataclass
class _Session:
    auth: Any
    target: Any
    context: Any


@register
class SnmpCollector(PollingCollector):
    protocol = "snmp"
    Options = SnmpOptions
    needs_address = "an SNMP device needs address = \"host[:port]\""
    profile_schema = Profile

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions: dict[str, _Session] = {}

    @classmethod
    def load_profile(cls, name: str) -> CompiledProfile:
        return profile_named(name)

    async def _session(self, device: Any) -> _Session:
        s = self._sessions.get(device.name)
        if s is None:
            from pysnmp.hlapi.v3arch.asyncio import ContextData, UdpTransportTarget

            options: SnmpOptions = device.options or SnmpOptions()
            try:
                target = await UdpTransportTarget.create(
                    _address(device.address), timeout=device.timeout, retries=device.retries
                )
            except DeviceError:
                raise
            except Exception as err:  # unresolvable host name
                raise DeviceError("config", f"address {device.address!r}: {err}") from None
            ctx = ContextData(contextName=options.context) if options.context else ContextData()
            s = self._sessions[device.name] = _Session(_auth(options), target, ctx)
        return s

    async def poll(self, device: Any) -> list[Reading]:
        profile: CompiledProfile = self.profile(device)
        options: SnmpOptions = device.options or SnmpOptions()
        session = await self._session(device)
        values: dict[tuple[int, ...], Any] = {}
        if profile.scalars:
            await self._get(session, list(dict.fromkeys(profile.scalars.values())), values)
        for table in profile.tables:
            await self._walk(session, list(table.columns.values()), options.max_repetitions, values)
        parsed = parse_snmp(profile, device.name, values, time.time(), options.parts)
        if parsed.answered == 0:
            raise DeviceError("no_such_object", f"none of the OIDs of profile {profile.name!r} exist on the device")
        for metric in parsed.missing:
            self.health.drop(device.name, "no_such_object", metric=metric)
        return parsed.readings

    async def _get(self, s: _Session, oids: list[tuple[int, ...]], out: dict[tuple[int, ...], Any]) -> None:
        from pysnmp.hlapi.v3arch.asyncio import ObjectIdentity, ObjectType, get_cmd

        for i in range(0, len(oids), 30):  # stay far below any agent's PDU size limit
            chunk = oids[i : i + 30]
            err, status, index, var_binds = await get_cmd(
                _engine(), s.auth, s.target, s.context, *(ObjectType(ObjectIdentity(o)) for o in chunk),
                lookupMib=False,
            )  # fmt: skip
            _check(err, status, index)
            for name, value in var_binds:
                out[tuple(name)] = _plain(value)

    async def _walk(
        self, s: _Session, columns: list[tuple[int, ...]], repetitions: int, out: dict[tuple[int, ...], Any]
    ) -> None:
        """Walk several columns of one table together: each GETBULK carries every unfinished column."""
        from pysnmp.hlapi.v3arch.asyncio import ObjectIdentity, ObjectType, bulk_cmd

        cursor = {c: c for c in columns}
        while cursor:
            active = list(cursor)
            err, status, index, var_binds = await bulk_cmd(
                _engine(), s.auth, s.target, s.context, 0, repetitions,
                *(ObjectType(ObjectIdentity(cursor[c])) for c in active),
                lookupMib=False,
            )  # fmt: skip
            _check(err, status, index)
            if not var_binds:
                return
            for i, (name, value) in enumerate(var_binds):
                column = active[i % len(active)]
                if column not in cursor:
                    continue
                oid, plain = tuple(name), _plain(value)
                # Leaving the column, end of MIB, or a non-increasing OID (a buggy agent) ends the column.
                if plain is None or oid[: len(column)] != column or oid <= cursor[column]:
                    del cursor[column]
                    continue
                out[oid] = plain
                cursor[column] = oid


def _check(err: Any, status: Any, index: Any) -> None:
    if err:
        reason = "timeout" if "timed out" in str(err).lower() or "timeout" in str(err).lower() else "snmp_error"
        raise DeviceError(reason, str(err))
    if status:
        raise DeviceError("snmp_error", f"{status.prettyPrint()} at varbind {index}")


__all__ = ["Profile", "SnmpCollector", "SnmpOptions", "compile_profile", "parse_snmp", "profile_named"]
