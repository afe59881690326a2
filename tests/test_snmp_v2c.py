"""SNMPv2c without pysnmp (collectors/_snmp_v2c.py): the answer's values, then hostile datagrams in front of
a real snmpsim answer (a proxy that sends garbage first), and what the process imports for v2c and for v3.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asn1
import pytest

from examwatch.collectors._snmp_v2c import Garbage, VarBind, decode_response, encode_message, encode_request
from examwatch.collectors.base import Health
from examwatch.collectors.snmp import SnmpCollector, SnmpOptions
from examwatch.edge.config import Device
from examwatch.simulators.snmp import UPS_MIB, SnmpSimulator, value_of
from tests.support import Recorder


def response(request_id: int, var_binds: list[VarBind], community: bytes = b"ups") -> bytes:
    """A v2c Response: var_binds are (oid, class, tag number, value)."""
    return encode_message(community, 2, request_id, 0, 0, var_binds)


def with_varbind(var_bind: bytes) -> bytes:
    """A v2c Response (request id 1) around one var-bind given as its BER bytes."""
    var_binds = b"\x30" + bytes([len(var_bind)]) + var_bind
    pdu = bytes.fromhex("020101020100020100") + var_binds
    body = b"\x02\x01\x01\x04\x03ups\xa2" + bytes([len(pdu)]) + pdu
    return b"\x30" + bytes([len(body)]) + body


APP, CTX, UNI = asn1.Classes.Application, asn1.Classes.Context, asn1.Classes.Universal


def test_values_become_what_the_profiles_take() -> None:
    rid, status, index, var_binds = decode_response(
        response(
            77,
            [
                ("1.3.6.1.2.1.1.1.0", UNI, asn1.Numbers.OctetString, "UPS 中文".encode()),
                ("1.3.6.1.2.1.1.3.0", APP, 3, b"\x00\xff\xff\xff\xff"),  # TimeTicks above 2**31
                ("1.3.6.1.2.1.2.2.1.10.1", APP, 1, b"\xff\xff\xff\xff"),  # a Counter32 missing its 0x00
                ("1.3.6.1.2.1.31.1.1.1.6.1", APP, 6, b"\x00" + (2**64 - 1).to_bytes(8, "big")),
                ("1.3.6.1.2.1.4.20.1.1.1", APP, 0, bytes([192, 168, 10, 20])),
                ("1.3.6.1.2.1.33.1.2.4.0", UNI, asn1.Numbers.Integer, -3),
                ("1.3.6.1.2.1.33.1.2.5.0", CTX, 1, b""),  # noSuchInstance
                ("1.3.6.1.2.1.1.2.0", UNI, asn1.Numbers.ObjectIdentifier, "1.3.6.1.4.1.534"),
            ],
        ),
        b"ups",
    )
    assert (rid, status, index) == (77, 0, 0)
    assert [v for _, v in var_binds] == ["UPS 中文", 2**32 - 1, 2**32 - 1, 2**64 - 1, "192.168.10.20", -3, None,
                                         "1.3.6.1.4.1.534"]  # fmt: skip
    assert var_binds[0][0] == (1, 3, 6, 1, 2, 1, 1, 1, 0)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (response(1, [], community=b"other"), "another community"),
        (response(1, [("1.3.6.1.2.1.1.1.0", APP, 9, b"\x01")]), "unknown value type"),
        (response(1, [("1.3.6.1.2.1.1.1.0", APP, 0, b"\x01\x02")]), "unknown value type"),  # a 2-byte IpAddress
        (response(1, [("1.3.6.1.2.1.1.1.0", APP, 1, b"\x01" * 10)]), "application 1"),
        (encode_request(b"ups", 1, 0, 0, 0, [(1, 3, 6, 1)]), "pdu"),  # a request is not an answer
        (response(1, [])[:-1], "message: length 21 past the end"),  # cut short
        (b"\x30\x80" * 20_000, "message: length of 0 bytes"),  # the indefinite form (and nesting): refused
        (b"\x30\x84\xff\xff\xff\xff", "past the end"),  # a length past the datagram's end
        (bytes(70_000), "70000 bytes"),
        (b'0\x18\x02\x94\x01\x01ps"\xa2\x0e\x02\x04\x01\xa64-\x02\x01\x00\x02\x01\x000', "past the end"),  # fuzz
        (b"\x30\x03\x1f\x01\x00", "multi-byte identifier"),
        (b"\x30\x03\x02\x00\x00", "INTEGER of 0 bytes"),
        (response(1, [("1.3.6.1.2.1.1.1.0", UNI, asn1.Numbers.Integer, 2**80)]), "INTEGER of 11 bytes"),
        (response(1, [("1.3.6.1." + str(2**40), UNI, asn1.Numbers.Null, None)]), "sub-identifier too long"),
        (with_varbind(bytes.fromhex("300406012b05")), "value: premature end"),  # a value without its length
        (with_varbind(bytes.fromhex("300706012b05000500")), "more than a name and a value"),
        (with_varbind(bytes.fromhex("300506012b04026162")), "value: length 2 past the end"),  # past its varbind
        (with_varbind(bytes.fromhex("30050601ab0500")), "malformed OID"),  # its last byte says more follows
    ],
)
def test_garbage_is_refused_with_a_reason(data: bytes, why: str) -> None:
    with pytest.raises(Garbage, match=why):
        decode_response(data, b"ups")


class Proxy:
    """A UDP hop in front of snmpsim that answers each request with ``garbage(request)`` datagrams first,
    then (unless ``relay`` is off) with snmpsim's real answer."""

    def __init__(self, upstream: str, garbage: Callable[[bytes], list[bytes]], relay: bool = True) -> None:
        host, port = upstream.split(":")
        self.upstream = (host, int(port))
        self.garbage, self.relay = garbage, relay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(5)
            while not self.stopped.is_set():
                try:
                    request, client = self.sock.recvfrom(65535)
                except TimeoutError:
                    continue
                for g in self.garbage(request):
                    self.sock.sendto(g, client)
                if self.relay:
                    up.sendto(request, self.upstream)
                    self.sock.sendto(up.recv(65535), client)

    def __enter__(self) -> Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def request_id(request: bytes) -> int:
    d = asn1.Decoder()
    d.start(request)
    d.enter()
    d.read()
    d.read()
    d.enter()
    return int(d.read()[1])


def hostile(request: bytes) -> list[bytes]:
    """What a confused or forged peer sends before the real answer, each shaped to get far into decoding."""
    rid = request_id(request)
    charge = f"{UPS_MIB}.2.4.0"
    one = [(charge, UNI, asn1.Numbers.Integer, 1)]
    return [
        b"\x00garbage",
        response(rid, one, community=b"wrong"),  # the right id, another community
        response(rid + 1, one),  # another request's id: a late answer, ignored, not garbage
        response(rid, one * 11),  # more varbinds than the GET asked for
        response(rid, [(charge, APP, 7, b"")]),  # an empty Unsigned32
    ]


@pytest.fixture(scope="module")
def snmpsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SnmpSimulator]:
    sim = SnmpSimulator(tmp_path_factory.mktemp("snmpsim"), {"ups": "ups"})
    sim.start()
    yield sim
    sim.stop()


def ups(address: str, timeout: float = 1.0, retries: int = 0) -> Device:
    return Device(
        name="ups", kind="ups", protocol="snmp", address=address, profile="ups-mib", interval=1.0,
        timeout=timeout, retries=retries, options=SnmpOptions(community="ups"),
    )  # fmt: skip


def poll(device: Device) -> tuple[Recorder, Health]:
    acc, health = Recorder(), Health()

    async def run() -> None:
        collector = SnmpCollector([device], acc, health)
        await collector.poll_once(device)
        await collector.close()

    asyncio.run(run())
    return acc, health


def test_hostile_datagrams_before_the_answer_are_counted_and_the_answer_read(snmpsim: SnmpSimulator) -> None:
    with Proxy(snmpsim.address, hostile) as proxy:
        acc, health = poll(ups(proxy.address))
    assert acc.of("ups")["device_online"] == 1
    assert acc.of("ups")["ups_charge_percent"] == value_of(snmpsim.recording("ups"), f"{UPS_MIB}.2.4.0")
    assert health.dropped[("ups", "garbage")] == len(hostile(encode_request(b"ups", 1, 0, 0, 0, []))) - 1


def test_only_garbage_is_a_timeout_after_every_try(snmpsim: SnmpSimulator) -> None:
    tries: list[bytes] = []

    def garbage(request: bytes) -> list[bytes]:
        tries.append(request)
        return hostile(request)

    with Proxy(snmpsim.address, garbage, relay=False) as proxy:
        acc, health = poll(ups(proxy.address, timeout=0.3, retries=2))
    assert acc.of("ups") == {"device_online": 0}
    assert health.devices["ups"].errors["timeout"] == 1
    assert len(tries) == 3 and len({request_id(t) for t in tries}) == 1  # one request, sent three times


def test_a_late_answer_to_the_first_try_is_taken_during_the_retry(snmpsim: SnmpSimulator) -> None:
    """The retry resends the same request id: an answer to the first try that comes after its timeout is the
    answer (a slow agent under load is read, not counted out)."""
    tries: list[bytes] = []

    def slow_first(request: bytes) -> list[bytes]:
        if not tries:
            time.sleep(0.45)  # past the first try's 0.3 s: the answer comes during the second
        tries.append(request)
        return []

    with Proxy(snmpsim.address, slow_first) as proxy:
        acc, health = poll(ups(proxy.address, timeout=0.3, retries=1))
    assert acc.of("ups")["device_online"] == 1
    assert health.devices["ups"].errors == {}


PROBE = """
import asyncio, sys
import examwatch.edge.runtime
from examwatch.collectors.base import Health
from examwatch.collectors.snmp import SnmpCollector, SnmpOptions
from examwatch.edge.config import Device

class Acc:
    def add(self, reading): pass
    def add_all(self, readings): pass

async def main():
    options = SnmpOptions(version=sys.argv[1], user="u", auth_key="authkey12", priv_key="privkey12")
    device = Device(name="ups", kind="ups", protocol="snmp", address="127.0.0.1:9", profile="ups-mib",
                    timeout=0.2, options=options)
    collector = SnmpCollector([device], Acc(), Health())
    await collector.poll_once(device)

asyncio.run(main())
print(" ".join(sorted(m.split(".")[0] for m in sys.modules if sys.modules[m] is not None)))
"""


@pytest.mark.parametrize("version", ["2c", "3"])
def test_pysnmp_is_imported_only_for_snmpv3(version: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, version], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    )
    imported = set(out.stdout.split())
    assert "asn1" in imported
    assert ("pysnmp" in imported) == (version == "3")
    assert ("pyasn1" in imported) == (version == "3")
