"""RS485 noise meters over Modbus RTU (pymodbus async serial client).

Meters differ only in data: serial settings, slave address, register, function code (3 holding or
4 input), data type and scale, so each model is a profile ``collectors/profiles/modbus/<name>.toml``.
Several meters can share one RS485 bus (one port): they share one client and take turns.

pymodbus drops an answer whose CRC does not match and reports only "no response"; we keep the raw
bytes of each exchange (``trace_packet``) to tell a CRC error (noise on the line, wrong termination)
from silence (wrong address or baud rate, cable cut): two different repairs for the technician.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from typing import Annotated, Any, Literal

import msgspec
from pymodbus import ModbusException
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.framer import FramerRTU, FramerType

from examwatch.collectors.base import DeviceError, PollingCollector, register, retry
from examwatch.kernel.config import Strict
from examwatch.kernel.model import Reading

# pymodbus logs every dropped frame and timeout itself; we report them as device states, once per flip.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

DataType = Literal["uint16", "int16", "uint32", "int32", "float32"]
_FORMATS = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f"}


class Profile(Strict):
    description: str = ""
    baud: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    slave: int = 1
    function: Literal[3, 4] = 3
    register: int = 0  # zero-based register address as sent on the wire (not 40001-style numbering)
    datatype: DataType = "uint16"
    word_order: Literal["big", "little"] = "big"  # 32-bit values: high word first ("big") or last
    scale: float = 1.0  # dB = raw * scale + offset
    offset: float = 0.0

    @property
    def count(self) -> int:
        return 1 if self.datatype.endswith("16") else 2


class Options(Strict):
    # 0: the profile's default; set it when several meters share a bus (Modbus addresses are 1..247)
    slave: Annotated[int, msgspec.Meta(ge=0, le=247)] = 0
    baud: Annotated[int, msgspec.Meta(ge=0, le=115200)] = 0  # 0: the profile's


def decode(registers: list[int], p: Profile) -> float:
    """Registers as read -> dB (pure)."""
    if len(registers) != p.count:
        raise DeviceError("garbage", f"expected {p.count} registers, got {len(registers)}")
    words = registers[::-1] if p.word_order == "little" else registers
    raw = struct.unpack(_FORMATS[p.datatype], b"".join(w.to_bytes(2, "big") for w in words))[0]
    value = raw * p.scale + p.offset
    if not math.isfinite(value):  # a float32 meter in an error state may send NaN; a reading never is one
        raise DeviceError("garbage", f"registers {registers} are not a number")
    return value


def classify_silence(received: bytes) -> DeviceError:
    """Why no answer came through: bytes with a bad CRC, other bytes, or none at all."""
    if not received:
        return DeviceError("timeout", "no answer")
    if len(received) >= 5 and FramerRTU.compute_CRC(received[:-2]).to_bytes(2, "big") != received[-2:]:
        return DeviceError("crc", f"bad CRC in {received.hex()}")
    return DeviceError("garbage", f"unusable answer {received.hex()}")


class _Bus:
    """One serial port and the client on it; meters on the bus take turns."""

    def __init__(self, port: str, p: Profile, baud: int, timeout: float) -> None:
        self.lock = asyncio.Lock()
        self.received = bytearray()
        self.client = AsyncModbusSerialClient(
            port,
            framer=FramerType.RTU,
            baudrate=baud or p.baud,
            parity=p.parity,
            stopbits=p.stopbits,
            timeout=timeout,
            retries=0,  # retries are ours, so each attempt's bytes can be classified
            trace_packet=self._trace,
        )

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self.received += data
        return data

    async def read(self, p: Profile, slave: int) -> list[int]:
        if not self.client.connected and not await self.client.connect():
            raise DeviceError("port_unavailable", f"cannot open {self.client.comm_params.host}")
        self.received.clear()
        try:
            if p.function == 3:
                resp = await self.client.read_holding_registers(p.register, count=p.count, device_id=slave)
            else:
                resp = await self.client.read_input_registers(p.register, count=p.count, device_id=slave)
        except ModbusException:
            raise classify_silence(bytes(self.received)) from None
        if resp.isError():
            raise DeviceError("modbus_exception", f"exception code {getattr(resp, 'exception_code', '?')}")
        return list(resp.registers)


@register
class ModbusNoiseCollector(PollingCollector):
    protocol = "modbus_noise"
    Options = Options
    needs_address = 'a noise meter needs address = "/dev/serial/by-id/..."'
    profile_schema = Profile
    profile_folder = "modbus"
    default_profile = "generic-u16x10"
    uses_serial_port = True
    reasons = {
        "port_unavailable": "串口打不开",
        "garbage": "应答无法解析",
        "crc": "应答校验错误",
        "modbus_exception": "Modbus 设备返回异常",
    }
    sample = """
[[devices]]                     # example: an RS485 noise meter (Modbus RTU)
name = "noise-2"
kind = "noise"
protocol = "modbus_noise"
address = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0"
profile = "renke-rs-zs"
slave = 1
"""

    @classmethod
    def check(cls, device: Any) -> list[tuple[str, str]]:
        issues = super().check(device)
        if device.options is not None and not 0 <= device.options.slave <= 247:
            issues.append(("slave", "a Modbus slave address is 1-247 (0: the profile's)"))
        return issues

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buses: dict[str, _Bus] = {}

    async def poll(self, device: Any) -> list[Reading]:
        p: Profile = self.profile(device)
        o: Options = device.options
        bus = self._buses.get(device.address)
        if bus is None:
            bus = self._buses[device.address] = _Bus(device.address, p, o.baud, device.timeout)

        async def attempt() -> list[int]:
            async with bus.lock:
                return await bus.read(p, o.slave or p.slave)

        # retrying won't change these answers
        registers = await retry(attempt, device.retries + 1, final=("port_unavailable", "modbus_exception"))
        return [Reading(device.name, "noise_db", round(decode(registers, p), 2), time.time())]

    async def close(self) -> None:
        for bus in self._buses.values():
            bus.client.close()
