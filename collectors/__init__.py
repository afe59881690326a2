"""Collectors, one module per protocol, named after it (``collectors/snmp.py`` registers ``snmp``).

A protocol's module is imported only when a device uses it: an agent with only MQTT sensors never loads
pysnmp or pymodbus (memory matters on a Pi).
"""

from __future__ import annotations

import importlib
import pkgutil

from examwatch.collectors.base import (
    REGISTRY,
    Accumulator,
    Collector,
    Context,
    DeviceError,
    Health,
    PollingCollector,
    register,
)

__all__ = [
    "REGISTRY",
    "Accumulator",
    "Collector",
    "Context",
    "DeviceError",
    "Health",
    "PollingCollector",
    "available",
    "get",
    "register",
    "sample_blocks",
]

# the framework; and every module whose name starts with "_": a protocol's helpers
_NOT_PROTOCOLS = {"base", "blocking"}


def available() -> list[str]:
    """Every protocol's name, built-in (without importing any) or registered from elsewhere."""
    return sorted(
        {
            m.name
            for m in pkgutil.iter_modules(__path__)
            if not m.ispkg and m.name not in _NOT_PROTOCOLS and not m.name.startswith("_")
        }
        | REGISTRY.keys()
    )


def get(protocol: str) -> type[Collector]:
    """The collector class for a protocol; ``KeyError`` when there is none."""
    if protocol not in REGISTRY:
        if protocol not in available():
            raise KeyError(protocol)
        importlib.import_module(f"examwatch.collectors.{protocol}")
    return REGISTRY[protocol]


def sample_blocks() -> str:
    """Every protocol's sample ``[[devices]]`` blocks, for ``examwatch config sample`` (imports them all)."""
    return "".join(get(p).sample for p in available())
