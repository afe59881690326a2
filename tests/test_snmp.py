"""SNMP collector: pure profile logic, then the real thing against snmpsim serving snmpsim-data recordings.

Expected values are computed from the .snmprec recordings in the test, never restated by hand.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from examwatch.collectors import profiles
from examwatch.collectors.base import Health
from examwatch.collectors.snmp import (
    Expression,
    Profile,
    SnmpCollector,
    SnmpOptions,
    compile_profile,
    parse_snmp,
    profile_named,
)
from examwatch.edge.config import Device
from examwatch.simulators.snmp import (
    HIK_DISK,
    HR_FIXED_DISK,
    HR_STORAGE,
    IF_ADMIN,
    IF_OPER,
    MODELS,
    UPS_MIB,
    V3_AUTH_KEY,
    V3_PRIV_KEY,
    V3_USER,
    XUPS,
    SnmpSimulator,
    column,
    first_port_up,
    value_of,
)
from tests.support import Recorder, run_for, running


def _oid(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def device(
    name: str,
    address: str,
    profile: str,
    interval: float = 0.5,
    timeout: float = 1.0,
    retries: int = 0,
    **options: object,
) -> Device:
    return Device(
        name=name, kind="ups", protocol="snmp", address=address, profile=profile,
        interval=interval, timeout=timeout, retries=retries, options=SnmpOptions(**options),  # type: ignore[arg-type]
    )  # fmt: skip


def poll(*devices: Device) -> tuple[Recorder, Health]:
    acc, health = Recorder(), Health()

    async def run() -> None:
        collector = SnmpCollector(list(devices), acc, health)
        for d in devices:
            await collector.poll_once(d)

    asyncio.run(run())
    return acc, health


# --- pure ------------------------------------------------------------------------------------------------


def test_expressions_allow_arithmetic_and_comparisons_only() -> None:
    assert Expression("(size - used) * units")({"size": 10, "used": 4, "units": 4096}) == 24576
    assert Expression("source in (4, 6, 7)")({"source": 6}) is True
    assert Expression("num(x) / 100")({"x": "52 PERCENT"}) == 0.52
    for bad in ("x.__class__", "open('f')", "[i for i in x]", "x[0]", "lambda: 1", "__import__('os')"):
        with pytest.raises(ValueError):
            Expression(bad)


def test_every_builtin_profile_compiles() -> None:
    names = profiles.names("snmp")
    assert {"ups-mib", "eaton-xups", "if-mib", "host-resources-storage", "hikvision-nvr", "hikvision-camera"} <= set(
        names
    )
    for name in names:
        assert profile_named(name).metrics or profile_named(name).tables


def test_profile_errors_are_all_reported_at_once() -> None:
    bad = Profile(
        scalars={"a": "1.3.6.1.2.1.33.1.2.4.0", "b": "not-an-oid"},
        metrics={"ups_charge_percent": "a + c", "no_such_metric": "a", "ups_load_percent": "a.real"},
    )
    with pytest.raises(profiles.ProfileError) as err:
        compile_profile("bad", bad)
    text = str(err.value)
    assert "not-an-oid" in text and "unknown name(s) c" in text and "no_such_metric" in text and "Attribute" in text


def test_parse_marks_missing_inputs_and_keeps_the_rest() -> None:
    p = profile_named("ups-mib")
    rec = SnmpSimulator(Path("/nonexistent"), {"ups": "ups"}).recording("ups")
    values = {_oid(o): value_of(rec, o) for o in rec}
    charge_oid = _oid(f"{UPS_MIB}.2.4.0")
    values[charge_oid] = None  # noSuchInstance
    parsed = parse_snmp(p, "ups1", values, 0.0)
    metrics = {r.metric for r in parsed.readings}
    assert "ups_charge_percent" not in metrics and "ups_charge_percent" in parsed.missing
    assert {"power_on_battery", "ups_runtime_seconds", "input_voltage_volts"} <= metrics


def test_parse_filters_parts_and_rows() -> None:
    rec = SnmpSimulator(Path("/nonexistent"), {"sw": "switch"}).recording("sw")
    values = {_oid(o): value_of(rec, o) for o in rec}
    port = first_port_up(rec)
    parsed = parse_snmp(profile_named("if-mib"), "sw", values, 0.0, parts=[f"port{port}"])
    assert {r.device for r in parsed.readings} == {f"sw/port{port}"}


# --- against snmpsim ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snmpsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SnmpSimulator]:
    """One snmpsim for the module; tests that change a device's state put it back."""
    sim = SnmpSimulator(tmp_path_factory.mktemp("snmpsim"))
    sim.start()
    yield sim
    sim.stop()


def test_ups_mib_values_match_the_recording(snmpsim: SnmpSimulator) -> None:
    rec = snmpsim.recording("ups")
    acc, health = poll(device("ups", snmpsim.address, "ups-mib", community="ups"))
    got = acc.of("ups")
    assert got["device_online"] == 1
    assert got["ups_charge_percent"] == value_of(rec, f"{UPS_MIB}.2.4.0")
    assert got["ups_runtime_seconds"] == 60 * value_of(rec, f"{UPS_MIB}.2.3.0")  # type: ignore[operator]
    assert got["input_voltage_volts"] == value_of(rec, f"{UPS_MIB}.3.3.1.3.1")
    assert got["output_voltage_volts"] == value_of(rec, f"{UPS_MIB}.4.4.1.2.1")
    assert got["ups_load_percent"] == value_of(rec, f"{UPS_MIB}.4.4.1.5.1")
    assert got["input_frequency_hertz"] == value_of(rec, f"{UPS_MIB}.3.3.1.2.1") / 10  # type: ignore[operator]
    assert got["power_on_battery"] == (value_of(rec, f"{UPS_MIB}.4.1.0") == 5)
    assert got["ups_battery_low"] == (value_of(rec, f"{UPS_MIB}.2.1.0") in (3, 4))
    assert got["ups_alarms_present"] == value_of(rec, f"{UPS_MIB}.6.1.0")
    assert not health.dropped


def test_v3_sha_aes_reads_the_same_values(snmpsim: SnmpSimulator) -> None:
    rec = snmpsim.recording("ups")
    acc, _ = poll(
        device("ups", snmpsim.address, "ups-mib", version="3", user=V3_USER, auth_protocol="SHA",
               auth_key=V3_AUTH_KEY, priv_protocol="AES", priv_key=V3_PRIV_KEY, context="ups")
    )  # fmt: skip
    assert acc.of("ups")["device_online"] == 1
    assert acc.of("ups")["ups_charge_percent"] == value_of(rec, f"{UPS_MIB}.2.4.0")


def test_v3_wrong_key_is_a_device_state(snmpsim: SnmpSimulator) -> None:
    acc, health = poll(
        device("ups", snmpsim.address, "ups-mib", version="3", user=V3_USER, auth_key="wrong-key-123",
               priv_key=V3_PRIV_KEY, context="ups")
    )  # fmt: skip
    assert acc.of("ups") == {"device_online": 0}
    assert health.devices["ups"].online is False and sum(health.devices["ups"].errors.values()) == 1


def test_eaton_xups_values_match_the_recording(snmpsim: SnmpSimulator) -> None:
    rec = snmpsim.recording("ups-xups")
    acc, _ = poll(device("eaton", snmpsim.address, "eaton-xups", community="ups-xups"))
    got = acc.of("eaton")
    assert got["ups_charge_percent"] == value_of(rec, f"{XUPS}.2.4.0")
    assert got["ups_runtime_seconds"] == value_of(rec, f"{XUPS}.2.1.0")
    assert got["input_voltage_volts"] == value_of(rec, f"{XUPS}.3.4.1.2.1")
    assert got["ups_load_percent"] == value_of(rec, f"{XUPS}.4.1.0")
    assert got["power_on_battery"] == (value_of(rec, f"{XUPS}.4.5.0") == 5)


def test_switch_ports_match_the_recording(snmpsim: SnmpSimulator) -> None:
    rec = snmpsim.recording("switch")
    acc, _ = poll(device("sw", snmpsim.address, "if-mib", community="switch"))
    admin, oper = column(rec, IF_ADMIN), column(rec, IF_OPER)
    in_err, out_err = column(rec, "1.3.6.1.2.1.2.2.1.14"), column(rec, "1.3.6.1.2.1.2.2.1.20")
    watched = [i for i, a in admin.items() if a == "1"]
    assert watched
    for i in watched:
        assert acc.latest(f"sw/port{i}", "link_up") == (oper[i] == "1")
        assert acc.latest(f"sw/port{i}", "link_errors") == int(in_err[i]) + int(out_err[i])
    assert {r.device for r in acc.readings} == {"sw"} | {f"sw/port{i}" for i in watched}


def test_nvr_disks_match_the_recording(snmpsim: SnmpSimulator) -> None:
    rec = snmpsim.recording("nvr")
    acc, _ = poll(device("nvr1", snmpsim.address, "hikvision-nvr", community="nvr"))
    for index, capacity in column(rec, f"{HIK_DISK}.5").items():
        part = f"nvr1/disk{index.split('.')[0]}"
        free = int(column(rec, f"{HIK_DISK}.4")[index])
        assert acc.latest(part, "storage_total_bytes") == int(capacity) * 2**20
        assert acc.latest(part, "storage_free_bytes") == free * 2**20
        assert acc.latest(part, "storage_used_ratio") == pytest.approx(1 - free / int(capacity))
        assert acc.latest(part, "storage_ok") == (column(rec, f"{HIK_DISK}.3")[index] == "0")


def test_camera_host_resources_storage_matches_the_recording(snmpsim: SnmpSimulator) -> None:
    rec = snmpsim.recording("camera")
    acc, _ = poll(device("cam1", snmpsim.address, "host-resources-storage", community="camera"))
    types, units = column(rec, f"{HR_STORAGE}.2"), column(rec, f"{HR_STORAGE}.4")
    sizes, used = column(rec, f"{HR_STORAGE}.5"), column(rec, f"{HR_STORAGE}.6")
    fixed = [i for i, t in types.items() if t == HR_FIXED_DISK and int(sizes[i]) > 0]
    assert fixed
    for i in fixed:
        assert acc.latest(f"cam1/storage{i}", "storage_total_bytes") == int(sizes[i]) * int(units[i])
        assert acc.latest(f"cam1/storage{i}", "storage_free_bytes") == (int(sizes[i]) - int(used[i])) * int(units[i])
    assert {r.device for r in acc.readings} == {"cam1"} | {f"cam1/storage{i}" for i in fixed}


def _flip(sim: SnmpSimulator, dev: Device, community: str, state: str, checks: list[tuple[str, str, float]]) -> None:
    """Run the collector loop, flip the simulator, expect every (device, metric, value) within interval + 1 s."""
    acc, health = Recorder(), Health()

    async def run() -> None:
        async with running(SnmpCollector([dev], acc, health)):
            await acc.reaches(dev.name, "device_online", 1, 10)
            sim.set_state(community, state)
            for part, metric, value in checks:
                await acc.reaches(part, metric, value, dev.interval + 1)

    try:
        asyncio.run(run())
    finally:
        sim.set_state(community, "recorded")


def test_ups_to_battery_within_one_interval(snmpsim: SnmpSimulator) -> None:
    assert value_of(snmpsim.recording("ups"), f"{UPS_MIB}.4.1.0") != 5  # the recording is on mains
    _flip(snmpsim, device("ups", snmpsim.address, "ups-mib", community="ups"), "ups", "on_battery",
          [("ups", "power_on_battery", 1), ("ups", "input_voltage_volts", 0)])  # fmt: skip


def test_ups_charge_under_threshold_within_one_interval(snmpsim: SnmpSimulator) -> None:
    low = MODELS["ups"].variants["low_charge"](snmpsim.recording("ups"))
    _flip(snmpsim, device("ups", snmpsim.address, "ups-mib", community="ups"), "ups", "low_charge",
          [("ups", "ups_charge_percent", int(low[f"{UPS_MIB}.2.4.0"][1])), ("ups", "ups_battery_low", 1)])  # fmt: skip


def test_eaton_to_battery_within_one_interval(snmpsim: SnmpSimulator) -> None:
    _flip(snmpsim, device("eaton", snmpsim.address, "eaton-xups", community="ups-xups"), "ups-xups", "on_battery",
          [("eaton", "power_on_battery", 1)])  # fmt: skip


def test_switch_port_down_within_one_interval(snmpsim: SnmpSimulator) -> None:
    port = first_port_up(snmpsim.recording("switch"))
    _flip(snmpsim, device("sw", snmpsim.address, "if-mib", community="switch"), "switch", "link_down",
          [(f"sw/port{port}", "link_up", 0)])  # fmt: skip


def test_nvr_disk_full_and_failed_within_one_interval(snmpsim: SnmpSimulator) -> None:
    dev = device("nvr1", snmpsim.address, "hikvision-nvr", community="nvr")
    _flip(
        snmpsim,
        dev,
        "nvr",
        "disk_full",
        [("nvr1/disk1", "storage_free_bytes", 0), ("nvr1/disk1", "storage_used_ratio", 1)],
    )
    _flip(snmpsim, dev, "nvr", "disk_failed", [("nvr1/disk1", "storage_ok", 0)])


def test_camera_disk_full_within_one_interval(snmpsim: SnmpSimulator) -> None:
    rec = snmpsim.recording("camera")
    fixed = next(i for i, t in column(rec, f"{HR_STORAGE}.2").items() if t == HR_FIXED_DISK)
    _flip(snmpsim, device("cam1", snmpsim.address, "host-resources-storage", community="camera"), "camera", "disk_full",
          [(f"cam1/storage{fixed}", "storage_used_ratio", 1)])  # fmt: skip


def test_no_such_object_everywhere_is_a_device_state(snmpsim: SnmpSimulator) -> None:
    acc, health = poll(device("sw", snmpsim.address, "ups-mib", community="switch"))  # a switch has no UPS-MIB
    assert acc.of("sw") == {"device_online": 0}
    assert health.devices["sw"].errors["no_such_object"] == 1


def test_some_objects_missing_drops_only_those(
    snmpsim: SnmpSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "snmp"
    folder.mkdir()
    builtin = (profiles.BUILTIN / "snmp" / "ups-mib.toml").read_text()
    folder.joinpath("ups-mib-extra.toml").write_text(
        builtin.replace("[metrics]", 'missing = "1.3.6.1.2.1.33.1.9.99.0"\n\n[metrics]\nups_fault = "missing"')
    )
    monkeypatch.setenv("EXAMWATCH_PROFILES", str(tmp_path))
    acc, health = poll(device("ups", snmpsim.address, "ups-mib-extra", community="ups"))
    got = acc.of("ups")
    assert got["device_online"] == 1 and "ups_charge_percent" in got and "ups_fault" not in got
    assert health.dropped[("ups", "no_such_object")] == 1


def _blackhole() -> tuple[socket.socket, str]:
    """A UDP port that is bound (so no ICMP unreachable) but never answers: a dead SNMP card."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s, f"127.0.0.1:{s.getsockname()[1]}"


def test_timeout_is_a_device_state(snmpsim: SnmpSimulator) -> None:
    hole, address = _blackhole()
    with hole:
        acc, health = poll(device("dead", address, "ups-mib", timeout=0.3, retries=1))
    assert acc.of("dead") == {"device_online": 0}
    assert health.devices["dead"].errors["timeout"] == 1


def test_slow_device_does_not_delay_another(snmpsim: SnmpSimulator) -> None:
    """One collector, two devices: the dead one times out every poll, the live one keeps its interval."""
    hole, address = _blackhole()
    live = device("ups", snmpsim.address, "ups-mib", interval=0.3, community="ups")
    dead = device("dead", address, "ups-mib", interval=0.3, timeout=2.0, retries=1)
    acc, health = Recorder(), Health()

    with hole:
        run_for(SnmpCollector([live, dead], acc, health), 3.0)
    # The dead device's first poll takes 4 s (2 s x 2 tries); meanwhile the live one polls every 0.3 s.
    assert health.devices["ups"].polls >= 5
    assert health.devices["ups"].online is True
    assert health.devices.get("dead") is None or health.devices["dead"].online is not True


def test_unresolvable_address_is_a_device_state() -> None:
    acc, health = poll(device("ups", "no-such-host.invalid", "ups-mib"))
    assert acc.of("ups") == {"device_online": 0}
    assert health.devices["ups"].errors["config"] == 1


def test_unknown_profile_is_a_device_state(snmpsim: SnmpSimulator) -> None:
    acc, health = poll(device("ups", snmpsim.address, "no-such-profile", community="ups"))
    assert acc.of("ups") == {"device_online": 0}
    assert health.devices["ups"].errors["profile"] == 1
