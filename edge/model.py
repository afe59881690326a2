"""The values that flow through the agent: readings in, alarm events out.

Both are msgspec structs, so the same types serve in memory, in the store and on the wire.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated, Literal

import msgspec

from edge.catalog import unit_of

# Bounds checked when these are decoded (from the wire, from the store); building them in code checks nothing.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]  # device, metric, rule, site, room
Text = Annotated[str, msgspec.Meta(max_length=2000)]  # messages and actions for people
Time = Annotated[float, msgspec.Meta(ge=0, le=2**32)]  # unix seconds, finite
Finite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]  # inf out (JSON has no NaN)
Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"  # plausible but from a degraded source (e.g. a partial answer)
    BAD = "bad"


class Reading(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One value of one canonical metric from one device at one time.

    ``device`` is the configured device name; a part of a device (a switch port, an NVR disk, a network
    interface) is named ``<device>/<part>`` and inherits the device's kind.
    """

    device: Name
    metric: Name
    value: Finite
    ts: Time  # unix seconds, from the agent's clock when the value was read
    quality: Annotated[str, msgspec.Meta(max_length=16)] = Quality.GOOD

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

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    site: Name
    room: Name
    rule: Name
    level: Annotated[int, msgspec.Meta(ge=1, le=3)]
    state: Literal["raised", "updated", "cleared"]  # "updated": the level changed while active
    device: Name
    metric: Name | None = None
    value: Finite | None = None
    at: Time
    raised_at: Time
    since: Time | None = None
    phase: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    message: Text
    action: Text = ""
