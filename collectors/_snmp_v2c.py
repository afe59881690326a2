"""SNMPv2c GET and GETBULK on one UDP socket per device, BER through the ``asn1`` library (issue 13).

Why not pysnmp for v2c: a steady poll of ten OIDs cost ~5 ms of CPU in pysnmp (pyasn1's object model
for every message, its dispatcher and its MIB-aware caches), its import ~15 MiB of a Pi Zero's memory,
and its timer woke the agent 4 to 10 times a second. A v2c request is a community string and a PDU:
this module builds and reads only those, with python-asn1 doing the BER, and leaves everything that is
more than that to pysnmp, still used for SNMPv3 (USM authentication and privacy are not hand-written).

What a device sends back is hostile: a datagram is bounded, decoded without recursion, checked for
version, community, PDU type, request id and varbind count, and anything else is ``Garbage`` (counted by
the caller, the request keeps waiting: a stray or forged datagram cannot end it). A request that gets no
valid answer within its timeout is sent again ``retries`` times, then fails as ``timeout``, as with pysnmp.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Any

import asn1

from examwatch.collectors.base import DeviceError

MAX_DATAGRAM = 65_507  # the largest UDP payload: anything longer is not one answer
_GET, _RESPONSE, _GETBULK = 0, 2, 5  # PDU tags (context class, constructed), RFC 3416
# RFC 3416 error-status names, as pysnmp prints them (the log line's detail)
ERROR_STATUS = (
    "noError", "tooBig", "noSuchName", "badValue", "readOnly", "genErr", "noAccess", "wrongType", "wrongLength",
    "wrongEncoding", "wrongValue", "noCreation", "inconsistentValue", "resourceUnavailable", "commitFailed",
    "undoFailed", "authorizationError", "notWritable", "inconsistentName",
)  # fmt: skip
_UNSIGNED = {1, 2, 3, 6, 7}  # application tags: Counter32, Gauge32, TimeTicks, Counter64, Unsigned32 (RFC 2578)

Oid = tuple[int, ...]
VarBinds = list[tuple[Oid, Any]]
VarBind = tuple[str, int, int, Any]  # what encode_message writes: (OID text, class, tag number, value)


class Garbage(ValueError):
    """A datagram that is not a well-formed SNMPv2c answer to us."""


def encode_message(community: bytes, pdu: int, request_id: int, a: int, b: int, var_binds: Sequence[VarBind]) -> bytes:
    """A v2c message: PDU ``pdu`` with (request id, ``a``, ``b``) and var-binds of (OID, class, tag, value).
    A request's ``a``, ``b``: 0, 0 for GET; non-repeaters, max-repetitions for GETBULK."""
    e = asn1.Encoder()
    e.start()
    e.enter(asn1.Numbers.Sequence)
    e.write(1, asn1.Numbers.Integer)  # version-2c
    e.write(community, asn1.Numbers.OctetString)
    e.enter(pdu, asn1.Classes.Context)
    for n in (request_id, a, b):
        e.write(n, asn1.Numbers.Integer)
    e.enter(asn1.Numbers.Sequence)
    for oid, cls, tag, value in var_binds:
        e.enter(asn1.Numbers.Sequence)
        e.write(oid, asn1.Numbers.ObjectIdentifier)
        e.write(value, tag, asn1.Types.Primitive, cls)
        e.leave()
    for _ in range(3):
        e.leave()
    return bytes(e.output())


def encode_request(community: bytes, request_id: int, pdu: int, a: int, b: int, oids: list[Oid]) -> bytes:
    nulls = [(".".join(map(str, o)), asn1.Classes.Universal, asn1.Numbers.Null, None) for o in oids]
    return encode_message(community, pdu, request_id, a, b, nulls)


def _primitive(d: asn1.Decoder, what: str) -> tuple[asn1.Tag, Any]:
    tag = d.peek()
    if tag is None or tag.typ != asn1.Types.Primitive:
        raise Garbage(f"{what}: expected a primitive value, got {tag}")
    _, value = d.read()
    return tag, value


def _enter(d: asn1.Decoder, what: str, cls: int = asn1.Classes.Universal, nr: int = asn1.Numbers.Sequence) -> None:
    tag = d.peek()
    if tag is None or tag.typ != asn1.Types.Constructed or tag.cls != cls or tag.nr != nr:
        raise Garbage(f"{what}: expected a constructed {cls!r} {nr}, got {tag}")
    d.enter()


def _integer(d: asn1.Decoder, what: str) -> int:
    tag, value = _primitive(d, what)
    if tag.cls != asn1.Classes.Universal or tag.nr != asn1.Numbers.Integer:
        raise Garbage(f"{what}: not an INTEGER")
    return int(value)


def _value(tag: asn1.Tag, raw: Any) -> Any:
    """A varbind's value as the collector takes it (what ``snmp._plain`` makes of pysnmp's types)."""
    if tag.cls == asn1.Classes.Universal:
        if tag.nr == asn1.Numbers.Integer:
            return int(raw)
        if tag.nr == asn1.Numbers.OctetString:
            return bytes(raw).decode("utf-8", errors="replace")
        if tag.nr == asn1.Numbers.Null:
            return None
        if tag.nr == asn1.Numbers.ObjectIdentifier:
            return str(raw)
    elif tag.cls == asn1.Classes.Application:
        if tag.nr in _UNSIGNED:
            if not raw or len(raw) > 9:
                raise Garbage(f"application {tag.nr}: {len(raw)} bytes")
            return int.from_bytes(raw, "big")  # unsigned: a counter whose agent left out the leading 0x00 too
        if tag.nr == 0 and len(raw) == 4:  # IpAddress
            return ".".join(map(str, raw))
        if tag.nr == 4:  # Opaque
            return bytes(raw).decode("utf-8", errors="replace")
    elif tag.cls == asn1.Classes.Context and tag.nr in (0, 1, 2) and not raw:
        return None  # noSuchObject, noSuchInstance, endOfMibView
    raise Garbage(f"unknown value type {tag}")


def decode_response(data: bytes, community: bytes) -> tuple[int, int, int, VarBinds]:
    """A v2c Response -> (request id, error status, error index, [(oid, value)]); ``Garbage`` otherwise."""
    if len(data) > MAX_DATAGRAM:
        raise Garbage(f"{len(data)} bytes")
    d = asn1.Decoder()
    try:
        d.start(data)
        _enter(d, "message")
        if _integer(d, "version") != 1:
            raise Garbage("not SNMPv2c")
        tag, got = _primitive(d, "community")
        if tag.cls != asn1.Classes.Universal or tag.nr != asn1.Numbers.OctetString or got != community:
            raise Garbage("another community")
        _enter(d, "pdu", asn1.Classes.Context, _RESPONSE)
        request_id, status, index = _integer(d, "request-id"), _integer(d, "error-status"), _integer(d, "error-index")
        _enter(d, "varbinds")
        var_binds: VarBinds = []
        while d.peek() is not None:
            _enter(d, "varbind")
            tag, oid = _primitive(d, "name")
            if tag.cls != asn1.Classes.Universal or tag.nr != asn1.Numbers.ObjectIdentifier:
                raise Garbage("varbind name is not an OID")
            var_binds.append((tuple(map(int, oid.split("."))), _value(*_primitive(d, "value"))))
            d.leave()
    except asn1.Error as err:
        raise Garbage(str(err)) from None
    # the library's own checks on bad input, and a length of 2**64 bytes (OverflowError) found by bench/fuzz.py
    except (ValueError, TypeError, IndexError, AssertionError, ArithmeticError) as err:
        if isinstance(err, Garbage):
            raise
        raise Garbage(f"{type(err).__name__}: {err}") from None
    return request_id, status, index, var_binds


# Request ids that BER encodes in exactly four bytes, so that a GET encoded once takes any of them in place.
_FIRST_ID, _LAST_ID = 1 << 24, (1 << 31) - 1


class _Template:
    """A request whose bytes differ between polls only in the request id: encoded once, the id written in
    place (where two encodings with different ids differ) for each request."""

    def __init__(self, community: bytes, pdu: int, a: int, b: int, oids: list[Oid]) -> None:
        self.bytes = encode_request(community, _FIRST_ID, pdu, a, b, oids)
        other = encode_request(community, _LAST_ID, pdu, a, b, oids)
        self.at = next(i for i, (x, y) in enumerate(zip(self.bytes, other, strict=True)) if x != y)

    def message(self, request_id: int) -> bytes:
        return b"".join((self.bytes[: self.at], request_id.to_bytes(4, "big"), self.bytes[self.at + 4 :]))


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, session: V2cSession) -> None:
        self.session = session

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.session.received(data)

    def error_received(self, exc: Exception) -> None:
        """An ICMP port unreachable: pysnmp's unconnected socket never saw these, the request times out."""


class V2cSession:
    """One device: a UDP socket connected to it (the kernel drops datagrams from anyone else), one
    request at a time. ``garbage(detail)`` is told of every datagram refused."""

    def __init__(self, community: str, timeout: float, retries: int, garbage: Callable[[str], None]) -> None:
        self.community = community.encode()
        self.timeout, self.retries = timeout, retries
        self.garbage = garbage
        self.transport: asyncio.DatagramTransport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, asyncio.Future[tuple[int, int, VarBinds]]] = {}
        self._next_id = random.randrange(_FIRST_ID, _LAST_ID)
        self._gets: dict[tuple[Oid, ...], _Template] = {}  # the device's GET requests, encoded once
        self._expected = 0  # varbinds the pending request may get back

    @classmethod
    async def open(
        cls, address: tuple[str, int], community: str, timeout: float, retries: int, garbage: Callable[[str], None]
    ) -> V2cSession:
        self = cls(community, timeout, retries, garbage)
        loop = self.loop = asyncio.get_running_loop()
        try:
            self.transport, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self), remote_addr=address)
        except OSError as err:  # unresolvable host name, no route
            raise DeviceError("config", f"address {address[0]}:{address[1]}: {err}") from None
        return self

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def received(self, data: bytes) -> None:
        try:
            request_id, status, index, var_binds = decode_response(data, self.community)
        except Garbage as err:
            self.garbage(str(err))
            return
        future = self._waiting.get(request_id)
        if future is None or future.done():
            return  # a late answer to a request given up, or a duplicate
        if len(var_binds) > self._expected:
            self.garbage(f"{len(var_binds)} varbinds for at most {self._expected}")
            return
        future.set_result((status, index, var_binds))

    async def get(self, oids: list[Oid]) -> VarBinds:
        key = tuple(oids)
        template = self._gets.get(key)
        if template is None:
            if len(self._gets) >= 16:  # a profile has a few chunks of scalars; never grow without bound
                self._gets.clear()
            template = self._gets[key] = _Template(self.community, _GET, 0, 0, oids)
        return await self._request(template.message, len(oids))

    async def bulk(self, repetitions: int, oids: list[Oid]) -> VarBinds:
        return await self._request(
            lambda rid: encode_request(self.community, rid, _GETBULK, 0, repetitions, oids), repetitions * len(oids)
        )

    async def _request(self, encode: Callable[[int], bytes], expected: int) -> VarBinds:
        assert self.transport is not None
        request_id = self._next_id
        self._next_id = _FIRST_ID + (self._next_id + 1 - _FIRST_ID) % (_LAST_ID - _FIRST_ID)
        message = encode(request_id)
        future: asyncio.Future[tuple[int, int, VarBinds]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id], self._expected = future, expected
        try:
            for _ in range(self.retries + 1):  # the same request id: a late answer to the first try still counts
                self.transport.sendto(message)
                try:
                    status, index, var_binds = await asyncio.wait_for(asyncio.shield(future), self.timeout)
                    break
                except TimeoutError:
                    continue
            else:
                raise DeviceError("timeout", "No SNMP response received before timeout")
        finally:
            del self._waiting[request_id]
        if status:
            name = ERROR_STATUS[status] if 0 <= status < len(ERROR_STATUS) else str(status)
            raise DeviceError("snmp_error", f"{name} at varbind {index}")
        return var_binds
