"""The collector framework: a registry of protocols, the accumulator they feed, and device health.

A collector does I/O and pure parsing only. It hands ``Reading``s to an ``Accumulator`` and reports a
failing device with ``DeviceError``; it never touches the store, the rules, the uplink or Prometheus.
A failing device is a state (``device_online`` 0, an error counter), logged once when it flips.

A collector class declares everything the rest of the system needs to know about its protocol (its
``Options``, whether it holds a serial port, its error reasons in words, its sample config block, its
readiness probe), so a new protocol is one module: nothing outside collectors/ names protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import msgspec
import structlog

from examwatch.collectors import profiles
from examwatch.kernel.config import Strict
from examwatch.kernel.model import Reading

log = structlog.get_logger("examwatch.collector")


class DeviceError(Exception):
    """A device did not answer, or answered something we cannot use.

    ``reason`` is a short stable code (``timeout``, ``garbage``, ``no_such_object``, ``crc``, ...) that
    becomes a counter label, so keep the set small; ``detail`` is for the log line only.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Accumulator(Protocol):
    def add(self, reading: Reading) -> None: ...

    def add_all(self, readings: Sequence[Reading]) -> None:
        """A poll's readings at once: one hand-off per poll, not one per reading."""
        ...


T = TypeVar("T")


async def retry(attempt: Callable[[], Awaitable[T]], tries: int, final: Collection[str] = ()) -> T:
    """Run ``attempt`` up to ``tries`` times while it raises ``DeviceError``, at once (the device's own
    timeout was the wait); the last error is raised. A reason in ``final`` ends it: asking again would
    not change the answer (a wrong password, a Modbus exception)."""
    for left in range(max(1, tries) - 1, -1, -1):
        try:
            return await attempt()
        except DeviceError as err:
            if not left or err.reason in final:
                raise
    raise AssertionError("unreachable")


class Backoff:
    """Growing waits between reopening a lost connection (a pulled USB adapter): ``low`` doubling up to
    ``high``, back to none after a success. Polls in between fail fast instead of hammering the port."""

    def __init__(self, low: float = 1.0, high: float = 60.0) -> None:
        self.low, self.high = low, high
        self.delay = 0.0
        self.until = 0.0  # time.monotonic() before which we do not try again

    def failed(self) -> None:
        self.delay = min(self.high, max(self.low, self.delay * 2))
        self.until = time.monotonic() + self.delay

    def succeeded(self) -> None:
        self.delay = self.until = 0.0

    def waiting(self) -> float:
        """Seconds until the next try is due; 0 when it is."""
        return max(0.0, self.until - time.monotonic())


class Device(Protocol):
    """What a collector reads of a configured device (the agent's ``[[devices]]`` entry has it; collectors never
    import the agent's config). ``options`` is the protocol's own ``Options`` struct."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def profile(self) -> str: ...
    @property
    def interval(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def retries(self) -> int: ...
    @property
    def options(self) -> Any: ...


@dataclass(frozen=True)
class Context:
    """What a protocol may need from the agent besides its devices: the room's broker (its client id
    settled: the agent's, or the readiness check's own) and the agent's id. The agent's bootstrap
    (edge/bootstrap.py) builds it; a collector takes what it needs."""

    agent_id: str = ""
    broker: Any = None  # the [mqtt] settings (host, port, login, TLS, client_id)


# --- the readiness probe's vocabulary (``examwatch check``) -------------------------------------------------

OK, WARN, FAIL = "ok", "warn", "fail"

# DeviceError reasons any collector may raise, in the technician's words; each protocol adds its own.
COMMON_REASONS = {
    "timeout": "无应答（超时）",
    "profile": "型号（profile）配置有误",
    "config": "地址配置有误",
}


@dataclass(frozen=True)
class Finding:
    """One row of a readiness probe. About a device (``device`` set; the check names its kind) or about
    the protocol's own connection (``id`` and ``item``, e.g. the room broker)."""

    status: str  # ok | warn | fail
    detail: str  # Chinese: what was found and what to do
    device: Device | None = None
    via: str = ""  # how the device is reached, e.g. "snmp", "mqtt zigbee2mqtt/door1"
    noun: str = "设备"
    id: str = ""
    item: str = ""


def public_address(address: str) -> str:
    """An address fit to print: any ``user:password@`` removed."""
    return re.sub(r"(?<=://)[^@/]*@", "", address)


class NoOptions(Strict):
    """For protocols that need no device options beyond the common ones."""


@dataclass
class DeviceHealth:
    collector: str
    online: bool | None = None  # None until the first poll or report
    last_ok: float | None = None
    last_duration: float = 0.0
    polls: int = 0
    readings: int = 0  # readings handed over, device_online aside
    errors: Counter[str] = field(default_factory=Counter)
    last_error: DeviceError | None = None


class Health:
    """Collector and device health, read by the exporter at scrape time and by the readiness check."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceHealth] = {}
        self.dropped: Counter[tuple[str, str]] = Counter()  # (source, reason) -> count
        self.refused: dict[str, str] = {}  # device -> the reason its last refused input was dropped
        self._dropped_logged: set[tuple[str, str]] = set()

    def device(self, name: str, collector: str) -> DeviceHealth:
        h = self.devices.get(name)
        if h is None:
            h = self.devices[name] = DeviceHealth(collector)
        return h

    def ok(self, name: str, collector: str, duration: float, now: float, readings: int = 0) -> None:
        h = self.device(name, collector)
        h.polls += 1
        h.readings += readings
        h.last_ok = now
        h.last_duration = duration
        if h.online is not True:
            if h.online is False:
                log.info("device_recovered", device=name, collector=collector)
            h.online = True

    def failed(self, name: str, collector: str, err: DeviceError, duration: float) -> None:
        h = self.device(name, collector)
        h.polls += 1
        h.last_duration = duration
        h.errors[err.reason] += 1
        h.last_error = err
        if h.online is not False:
            log.warning("device_offline", device=name, collector=collector, reason=err.reason, detail=err.detail)
            h.online = False

    def drop(self, source: str, reason: str, **detail: Any) -> None:
        """Count input we refused (a malformed payload, an unknown device); log each kind once."""
        key = (source, reason)
        self.dropped[key] += 1
        if "device" in detail:
            self.refused[str(detail["device"])] = reason
        if key not in self._dropped_logged:
            self._dropped_logged.add(key)
            log.warning("input_dropped", source=source, reason=reason, **detail)


class Collector:
    """One protocol. Subclasses set ``protocol`` and ``sample`` and, if they take device options,
    ``Options``; a protocol whose devices are described by profiles sets ``profile_schema`` (and
    ``default_profile`` when a device may name none)."""

    protocol: ClassVar[str]
    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    needs_address: ClassVar[str] = ""  # the hint when a device has no address; empty: address optional
    profile_schema: ClassVar[type[msgspec.Struct] | None] = None
    profile_folder: ClassVar[str] = ""  # under collectors/profiles/; empty: the protocol's name
    default_profile: ClassVar[str] = ""
    # On a serial line: one reader at a time, so the readiness check leaves a running agent's ports alone.
    uses_serial_port: ClassVar[bool] = False
    reasons: ClassVar[dict[str, str]] = {}  # its own DeviceError reasons, in the technician's words
    sample: ClassVar[str] = ""  # its [[devices]] block(s) for `examwatch config sample`, commented
    # Metrics worth telling at once (a UPS going on battery). A polling protocol that names them asks every
    # ``watch_interval(device)`` seconds and hands its readings over when one of them (or device_online)
    # changed, else every ``interval`` as before: watching closely costs polls, not storage or uplink.
    watched: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self, devices: Sequence[Device], acc: Accumulator, health: Health, context: Context | None = None
    ) -> None:
        self.devices = devices
        self.acc = acc
        self.health = health
        self.context = context or Context()

    @classmethod
    def check(cls, device: Device) -> list[tuple[str, str]]:
        """Problems with a device's settings that types cannot see (an unknown profile, a bad address),
        as (key, message) pairs; ``examwatch config check`` reports them. Pure: no I/O beyond profiles.
        Subclasses add their own checks to these."""
        issues = [("address", cls.needs_address)] if cls.needs_address and not device.address else []
        if cls.profile_schema is not None:
            try:
                cls.load_profile(device.profile or cls.default_profile)
            except profiles.ProfileError as err:
                issues.append(("profile", str(err)))
        return issues

    @classmethod
    def check_together(cls, devices: Sequence[tuple[int, Device]]) -> list[tuple[int, str, str]]:
        """Problems between this protocol's devices (index in the file, device), as (index, key, message):
        what no single device shows, e.g. two devices on one MQTT topic. Pure, like ``check``."""
        return []

    @classmethod
    def load_profile(cls, name: str) -> Any:
        """One of the protocol's profiles (cached), validated; ``ProfileError`` if unknown or invalid.
        A protocol that prepares its profiles further (SNMP compiles them) overrides this."""
        assert cls.profile_schema is not None, f"{cls.protocol} has no profiles"
        return profiles.load(cls.profile_folder or cls.protocol, name, cls.profile_schema)

    def profile(self, device: Device) -> Any:
        """The device's profile, at poll time: an unknown or broken one is a device state, not a crash."""
        try:
            return self.load_profile(device.profile or self.default_profile)
        except profiles.ProfileError as err:
            raise DeviceError("profile", str(err)) from None

    async def run(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections; called once after ``run`` returned."""

    def alive(self) -> bool:
        """False when the collector can no longer read anything (the agent then reports itself unhealthy)."""
        return True

    # --- the readiness probe: ``examwatch check`` ---

    async def probe(self, wait: float) -> None:
        """One round for the readiness check: ask every device once (a push protocol: listen up to
        ``wait`` seconds). Readings go to the accumulator, outcomes to ``health``, as when running."""
        raise NotImplementedError

    def judge(self, device: Device, readings: list[Reading]) -> Finding:
        """After ``probe``: the device's row, from what it said (``readings``) and its health."""
        h = self.health.devices.get(device.name)
        if h is not None and h.online:
            answered = f"有应答：{h.readings} 项读数，用时 {h.last_duration:.1f} 秒"
            return Finding(OK, answered, device, self.protocol)
        err = h.last_error if h is not None else None
        return self.failure(device, err.reason if err else "", err.detail if err else "")

    def findings(self) -> list[Finding]:
        """After ``probe``: rows about the protocol's own connection (the room broker), before its devices'."""
        return []

    @classmethod
    def reason_text(cls, reason: str) -> str:
        return cls.reasons.get(reason) or COMMON_REASONS.get(reason) or reason or "无应答"

    @classmethod
    def failure(cls, device: Device, reason: str, detail: str) -> Finding:
        why = f"（{detail[:120]}）" if detail else ""
        return Finding(
            FAIL,
            f"{cls.reason_text(reason)}{why}。请检查设备电源、连线和地址 "
            f"{public_address(device.address)}；无法修复时启用备用设备，并记下原设备编号和故障原因",
            device,
            cls.protocol,
        )


class PollingCollector(Collector):
    """A collector that asks each device on its own interval, one task per device.

    Subclasses implement ``poll(device) -> list[Reading]`` (raise ``DeviceError`` on failure). Each
    device has its own task and its own timeout, so a slow UPS never delays the door sensors.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._told: dict[str, tuple[float, dict[str, float]]] = {}  # device -> (monotonic, watched values) last told

    async def poll(self, device: Device) -> list[Reading]:
        raise NotImplementedError

    def watch_interval(self, device: Any) -> float:
        """Seconds between polls; shorter than ``interval`` only for a protocol that declares ``watched``."""
        return device.interval

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for device in self.devices:
                tg.create_task(self._loop(device, stop))

    async def probe(self, wait: float) -> None:
        """Every device once, all at once, each within its own timeout."""
        await asyncio.gather(*(self.poll_once(d) for d in self.devices))

    async def poll_once(self, device: Device) -> None:
        """Poll one device and account for the outcome: readings, device_online, health."""
        start = time.monotonic()
        try:
            # Headroom over the protocol's own timeout: retries live inside poll().
            # asyncio.timeout, not wait_for: no task of its own per poll (a tenth of a NUT poll's CPU)
            async with asyncio.timeout(device.timeout * (device.retries + 1) + 1):
                readings = await self.poll(device)
        except DeviceError as err:
            self._failed(device, err, start)
        except TimeoutError:
            self._failed(device, DeviceError("timeout", f"no answer within {device.timeout}s"), start)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug or an unexpected library error: a state, not a dead loop
            self._failed(device, DeviceError("error", f"{type(err).__name__}: {err}"), start)
        else:
            self._succeeded(device, readings, start)

    # The hand-off last: a collector on its own thread then sleeps right after waking the writer, which
    # finds the GIL free instead of waking a second time for it.
    def _succeeded(self, device: Device, readings: list[Reading], start: float) -> None:
        now = time.time()
        self.health.ok(device.name, self.protocol, time.monotonic() - start, now, len(readings))
        self._tell(device, [*readings, Reading(device.name, "device_online", 1.0, now)])

    def _failed(self, device: Device, err: DeviceError, start: float) -> None:
        self.health.failed(device.name, self.protocol, err, time.monotonic() - start)
        self._tell(device, [Reading(device.name, "device_online", 0.0, time.time())])

    def _tell(self, device: Device, readings: list[Reading]) -> None:
        """Hand a poll's readings over; while watching, only on a change of a watched metric or when due."""
        if self.watched:
            now = time.monotonic()
            seen = {r.metric: r.value for r in readings if r.metric in self.watched or r.metric == "device_online"}
            told = self._told.get(device.name)
            if told is not None and now - told[0] < device.interval and seen == told[1]:
                return
            self._told[device.name] = (now, seen)
        self.acc.add_all(readings)

    async def _loop(self, device: Device, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            await self.poll_once(device)
            delay = max(0.0, self.watch_interval(device) - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()


REGISTRY: dict[str, type[Collector]] = {}


def register(cls: type[Collector]) -> type[Collector]:
    """Class decorator: make a collector available under its ``protocol`` name."""
    if cls.protocol in REGISTRY:
        raise ValueError(f"protocol {cls.protocol!r} registered twice")
    REGISTRY[cls.protocol] = cls
    return cls
