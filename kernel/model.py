"""The values that flow through the agent: readings in, alarm events out.

Both are msgspec structs, so the same types serve in memory, in the store and on the wire.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from examwatch.kernel.catalog import unit_of


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"  # plausible but from a degraded source (e.g. a partial answer)
    BAD = "bad"


class Reading(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One value of one canonical metric from one device at one time.

    ``device`` is the configured device name; a part of a device (a switch port, an NVR disk, a network
    interface) is named ``<device>/<part>`` and inherits the device's kind.
    """

    device: str
    metric: str
    value: float
    ts: float  # unix seconds, from the agent's clock when the value was read
    quality: str = Quality.GOOD

    @property
    def unit(self) -> str:
        return unit_of(self.metric)


def base_device(device: str) -> str:
    """The configured device a reading belongs to (``switch1/port3`` -> ``switch1``)."""
    return device.split("/", 1)[0]


class AlarmEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One alarm transition, as logged, stored and sent to the county.

    ``id`` names the alarm occurrence (stable from raise to clear); ``at`` is when this transition
    happened, ``raised_at`` when the occurrence was first raised, ``since`` when its condition began.
    """

    id: str
    site: str
    room: str
    rule: str
    level: int
    state: str  # "raised" | "updated" (level changed while active) | "cleared"
    device: str
    metric: str | None = None
    value: float | None = None
    at: float
    raised_at: float
    since: float | None = None
    phase: str | None = None
    message: str
    action: str = ""
