"""Megatec/Q1 serial UPS: pure parsing, and the collector against the simulator on a socat pty pair."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from examwatch.collectors import profiles
from examwatch.collectors.base import DeviceError, Health
from examwatch.collectors.megatec import (
    Battery,
    MegatecCollector,
    Options,
    Profile,
    Rating,
    estimate_charge,
    parse_f,
    parse_i,
    parse_q1,
)
from examwatch.edge.config import Device
from examwatch.simulators.megatec import MegatecSimulator
from examwatch.simulators.serial_pty import PtyPair
from tests.support import Recorder, RulesRecorder, run_for, running, until, wait_until

# Answers as real units send them (the Megatec protocol sheet and NUT's blazer/nutdrv_qx test notes).
Q1_ONLINE_CELL = b"(218.0 218.0 219.0 016 50.0 2.27 30.0 00001000\r"
Q1_ON_BATTERY_PACK = b"(000.0 000.0 220.1 034 50.1 12.4 --.- 11001001\r"


# --- pure ---------------------------------------------------------------------------------------------------


def test_parse_q1_reads_values_and_all_eight_bits() -> None:
    s = parse_q1(Q1_ONLINE_CELL)
    assert (s.input_voltage, s.output_voltage, s.load_percent, s.input_frequency) == (218.0, 219.0, 16.0, 50.0)
    assert (s.battery_voltage, s.temperature) == (2.27, 30.0)
    assert s.standby_type and not (s.utility_fail or s.battery_low or s.bypass_boost or s.ups_failed)
    b = parse_q1(Q1_ON_BATTERY_PACK)
    assert b.utility_fail and b.battery_low and b.beeper_on and b.temperature is None
    assert b.standby_type and not (b.bypass_boost or b.ups_failed or b.test_in_progress or b.shutdown_active)
    bits = parse_q1(b"(230.0 230.0 230.0 010 50.0 13.6 25.0 00110110\r")
    assert (bits.bypass_boost, bits.ups_failed, bits.test_in_progress, bits.shutdown_active) == (True, True, True, True)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"", "truncated"),
        (b"(218.0 218.0 219.0 016 50", "truncated"),
        (Q1_ONLINE_CELL[:-1], "truncated"),
        (b"Q1\r", "garbage"),  # an echo: the UPS does not know Q1
        (b"(218.0 218.0 219.0 016 50.0 2.27 30.0 0000100\r", "garbage"),
        (b"\x8f\xfe(2#0.1 ZZ @@@ 1x1\r", "garbage"),
    ],
)
def test_parse_q1_rejects_bad_answers(line: bytes, reason: str) -> None:
    with pytest.raises(DeviceError) as err:
        parse_q1(line)
    assert err.value.reason == reason


@given(st.binary(max_size=80))
def test_parse_q1_random_bytes_raise_only_device_error(data: bytes) -> None:
    with contextlib.suppress(DeviceError):
        parse_q1(data)


@given(st.lists(st.sampled_from(list(b"0123456789. ()-\r")), max_size=60))
def test_parse_q1_near_misses_raise_only_device_error(chars: list[int]) -> None:
    with contextlib.suppress(DeviceError):
        parse_q1(bytes(chars))


def test_parse_f_and_i() -> None:
    assert parse_f(b"#220.0 003 12.00 50.0\r") == Rating(220.0, 3.0, 12.0, 50.0)
    assert parse_i(b"#SANTAK          C1K        V2.0      \r") == "SANTAK C1K V2.0"
    assert parse_i(b"I\r") == ""
    with pytest.raises(DeviceError):
        parse_f(b"F\r")


def test_numbers_wider_than_the_fields_are_garbage_not_infinite() -> None:
    # Found by bench/fuzz.py: 400 nines parsed as an infinite battery voltage, and the pack profile's
    # cell count (round(inf / 2)) then raised OverflowError out of the poll.
    with pytest.raises(DeviceError) as err:
        parse_f(b"#230.0 004 " + b"9" * 400 + b" 50.0\r")
    assert err.value.reason == "garbage"
    with pytest.raises(DeviceError) as err:
        parse_q1(b"(" + b"9" * 400 + b" 230.0 230.0 018 50.0 13.60 25.0 00001000\r")
    assert err.value.reason == "garbage"
    assert parse_q1(b"(1230.0 230.0 230.0 018 50.0 13.60 -25.0 00001000\r").input_voltage == 1230.0


def test_charge_estimate_from_profiles() -> None:
    pack = profiles.load("megatec", "pack-voltage", Profile).battery
    cell = profiles.load("megatec", "cell-voltage", Profile).battery
    assert pack is not None and cell is not None
    rating = Rating(230.0, 4.0, 12.0, 50.0)  # one 12 V block: 6 cells
    assert estimate_charge(13.5, pack, rating) == 100.0
    assert estimate_charge(12.0, pack, rating) == pytest.approx(50.0)
    assert estimate_charge(10.5, pack, rating) == 0.0
    assert estimate_charge(12.0, pack, None) is None  # no F and no cell count: no guess
    assert estimate_charge(12.0, Battery("pack", cells=6), None) == pytest.approx(50.0)
    assert estimate_charge(2.0, cell, None) == pytest.approx(50.0)
    assert profiles.load("megatec", "generic", Profile).battery is None


# --- against the simulator ------------------------------------------------------------------------------------


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[tuple[PtyPair, MegatecSimulator]]:
    pair = PtyPair(tmp_path, "ups")
    pair.start()
    sim = MegatecSimulator(str(pair.device))
    sim.start()
    yield pair, sim
    sim.stop()
    pair.stop()


def device(port: Path | str, name: str = "ups1", **kw: object) -> Device:
    fields = {"interval": 0.3, "timeout": 0.5, "retries": 0, "profile": "pack-voltage", "options": Options()} | kw
    return Device(name=name, kind="ups", protocol="megatec", address=str(port), **fields)  # type: ignore[arg-type]


def test_poll_reads_the_simulated_ups(ups: tuple[PtyPair, MegatecSimulator]) -> None:
    pair, sim = ups
    acc, health = Recorder(), Health()
    c = MegatecCollector([device(pair.agent)], acc, health)

    async def go() -> None:
        await c.poll_once(c.devices[0])
        await c.close()

    asyncio.run(go())
    got = {r.metric: r.value for r in acc.readings}
    assert got["power_on_battery"] == 0.0 and got["ups_fault"] == 0.0 and got["device_online"] == 1.0
    assert got["input_voltage_volts"] == sim.state.input_voltage and got["ups_load_percent"] == sim.state.load_percent
    assert got["ups_charge_percent"] == 100.0  # 13.6 V on a 12 V block, cells from the F rating
    assert sim.commands == ["Q1", "F"]  # Q1 first: F and I (optional) only once the UPS has answered


Q1_ONLY_PROFILE = """description = "a unit that answers Q1 only: one 12 V block"
[battery]
reports = "pack"
[rating]
battery_voltage = 12.0
"""


def test_a_unit_that_ignores_f_and_i_is_polled_with_the_rating_from_its_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "megatec").mkdir()
    (tmp_path / "megatec" / "q1-only-12v.toml").write_text(Q1_ONLY_PROFILE, encoding="utf-8")
    monkeypatch.setenv("EXAMWATCH_PROFILES", str(tmp_path))
    with PtyPair(tmp_path, "ups") as pair:
        sim = MegatecSimulator(str(pair.device), lacks=("F", "I"))
        sim.start()
        acc, health = Recorder(), Health()
        c = MegatecCollector([device(pair.agent, profile="q1-only-12v", timeout=0.3)], acc, health)

        async def go() -> None:
            for _ in range(4):
                await c.poll_once(c.devices[0])
            await c.close()

        try:
            asyncio.run(go())
        finally:
            sim.stop()
    assert sim.commands == ["Q1", "F", "Q1", "I", "Q1", "Q1"]  # each optional command asked once, Q1 every poll
    h = health.devices["ups1"]
    assert h.online is True and h.polls == 4 and not h.errors
    assert acc.latest("ups1", "ups_charge_percent") == 100.0  # 13.6 V, 6 cells from the profile's 12 V rating
    assert acc.latest("ups1", "power_on_battery") == 0.0


def test_a_profile_rating_is_checked_like_any_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "megatec").mkdir()
    (tmp_path / "megatec" / "bad-rating.toml").write_text("[rating]\nbattery_voltage = -12.0\n", encoding="utf-8")
    monkeypatch.setenv("EXAMWATCH_PROFILES", str(tmp_path))
    with pytest.raises(profiles.ProfileError, match=r"rating\.battery_voltage"):
        MegatecCollector.load_profile("bad-rating")


def test_mode_flips_show_within_one_interval(ups: tuple[PtyPair, MegatecSimulator]) -> None:
    pair, sim = ups
    acc = Recorder()
    dev = device(pair.agent)
    c = MegatecCollector([dev], acc, Health())

    async def go() -> None:
        async with running(c):
            await acc.reaches("ups1", "power_on_battery", 0.0, 5)
            for mode, metric in [
                ("battery", "power_on_battery"),
                ("battery_low", "ups_battery_low"),
                ("fault", "ups_fault"),
            ]:
                sim.set_mode(mode)
                await acc.reaches("ups1", metric, 1.0, dev.interval + 1)
            assert acc.latest("ups1", "power_on_battery") == 0.0  # fault on line power
            sim.set_mode("line")
            await acc.reaches("ups1", "ups_fault", 0.0, dev.interval + 1)

    asyncio.run(go())


@pytest.mark.parametrize(("how", "reason"), [("garbage", "garbage"), ("truncated", "truncated"), ("silent", "timeout")])
def test_bad_answers_are_a_device_state_and_recover(
    ups: tuple[PtyPair, MegatecSimulator], how: str, reason: str
) -> None:
    pair, sim = ups
    acc, health = Recorder(), Health()
    c = MegatecCollector([device(pair.agent, timeout=0.3)], acc, health)

    async def go() -> None:
        await c.poll_once(c.devices[0])
        sim.misbehave(how)  # type: ignore[arg-type]
        await c.poll_once(c.devices[0])
        await c.poll_once(c.devices[0])
        assert health.devices["ups1"].online is False
        assert health.devices["ups1"].errors[reason] == 2
        assert acc.latest("ups1", "device_online") == 0.0
        sim.misbehave(None)
        await c.poll_once(c.devices[0])
        assert health.devices["ups1"].online is True and acc.latest("ups1", "device_online") == 1.0
        await c.close()

    asyncio.run(go())


def test_vanished_port_is_reopened(ups: tuple[PtyPair, MegatecSimulator]) -> None:
    pair, sim = ups
    acc, health = Recorder(), Health()
    dev = device(pair.agent)
    c = MegatecCollector([dev], acc, health)

    async def go() -> None:
        async with running(c):
            await acc.reaches("ups1", "device_online", 1.0, 5)
            pair.stop()  # the USB-serial adapter is pulled
            await wait_until(lambda: health.devices["ups1"].online is False, 5)
            assert {"port_lost", "port_unavailable"} & set(health.devices["ups1"].errors)
            await asyncio.to_thread(pair.start)  # and plugged back in
            sim.set_mode("battery")
            await acc.reaches("ups1", "power_on_battery", 1.0, 10)
            assert health.devices["ups1"].online is True

    asyncio.run(go())


def test_silent_ups_does_not_stall_another(ups: tuple[PtyPair, MegatecSimulator], tmp_path: Path) -> None:
    pair, _ = ups
    dead = PtyPair(tmp_path, "dead")  # a port nobody answers on
    dead.start()
    acc, health = Recorder(), Health()
    c = MegatecCollector([device(pair.agent), device(dead.agent, name="ups2", timeout=1.0, retries=1)], acc, health)

    try:
        run_for(c, 2.0)
    finally:
        dead.stop()
    h = health.devices["ups1"]
    assert h.online is True and h.polls >= 4 and not h.errors  # polled every 0.25 s while ups2 sat in its timeouts
    assert health.devices["ups2"].online is False and health.devices["ups2"].errors["timeout"] >= 1


def test_watched_closely_status_changes_are_told_at_once_the_rest_every_interval(
    ups: tuple[PtyPair, MegatecSimulator],
) -> None:
    """Q1 every 0.05 s, readings every 30 s: only the first poll and the changes of the status bits get out."""
    pair, sim = ups
    acc, health = Recorder(), Health()
    c = MegatecCollector([device(pair.agent, interval=30.0, options=Options(watch_interval=0.05))], acc, health)

    async def go() -> None:
        async with running(c):
            await wait_until(lambda: health.devices.get("ups1") and health.devices["ups1"].polls >= 10, 10, "10 polls")
            sim.set_mode("battery")
            await acc.reaches("ups1", "power_on_battery", 1.0, 10)  # long before the 30 s interval
            sim.set_mode("line")
            await acc.reaches("ups1", "power_on_battery", 0.0, 10)
            sim.state.input_voltage = 221.0  # not watched: waits for the interval
            polls = health.devices["ups1"].polls
            await wait_until(lambda: health.devices["ups1"].polls >= polls + 5, 10, "5 more polls")

    asyncio.run(go())
    told = [r.value for r in acc.readings if r.metric == "power_on_battery"]
    assert told == [0.0, 1.0, 0.0] and health.devices["ups1"].polls >= 17
    assert {r.value for r in acc.readings if r.metric == "input_voltage_volts"} == {230.0, 0.0}


def test_unknown_profile_is_a_device_state(ups: tuple[PtyPair, MegatecSimulator]) -> None:
    pair, _ = ups
    acc, health = Recorder(), Health()
    c = MegatecCollector([device(pair.agent, profile="no-such-model")], acc, health)
    asyncio.run(c.poll_once(c.devices[0]))
    assert health.devices["ups1"].errors["profile"] == 1


def test_config_check_reports_unknown_profile_and_missing_port() -> None:
    from examwatch.edge.config import ConfigError, loads

    with pytest.raises(ConfigError) as err:
        loads(
            '[agent]\nsite = "s"\nroom = "r"\n[[devices]]\nname = "ups1"\nkind = "ups"\nprotocol = "megatec"\n'
            'profile = "no-such-model"\nbaud = 2400\n'
        )
    text = str(err.value)
    assert "devices[0].profile" in text and "devices[0].address" in text


def test_mains_lost_raises_the_alarm_within_one_interval(ups: tuple[PtyPair, MegatecSimulator]) -> None:
    """Simulator -> collector -> the default rule pack: UPS on battery, then battery low, as alarms."""
    from examwatch.edge.config import loads

    pair, sim = ups
    sim.lacks = frozenset({"F", "I"})  # and a unit that answers Q1 only is watched all the same
    cfg = loads(
        '[agent]\nsite = "s1"\nroom = "r1"\n[[devices]]\nname = "ups1"\nkind = "ups"\nprotocol = "megatec"\n'
        f'address = "{pair.agent}"\nprofile = "pack-voltage"\ninterval = 0.3\ntimeout = 0.5\nretries = 0\n'
    )
    alarms = RulesRecorder(cfg)
    c = MegatecCollector(cfg.devices, alarms, Health())

    async def go() -> None:
        async with running(c):
            await asyncio.sleep(0.5)
            assert alarms.raised == []
            for mode, rule in [("battery", "ups_on_battery"), ("battery_low", "ups_battery_low")]:
                sim.set_mode(mode)  # type: ignore[arg-type]
                await wait_until(lambda r=rule: r in alarms.raised, cfg.devices[0].interval + 1, f"{rule} raised")

    asyncio.run(go())


def test_a_q1_only_ups_in_the_real_agent_raises_the_on_battery_alarm(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    """The whole path: a unit silent to F and I, `examwatch agent run`, its signed alarm on the county topic."""
    from examwatch.simulators.broker import free_port
    from tests.support.agent import Watcher, agent_toml, launch_agent

    with PtyPair(tmp_path, "ups") as pair:
        sim = MegatecSimulator(str(pair.device), lacks=("F", "I"))
        sim.start()
        watcher = Watcher(mosquitto.port)
        exporter = free_port()
        body = (
            f'[[devices]]\nname = "ups1"\nkind = "ups"\nprotocol = "megatec"\naddress = "{pair.agent}"\n'
            'profile = "pack-voltage"\ninterval = 1.0\ntimeout = 0.5\n'
        )
        path = tmp_path / "agent.toml"
        path.write_text(agent_toml(mosquitto.port, exporter, tmp_path / "state", body=body), encoding="utf-8")
        agent = launch_agent(path, exporter, mosquitto.port, ready=("agent_started",))
        try:
            assert until(lambda: agent.sample("examwatch_collector_success", device="ups1") == 1.0, 10)
            sim.set_mode("battery")
            got = watcher.wait(lambda e: e.rule == "ups_on_battery" and e.state == "raised", timeout=10)
            assert got is not None, agent.log
            assert got[1].device == "ups1" and got[1].value == 1.0
            assert agent.sample("examwatch_collector_success", device="ups1") == 1.0
        finally:
            agent.close()
            watcher.close()
            sim.stop()
    assert sim.commands.count("F") == 1 and sim.commands.count("I") == 1  # asked once, never again
