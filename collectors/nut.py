"""NUT: read a UPS that an existing upsd (Network UPS Tools) already drives, over its TCP protocol.

Every UPS that NUT supports (USB HID, serial, SNMP, ...) thereby works with examwatch. The device
address uses NUT's own syntax, ``<ups>@<host>[:<port>]`` (port 3493 by default), as ``upsc`` does.
One ``LIST VAR <ups>`` per poll on a connection kept open between polls, from the UPS's own thread
(``collectors/blocking.py``: no event loop round trips); ``parse_nut`` (pure) maps
NUT's variables onto the catalog by the device's profile (``collectors/profiles/nut/``): ``standard`` has
NUT's standard names, others the names some drivers use instead (per phase on a three-phase UPS).
"""

from __future__ import annotations

import functools
import math
import re
import socket
import time
from typing import Any

from examwatch.collectors import profiles
from examwatch.collectors.base import DeviceError, register
from examwatch.collectors.blocking import BlockingPollingCollector, retry_blocking
from examwatch.kernel.catalog import METRICS
from examwatch.kernel.config import Strict
from examwatch.kernel.model import Reading

DEFAULT_PROFILE = "standard"


class Profile(Strict, kw_only=True):
    description: str = ""
    variables: dict[str, str]  # NUT variable -> catalog metric; NUT already speaks base units
    status: dict[str, list[str]] = {}  # catalog metric -> the ups.status flags that make it 1

    def __post_init__(self) -> None:
        unknown = sorted({*self.variables.values(), *self.status} - METRICS.keys())
        if unknown:
            raise ValueError(f"not catalog metrics: {', '.join(unknown)}")


MAX_ANSWER = 256 * 1024  # bytes of one LIST VAR answer; a real UPS has a few dozen variables
READ_CHUNK = 16 * 1024  # bytes read at once: a whole answer of a real UPS
_VAR = re.compile(r'VAR (\S+) (\S+) "((?:[^"\\]|\\.)*)"')


class NutError(Exception):
    """upsd answered ``ERR <code>``."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def parse_list_var(lines: list[str], ups: str) -> dict[str, str]:
    """The lines between ``BEGIN LIST VAR <ups>`` and ``END LIST VAR <ups>`` -> variable -> value."""
    out: dict[str, str] = {}
    prefix = f"VAR {ups} "
    for line in lines:
        if line.startswith("ERR "):
            raise NutError(line[4:].split()[0] if line[4:].split() else "UNKNOWN")
        if not line.startswith(prefix):
            continue
        # nearly every line: a plain name and a value with no quote or backslash in it, read without the regex
        name, sep, rest = line[len(prefix) :].partition(' "')
        if sep and rest.endswith('"') and '"' not in rest[:-1] and "\\" not in rest and name.split() == [name]:
            out[name] = rest[:-1]
            continue
        m = _VAR.fullmatch(line)
        if m and m.group(1) == ups:
            value = m.group(3)
            out[m.group(2)] = re.sub(r"\\(.)", r"\1", value) if "\\" in value else value
    return out


def parse_nut(
    variables: dict[str, str], device: str, ts: float, profile: Profile | None = None
) -> tuple[list[Reading], list[str]]:
    """Map NUT variables onto Readings by ``profile`` (default: NUT's standard names); returns (readings, names
    of values that were not finite numbers)."""
    p = profile or profiles.load("nut", DEFAULT_PROFILE, Profile)
    readings: list[Reading] = []
    bad: list[str] = []
    status = variables.get("ups.status")
    if status is not None:
        flags = set(status.split())
        for metric, wanted in p.status.items():
            readings.append(Reading(device, metric, float(bool(flags.intersection(wanted))), ts))
    for name, metric in p.variables.items():
        text = variables.get(name)
        if text is None:
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value):  # "nan", "inf" and "1e999" parse as floats but are not readings
            readings.append(Reading(device, metric, value, ts))
        else:
            bad.append(name)
    return readings, bad


@functools.lru_cache(maxsize=256)  # once per device, not once per poll
def parse_address(address: str) -> tuple[str, str, int]:
    """``ups@host[:port]`` -> (ups, host, port)."""
    m = re.fullmatch(r"([^@\s]+)@(\[[^\]]+\]|[^:\s]+)(?::(\d+))?", address)
    if m is None:
        raise DeviceError("config", f"address {address!r}: expected <ups>@<host>[:<port>], e.g. ups@127.0.0.1")
    return m.group(1), m.group(2).strip("[]"), int(m.group(3) or 3493)


class NutOptions(Strict, kw_only=True):
    """Reading variables needs no login on a default upsd; give one where upsd.users demands it."""

    username: str = ""
    password: str = ""  # a secret: never logged

    def __repr__(self) -> str:
        return f"NutOptions(username={self.username!r})"


class _Connection:
    """One kept connection to upsd on a blocking socket (the device's thread polls on it: no event loop, whose
    round trips cost more CPU than the poll). Answers are read into one buffer kept for the connection's
    life; an answer longer than ``MAX_ANSWER`` bytes, or upsd closing, is a ``ConnectionError``."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock  # a socket, or in a test anything with sendall, recv and close
        self.buffer = bytearray()

    @classmethod
    def open(cls, host: str, port: int, timeout: float) -> _Connection:
        return cls(socket.create_connection((host, port), timeout=timeout))  # the timeout bounds every read

    def _complete(self, end: bytes, searched: int) -> int | None:
        """The length of the answer when the buffer holds all of it: its first line when that is not
        ``BEGIN`` (an error), else up to the end line (at the start of a line: a value may hold its words).
        ``searched``: bytes of the buffer already searched for ``end``."""
        first = self.buffer.find(b"\n")
        if first < 0:
            return None
        if not end or not self.buffer.startswith(b"BEGIN "):
            return first + 1
        at = self.buffer.find(b"\n" + end, max(first, searched - len(end) - 3))
        while at >= 0:
            tail = at + 1 + len(end)
            if self.buffer.startswith(b"\n", tail) or self.buffer.startswith(b"\r\n", tail):
                return self.buffer.index(b"\n", tail) + 1
            if len(self.buffer) - tail < 2:  # the end line's own line end may still come
                break
            at = self.buffer.find(b"\n" + end, at + 1)
        return None

    def ask(self, line: str, deadline: float, end: str = "") -> list[str]:
        """Send ``line``; its answer as lines: one, or those up to the line ``end`` (without it). Past
        ``deadline`` (monotonic) a slow answer is a ``TimeoutError``, however it trickles in."""
        self.sock.sendall(line.encode() + b"\n")
        wanted, searched = end.encode(), 0
        while (size := self._complete(wanted, searched)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError("answer not complete in time")
            searched = len(self.buffer)
            chunk = self.sock.recv(READ_CHUNK)
            if not chunk:
                raise ConnectionError("upsd closed the connection")
            self.buffer += chunk
            if len(self.buffer) > MAX_ANSWER:
                raise ConnectionError(f"an answer longer than {MAX_ANSWER} bytes")
        raw = bytes(self.buffer[:size])
        del self.buffer[:size]
        lines = [ln.rstrip("\r") for ln in raw.decode("utf-8", errors="replace").split("\n")[:-1]]
        return lines[:-1] if end and len(lines) > 1 else lines

    def close(self) -> None:
        self.sock.close()


@register
class NutCollector(BlockingPollingCollector):
    protocol = "nut"
    Options = NutOptions
    profile_schema = Profile
    default_profile = DEFAULT_PROFILE
    reasons = {
        "connection": "连不上",
        "stale": "UPS 服务在，但与 UPS 失去联系",
        "auth": "无权限（账号被拒绝）",
        "nut_error": "UPS 服务（upsd）报错",
    }
    sample = """
[[devices]]                     # example: a UPS that NUT already drives
name = "ups2"
kind = "ups"
protocol = "nut"
address = "ups@127.0.0.1"       # NUT's syntax: <ups>@<host>[:<port>]
profile = "standard"            # NUT's standard names; "three-phase" for per-phase drivers
"""

    @classmethod
    def check(cls, device: Any) -> list[tuple[str, str]]:
        issues = super().check(device)
        try:
            parse_address(device.address)
        except DeviceError as err:
            issues.append(("address", err.detail))
        return issues

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections: dict[str, _Connection] = {}

    def poll_blocking(self, device: Any) -> list[Reading]:
        profile: Profile = self.profile(device)
        ups, host, port = parse_address(device.address)

        def attempt() -> list[str]:
            try:
                return self._list_var(device, ups, host, port, time.monotonic() + device.timeout)
            except (TimeoutError, OSError, ConnectionError) as err:
                self._drop_connection(device.name)
                reason = "timeout" if isinstance(err, TimeoutError) else "connection"
                raise DeviceError(reason, str(err) or type(err).__name__) from None
            except NutError as err:
                self._drop_connection(device.name)
                # DATA-STALE / DRIVER-NOT-CONNECTED: upsd is up but has lost the UPS itself.
                reason = {"DATA-STALE": "stale", "DRIVER-NOT-CONNECTED": "stale", "ACCESS-DENIED": "auth"}.get(
                    err.code, "nut_error"
                )
                raise DeviceError(reason, f"upsd says {err.code} for {ups!r}") from None

        lines = retry_blocking(attempt, device.retries + 1, final=("stale", "auth", "nut_error"))
        variables = parse_list_var(lines, ups)
        readings, bad = parse_nut(variables, device.name, time.time(), profile)
        for name in bad:
            self.health.drop(device.name, "bad_value", variable=name)
        if "ups.status" not in variables:
            self.health.drop(device.name, "no_status", ups=ups)
        return readings

    def _list_var(self, device: Any, ups: str, host: str, port: int, deadline: float) -> list[str]:
        conn = self._connections.get(device.name)
        if conn is None:
            conn = self._connections[device.name] = _Connection.open(host, port, device.timeout)
            options: NutOptions = device.options or NutOptions()
            if options.username:
                for line in (f"USERNAME {options.username}", f"PASSWORD {options.password}"):
                    answer = conn.ask(line, deadline)[0]
                    if answer != "OK":
                        raise NutError(answer[4:] if answer.startswith("ERR ") else "LOGIN")
        lines = conn.ask(f"LIST VAR {ups}", deadline, end=f"END LIST VAR {ups}")
        first = lines[0] if lines else ""
        if first.startswith("ERR "):
            raise NutError(first[4:].split()[0])
        if first != f"BEGIN LIST VAR {ups}":
            raise ConnectionError(f"unexpected answer {first[:80]!r}")
        return lines[1:]

    def _drop_connection(self, name: str) -> None:
        conn = self._connections.pop(name, None)
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        for name in list(self._connections):
            self._drop_connection(name)


__all__ = ["NutCollector", "NutOptions", "Profile", "parse_address", "parse_list_var", "parse_nut"]
