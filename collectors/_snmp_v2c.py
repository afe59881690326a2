"""SNMPv2c GET and GETBULK on one UDP socket per device: requests encoded by the ``asn1`` library, answers
read by ``decode_response`` (issue 13).

Why not pysnmp for v2c: a steady poll of ten OIDs cost ~5 ms of CPU in pysnmp (pyasn1's object model
for every message, its dispatcher and its MIB-aware caches), its import ~15 MiB of a Pi Zero's memory,
and its timer woke the agent 4 to 10 times a second. A v2c request is a community string and a PDU:
this module builds and reads only those and leaves everything that is more than that to pysnmp, still
used for SNMPv3 (USM authentication and privacy are not hand-written). Requests are encoded once per
device with python-asn1; answers are read by a flat pass that knows only a Response's few BER types:
python-asn1's general decoder was a third of a poll's CPU (0.5 ms of 1.5).

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


def _tlv(data: bytes, pos: int, end: int, what: str) -> tuple[int, int, int]:
    """The BER element at ``pos``: (identifier byte, value start, value end), which must lie before ``end``.
    SNMP uses only single-byte identifiers and definite lengths (RFC 3417: no indefinite form)."""
    if pos + 2 > end:
        raise Garbage(f"{what}: premature end")
    tag, size = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise Garbage(f"{what}: multi-byte identifier {tag:#x}")
    pos += 2
    if size & 0x80:
        n = size & 0x7F
        if not 1 <= n <= 4 or pos + n > end:
            raise Garbage(f"{what}: length of {n} bytes")
        size = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + size > end:
        raise Garbage(f"{what}: length {size} past the end")
    return tag, pos, pos + size


def _integer(data: bytes, start: int, end: int, what: str) -> int:
    if not 1 <= end - start <= 9:  # 9: an unsigned 64-bit value with its leading 0x00
        raise Garbage(f"{what}: INTEGER of {end - start} bytes")
    return int.from_bytes(data[start:end], "big", signed=True)


def _oid(data: bytes, start: int, end: int) -> Oid:
    """BER sub-identifiers (base 128, high bit: more follows); the first holds two arcs."""
    arcs, n, used = [], 0, 0
    for b in data[start:end]:
        n, used = (n << 7) | (b & 0x7F), used + 1
        if used > 5:  # a sub-identifier is at most 2**32 - 1 (RFC 2578): 5 bytes
            raise Garbage("OID sub-identifier too long")
        if not b & 0x80:
            arcs.append(n)
            n = used = 0
    if used or not arcs or len(arcs) > 128:  # RFC 2578: at most 128 sub-identifiers
        raise Garbage("malformed OID")
    first = min(arcs[0] // 40, 2)
    return (first, arcs[0] - 40 * first, *arcs[1:])


def _value(tag: int, data: bytes, start: int, end: int) -> Any:
    """A varbind's value as the collector takes it (what ``snmp._plain`` makes of pysnmp's types)."""
    raw = data[start:end]
    if tag == 0x02:  # INTEGER
        return _integer(data, start, end, "value")
    if tag in (0x04, 0x44):  # OCTET STRING, Opaque
        return raw.decode("utf-8", errors="replace")
    if tag == 0x05 and not raw:  # NULL
        return None
    if tag == 0x06:  # OBJECT IDENTIFIER
        return ".".join(map(str, _oid(data, start, end)))
    if tag & 0xE0 == 0x40 and tag & 0x1F in _UNSIGNED:  # application, primitive
        if not raw or len(raw) > 9:
            raise Garbage(f"application {tag & 0x1F}: {len(raw)} bytes")
        return int.from_bytes(raw, "big")  # unsigned: a counter whose agent left out the leading 0x00 too
    if tag == 0x40 and len(raw) == 4:  # IpAddress
        return ".".join(map(str, raw))
    if tag in (0x80, 0x81, 0x82) and not raw:
        return None  # noSuchObject, noSuchInstance, endOfMibView
    raise Garbage(f"unknown value type {tag:#x}")


def decode_response(data: bytes, community: bytes) -> tuple[int, int, int, VarBinds]:
    """A v2c Response -> (request id, error status, error index, [(oid, value)]); ``Garbage`` otherwise.

    Read in one flat pass over the bytes, every element checked against the one that holds it (no
    recursion, nothing read past its container): a GET's answer costs ~0.05 ms, python-asn1's ~0.5 ms."""
    if len(data) > MAX_DATAGRAM:
        raise Garbage(f"{len(data)} bytes")
    tag, pos, end = _tlv(data, 0, len(data), "message")
    if tag != 0x30:
        raise Garbage(f"message: not a SEQUENCE ({tag:#x})")
    tag, start, pos = _tlv(data, pos, end, "version")
    if tag != 0x02 or _integer(data, start, pos, "version") != 1:
        raise Garbage("version: not SNMPv2c")
    tag, start, pos = _tlv(data, pos, end, "community")
    if tag != 0x04 or data[start:pos] != community:
        raise Garbage("another community")
    tag, pos, end = _tlv(data, pos, end, "pdu")
    if tag != 0xA0 | _RESPONSE:
        raise Garbage(f"pdu: not a Response ({tag:#x})")
    header = []
    for what in ("request-id", "error-status", "error-index"):
        tag, start, pos = _tlv(data, pos, end, what)
        if tag != 0x02:
            raise Garbage(f"{what}: not an INTEGER")
        header.append(_integer(data, start, pos, what))
    tag, pos, end = _tlv(data, pos, end, "varbinds")
    if tag != 0x30:
        raise Garbage("varbinds: not a SEQUENCE")
    var_binds: VarBinds = []
    while pos < end:
        tag, start, pos = _tlv(data, pos, end, "varbind")
        if tag != 0x30:
            raise Garbage("varbind: not a SEQUENCE")
        tag, at, start = _tlv(data, start, pos, "name")
        if tag != 0x06:
            raise Garbage("varbind name is not an OID")
        name = _oid(data, at, start)
        tag, at, start = _tlv(data, start, pos, "value")
        if start != pos:
            raise Garbage("varbind: more than a name and a value")
        var_binds.append((name, _value(tag, data, at, start)))
    return header[0], header[1], header[2], var_binds


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
        loop = asyncio.get_running_loop()
        self._expected = expected
        try:
            for _ in range(self.retries + 1):  # the same request id: a late answer to the first try still counts
                # a future per try, awaited under asyncio.timeout: wait_for and shield cost a poll a tenth of its CPU
                future: asyncio.Future[tuple[int, int, VarBinds]] = loop.create_future()
                self._waiting[request_id] = future
                self.transport.sendto(message)
                try:
                    async with asyncio.timeout(self.timeout):
                        status, index, var_binds = await future
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
