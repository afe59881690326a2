"""The values that flow through the agent: readings in, alarm events out.

Both are msgspec structs, so the same types serve in memory, in the store and on the wire.
"""

from __future__ import annotations

import sys
from enum import IntEnum, StrEnum
from typing import Annotated, Literal, get_args

import msgspec

from examwatch.kernel.catalog import unit_of

DeviceKind = Literal["recorder", "camera", "nvr", "ups", "switch", "link", "door", "noise", "host"]
DEVICE_KINDS: frozenset[str] = frozenset(get_args(DeviceKind))
DEVICE_KIND_NAMES: dict[str, str] = {
    "recorder": "录音笔",
    "camera": "摄像机",
    "nvr": "硬盘录像机",
    "ups": "UPS",
    "switch": "交换机",
    "link": "网络链路",
    "door": "门磁",
    "noise": "噪声传感器",
    "host": "监测终端",
}

RoomKind = Literal["exam_room", "secrecy_room"]  # 考场 or 保密室
ROOM_KINDS: frozenset[str] = frozenset(get_args(RoomKind))


class Level(IntEnum):
    """The plans' response levels: 1 and 2 are raised in the room, 3 only by the county's correlation."""

    MINOR = 1  # 一级: one room or one person; handled on the spot, fed back within 5 minutes
    LOCAL = 2  # 二级: part of the process, e.g. two rooms; reported to the leading group within 10 minutes
    SITE = 3  # 三级: the whole site

    @property
    def label(self) -> str:
        return ("一级", "二级", "三级")[self - 1]


class AlarmState(StrEnum):
    RAISED = "raised"
    UPDATED = "updated"  # its level changed while active
    CLEARED = "cleared"


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
    level: Level
    state: AlarmState
    device: Name
    metric: Name | None = None
    value: Finite | None = None
    at: Time
    raised_at: Time
    since: Time | None = None
    phase: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    message: Text
    action: Text = ""
    # Channels the room's agent itself already told (its fallback while the county was unreachable): the
    # gateway does not send this transition to them again. Set on the signed outbox row when it goes out.
    notified: Annotated[list[Name], msgspec.Meta(max_length=8)] = []
