"""RS485 noise meters speaking Modbus RTU, on a serial port (one end of a pty pair).

Each meter on the simulated bus has a slave address and encodes its dB value the way its profile says
(register, function code, data type, scale), so the collector is tested against the same profile data
it reads in the field. ``misbehave("bad_crc" | "silent" | "exception")`` breaks the answers on demand.

    python -m examwatch.simulators.modbus_noise /tmp/noise-device renke-rs-zs   # then type a dB value on stdin
"""

from __future__ import annotations

import os
import select
import struct
import sys
import termios
import threading
import tty
from dataclasses import dataclass, field
from typing import Literal

from pymodbus.framer import FramerRTU

from examwatch.collectors import profiles
from examwatch.collectors.modbus_noise import Profile

Misbehaviour = Literal["bad_crc", "silent", "exception"] | None


def crc(frame: bytes) -> bytes:
    return FramerRTU.compute_CRC(frame).to_bytes(2, "big")


def encode(value: float, p: Profile) -> list[int]:
    """dB -> the registers the meter holds (the inverse of the collector's decode)."""
    raw = (value - p.offset) / p.scale
    fmt = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f"}[p.datatype]
    data = struct.pack(fmt, raw if p.datatype == "float32" else round(raw))
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return words[::-1] if p.word_order == "little" else words


@dataclass
class Meter:
    profile: Profile
    registers: dict[tuple[int, int], int] = field(default_factory=dict)  # (function, address) -> value


class NoiseMeterBus:
    """One RS485 bus with one or more meters, served on a pty end in a thread."""

    def __init__(self, port: str) -> None:
        self.port = port
        self.meters: dict[int, Meter] = {}
        self.misbehaviour: Misbehaviour = None
        self.requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add_meter(self, profile_name: str, slave: int | None = None, db: float = 40.0) -> int:
        p = profiles.load("modbus", profile_name, Profile)
        address = slave if slave is not None else p.slave
        self.meters[address] = Meter(p)
        self.set_db(db, address)
        return address

    def set_db(self, db: float, slave: int = 1) -> None:
        m = self.meters[slave]
        with self._lock:
            for i, word in enumerate(encode(db, m.profile)):
                m.registers[(m.profile.function, m.profile.register + i)] = word

    def misbehave(self, how: Misbehaviour) -> None:
        self.misbehaviour = how

    def answer(self, request: bytes) -> bytes:
        """The reply frame to one request frame; b'' when a real bus would stay silent."""
        if len(request) != 8 or crc(request[:6]) != request[6:]:
            return b""  # a garbled request: a real slave ignores it
        slave, function = request[0], request[1]
        address, count = struct.unpack(">HH", request[2:6])
        meter = self.meters.get(slave)
        if meter is None or self.misbehaviour == "silent":
            return b""
        with self._lock:
            words = [meter.registers.get((function, address + i)) for i in range(count)]
        if function not in (3, 4) or None in words or self.misbehaviour == "exception":
            body = bytes([slave, function | 0x80, 0x02])  # illegal data address
        else:
            body = bytes([slave, function, 2 * count]) + b"".join(w.to_bytes(2, "big") for w in words)  # type: ignore[union-attr]
        check = crc(body)
        if self.misbehaviour == "bad_crc":
            check = bytes([check[0] ^ 0x5A, check[1]])
        return body + check

    # --- serving ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        fd = os.open(self.port, os.O_RDWR | os.O_NOCTTY)  # opened before start() returns: no request is missed
        tty.setraw(fd, termios.TCSANOW)  # not the default TCSAFLUSH, which would drop a request already queued
        self._thread = threading.Thread(target=self._serve, args=(fd,), name="modbus-sim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _serve(self, fd: int) -> None:
        buf = b""
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.02)
                if not ready:
                    buf = b""  # silence ends a frame (RTU's 3.5 character gap, generously)
                    continue
                buf += os.read(fd, 256)
                while len(buf) >= 8:  # read requests (FC 3/4) are 8 bytes
                    request, buf = buf[:8], buf[8:]
                    self.requests += 1
                    reply = self.answer(request)
                    if reply:
                        os.write(fd, reply)
        except OSError:
            pass  # the pty pair went away
        finally:
            os.close(fd)


def main() -> None:
    bus = NoiseMeterBus(sys.argv[1])
    slave = bus.add_meter(sys.argv[2] if len(sys.argv) > 2 else "generic-u16x10")
    bus.start()
    print("type a dB value, or bad_crc / silent / exception / ok", flush=True)
    for line in sys.stdin:
        word = line.strip()
        if word in ("bad_crc", "silent", "exception"):
            bus.misbehave(word)  # type: ignore[arg-type]
        elif word == "ok":
            bus.misbehave(None)
        else:
            try:
                bus.set_db(float(word), slave)
            except ValueError:
                print("?", flush=True)
    bus.stop()


if __name__ == "__main__":
    main()
