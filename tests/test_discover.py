"""`examwatch discover`, its parts: choosing a profile (pure), the Zigbee2MQTT device list and upsd's UPS list
(outside input), SNMP devices of several models on real snmpsim, serial ports on pty pairs (one held by another
process, which must be left alone)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from examwatch.collectors import profiles
from examwatch.edge.discover import NONE, OK, SKIPPED, Found, offered
from examwatch.edge.discover import mqtt as dmqtt
from examwatch.edge.discover import nut as dnut
from examwatch.edge.discover import serial as dserial
from examwatch.edge.discover import snmp as dsnmp
from examwatch.edge.discover.draft import draft
from examwatch.simulators.megatec import MegatecSimulator
from examwatch.simulators.modbus_noise import NoiseMeterBus
from examwatch.simulators.serial_pty import PtyPair
from examwatch.simulators.snmp import SnmpSimulator

# --- pure ---------------------------------------------------------------------------------------------------

OFFERED = [
    ("ups-mib", profiles.Discovery(kind="ups", rank=1, sys_object_id=["1.3.6.1.4.1.935."])),
    ("eaton-xups", profiles.Discovery(kind="ups", rank=2, sys_object_id=["1.3.6.1.4.1.534."])),
    ("if-mib", profiles.Discovery(kind="switch", rank=9)),
]


def test_a_sysobjectid_match_wins_then_the_lowest_rank() -> None:
    assert dsnmp.choose("1.3.6.1.4.1.534.1", {"ups-mib": 9, "eaton-xups": 8, "if-mib": 40}, OFFERED) == "eaton-xups"
    assert dsnmp.choose("1.3.6.1.4.1.8072.3", {"ups-mib": 9, "if-mib": 40}, OFFERED) == "ups-mib"  # unknown vendor
    assert dsnmp.choose("1.3.6.1.4.1.534.1", {"if-mib": 4}, OFFERED) == "if-mib"  # its claimed MIB does not answer
    assert dsnmp.choose("", {}, OFFERED) is None


def test_snmp_targets_and_v3_users() -> None:
    hosts, ranged = dsnmp.targets(["192.168.1.0/29", "10.0.0.5:1161,10.0.0.5:1161"])
    assert hosts[:2] == ["192.168.1.1", "192.168.1.2"] and hosts[-1] == "10.0.0.5:1161" and len(hosts) == 7
    assert ranged
    with pytest.raises(ValueError, match="more than"):
        dsnmp.targets(["10.0.0.0/8"])
    v3 = dsnmp.parse_v3("examwatch:sha:authkey1:aes:privkey1")
    assert v3.keys == {"version": "3", "user": "examwatch", "auth_protocol": "SHA", "auth_key": "authkey1",
                       "priv_protocol": "AES", "priv_key": "privkey1"}  # fmt: skip
    assert "authkey1" not in v3.label
    for bad in ("", "u:sha", "u:md4:k:aes:p"):
        with pytest.raises(ValueError):
            dsnmp.parse_v3(bad)


def bridge(*devices: dict) -> bytes:
    coordinator = {"type": "Coordinator", "friendly_name": "Coordinator", "ieee_address": "0x00"}
    return json.dumps([coordinator, *devices]).encode()


def zdevice(name: str, model: str, *exposes: object, **extra: object) -> dict:
    definition = {"model": model, "vendor": "V", "exposes": list(exposes)}
    return {"type": "EndDevice", "friendly_name": name, "interview_completed": True, "definition": definition} | extra


DOOR = zdevice("secrecy-door", "MCCGQ11LM", {"type": "binary", "property": "contact"}, {"property": "battery"})
NOISE = zdevice("noise 1", "NS-1", {"type": "numeric", "property": "noise"})
RECORDER = zdevice(
    "pen-1", "REC", {"type": "composite", "features": [{"property": "recording"}, {"property": "battery"}]}
)
PLUG = zdevice("plug", "SP-1", {"type": "switch", "features": [{"property": "state"}]})


def test_the_zigbee_device_list_maps_onto_the_mqtt_profiles() -> None:
    devices = dmqtt.parse_bridge_devices(bridge(DOOR, NOISE, RECORDER, PLUG, zdevice("off", "X", disabled=True)))
    rows = {r.address: r for r in dmqtt.rows(devices, "zigbee2mqtt", offered("mqtt"))}
    door = rows["zigbee2mqtt/secrecy-door"]
    assert (door.result, door.kind, door.profile, door.name) == (OK, "door", "zigbee2mqtt_contact", "secrecy-door")
    assert door.device["interval"] == 3600.0 and door.notes  # the heartbeat is for a human to confirm
    assert (rows["zigbee2mqtt/noise 1"].profile, rows["zigbee2mqtt/noise 1"].name) == ("zigbee2mqtt_noise", "noise-1")
    assert rows["zigbee2mqtt/pen-1"].profile == "recorder_json"  # a composite's features count
    assert rows["zigbee2mqtt/plug"].result == NONE and "state" in rows["zigbee2mqtt/plug"].why
    assert rows["zigbee2mqtt/off"].result == "error" and "disabled" in rows["zigbee2mqtt/off"].why
    assert "zigbee2mqtt/Coordinator" not in rows


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe not json", "not_json"),
        (b'{"devices": []}', "not_a_list"),
        (b"[" * 100_000 + b"]" * 100_000, "not_json"),
        (b" " * (dmqtt.MAX_BRIDGE + 1), "too_large"),
        (json.dumps([{}] * (dmqtt.MAX_DEVICES + 1)).encode(), "too_many_devices"),
    ],
)
def test_a_bad_device_list_is_refused_by_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(dmqtt.BridgeError) as err:
        dmqtt.parse_bridge_devices(payload)
    assert err.value.reason == reason


def test_odd_entries_in_a_device_list_cost_only_themselves() -> None:
    odd = [1, "x", None, {"friendly_name": 7}, zdevice("deep", "D", {"features": [[{"features": []}]] * 3})]
    payload = json.dumps([*odd, DOOR]).encode()
    rows = dmqtt.rows(dmqtt.parse_bridge_devices(payload), "zigbee2mqtt", offered("mqtt"))
    assert [r.profile for r in rows if r.result == OK] == ["zigbee2mqtt_contact"]


def test_upsd_ups_list() -> None:
    lines = ['UPS ups1 "Eaton 5E"', 'UPS bad name "x"', 'UPS ups2 "say \\"hi\\""', "garbage", "UPS ups3"]
    assert dnut.parse_list_ups(lines) == [("ups1", "Eaton 5E"), ("ups2", 'say "hi"')]


def test_the_draft_adds_each_device_once_and_lists_what_it_left_out() -> None:
    head = '[agent]\nsite = "s1"\nroom = "r1"\n\n'
    head += '[[devices]]\nname = "ups1"\nkind = "ups"\nprotocol = "nut"\naddress = "ups@h"\n'
    dev = {"protocol": "nut", "address": "ups@h", "kind": "ups"}
    new = {"protocol": "nut", "address": "ups2@h", "kind": "ups"}
    rows = [Found("nut", "ups@h", OK, "a", "ups", "", "", dev), Found("nut", "ups2@h", OK, "b", "ups", "", "", new),
            Found("snmp", "10.0.0.9", NONE, "SNMP 无应答")]  # fmt: skip
    text = draft(head, rows)
    assert text.count('address = "ups@h"') == 1 and 'name = "ups2"' in text  # ups1 is taken
    assert "# 已在配置中：nut ups@h" in text and "#   snmp 10.0.0.9：无匹配" in text
    from examwatch.edge.config import loads

    assert [d.name for d in loads(text).devices] == ["ups1", "ups2"]


# --- SNMP: several models on real snmpsim, one agent address each ------------------------------------------------

MODELS = ["ups", "ups-xups", "ups-huawei", "nvr", "camera", "camera-hikvision", "switch"]


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One snmpsim per device (a host is one device), community "public"; "garbage" answers text for every OID.
    Model -> address. Started together: each takes seconds to index its recording."""
    names = [*MODELS, "garbage"]
    sims = {m: SnmpSimulator(tmp_path_factory.mktemp(m), {"public": "ups" if m == "garbage" else m}) for m in names}
    failed: list[BaseException] = []

    def start(sim: SnmpSimulator) -> None:
        try:
            sim.start(timeout=90)
        except BaseException as err:
            failed.append(err)

    threads = [threading.Thread(target=start, args=(s,)) for s in sims.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not failed, failed
        sims["garbage"].set_state("public", "nonsense")
        yield {m: s.address for m, s in sims.items()}
    finally:
        for s in sims.values():
            s.stop()


def test_snmp_devices_are_recognised_by_sysobjectid_or_by_what_answers(agents: dict[str, str]) -> None:
    addresses = {a: m for m, a in agents.items()}
    settings = dsnmp.Settings([dsnmp.Credential({"version": "2c", "community": c}) for c in ("wrong", "public")])
    rows = asyncio.run(dsnmp.probe([*addresses, "127.0.0.1:9"], False, settings, 1e12))
    got = {addresses.get(r.address, r.address): r for r in rows}
    expected = {
        "ups": ("ups-mib", "ups"),  # Phoenixtec: its sysObjectID is the profile's
        "ups-xups": ("eaton-xups", "ups"),  # an MGE sysObjectID (705), only XUPS-MIB answers
        "ups-huawei": ("ups-mib", "ups"),  # Net-SNMP's sysObjectID, UPS-MIB answers
        "nvr": ("hikvision-nvr", "nvr"),
        "camera": ("host-resources-storage", "camera"),
        "camera-hikvision": ("hikvision-camera", "camera"),  # no system group at all
        "switch": ("if-mib", "switch"),
    }
    assert {m: (got[m].profile, got[m].kind) for m in expected} == expected, [got[m].why for m in expected]
    assert "sysObjectID 相符" in got["ups"].why and "按 OID 应答识别" in got["ups-huawei"].why
    assert all(got[m].device["community"] == "public" for m in expected)  # the second community was the one
    assert got["garbage"].result == NONE and "没有 profile 能读" in got["garbage"].why
    assert got["127.0.0.1:9"].result == NONE and "无应答" in got["127.0.0.1:9"].why


def test_the_snmp_sweep_keeps_to_its_time_limit() -> None:
    import time

    settings = dsnmp.Settings([dsnmp.Credential({"version": "2c", "community": "wrong"})], timeout=1.0, concurrency=1)
    rows = asyncio.run(dsnmp.probe(["127.0.0.1:9", "127.0.0.1:10", "127.0.0.1:11"], False, settings, time.monotonic()))
    assert [r.why for r in rows] == ["未完成：超出总时限（--time-limit）"] * 3


def test_the_rate_limit_spaces_requests() -> None:
    async def go() -> list[float]:
        limit, loop = dsnmp.RateLimit(50.0), asyncio.get_running_loop()
        stamps = []
        for _ in range(6):
            await limit.wait()
            stamps.append(loop.time())
        return stamps

    stamps = asyncio.run(go())
    assert all(b - a >= 0.02 - 1e-3 for a, b in itertools.pairwise(stamps))


# --- serial: pty pairs --------------------------------------------------------------------------------------------


def _holder(port: Path) -> subprocess.Popen[str]:
    """Another program with the port open and in exclusive mode (TIOCEXCL), as a careful driver holds it."""
    code = (
        f"import fcntl, serial, termios, time; s = serial.Serial({str(port)!r}, 2400); "
        "fcntl.ioctl(s.fd, termios.TIOCEXCL); print('open', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
    return proc


def test_serial_ports_are_asked_for_megatec_then_modbus_and_a_held_one_is_left_alone(tmp_path: Path) -> None:
    with PtyPair(tmp_path, "ups") as ups, PtyPair(tmp_path, "rs485") as rs485, PtyPair(tmp_path, "held") as held, \
            PtyPair(tmp_path, "empty") as empty:  # fmt: skip
        sim = MegatecSimulator(str(ups.device), lacks=("F",))
        sim.start()
        bus = NoiseMeterBus(str(rs485.device))
        bus.add_meter("generic-u16x10", db=48.7)
        bus.start()
        holder = _holder(held.agent)
        far_end = os.open(held.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            paths = [str(p.agent) for p in (ups, rs485, held, empty)]
            rows = asyncio.run(dserial.probe(paths, 0.4))
            heard = select.select([far_end], [], [], 0.2)[0]
        finally:
            os.close(far_end)
            holder.kill()
            holder.wait()
            sim.stop()
            bus.stop()
    by = {r.address: r for r in rows}
    u, n, h, e = (by[p] for p in paths)
    assert (u.protocol, u.kind, u.profile) == ("megatec", "ups", "pack-voltage")
    assert any("不回答 F" in note for note in u.notes)  # the rating must come from a profile
    assert (n.protocol, n.kind, n.device["profile"]) == ("modbus_noise", "noise", n.profile) and "48.7" in n.why
    assert h.result == SKIPPED and f"PID {holder.pid}" in h.why
    assert not heard, "the held port was written to"
    assert e.result == NONE
    assert sim.commands[:2] == ["Q1", "F"]


# --- ISAPI ----------------------------------------------------------------------------------------------------


def test_isapi_devices_get_the_profile_that_reads_them(tmp_path: Path) -> None:
    from examwatch.edge.discover import isapi as disapi
    from examwatch.simulators.isapi import IsapiSimulator, SimDisk

    (tmp_path / "pass").write_text("sim-pass\n")
    (tmp_path / "wrong").write_text("not-it\n")
    with IsapiSimulator() as nvr, IsapiSimulator(whole=False) as cam:
        cam.disks = [SimDisk(1, capacity_mib=60880)]
        targets = [disapi.parse_target(f"{a}:admin:{tmp_path / p}") for a, p in
                   ((nvr.address, "pass"), (cam.address, "pass"), (nvr.address, "wrong"))]  # fmt: skip
        rows = asyncio.run(disapi.probe(targets, 2.0))
    assert [(r.result, r.profile, r.kind) for r in rows[:2]] == [
        (OK, "hikvision", "nvr"),
        (OK, "hikvision-hdd", "camera"),
    ]
    assert rows[1].device["profile"] == "hikvision-hdd" and "sd1" in rows[1].why
    assert rows[2].result == "error" and "http_401" in rows[2].why
    with pytest.raises(ValueError, match="host"):
        disapi.parse_target("10.0.0.1:admin")


def test_a_room_broker_that_refuses_our_login_is_one_clear_row(tmp_path: Path) -> None:
    from examwatch.edge.config import MqttSettings
    from examwatch.simulators.broker import CountyBroker

    broker = CountyBroker(tmp_path / "broker", {"someone": "else"}, [])
    broker.start()
    try:
        settings = MqttSettings(port=broker.port, username="nobody", password="wrong", client_id="t")
        rows = dmqtt.probe(settings, "zigbee2mqtt", 3.0)
    finally:
        broker.stop()
    assert [r.result for r in rows] == ["error"] and "refused" in rows[0].why, rows


def test_a_port_in_exclusive_mode_is_seen_as_such(tmp_path: Path) -> None:
    """The second guard, for a holder /proc does not show (another PID namespace): TIOCEXCL."""
    import fcntl
    import termios

    with PtyPair(tmp_path, "tty") as pair:
        fd = os.open(pair.agent, os.O_RDWR | os.O_NOCTTY)
        try:
            assert not dserial.exclusive(str(pair.agent))
            fcntl.ioctl(fd, termios.TIOCEXCL)
            assert dserial.exclusive(str(pair.agent))
        finally:
            os.close(fd)
