"""Modbus RTU noise meters: decoding per profile, and the collector against simulated meters on a pty bus."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from examwatch.collectors import profiles
from examwatch.collectors.base import DeviceError, Health
from examwatch.collectors.modbus_noise import ModbusNoiseCollector, Options, Profile, classify_silence, decode
from examwatch.edge.config import Device
from examwatch.simulators.modbus_noise import NoiseMeterBus, crc, encode
from examwatch.simulators.serial_pty import PtyPair
from tests.support import Recorder, RulesRecorder, run_for, running, wait_until

PROFILES = ["generic-u16x10", "renke-rs-zs", "generic-float32-input"]


def test_decode_known_register_values() -> None:
    u16 = profiles.load("modbus", "generic-u16x10", Profile)
    assert decode([653], u16) == pytest.approx(65.3)
    f32 = profiles.load("modbus", "generic-float32-input", Profile)
    assert decode([0x428C, 0xCCCD], f32) == pytest.approx(70.4, abs=1e-5)  # 70.4 as IEEE-754 0x428CCCCD
    swapped = Profile(datatype="float32", word_order="little", function=4)
    assert decode([0xCCCD, 0x428C], swapped) == pytest.approx(70.4, abs=1e-5)
    assert decode([0xFFFF], Profile(datatype="int16", scale=0.1)) == pytest.approx(-0.1)
    with pytest.raises(DeviceError):
        decode([1, 2], u16)


@pytest.mark.parametrize(
    "registers", [[0x7FC0, 0x0000], [0x7F80, 0x0000], [0xFF80, 0x0000]], ids=["nan", "inf", "-inf"]
)
def test_decode_refuses_what_is_not_a_number(registers: list[int]) -> None:
    # Found by bench/fuzz.py: a float32 meter's NaN became a noise_db reading of NaN.
    f32 = profiles.load("modbus", "generic-float32-input", Profile)
    with pytest.raises(DeviceError) as err:
        decode(registers, f32)
    assert err.value.reason == "garbage"


@pytest.mark.parametrize("name", PROFILES)
def test_profiles_round_trip_through_the_simulators_encoding(name: str) -> None:
    p = profiles.load("modbus", name, Profile)
    assert p.function in (3, 4) and 1 <= p.slave <= 247
    assert decode(encode(72.5, p), p) == pytest.approx(72.5, abs=0.05)


def test_classify_silence() -> None:
    good = bytes([1, 3, 2, 0x02, 0x8D])
    assert classify_silence(b"").reason == "timeout"
    assert classify_silence(good + bytes([crc(good)[0] ^ 1, crc(good)[1]])).reason == "crc"
    assert classify_silence(b"\x01\x03").reason == "garbage"


# --- against the simulator ------------------------------------------------------------------------------------


@pytest.fixture
def rs485(tmp_path: Path) -> Iterator[tuple[PtyPair, NoiseMeterBus]]:
    pair = PtyPair(tmp_path, "rs485")
    pair.start()
    bus = NoiseMeterBus(str(pair.device))
    yield pair, bus
    bus.stop()
    pair.stop()


def meter(
    port: Path | str, name: str = "noise1", profile: str = "generic-u16x10", slave: int = 0, **kw: object
) -> Device:
    fields = {"interval": 0.3, "timeout": 0.3, "retries": 0} | kw
    return Device(
        name=name,
        kind="noise",
        protocol="modbus_noise",
        address=str(port),
        profile=profile,
        options=Options(slave=slave),
        **fields,
    )  # type: ignore[arg-type]


def poll_all(c: ModbusNoiseCollector) -> None:
    async def go() -> None:
        for d in c.devices:
            await c.poll_once(d)

    asyncio.run(go())


@pytest.mark.parametrize("profile", PROFILES)
def test_reads_the_simulated_meter_per_profile(rs485: tuple[PtyPair, NoiseMeterBus], profile: str) -> None:
    pair, bus = rs485
    bus.add_meter(profile, db=48.7)
    bus.start()
    acc = Recorder()
    c = ModbusNoiseCollector([meter(pair.agent, profile=profile)], acc, Health())
    poll_all(c)
    asyncio.run(c.close())
    assert acc.latest("noise1", "noise_db") == pytest.approx(48.7, abs=0.01)
    assert acc.latest("noise1", "device_online") == 1.0


def test_two_meters_share_one_bus(rs485: tuple[PtyPair, NoiseMeterBus]) -> None:
    pair, bus = rs485
    bus.add_meter("generic-u16x10", slave=1, db=41.0)
    bus.add_meter("generic-u16x10", slave=2, db=63.5)
    bus.start()
    acc = Recorder()
    c = ModbusNoiseCollector([meter(pair.agent, "front", slave=1), meter(pair.agent, "back", slave=2)], acc, Health())

    run_for(c, 1.0)  # both poll concurrently: the bus lock keeps frames apart
    assert acc.latest("front", "noise_db") == 41.0 and acc.latest("back", "noise_db") == 63.5
    assert all(r.value == 1.0 for r in acc.readings if r.metric == "device_online")


def test_noise_over_the_limit_shows_within_one_interval(rs485: tuple[PtyPair, NoiseMeterBus]) -> None:
    pair, bus = rs485
    bus.add_meter("renke-rs-zs", db=42.0)
    bus.start()
    acc = Recorder()
    dev = meter(pair.agent, profile="renke-rs-zs")
    c = ModbusNoiseCollector([dev], acc, Health())

    async def go() -> None:
        async with running(c):
            await acc.reaches("noise1", "noise_db", 42.0, 5)
            bus.set_db(78.4)  # a lawn mower outside during the maths paper
            await acc.reaches("noise1", "noise_db", 78.4, dev.interval + 1)

    asyncio.run(go())


@pytest.mark.parametrize(
    ("how", "reason"), [("bad_crc", "crc"), ("silent", "timeout"), ("exception", "modbus_exception")]
)
def test_bad_answers_are_device_states_and_recover(rs485: tuple[PtyPair, NoiseMeterBus], how: str, reason: str) -> None:
    pair, bus = rs485
    bus.add_meter("generic-u16x10", db=50.0)
    bus.start()
    acc, health = Recorder(), Health()
    dev = meter(pair.agent, retries=1)
    c = ModbusNoiseCollector([dev], acc, health)

    async def go() -> None:
        await c.poll_once(dev)
        bus.misbehave(how)  # type: ignore[arg-type]
        await c.poll_once(dev)
        await c.poll_once(dev)
        assert health.devices["noise1"].online is False and health.devices["noise1"].errors[reason] == 2
        assert acc.latest("noise1", "device_online") == 0.0
        bus.misbehave(None)
        await c.poll_once(dev)
        assert health.devices["noise1"].online is True and acc.latest("noise1", "noise_db") == 50.0
        await c.close()

    asyncio.run(go())


def test_silent_meter_does_not_stall_a_meter_on_another_bus(
    rs485: tuple[PtyPair, NoiseMeterBus], tmp_path: Path
) -> None:
    pair, bus = rs485
    bus.add_meter("generic-u16x10", db=45.0)
    bus.start()
    dead = PtyPair(tmp_path, "dead")
    dead.start()
    acc, health = Recorder(), Health()
    c = ModbusNoiseCollector([meter(pair.agent), meter(dead.agent, "noise2", timeout=1.0, retries=1)], acc, health)

    try:
        run_for(c, 2.0)
    finally:
        dead.stop()
    assert sum(1 for r in acc.readings if r.device == "noise1" and r.metric == "noise_db") >= 4
    assert health.devices["noise2"].errors["timeout"] >= 1 and health.devices["noise2"].online is False


def test_missing_port_is_a_device_state(tmp_path: Path) -> None:
    acc, health = Recorder(), Health()
    c = ModbusNoiseCollector([meter(tmp_path / "no-such-tty")], acc, health)
    poll_all(c)
    asyncio.run(c.close())
    assert health.devices["noise1"].errors["port_unavailable"] == 1 and acc.latest("noise1", "device_online") == 0.0


def test_config_check_reports_bad_slave_and_profile() -> None:
    from examwatch.edge.config import ConfigError, loads

    with pytest.raises(ConfigError) as err:
        loads(
            '[agent]\nsite = "s"\nroom = "r"\n[[devices]]\nname = "n1"\nkind = "noise"\nprotocol = "modbus_noise"\n'
            'address = "/dev/ttyUSB0"\nprofile = "nope"\nslave = 300\n'
        )
    text = str(err.value)
    assert "devices[0].profile" in text and "devices[0].slave" in text


def test_noise_over_the_limit_raises_the_alarm_during_a_session(rs485: tuple[PtyPair, NoiseMeterBus]) -> None:
    """Simulator -> collector -> the default rule pack, in an exam session (``for`` shortened to 0)."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    from examwatch.edge.config import loads

    pair, bus = rs485
    bus.add_meter("renke-rs-zs", db=45.0)
    bus.start()
    local = datetime.now(ZoneInfo("Asia/Shanghai")).replace(tzinfo=None, microsecond=0)  # sessions are local time
    start, end = (local - timedelta(hours=1)).isoformat(), (local + timedelta(hours=1)).isoformat()
    cfg = loads(
        '[agent]\nsite = "s1"\nroom = "r1"\n[[devices]]\nname = "noise1"\nkind = "noise"\n'
        f'protocol = "modbus_noise"\naddress = "{pair.agent}"\nprofile = "renke-rs-zs"\ninterval = 0.3\n'
        "timeout = 0.3\nretries = 0\n[rules.noise_high]\nfor = 0\n"
        f'[[schedule.sessions]]\nname = "数学"\nstart = {start}\nend = {end}\n'
    )
    alarms = RulesRecorder(cfg)
    c = ModbusNoiseCollector(cfg.devices, alarms, Health())

    async def go() -> None:
        async with running(c):
            await asyncio.sleep(0.5)
            assert alarms.raised == []
            bus.set_db(78.4)
            await wait_until(lambda: "noise_high" in alarms.raised, cfg.devices[0].interval + 1, "noise alarm")

    asyncio.run(go())


def test_pulled_adapter_is_reopened(rs485: tuple[PtyPair, NoiseMeterBus]) -> None:
    pair, bus = rs485
    bus.add_meter("generic-u16x10", db=52.0)
    bus.start()
    acc, health = Recorder(), Health()
    c = ModbusNoiseCollector([meter(pair.agent)], acc, health)

    async def go() -> None:
        async with running(c):
            await acc.reaches("noise1", "noise_db", 52.0, 5)
            bus.stop()
            pair.stop()  # the USB-RS485 stick is pulled
            await wait_until(lambda: health.devices["noise1"].online is False, 5, "noise1 offline")
            await asyncio.to_thread(pair.start)
            bus.start()
            bus.set_db(61.0)
            await acc.reaches("noise1", "noise_db", 61.0, 5)

    asyncio.run(go())
    assert health.devices["noise1"].errors["port_unavailable"] >= 1
