"""Serial UPSes speaking the Megatec/Q1 protocol (most small UPSes with only an RS232 port).

The agent writes ``Q1\\r`` and the UPS answers one line::

    (MMM.M NNN.N PPP.P QQQ RR.R S.SS TT.T b7b6b5b4b3b2b1b0\\r
     input  fault  output load freq batt  temp status bits

``F\\r`` gives the nominal ratings (``#MMM.M QQQ SS.SS RR.R``) and ``I\\r`` the identity
(``#company model version``). Both are optional (many units answer Q1 only, as NUT knows): each is asked
once after the port opens, after a Q1 answer proved the UPS is there, one per poll so a silent one costs a
single timeout; without F the rating comes from the profile. The battery voltage is either per cell or per
pack depending on the model, so estimating the charge from it is the profile's business.

pyserial runs on the UPS's own thread (``collectors/blocking.py``). A timeout returns nothing or half a
line (a device state, not an exception); a port that vanished (USB adapter pulled) raises
``SerialException``: the port is closed and reopened with a growing backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import termios
import threading
import time
from typing import Annotated, Any, Literal

import msgspec
import serial
import structlog

from examwatch.collectors.base import Backoff, DeviceError, register
from examwatch.collectors.blocking import BlockingPollingCollector, retry_blocking
from examwatch.kernel.config import Strict
from examwatch.kernel.model import Reading

log = structlog.get_logger("examwatch.collector.megatec")


# --- profiles ---------------------------------------------------------------------------------------------


Nominal = Annotated[float, msgspec.Meta(ge=0, le=10_000)]  # a rating's fields: finite, never negative


class Battery(Strict):
    """How to turn Q1's battery voltage into a charge estimate (a straight line between empty and full)."""

    reports: Literal["cell", "pack"]  # Q1's S.SS is per cell (e.g. 2.25) or for the whole pack (e.g. 27.0)
    cell_volts_empty: float = 1.75
    cell_volts_full: float = 2.25
    cells: int = 0  # cells in the pack; 0: nominal battery voltage from ``F`` / 2 V per cell


class Rating(Strict):
    """The nominal ratings: what ``F`` answers, or the profile's ``[rating]`` for a unit without F."""

    voltage: Nominal = 0.0
    current: Nominal = 0.0
    battery_voltage: Nominal = 0.0  # the pack's nominal voltage, e.g. 12.0 or 24.0 (cells: battery_voltage / 2)
    frequency: Nominal = 0.0


class Profile(Strict):
    description: str = ""
    battery: Battery | None = None  # none: the model's battery voltage says nothing reliable about charge
    rating: Rating | None = None  # for units that do not answer F (NUT's default.* values); F wins if answered


# Q1 every WATCH seconds: mains loss is seen at a median of WATCH / 2 plus the ~0.2 s a Q1 answer takes at
# 2400 baud (bench/ups_detect.py); all readings still go out every ``interval``, changes of the status bits
# at once (``watched``), so the store and the uplink carry no more than before.
WATCH = 0.25


class Options(Strict):
    baud: Annotated[int, msgspec.Meta(ge=300, le=115200)] = 2400  # Megatec is 2400 8N1; a few models use 9600
    watch_interval: Annotated[float, msgspec.Meta(ge=0.05, le=86400)] = WATCH  # seconds between Q1 requests


# --- pure parsing -----------------------------------------------------------------------------------------

# Fields are fixed-width (MMM.M, S.SS): bounding the digits keeps every value finite and in range, so a
# line garbled into 400 nines is garbage, not an infinite voltage.
_NUM = r"(\d{1,4}(?:\.\d{1,3})?)"
_Q1 = re.compile(rf"\({_NUM} {_NUM} {_NUM} {_NUM} {_NUM} {_NUM} (-?\d{{1,4}}(?:\.\d{{1,3}})?|-[-.]*) ([01]{{8}})\r")
_F = re.compile(rf"#{_NUM} +{_NUM} +{_NUM} +{_NUM}\r?")


class Status(msgspec.Struct, frozen=True):
    input_voltage: float
    input_fault_voltage: float
    output_voltage: float
    load_percent: float
    input_frequency: float
    battery_voltage: float
    temperature: float | None
    utility_fail: bool  # b7: on battery
    battery_low: bool  # b6
    bypass_boost: bool  # b5: bypass or AVR boost/buck active
    ups_failed: bool  # b4
    standby_type: bool  # b3: 1 line-interactive/standby, 0 on-line
    test_in_progress: bool  # b2
    shutdown_active: bool  # b1
    beeper_on: bool  # b0


def parse_q1(line: bytes) -> Status:
    """One Q1 answer -> Status; anything else -> DeviceError (``truncated`` or ``garbage``)."""
    text = line.decode("ascii", errors="replace").strip("\x00\n")
    m = _Q1.fullmatch(text)
    if m is None:
        if not text.endswith("\r"):
            raise DeviceError("truncated", f"incomplete Q1 answer {text[:60]!r}")
        raise DeviceError("garbage", f"not a Q1 answer: {text[:60]!r}")
    vin, vfault, vout, load, freq, vbat = (float(g) for g in m.groups()[:6])
    temp = m.group(7)
    bits = [c == "1" for c in m.group(8)]
    celsius = None if temp.startswith("--") or temp == "-" else float(temp)  # "--.-": no sensor
    return Status(vin, vfault, vout, load, freq, vbat, celsius, *bits)


def parse_f(line: bytes) -> Rating:
    text = line.decode("ascii", errors="replace").strip("\x00\n")
    m = _F.fullmatch(text)
    if m is None:
        raise DeviceError("garbage", f"not an F answer: {text[:60]!r}")
    return Rating(*(float(g) for g in m.groups()))


def parse_i(line: bytes) -> str:
    """Identity (``#company(15) model(10) version(10)``), whitespace squeezed; '' if the UPS has none."""
    text = line.decode("ascii", errors="replace").strip("\x00\r\n")
    return " ".join(text[1:].split()) if text.startswith("#") else ""


def estimate_charge(volts: float, battery: Battery, rating: Rating | None) -> float | None:
    """Charge in percent from the battery voltage, or None when the cell count cannot be known."""
    if battery.reports == "cell":
        per_cell = volts
    else:
        cells = battery.cells or (round(rating.battery_voltage / 2.0) if rating and rating.battery_voltage else 0)
        if not cells:
            return None
        per_cell = volts / cells
    span = battery.cell_volts_full - battery.cell_volts_empty
    return max(0.0, min(100.0, (per_cell - battery.cell_volts_empty) / span * 100.0))


def readings_from(device: str, s: Status, profile: Profile, rating: Rating | None, now: float) -> list[Reading]:
    values = {
        "input_voltage_volts": s.input_voltage,
        "output_voltage_volts": s.output_voltage,
        "ups_load_percent": s.load_percent,
        "input_frequency_hertz": s.input_frequency,
        "power_on_battery": float(s.utility_fail),
        "ups_battery_low": float(s.battery_low),
        "ups_bypass": float(s.bypass_boost),
        "ups_fault": float(s.ups_failed),
        "ups_test_active": float(s.test_in_progress),
        "ups_shutdown_pending": float(s.shutdown_active),
    }
    if profile.battery is not None:
        charge = estimate_charge(s.battery_voltage, profile.battery, rating)
        if charge is not None:
            values["ups_charge_percent"] = round(charge, 1)
    return [Reading(device, metric, value, now) for metric, value in values.items()]


# --- I/O --------------------------------------------------------------------------------------------------


class _Port:
    """One serial port, used from worker threads one request at a time; reopened with backoff."""

    def __init__(self, path: str, baud: int, timeout: float) -> None:
        self.path, self.baud, self.timeout = path, baud, timeout
        self.serial: serial.Serial | None = None
        self.lock = threading.Lock()
        self.backoff = Backoff()
        self.optional: list[bytes] = []  # F and I, still to ask since the port opened (one per poll)
        self.rating: Rating | None = None
        self.identity = ""

    def ask(self, command: bytes) -> bytes:
        """Send one command, return what came back up to and including ``\\r`` (maybe less on timeout)."""
        with self.lock:
            port = self._open()
            try:
                port.reset_input_buffer()  # leftovers of an earlier garbled or late answer
                port.write(command + b"\r")
                return port.read_until(b"\r", 128)
            except (serial.SerialException, OSError, termios.error) as err:  # tcflush on a dead pty: termios.error
                self._lost(err)
                raise DeviceError("port_lost", str(err)) from None

    def _open(self) -> serial.Serial:
        if self.serial is not None:
            return self.serial
        if self.backoff.waiting():
            raise DeviceError("port_unavailable", f"{self.path}: retrying in {self.backoff.waiting():.0f}s")
        try:
            self.serial = serial.Serial(self.path, self.baud, timeout=self.timeout, write_timeout=self.timeout)
        except (serial.SerialException, OSError) as err:
            self._lost(err)
            raise DeviceError("port_unavailable", str(err)) from None
        self.backoff.succeeded()
        self.optional = [b"F", b"I"]
        return self.serial

    def _lost(self, err: Exception) -> None:
        if self.serial is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                self.serial.close()
            self.serial = None
        self.backoff.failed()

    def close(self) -> None:
        with self.lock:
            if self.serial is not None:
                self.serial.close()
                self.serial = None


@register
class MegatecCollector(BlockingPollingCollector):
    protocol = "megatec"
    Options = Options
    needs_address = 'a serial UPS needs address = "/dev/serial/by-id/..."'
    profile_schema = Profile
    default_profile = "generic"
    uses_serial_port = True
    watched = frozenset(
        {"power_on_battery", "ups_battery_low", "ups_fault", "ups_bypass", "ups_test_active", "ups_shutdown_pending"}
    )
    reasons = {
        "port_unavailable": "串口打不开",
        "port_lost": "串口断开",
        "garbage": "应答无法解析",
        "truncated": "应答不完整",
    }
    sample = """
[[devices]]                     # example: a UPS with only an RS232 port (Megatec/Q1, 2400 8N1)
name = "ups3"
kind = "ups"
protocol = "megatec"
address = "/dev/serial/by-id/usb-Prolific_Technology_Inc._USB-Serial_Controller-if00-port0"
profile = "pack-voltage"
interval = 5.0                  # all readings every 5 s; a change of the status bits at once
watch_interval = 0.25           # Q1 every 0.25 s: mains loss reaches the county in < 0.5 s
timeout = 1.0
"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ports: dict[str, _Port] = {}

    def watch_interval(self, device: Any) -> float:
        return min(device.interval, device.options.watch_interval)

    def poll_blocking(self, device: Any) -> list[Reading]:
        profile: Profile = self.profile(device)
        port = self._ports.get(device.name)
        if port is None:
            port = self._ports[device.name] = _Port(device.address, device.options.baud, device.timeout)
        # a lost or unopenable port is not asked again: the backoff decides when to reopen it
        status = retry_blocking(lambda: self._status(port), device.retries + 1, final=("port_lost", "port_unavailable"))
        if port.optional:  # the UPS answered Q1: now F or I, whose silence only means the model lacks it
            self._ask_optional(device.name, port, profile)
        return readings_from(device.name, status, profile, port.rating or profile.rating, time.time())

    @staticmethod
    def _status(port: _Port) -> Status:
        line = port.ask(b"Q1")
        if not line:
            raise DeviceError("timeout", f"no answer to Q1 within {port.timeout}s")
        return parse_q1(line)

    @staticmethod
    def _ask_optional(name: str, port: _Port, profile: Profile) -> None:
        """Ask the next of F and I, once per opened port; no answer, an echo or garbage is no error."""
        command = port.optional.pop(0)
        line = port.ask(command)
        if command == b"F":
            try:
                port.rating = parse_f(line)
            except DeviceError:  # silent, or an echo: the model lacks F
                port.rating = None
                log.info("ups_lacks_rating", device=name, answer=line[:40], rating_from_profile=profile.rating)
        else:
            log.info("ups_identified", device=name, identity=parse_i(line) or "(none)", rating=port.rating)

    async def close(self) -> None:
        for port in self._ports.values():
            await asyncio.to_thread(port.close)
