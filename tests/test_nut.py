"""NUT collector: pure parsing, then against Debian's real upsd with the dummy-ups driver."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fuzz_inputs import nut_lines
from examwatch.collectors import profiles
from examwatch.collectors.base import DeviceError, Health
from examwatch.collectors.nut import (
    NutCollector,
    NutError,
    NutOptions,
    Profile,
    _Connection,
    parse_address,
    parse_list_var,
    parse_nut,
)
from examwatch.edge.config import Device
from examwatch.simulators.nut import STATES, NutSimulator
from tests.support import Recorder, running


def device(address: str, interval: float = 0.5, profile: str = "", **options: str) -> Device:
    return Device(
        name="ups1", kind="ups", protocol="nut", address=address, interval=interval, timeout=1.0, retries=0,
        profile=profile, options=NutOptions(**options),
    )  # fmt: skip


def poll(dev: Device) -> tuple[Recorder, Health]:
    acc, health = Recorder(), Health()

    async def run() -> None:
        collector = NutCollector([dev], acc, health)
        await collector.poll_once(dev)
        await collector.close()

    asyncio.run(run())
    return acc, health


# --- pure ------------------------------------------------------------------------------------------------


def test_parse_list_var_unescapes_and_keeps_only_the_ups() -> None:
    lines = [
        'VAR ups1 ups.status "OB LB"',
        'VAR ups1 device.model "Smart \\"UPS\\" 1500 \\\\ RM"',
        'VAR other battery.charge "5"',
        "garbage line",
    ]
    assert parse_list_var(lines, "ups1") == {"ups.status": "OB LB", "device.model": 'Smart "UPS" 1500 \\ RM'}
    with pytest.raises(NutError) as err:
        parse_list_var(["ERR DATA-STALE"], "ups1")
    assert err.value.code == "DATA-STALE"


@pytest.mark.parametrize(
    "status, on",
    [
        ("OL", set()),
        ("OB DISCHRG", {"power_on_battery"}),
        ("OB LB FSD", {"power_on_battery", "ups_battery_low", "ups_shutdown_pending"}),
        ("OL BOOST", {"ups_bypass"}),
        ("OL CAL", {"ups_test_active"}),
        ("OL RB", {"ups_fault"}),
        ("OL ALARM OVER", {"ups_fault"}),
    ],
)
def test_status_flags(status: str, on: set[str]) -> None:
    readings, bad = parse_nut({"ups.status": status}, "u", 0.0)
    assert {r.metric for r in readings} == set(profiles.load("nut", "standard", Profile).status)
    assert {r.metric for r in readings if r.value == 1} == on and not bad


def test_non_numbers_are_reported_not_raised() -> None:
    readings, bad = parse_nut({"battery.charge": "n/a", "ups.load": "17"}, "u", 0.0)
    assert bad == ["battery.charge"] and [(r.metric, r.value) for r in readings] == [("ups_load_percent", 17.0)]


def test_nan_and_infinite_values_are_reported_not_read() -> None:
    # Found by bench/fuzz.py: float() takes "nan", "inf" and "1e900", and they became readings.
    variables = parse_list_var(
        [
            'VAR ups1 battery.charge "1e900"',
            'VAR ups1 ups.load "nan"',
            'VAR ups1 input.voltage "-inf"',
            'VAR ups1 output.voltage "230.0"',
        ],
        "ups1",
    )
    readings, bad = parse_nut(variables, "u", 0.0)
    assert sorted(bad) == ["battery.charge", "input.voltage", "ups.load"]
    assert [(r.metric, r.value) for r in readings] == [("output_voltage_volts", 230.0)]


def test_parse_address() -> None:
    assert parse_address("ups1@10.0.0.5") == ("ups1", "10.0.0.5", 3493)
    assert parse_address("myups@[::1]:3500") == ("myups", "::1", 3500)
    with pytest.raises(DeviceError):
        parse_address("10.0.0.5:3493")


# --- against upsd ----------------------------------------------------------------------------------------


@pytest.fixture
def nut(tmp_path: Path) -> Iterator[NutSimulator]:
    sim = NutSimulator(tmp_path, username="examwatch", password="s3cret")
    sim.start()
    yield sim
    sim.stop()


def test_values_match_what_upsd_serves(nut: NutSimulator) -> None:
    dev_text = nut.dev_file.read_text()
    served = dict(line.split(": ", 1) for line in dev_text.splitlines() if not line.startswith("#"))
    acc, health = poll(device(nut.address))
    assert acc.latest("ups1", "device_online") == 1
    assert acc.latest("ups1", "ups_charge_percent") == float(served["battery.charge"])
    assert acc.latest("ups1", "ups_runtime_seconds") == float(served["battery.runtime"])
    assert acc.latest("ups1", "input_voltage_volts") == float(served["input.voltage"])
    assert acc.latest("ups1", "output_voltage_volts") == float(served["output.voltage"])
    assert acc.latest("ups1", "ups_load_percent") == float(served["ups.load"])
    assert acc.latest("ups1", "input_frequency_hertz") == float(served["input.frequency"])
    assert acc.latest("ups1", "power_on_battery") == ("OB" in served["ups.status"].split())
    assert not health.dropped


def test_login_when_configured(nut: NutSimulator) -> None:
    acc, _ = poll(device(nut.address, username="examwatch", password="s3cret"))
    assert acc.latest("ups1", "device_online") == 1


def _flip(nut: NutSimulator, state: str, checks: dict[str, float]) -> None:
    acc, health = Recorder(), Health()
    dev = device(nut.address)

    async def run() -> None:
        async with running(NutCollector([dev], acc, health)):
            await acc.reaches("ups1", "device_online", 1, 10)
            nut.set_state(state)
            # dummy-ups re-reads its file once per second: one poll interval + 1 s for us, + 1 s for it.
            for metric, value in checks.items():
                await acc.reaches("ups1", metric, value, dev.interval + 1 + 1)

    asyncio.run(run())


def test_power_cut_then_low_battery_then_restored(nut: NutSimulator) -> None:
    _flip(
        nut, "on_battery", {"power_on_battery": 1, "input_voltage_volts": float(STATES["on_battery"]["input.voltage"])}
    )
    _flip(
        nut, "low_battery", {"ups_battery_low": 1, "ups_charge_percent": float(STATES["low_battery"]["battery.charge"])}
    )
    _flip(nut, "shutdown", {"ups_shutdown_pending": 1})
    _flip(nut, "online", {"power_on_battery": 0, "ups_battery_low": 0})


def test_unknown_ups_is_a_device_state(nut: NutSimulator) -> None:
    acc, health = poll(device(nut.address.replace("ups1@", "nosuch@")))
    assert acc.latest("ups1", "device_online") == 0
    assert health.devices["ups1"].errors["nut_error"] == 1


def test_garbage_value_is_counted_and_the_rest_kept(nut: NutSimulator) -> None:
    nut.set_raw("ups.status: OL\nbattery.charge: lots\nups.load: 21\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        acc, health = poll(device(nut.address))
        if acc.latest("ups1", "ups_load_percent") == 21:
            break
        time.sleep(0.2)
    assert acc.latest("ups1", "ups_charge_percent") is None
    assert health.dropped[("ups1", "bad_value")] == 1
    assert acc.latest("ups1", "device_online") == 1


def test_upsd_gone_and_back(nut: NutSimulator) -> None:
    acc, health = Recorder(), Health()
    dev = device(nut.address)

    async def run() -> None:
        collector = NutCollector([dev], acc, health)
        await collector.poll_once(dev)
        nut.stop()
        await collector.poll_once(dev)  # the kept connection is dead: a state, not an exception
        assert health.devices["ups1"].online is False
        nut.start()
        await collector.poll_once(dev)
        await collector.close()

    asyncio.run(run())
    assert [r.value for r in acc.readings if r.metric == "device_online"] == [1, 0, 1]
    assert sum(health.devices["ups1"].errors.values()) == 1


THREE_PHASE = (
    "ups.status: OB\ninput.L1-N.voltage: 0.0\noutput.L1-N.voltage: 229.5\noutput.L1.power.percent: 31\n"
    "battery.charge: 97\ninput.voltage: 999\n"
)


def test_a_three_phase_driver_is_read_by_its_profile(nut: NutSimulator) -> None:
    """Per-phase names: the three-phase profile reads phase L1; the default (standard names) does not."""
    nut.set_raw(THREE_PHASE)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        acc, _ = poll(device(nut.address, profile="three-phase"))
        if acc.latest("ups1", "output_voltage_volts") == 229.5:
            break
        time.sleep(0.2)
    assert acc.latest("ups1", "ups_load_percent") == 31 and acc.latest("ups1", "input_voltage_volts") == 0.0
    assert acc.latest("ups1", "power_on_battery") == 1 and acc.latest("ups1", "ups_charge_percent") == 97
    standard, _ = poll(device(nut.address))
    # dummy-ups keeps the variables it served before: the standard names still say 230 V, not phase L1's 229.5
    assert standard.latest("ups1", "input_voltage_volts") == 999
    assert standard.latest("ups1", "output_voltage_volts") != 229.5


def test_a_nut_profile_naming_no_catalog_metric_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from examwatch.edge.config import loads

    (tmp_path / "nut").mkdir()
    (tmp_path / "nut" / "typo.toml").write_text('[variables]\n"battery.charge" = "ups_charge_pct"\n', encoding="utf-8")
    monkeypatch.setenv("EXAMWATCH_PROFILES", str(tmp_path))
    profiles.load.cache_clear()
    text = '[agent]\nsite = "s"\nroom = "r"\n[[devices]]\nname = "u"\nkind = "ups"\nprotocol = "nut"\n'
    with pytest.raises(Exception, match="ups_charge_pct"):
        loads(text + 'address = "ups@h"\nprofile = "typo"\n')
    profiles.load.cache_clear()


# --- answers upsd does not give, from a scripted server -------------------------------------------------


def poll_twice(answer: bytes) -> tuple[Recorder, Health]:
    """Two polls on one kept connection to a server that answers every LIST VAR with ``answer``."""
    acc, health = Recorder(), Health()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline():
            writer.write(answer)
            await writer.drain()

    async def run() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        dev = device(f"ups1@127.0.0.1:{port}")
        collector = NutCollector([dev], acc, health)
        for _ in range(2):
            await collector.poll_once(dev)
        await collector.close()
        server.close()

    asyncio.run(run())
    return acc, health


@pytest.mark.parametrize(
    "answer",
    [
        b'BEGIN LIST VAR ups1\r\nVAR ups1 battery.charge "87"\r\nVAR ups1 ups.status "OL"\r\nEND LIST VAR ups1\r\n',
        b'BEGIN LIST VAR ups1\nVAR ups1 ups.alarm "END LIST VAR ups1"\nVAR ups1 battery.charge "87"\n'
        b'VAR ups1 ups.status "OL"\nEND LIST VAR ups1\n',
    ],
)
def test_whole_answer_read_whatever_its_line_ends_or_values(answer: bytes) -> None:
    acc, health = poll_twice(answer)
    assert [r.value for r in acc.readings if r.metric == "ups_charge_percent"] == [87, 87]
    assert health.devices["ups1"].polls == 2 and health.devices["ups1"].online is True


def test_empty_list_is_read_as_no_status() -> None:
    acc, health = poll_twice(b"BEGIN LIST VAR ups1\nEND LIST VAR ups1\n")
    assert [r.value for r in acc.readings if r.metric == "device_online"] == [1, 1]
    assert health.dropped[("ups1", "no_status")] == 2


def test_endless_answer_is_a_connection_state() -> None:
    line = b'VAR ups1 ups.alarm "' + b"x" * 1000 + b' END LIST VAR ups1"\n'
    acc, health = poll_twice(b"BEGIN LIST VAR ups1\n" + line * 300 + b"END LIST VAR ups1\n")
    assert [r.value for r in acc.readings if r.metric == "device_online"] == [0, 0]
    assert health.devices["ups1"].errors["connection"] == 2


def _list_var_by_regex(lines: list[str], ups: str) -> dict[str, str]:
    """parse_list_var as it was: every line through the regex (the reference for its plain-line fast path)."""
    import re

    from examwatch.collectors.nut import _VAR

    out = {}
    for line in lines:
        if line.startswith("ERR "):
            raise NutError(line[4:].split()[0] if line[4:].split() else "UNKNOWN")
        m = _VAR.fullmatch(line)
        if m and m.group(1) == ups:
            out[m.group(2)] = re.sub(r"\\(.)", r"\1", m.group(3))
    return out


@settings(max_examples=500, deadline=None)
@given(nut_lines(), st.sampled_from(["ups1", "ups2"]))
def test_plain_lines_read_without_the_regex_read_as_with_it(text: str, ups: str) -> None:
    lines = text.split("\n")
    try:
        expected: dict[str, str] | NutError = _list_var_by_regex(lines, ups)
    except NutError as err:
        expected = err
    if isinstance(expected, NutError):
        with pytest.raises(NutError) as got:
            parse_list_var(lines, ups)
        assert got.value.code == expected.code
    else:
        assert parse_list_var(lines, ups) == expected


class _Wire:
    """The socket's side a ``_Connection`` sees: what it sends, kept; what it receives, in the pieces given."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.sent = b""
        self.pieces = pieces
        self.at = 0

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def recv(self, size: int) -> bytes:
        piece = self.pieces[self.at % len(self.pieces)]  # the next answer comes in the same pieces
        self.at += 1
        assert len(piece) <= size
        return piece


SPLIT_ANSWER = (
    b'BEGIN LIST VAR ups1\nVAR ups1 ups.alarm "END LIST VAR ups1"\nVAR ups1 battery.charge "87"\nEND LIST VAR ups1\n'
)


@settings(max_examples=300, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=len(SPLIT_ANSWER.replace(b"\n", b"\r\n")) - 1), max_size=10),
    crlf=st.booleans(),
)
def test_an_answer_split_anywhere_across_reads_is_read_whole(cuts: list[int], crlf: bool) -> None:
    """upsd's answer arrives in TCP segments cut anywhere (inside the end line, between its CR and LF): the
    answer is the same lines, and the next answer on the kept connection starts clean."""
    answer = SPLIT_ANSWER.replace(b"\n", b"\r\n") if crlf else SPLIT_ANSWER
    bounds = sorted({c for c in cuts if c < len(answer)} | {0, len(answer)})
    pieces = [answer[a:b] for a, b in itertools.pairwise(bounds)]

    wire = _Wire(pieces)
    conn = _Connection(wire)
    got = [conn.ask("LIST VAR ups1", time.monotonic() + 60, end="END LIST VAR ups1") for _ in range(2)]
    assert wire.sent == b"LIST VAR ups1\n" * 2

    expected = ["BEGIN LIST VAR ups1", 'VAR ups1 ups.alarm "END LIST VAR ups1"', 'VAR ups1 battery.charge "87"']
    assert got == [expected, expected]


def test_an_answer_that_trickles_in_forever_ends_in_a_timeout() -> None:
    """A server (or a hostile peer) that keeps the connection busy with a byte now and then never holds the
    device's thread: each read is bounded by the timeout, and so is the whole answer."""
    health = Health()
    outcome: list[BaseException] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"BEGIN LIST VAR ups1\n")
        while True:  # never the end line
            writer.write(b"V")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def run() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        dev = device(f"ups1@127.0.0.1:{server.sockets[0].getsockname()[1]}")
        collector = NutCollector([dev], Recorder(), health)

        def poll() -> None:
            try:
                collector.poll_blocking(dev)
            except DeviceError as err:
                outcome.append(err)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        await asyncio.to_thread(thread.join, 30)  # without the bound: forever
        assert not thread.is_alive()
        await collector.close()
        server.close()

    asyncio.run(run())
    assert [e.reason for e in outcome if isinstance(e, DeviceError)] == ["timeout"]
