"""A Megatec/Q1 UPS on a serial port (one end of a pty pair), whose state a test or the demo can change.

It answers ``Q1``, ``F`` and ``I`` like a small line-interactive UPS, accepts the test/beeper/shutdown
commands NUT sends, and echoes anything else (what real Megatec UPSes do with a command they lack).
``misbehave("garbage" | "truncated" | "silent")`` makes it answer badly until ``misbehave(None)``.
``lacks=("F", "I")`` makes a unit that answers Q1 only (silent to the others, as many are); ``baud=2400``
paces each exchange like a real line (10 bits a character), which a pty pair alone does not; ``twin(port)``
serves the same UPS on a second port, so two programs (the agent and NUT) can watch one state.

    python -m examwatch.simulators.megatec /tmp/ups-device [--q1-only] [--baud 2400]   # type a state on stdin
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Mode = Literal["line", "battery", "battery_low", "fault"]
Misbehaviour = Literal["garbage", "truncated", "silent"] | None


@dataclass
class UpsState:
    mode: Mode = "line"
    input_voltage: float = 230.0
    output_voltage: float = 230.0
    load_percent: int = 23
    frequency: float = 50.0
    battery_voltage: float = 13.6  # pack voltage of one 12 V block (6 cells)
    temperature: float = 25.0
    bypass: bool = False
    test: bool = False
    shutdown: bool = False
    beeper: bool = True


class MegatecSimulator:
    identity = f"#{'EXAMWATCH-SIM':<15} {'LI-1000':<10} {'V1.0':<10}\r".encode()  # fixed widths: NUT checks them
    rating = b"#230.0 004 12.00 50.0\r"

    def __init__(self, port: str, lacks: Iterable[str] = (), baud: int = 0) -> None:
        self.port = port
        self.lacks = frozenset(lacks)  # commands this model ignores: no answer at all
        self.baud = baud  # 0: answer at once; else wait as long as the characters take on the line
        self.state = UpsState()
        self.misbehaviour: Misbehaviour = None
        self.commands: list[str] = []  # every command received, for tests
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._open = threading.Event()  # set while the port is open, so start() returns ready to answer
        self._thread: threading.Thread | None = None

    # --- state the tests and the demo change -----------------------------------------------------------

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            s = self.state
            s.mode = mode
            on_battery = mode in ("battery", "battery_low")
            s.input_voltage = 0.0 if on_battery else 230.0
            s.battery_voltage = {"line": 13.6, "battery": 12.4, "battery_low": 10.6, "fault": 13.0}[mode]

    def twin(self, port: str) -> MegatecSimulator:
        """The same UPS on another port: one state, one lock; start and stop it on its own."""
        other = MegatecSimulator(port, self.lacks, self.baud)
        other.state, other._lock = self.state, self._lock
        return other

    def misbehave(self, how: Misbehaviour) -> None:
        self.misbehaviour = how

    def q1(self) -> bytes:
        with self._lock:
            s = self.state
            bits = [
                s.mode in ("battery", "battery_low"),  # b7 utility fail
                s.mode == "battery_low",  # b6 battery low
                s.bypass,  # b5 bypass/boost
                s.mode == "fault",  # b4 UPS failed
                True,  # b3 line-interactive
                s.test,  # b2 test in progress
                s.shutdown,  # b1 shutdown active
                s.beeper,  # b0 beeper on
            ]
            return (
                f"({s.input_voltage:05.1f} {s.input_voltage:05.1f} {s.output_voltage:05.1f} {s.load_percent:03d} "
                f"{s.frequency:04.1f} {_four(s.battery_voltage)} {s.temperature:04.1f} "
                + "".join("1" if b else "0" for b in bits)
                + "\r"
            ).encode()

    def answer(self, command: str) -> bytes:
        """The reply to one command (without misbehaviour); b'' for commands that get none."""
        if command in self.lacks:
            return b""
        if command == "Q1":
            return self.q1()
        if command == "F":
            return self.rating
        if command == "I":
            return self.identity
        with self._lock:
            if command == "Q":  # toggle beeper
                self.state.beeper = not self.state.beeper
                return b""
            if command in ("T", "TL") or (command.startswith("T") and command[1:].isdigit()):
                self.state.test = True
                return b""
            if command == "CT":
                self.state.test = False
                return b""
            if command.startswith("S") and len(command) > 1:
                self.state.shutdown = True
                return b""
            if command == "C":
                self.state.shutdown = False
                return b""
        return command.encode() + b"\r"

    # --- serving ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="megatec-sim", daemon=True)
        self._thread.start()
        self._open.wait(5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _serve(self) -> None:
        fd = -1
        buf = b""
        while not self._stop.is_set():
            if fd < 0:
                try:
                    fd = os.open(self.port, os.O_RDWR | os.O_NOCTTY)
                    tty.setraw(fd, termios.TCSANOW)  # TCSAFLUSH (the default) would drop a queued command
                    buf = b""
                    self._open.set()
                except OSError:  # the pty pair is being rebuilt: the cable was pulled
                    self._stop.wait(0.05)
                    continue
            try:
                ready, _, _ = select.select([fd], [], [], 0.05)
                if not ready:
                    continue
                chunk = os.read(fd, 256)
                if not chunk:
                    raise OSError("closed")
            except (OSError, termios.error):
                self._open.clear()
                os.close(fd)
                fd = -1
                continue
            buf += chunk
            while b"\r" in buf:
                raw, buf = buf.split(b"\r", 1)
                command = raw.decode("ascii", errors="replace").strip()
                self.commands.append(command)
                self._line(len(raw) + 1)  # the command is complete only when its last character arrived
                reply = self._misbehaved(self.answer(command))
                self._line(len(reply))
                if reply:
                    with contextlib.suppress(OSError):
                        os.write(fd, reply)
        if fd >= 0:
            os.close(fd)

    def _line(self, characters: int) -> None:
        if self.baud and characters:
            time.sleep(characters * 10 / self.baud)  # 8N1: start, 8 data and stop bits

    def _misbehaved(self, reply: bytes) -> bytes:
        how = self.misbehaviour
        if how is None or not reply:
            return reply
        if how == "silent":
            return b""
        if how == "truncated":
            return reply[: len(reply) // 2]
        return b"\x8f\xfe(2#0.1 ZZ @@@ 1x1\r"  # line noise that still ends like a line


def _four(volts: float) -> str:
    """The battery field is four characters wide: "2.27" per cell or "13.6" per pack (NUT parses by position)."""
    return f"{volts:.2f}" if volts < 10 else f"{volts:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description="a Megatec/Q1 UPS on a serial port; type a mode on stdin")
    ap.add_argument("port")
    ap.add_argument("--q1-only", action="store_true", help="ignore F and I, as many units do")
    ap.add_argument("--baud", type=int, default=0, help="pace answers like a line at this speed (0: at once)")
    args = ap.parse_args()
    sim = MegatecSimulator(args.port, ("F", "I") if args.q1_only else (), args.baud)
    sim.start()
    print("modes: line battery battery_low fault; misbehave: garbage truncated silent ok", flush=True)
    for line in sys.stdin:
        word = line.strip()
        if word in ("line", "battery", "battery_low", "fault"):
            sim.set_mode(word)  # type: ignore[arg-type]
        elif word in ("garbage", "truncated", "silent"):
            sim.misbehave(word)  # type: ignore[arg-type]
        elif word == "ok":
            sim.misbehave(None)
    sim.stop()


if __name__ == "__main__":
    main()
