"""``examwatch discover``: what a room's Pi can reach, which profile reads each device, and a config draft.

One module per protocol probes (snmp, serial, mqtt, isapi, nut) and returns ``Found`` rows: data, never
printing. Whether a profile reads a device is decided by the agent's own collector polling it once with
that profile (``trial``), so discovery knows no model the profiles do not describe (their ``[discover]``
tables rank and name what answered). ``draft`` turns the rows into a config draft; ``run`` does the I/O
around them (arguments, progress bar, summary table, the file).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from examwatch import collectors
from examwatch.collectors import profiles
from examwatch.collectors.base import Health
from examwatch.kernel.model import Reading

OK, NONE, SKIPPED, ERROR = "ok", "none", "skipped", "error"


@dataclass(frozen=True)
class Found:
    """One row of the summary; with ``device`` (the [[devices]] keys but the name) it goes into the draft."""

    protocol: str
    address: str  # as shown: no community, key or password
    result: str  # ok | none (answers, no profile reads it) | skipped (not asked: busy port) | error
    why: str  # in the technician's words: what answered, or why nothing fits
    kind: str = ""
    profile: str = ""
    name: str = ""  # a suggested device name
    device: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what a human must decide, as comments beside the device


@dataclass
class Trial:
    """One poll of a device with one profile, by the agent's own collector."""

    readings: list[Reading]
    reason: str = ""  # the collector's DeviceError reason when it failed
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason and bool(self.readings)


class _Readings(list[Reading]):
    def add(self, reading: Reading) -> None:
        self.append(reading)

    def add_all(self, readings: Sequence[Reading]) -> None:
        self.extend(readings)


async def trial(device: dict[str, Any]) -> Trial:
    """Poll ``device`` (a [[devices]] entry as a dict) once with its protocol's collector, as the agent would."""
    from examwatch.edge.config import Device

    protocol = device["protocol"]
    cls = collectors.get(protocol)
    fields = {k: v for k, v in device.items() if k in Device.__struct_fields__}
    options = msgspec.convert({k: v for k, v in device.items() if k not in fields}, cls.Options)
    d = Device(name="probe", **{**fields, "options": options})
    acc, health = _Readings(), Health()
    collector = cls([d], acc, health)
    try:
        await collector.probe(d.timeout)  # one round, as `examwatch check` asks: every device once
    finally:
        await collector.close()
    h = health.devices.get("probe")
    readings = [r for r in acc if r.metric != "device_online"]
    if h is None or not h.online:
        err = h.last_error if h is not None else None
        return Trial(readings, err.reason if err else "timeout", err.detail if err else "")
    return Trial(readings)


def offered(protocol: str) -> list[tuple[str, profiles.Discovery]]:
    """The protocol's profiles that say how to recognise their model (a ``[discover]`` table), lowest rank
    first; a broken profile is left out (``config check`` reports it)."""
    cls = collectors.get(protocol)
    folder = cls.profile_folder or protocol
    out = []
    for name in profiles.names(folder):
        with contextlib.suppress(profiles.ProfileError):
            d = getattr(cls.load_profile(name), "discover", None)
            if d is not None:
                out.append((name, d))
    return sorted(out, key=lambda nd: (nd[1].rank, nd[0]))


def device_name(text: str, fallback: str) -> str:
    """A config device name (letters, digits, '-', '_', '.') from a label such as a Zigbee friendly name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:64]
    return name or fallback


__all__ = ["ERROR", "NONE", "OK", "SKIPPED", "Found", "Trial", "device_name", "offered", "trial"]
