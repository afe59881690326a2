"""SNMP (v2c and v3): UPS cards, switches, NVRs and cameras, each model described by a profile.

A profile (``collectors/profiles/snmp/<name>.toml``, compiled by ``_snmp_profile.py``) names the OIDs to
read and gives each canonical metric as a small expression over them. The collector GETs the scalars and
bulk-walks the tables (only their columns, never the whole MIB), turns the answer into plain Python values,
and ``parse_snmp`` (pure) evaluates the profile over them. v2c goes through ``_snmp_v2c`` (one UDP socket
per device, BER by python-asn1); v3 through one pysnmp engine per event loop, which owns USM (auth, privacy),
and only then is pysnmp imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from examwatch.collectors._snmp_profile import (
    CompiledProfile,
    Expression,
    Profile,
    compile_profile,
    parse_snmp,
    profile_named,
)
from examwatch.collectors._snmp_v2c import V2cSession
from examwatch.collectors.base import DeviceError, PollingCollector, register
from examwatch.kernel.config import Strict
from examwatch.kernel.model import Reading

# pysnmp imports its optional MIB compiler (pysmi, and with it requests and jinja2: about 11 MiB of RSS and
# 0.2 s) whenever pysmi is installed, as it is with the simulators' extra. Profiles name numeric OIDs and
# nothing asks pysnmp to resolve a MIB name, so it is kept out of the process (pysnmp then runs without it).
if "pysmi" not in sys.modules:
    sys.modules["pysmi"] = None  # type: ignore[assignment]

# --- I/O -----------------------------------------------------------------------------------------------


class SnmpOptions(Strict, kw_only=True):
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
    max_repetitions: Annotated[int, msgspec.Meta(ge=1, le=100)] = 25  # rows per GETBULK

    def __repr__(self) -> str:  # a logged Device must not carry the community or the keys
        return (
            f"SnmpOptions(version={self.version!r}, user={self.user!r}, context={self.context!r}, parts={self.parts!r})"
        )


_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


def _engine() -> Any:
    """One SnmpEngine per event loop: creating one costs ~300 ms, and its caches are per engine."""
    from pysnmp.hlapi.v3arch.asyncio import SnmpEngine

    loop = asyncio.get_running_loop()
    engine = _engines.get(loop)
    if engine is None:
        engine = _engines[loop] = SnmpEngine()
    return engine


_ticks: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _tick_for(engine: Any, timeout: float) -> None:
    """Slow pysnmp's timer to a quarter of the shortest request timeout its devices have (0.1 to 1 s).

    pysnmp wakes every 0.1 s by default to expire requests, which alone cost an agent with one SNMP device
    about 4 ms of CPU per second; a request now times out between 1 and 1.25 times its timeout."""
    tick = min(1.0, max(0.1, timeout / 4))
    if tick < _ticks.get(engine, float("inf")):
        engine.transport_dispatcher.set_timer_resolution(tick)
        _ticks[engine] = tick


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
        return CommunityData(options.community, mpModel=1)  # noqa: S508 - what the site's switches and UPS cards speak
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
        return UsmUserData(options.user)  # noqa: S509 - the device's configured security level, chosen by the site
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
    """SNMPv3 through pysnmp: the engine the device was configured in and pysnmp's target name.

    The requests go to pysnmp's command generators directly, with the OIDs as plain tuples: its high-level
    API resolves every OID of every request through a MIB view (a third of the poll's CPU) even when
    asked not to look up the answer."""

    engine: Any
    target: str  # pysnmp's local configuration name for (auth, transport)
    context: Any

    async def get(self, oids: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], Any]]:
        from pysnmp.entity.rfc3413.cmdgen import GetCommandGenerator

        return await _request(self, GetCommandGenerator(), [(o, None) for o in oids])

    async def bulk(self, repetitions: int, oids: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], Any]]:
        from pysnmp.entity.rfc3413.cmdgen import BulkCommandGenerator

        return await _request(self, BulkCommandGenerator(), 0, repetitions, [(o, None) for o in oids])

    def close(self) -> None:
        """pysnmp's transports belong to its engine, shared by the loop's devices."""


async def _request(s: _Session, generator: Any, *args: Any) -> list[tuple[tuple[int, ...], Any]]:
    """Send one PDU; its var-binds as (OID, plain value), or ``DeviceError``."""
    future: asyncio.Future[tuple[Any, Any, Any, Any]] = asyncio.get_running_loop().create_future()

    def done(engine: Any, handle: Any, err: Any, status: Any, index: Any, var_binds: Any, ctx: Any) -> None:
        if not future.done():
            future.set_result((err, status, index, var_binds))

    generator.send_varbinds(s.engine, s.target, s.context.contextEngineId, s.context.contextName, *args, done, None)
    err, status, index, var_binds = await future
    _check(err, status, index)
    return [(tuple(name), _plain(value)) for name, value in var_binds]


Session = V2cSession | _Session  # what a poll asks: get(oids), bulk(repetitions, oids), close()


@register
class SnmpCollector(PollingCollector):
    protocol = "snmp"
    Options = SnmpOptions
    needs_address = 'an SNMP device needs address = "host[:port]"'
    profile_schema = Profile
    reasons = {
        "no_such_object": "设备不支持所配置的型号（profile）",
        "snmp_error": "SNMP 出错",
    }
    sample = """
[[devices]]                     # example: a UPS with an SNMP card (RFC 1628 UPS-MIB), SNMP v2c
name = "ups1"
kind = "ups"
protocol = "snmp"
address = "192.168.10.20"       # host or host:port (161)
profile = "ups-mib"             # see docs/profiles.md: eaton-xups, if-mib, hikvision-nvr, ...
interval = 10.0
community = "examwatch-ro"      # a secret: never logged

[[devices]]                     # example: the room's switch, SNMPv3 (SHA/AES), only the cabled ports
name = "switch1"
kind = "switch"
protocol = "snmp"
address = "192.168.10.2"
profile = "if-mib"
version = "3"
user = "examwatch"
auth_protocol = "SHA"
auth_key = "change-me-auth"
priv_protocol = "AES"
priv_key = "change-me-priv"
parts = ["port1", "port24"]     # empty: every admin-up port
"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions: dict[str, Session] = {}
        # Importing pysnmp and building its engine blocks the event loop for a second or more (seconds on a
        # busy Pi): pay it here, before any device's poll timeout runs, or every device in the room times out.
        # Only SNMPv3 needs it: v2c goes through _snmp_v2c.
        if any(_options(d).version == "3" for d in self.devices):
            with contextlib.suppress(RuntimeError):  # built outside a running loop: the first poll builds it
                _engine()

    @classmethod
    def load_profile(cls, name: str) -> CompiledProfile:
        return profile_named(name)

    async def _session(self, device: Any) -> Session:
        s = self._sessions.get(device.name)
        options = _options(device)
        if options.version == "2c":
            if not isinstance(s, V2cSession) or s.loop is not asyncio.get_running_loop():  # its socket's loop
                address = _address(device.address)

                def garbage(detail: str) -> None:
                    self.health.drop(device.name, "garbage", detail=detail[:200])

                s = await V2cSession.open(address, options.community, device.timeout, device.retries, garbage)
                self._sessions[device.name] = s
            return s
        engine = _engine()
        if not isinstance(s, _Session) or s.engine is not engine:
            from pysnmp.hlapi.v3arch.asyncio import ContextData, UdpTransportTarget
            from pysnmp.hlapi.v3arch.asyncio.lcd import CommandGeneratorLcdConfigurator

            try:
                target = await UdpTransportTarget.create(
                    _address(device.address), timeout=device.timeout, retries=device.retries
                )
            except DeviceError:
                raise
            except Exception as err:  # unresolvable host name
                raise DeviceError("config", f"address {device.address!r}: {err}") from None
            ctx = ContextData(contextName=options.context) if options.context else ContextData()
            name, _ = CommandGeneratorLcdConfigurator().configure(engine, _auth(options), target, ctx.contextName)
            v3 = [d.timeout for d in self.devices if _options(d).version == "3"]
            _tick_for(engine, min(v3))  # set once: pending requests count ticks
            s = self._sessions[device.name] = _Session(engine, name, ctx)
        return s

    async def poll(self, device: Any) -> list[Reading]:
        profile: CompiledProfile = self.profile(device)
        options = _options(device)
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

    async def close(self) -> None:
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()

    async def _get(self, s: Session, oids: list[tuple[int, ...]], out: dict[tuple[int, ...], Any]) -> None:
        for i in range(0, len(oids), 30):  # stay far below any agent's PDU size limit
            for oid, value in await s.get(oids[i : i + 30]):
                out[oid] = value

    async def _walk(
        self, s: Session, columns: list[tuple[int, ...]], repetitions: int, out: dict[tuple[int, ...], Any]
    ) -> None:
        """Walk several columns of one table together: each GETBULK carries every unfinished column."""
        cursor = {c: c for c in columns}
        while cursor:
            active = list(cursor)
            var_binds = await s.bulk(repetitions, [cursor[c] for c in active])
            if not var_binds:
                return
            for i, (oid, plain) in enumerate(var_binds):
                column = active[i % len(active)]
                if column not in cursor:
                    continue
                # Leaving the column, end of MIB, or a non-increasing OID (a buggy agent) ends the column.
                if plain is None or oid[: len(column)] != column or oid <= cursor[column]:
                    del cursor[column]
                    continue
                out[oid] = plain
                cursor[column] = oid


def _options(device: Any) -> SnmpOptions:
    return device.options or SnmpOptions()


def _check(err: Any, status: Any, index: Any) -> None:
    if err:
        reason = "timeout" if "timed out" in str(err).lower() or "timeout" in str(err).lower() else "snmp_error"
        raise DeviceError(reason, str(err))
    if status:
        raise DeviceError("snmp_error", f"{status.prettyPrint()} at varbind {index}")


__all__ = ["Expression", "Profile", "SnmpCollector", "SnmpOptions", "compile_profile", "parse_snmp", "profile_named"]
