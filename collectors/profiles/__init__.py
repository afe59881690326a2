"""Device models as data: ``<protocol>/<name>.toml`` files mapping what a device says onto the catalog.

Built-in profiles ship in this folder; a site adds a model by dropping a file into an extra folder
(``EXAMWATCH_PROFILES``, default ``/etc/examwatch/profiles``) with the same layout; no code needed.
"""

from __future__ import annotations

import os
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import TypeVar

import msgspec

from examwatch.kernel.config import Strict
from examwatch.kernel.model import DeviceKind

T = TypeVar("T", bound=msgspec.Struct)

BUILTIN = Path(__file__).parent


class ProfileError(Exception):
    pass


class Discovery(Strict, kw_only=True):
    """A profile's ``[discover]`` table: how ``examwatch discover`` recognises a device the profile reads.

    A device is tried against every profile of its protocol that has one; the profile must also read it
    (its OIDs answer, its storage document parses), so these only rank and name what answered."""

    kind: DeviceKind  # what the device is, for its [[devices]] entry
    rank: int = 0  # among profiles that all read a device, the lowest wins (a UPS card also answers IF-MIB)
    sys_object_id: list[str] = []  # SNMP: sysObjectID prefixes of the models it was written for
    exposes: list[str] = []  # MQTT (Zigbee2MQTT): properties a device must expose, all of them
    models: list[str] = []  # MQTT (Zigbee2MQTT): model ids it is known for, whatever they expose
    interval: float = 0.0  # seconds between its reports (a sensor's heartbeat), for the draft; 0: the default
    note: str = ""  # what a technician must still decide, put beside the device in the draft


def search_path() -> list[Path]:
    extra = os.environ.get("EXAMWATCH_PROFILES", "/etc/examwatch/profiles")
    return [Path(p) for p in extra.split(os.pathsep) if p] + [BUILTIN]


def names(protocol: str) -> list[str]:
    found = {p.stem for d in search_path() for p in (d / protocol).glob("*.toml")}
    return sorted(found)


@cache
def load(protocol: str, name: str, schema: type[T]) -> T:
    """Load and validate one profile; the first folder on the search path that has it wins."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) and ".." not in name:  # a name, never a path
        for d in search_path():
            path = d / protocol / f"{name}.toml"
            if path.is_file():
                try:
                    return msgspec.convert(tomllib.loads(path.read_text(encoding="utf-8")), schema)
                except (tomllib.TOMLDecodeError, msgspec.ValidationError) as err:
                    raise ProfileError(f"profile {protocol}/{name} ({path}): {err}") from None
    known = ", ".join(names(protocol)) or "none"
    raise ProfileError(f"no {protocol} profile named {name[:64]!r}; known: {known}")
