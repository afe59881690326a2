"""The agent's parts, built one way for the runtime and for the readiness check (``examwatch check``):
devices grouped by protocol, the context a collector gets from the agent, the collectors themselves.

Nothing here names a protocol: a collector takes from the ``Context`` what it needs (the MQTT sensors
the room broker), so a new protocol needs no change here.
"""

from __future__ import annotations

from collections import defaultdict

import msgspec

from examwatch import collectors
from examwatch.collectors import Accumulator, Collector, Context, Health
from examwatch.edge.config import Config, Device


def context(cfg: Config, *, checking: bool = False) -> Context:
    """The agent's context; ``checking``: the readiness check's, whose client ids are its own, never the
    running agent's (the broker would drop the agent's connection for ours)."""
    client_id = cfg.mqtt.client_id or f"examwatch-{cfg.agent.site}-{cfg.agent.room}-sensors"
    if checking:
        client_id += "-check"
    return Context(agent_id=cfg.agent_id, broker=msgspec.structs.replace(cfg.mqtt, client_id=client_id))


def by_protocol(devices: list[Device]) -> dict[str, list[Device]]:
    """Devices grouped by protocol, in the order the config first names each: one collector per group."""
    groups: dict[str, list[Device]] = defaultdict(list)
    for d in devices:
        groups[d.protocol].append(d)
    return dict(groups)


def build(protocol: str, devices: list[Device], acc: Accumulator, health: Health, ctx: Context) -> Collector:
    return collectors.get(protocol)(devices, acc, health, ctx)


def build_all(devices: list[Device], acc: Accumulator, health: Health, ctx: Context) -> list[Collector]:
    return [build(p, group, acc, health, ctx) for p, group in by_protocol(devices).items()]
