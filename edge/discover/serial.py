"""Serial discovery: every /dev/serial/by-id port asked for a Megatec/Q1 UPS, then for a Modbus noise meter.

A port another process holds (the running agent, NUT's driver, a technician's terminal) is not opened:
two readers on one tty steal each other's bytes, and the agent would see garbage and alarm. Holders are
found in /proc/*/fd; a process holding the pty's master (the far end of a virtual cable: socat, a
simulator) is the device side, not a user. A port in exclusive mode (TIOCEXCL) is skipped as well.
Each question has its own short timeout; the Modbus trials are the agent's own collector with each
modbus profile (its baud rate, slave id, register).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path

import serial

from examwatch.collectors import profiles
from examwatch.collectors.base import DeviceError
from examwatch.collectors.megatec import Profile as MegatecProfile
from examwatch.collectors.megatec import Rating, Status, parse_f, parse_q1
from examwatch.collectors.modbus_noise import Profile as ModbusProfile
from examwatch.edge.discover import ERROR, NONE, OK, SKIPPED, Found, trial

BY_ID = Path("/dev/serial/by-id")
TIOCGEXCL = 0x80045440  # Linux >= 3.8: is the tty in exclusive mode
PLAUSIBLE_DB = (20.0, 140.0)  # a room's sound level; a register that reads 0 or 6553.5 is not a meter


def ports(extra: list[str]) -> list[str]:
    found = sorted(str(p) for p in BY_ID.glob("*")) if BY_ID.is_dir() else []
    return list(dict.fromkeys([*found, *extra]))


def _pty_index(path: str) -> int | None:
    name = os.path.realpath(path)
    return int(name.rsplit("/", 1)[1]) if name.startswith("/dev/pts/") and name.rsplit("/", 1)[1].isdigit() else None


def holders(path: str, proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, command) of the other processes that have ``path`` open, the pty's master side excepted."""
    target = os.path.realpath(path)
    index = _pty_index(path)
    out = []
    for pid_dir in proc.glob("[0-9]*"):
        pid = int(pid_dir.name)
        if pid == os.getpid():
            continue
        holds, master = False, False
        with contextlib.suppress(OSError):
            for fd in (pid_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link == target:
                        holds = True
                    elif link == "/dev/ptmx" and index is not None:
                        info = (pid_dir / "fdinfo" / fd.name).read_text()
                        master = master or f"tty-index:\t{index}\n" in info
        if holds and not master:
            comm = ""
            with contextlib.suppress(OSError):
                comm = (pid_dir / "comm").read_text().strip()
            out.append((pid, comm))
    return out


def exclusive(path: str) -> bool:
    """Whether the tty is in exclusive mode (TIOCEXCL): its owner wants no one else on it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return bool(struct.unpack("i", fcntl.ioctl(fd, TIOCGEXCL, b"\0\0\0\0"))[0])
    except OSError:
        return False
    finally:
        os.close(fd)


def ask_megatec(path: str, timeout: float) -> tuple[Status, Rating | None]:
    """Q1 at 2400 8N1 (and F, optional); DeviceError when nothing Megatec-like answers."""
    try:
        with serial.Serial(path, 2400, timeout=timeout, write_timeout=timeout, exclusive=True) as port:
            port.reset_input_buffer()
            port.write(b"Q1\r")
            line = port.read_until(b"\r", 128)
            if not line:
                raise DeviceError("timeout", "no answer to Q1")
            status = parse_q1(line)
            port.write(b"F\r")
            try:
                rating: Rating | None = parse_f(port.read_until(b"\r", 128))
            except DeviceError:
                rating = None
    except (serial.SerialException, OSError) as err:
        raise DeviceError("port_unavailable", str(err)[:120]) from None
    return status, rating


def megatec_profile(status: Status, rating: Rating | None) -> tuple[str, list[str]]:
    """The megatec profile whose battery reporting fits Q1's battery voltage (per cell below 3 V), and notes."""
    reports = "cell" if status.battery_voltage < 3.0 else "pack"
    fitting = []
    for name in profiles.names("megatec"):
        with contextlib.suppress(profiles.ProfileError):
            p = profiles.load("megatec", name, MegatecProfile)
            if p.battery is not None and p.battery.reports == reports:
                fitting.append((p.battery.cells != 0 or p.rating is not None, name))
    notes = []
    if not fitting:
        return "generic", ["没有与该电池电压相符的 profile：不估算电量"]
    name = sorted(fitting)[0][1]
    volts = f"Q1 报告电池电压 {status.battery_voltage:g} V（{'单体' if reports == 'cell' else '整组'}）"
    notes.append(f"{volts}，按 {name} 估算电量；请对照 UPS 说明书核对")
    if reports == "pack" and rating is None:
        notes.append("该 UPS 不回答 F：请在 profile 中给出 [rating] battery_voltage 或 [battery] cells，否则不估算电量")
    return name, notes


def modbus_candidates() -> list[str]:
    """The modbus profiles, one per distinct way of asking (baud, slave, register...): the same question
    once."""
    seen, out = set(), []
    for name in profiles.names("modbus"):
        with contextlib.suppress(profiles.ProfileError):
            p = profiles.load("modbus", name, ModbusProfile)
            key = (p.baud, p.parity, p.stopbits, p.slave, p.function, p.register, p.datatype, p.word_order, p.scale)
            if key not in seen:
                seen.add(key)
                out.append(name)
    return out


async def probe_port(path: str, timeout: float) -> Found:
    busy = holders(path)
    if busy:
        who = "，".join(f"PID {pid}（{comm}）" for pid, comm in busy)
        return Found("serial", path, SKIPPED, f"串口正被占用：{who}；未打开，以免干扰")
    if exclusive(path):
        return Found("serial", path, SKIPPED, "串口处于独占模式（TIOCEXCL）：另有程序在用；未打开")
    try:
        status, rating = await asyncio.to_thread(ask_megatec, path, timeout)
    except DeviceError as err:
        if err.reason == "port_unavailable":
            return Found("serial", path, ERROR, f"串口打不开：{err.detail}")
        megatec_said = err.reason
    else:
        name, notes = megatec_profile(status, rating)
        state = "市电" if not status.utility_fail else "电池供电"
        device = {"protocol": "megatec", "address": path, "kind": "ups", "profile": name}
        why = f"Megatec/Q1 UPS 应答（{state}，输入 {status.input_voltage:g} V，负载 {status.load_percent:g}%）"
        return Found("megatec", path, OK, why, "ups", name, "", device, tuple(notes))
    read: list[tuple[str, float]] = []
    for name in modbus_candidates():
        device = {"protocol": "modbus_noise", "address": path, "kind": "noise", "profile": name}
        t = await trial({**device, "timeout": timeout, "retries": 0, "interval": 10.0})
        value = next((r.value for r in t.readings if r.metric == "noise_db"), None)
        if t.ok and value is not None and PLAUSIBLE_DB[0] <= value <= PLAUSIBLE_DB[1]:
            read.append((name, value))
    if read:
        name, value = read[0]
        device = {"protocol": "modbus_noise", "address": path, "kind": "noise", "profile": name}
        notes = (
            ["多个 profile 都能读（" + "，".join(n for n, _ in read) + "）：请按噪声计型号核对波特率"]
            if len(read) > 1
            else []
        )
        return Found(
            "modbus_noise", path, OK, f"Modbus 噪声计应答：{value:g} dB", "noise", name, "", device, tuple(notes)
        )
    return Found("serial", path, NONE, f"Q1 无有效应答（{megatec_said}），任何 modbus profile 也读不到合理的分贝值")


async def probe(paths: list[str], timeout: float, tick: Callable[[], None] = lambda: None) -> list[Found]:
    """Each port in turn (a USB hub's adapters are cheap to ask one by one, and no port sees two probes)."""
    rows = []
    for path in paths:
        try:
            rows.append(await probe_port(path, timeout))
        except Exception as err:  # one odd port must not end discovery
            rows.append(Found("serial", path, ERROR, f"探测出错：{type(err).__name__}: {str(err)[:120]}"))
        tick()
    return rows


__all__ = ["exclusive", "holders", "megatec_profile", "ports", "probe"]
