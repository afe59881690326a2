"""The agent's own machine (psutil): CPU temperature, the state directory's disk, memory, interfaces."""

from __future__ import annotations

import time
from typing import Any

import psutil

from examwatch.collectors.base import PollingCollector, register
from examwatch.kernel.config import Strict
from examwatch.kernel.model import Reading


class HostOptions(Strict):
    interfaces: list[str] = []  # which network interfaces to watch; empty: every one but loopback


def parse_host(
    name: str,
    now: float,
    *,
    temps: dict[str, list[Any]],
    disk: Any,
    memory: Any,
    nics: dict[str, Any],
    watch: list[str],
) -> list[Reading]:
    """psutil's answers -> readings. Pure, so the mapping is tested without the machine."""
    out = [
        Reading(name, "storage_free_bytes", float(disk.free), now),
        Reading(name, "storage_total_bytes", float(disk.total), now),
        Reading(name, "storage_used_ratio", disk.used / disk.total if disk.total else 0.0, now),
        Reading(name, "memory_available_bytes", float(memory.available), now),
        Reading(name, "memory_used_ratio", 1 - memory.available / memory.total if memory.total else 0.0, now),
    ]
    # The Pi's SoC sensor is cpu_thermal; x86 boards say coretemp or k10temp. Take the hottest we know.
    cpu = [t.current for key in ("cpu_thermal", "coretemp", "k10temp", "soc_thermal") for t in temps.get(key, [])]
    if cpu:
        out.append(Reading(name, "cpu_temperature_celsius", float(max(cpu)), now))
    for nic in sorted(watch or [n for n in nics if n != "lo"]):
        stats = nics.get(nic)
        out.append(Reading(f"{name}/{nic}", "link_up", 1.0 if stats is not None and stats.isup else 0.0, now))
    return out


@register
class HostCollector(PollingCollector):
    """``address`` is the path whose disk to watch: the agent's state directory."""

    protocol = "host"
    Options = HostOptions
    sample = """
[[devices]]                     # the agent's own machine (added automatically when absent)
name = "host"
kind = "host"
protocol = "host"
address = "/var/lib/examwatch"  # whose disk to watch: the state directory
interval = 30.0
interfaces = []                 # which interfaces to watch; empty: all but loopback
"""

    async def poll(self, device: Any) -> list[Reading]:
        opts: HostOptions = device.options or HostOptions()
        temps = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        return parse_host(
            device.name,
            time.time(),
            temps=temps,
            disk=psutil.disk_usage(device.address or "/"),
            memory=psutil.virtual_memory(),
            nics=psutil.net_if_stats(),
            watch=opts.interfaces,
        )
