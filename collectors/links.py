"""Network links: can the room reach its gateway and the exam platform, how fast, and over which link.

Each configured target is probed with a burst of ICMP echoes where the system allows it (unprivileged
ICMP sockets when ``net.ipv4.ping_group_range`` covers us, raw sockets as root) and TCP connects
otherwise; a refused connection still proves the host is there. The burst gives link_loss_ratio and the
mean link_rtt_seconds; link_up is 1 when any probe came back.

The plans' remedy for a network outage is "switch to the backup link", so the agent also says which
interface carries the default route, read from ``/proc/net/route`` (link_primary_active is 1 while it is
the configured primary interface, 0 while traffic goes over the backup, e.g. a 4G dongle).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import icmplib
import msgspec

from examwatch.collectors.base import DeviceError, PollingCollector, register
from examwatch.kernel.config import Port, Strict
from examwatch.kernel.model import Reading

ROUTE_TABLE = Path("/proc/net/route")
DEFAULT_GATEWAY = "default-gateway"  # the address that means "whatever the default route points at"


class LinkOptions(Strict):
    method: Literal["auto", "icmp", "tcp"] = "auto"
    port: Port = 443  # for TCP probes
    probes: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5  # per poll: the window loss and RTT are measured over
    # seconds between probes in a burst (0: back to back)
    probe_interval: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.2
    primary_interface: str = ""  # e.g. "eth0": report link_primary_active for the default route


# --- pure: the routing table --------------------------------------------------------------------------------


class Route(msgspec.Struct, frozen=True):
    interface: str
    destination: str
    gateway: str
    mask: str
    metric: int
    up: bool


def _ip(hex_le: str) -> str:
    """/proc/net/route writes IPv4 addresses as little-endian hex ("010200C0" is 192.0.2.1)."""
    return socket.inet_ntoa(int(hex_le, 16).to_bytes(4, "little"))


def parse_routes(text: str) -> list[Route]:
    routes = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            routes.append(Route(f[0], _ip(f[1]), _ip(f[2]), _ip(f[7]), int(f[6]), bool(int(f[3], 16) & 0x1)))
        except ValueError:
            continue
    return routes


def default_route(routes: list[Route]) -> Route | None:
    """The default route the kernel uses: up, 0.0.0.0/0, lowest metric."""
    candidates = [r for r in routes if r.up and r.destination == "0.0.0.0" and r.mask == "0.0.0.0"]  # noqa: S104 - a route, not a bind
    return min(candidates, key=lambda r: r.metric, default=None)


def summarize(device: str, rtts: list[float | None], now: float) -> list[Reading]:
    """One burst of probes (RTT in seconds, None for a lost probe) -> link readings."""
    answered = [r for r in rtts if r is not None]
    out = [
        Reading(device, "link_up", 1.0 if answered else 0.0, now),
        Reading(device, "link_loss_ratio", 1.0 - len(answered) / len(rtts) if rtts else 1.0, now),
    ]
    if answered:
        out.append(Reading(device, "link_rtt_seconds", sum(answered) / len(answered), now))
    return out


# --- I/O ----------------------------------------------------------------------------------------------------


async def tcp_probe(host: str, port: int, timeout: float) -> float | None:
    start = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except ConnectionRefusedError:
        return time.monotonic() - start  # the host answered with a reset: reachable
    except (OSError, TimeoutError):
        return None
    rtt = time.monotonic() - start
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return rtt


@register
class LinksCollector(PollingCollector):
    protocol = "links"
    Options = LinkOptions
    needs_address = f'a link needs address = a host, an IP or "{DEFAULT_GATEWAY}"'
    reasons = {
        "name_lookup": "域名解析失败",
        "icmp_not_permitted": '本机不允许发 ping（ICMP）：改用 method = "tcp"',
        "icmp_error": "ping（ICMP）出错",
    }
    sample = """
[[devices]]                     # example: the exam platform's reachability, and which link carries it
name = "uplink-net"
kind = "link"
protocol = "links"
address = "default-gateway"     # or a host name / IP; see docs/profiles.md for probes and TCP
primary_interface = "eth0"      # link_primary_active is 0 while the default route is on the backup link
"""

    @classmethod
    def check(cls, device: Any) -> list[tuple[str, str]]:
        issues = super().check(device)
        o = device.options
        # The framework gives a poll timeout x (retries + 1) + 1 s; the burst must fit in it.
        if (
            o is not None
            and (o.probes - 1) * o.probe_interval + device.timeout > device.timeout * (device.retries + 1) + 1
        ):
            issues.append(("probes", "probes x probe_interval does not fit in the poll's time budget"))
        return issues

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._icmp_privileged: bool | None = None  # how ICMP works here; None: not found out yet

    async def poll(self, device: Any) -> list[Reading]:
        o: LinkOptions = device.options
        now = time.time()
        route = default_route(parse_routes(ROUTE_TABLE.read_text())) if ROUTE_TABLE.exists() else None
        out = []
        if o.primary_interface:
            primary = route is not None and route.interface == o.primary_interface
            out.append(Reading(device.name, "link_primary_active", float(primary), now))
        target = device.address
        if target == DEFAULT_GATEWAY:
            if route is None:  # no default route: nothing beyond this network is reachable
                return out + summarize(device.name, [None] * o.probes, now)
            target = route.gateway
        rtts = await self._probe(target, device.timeout, o)
        return out + summarize(device.name, rtts, time.time())

    async def _probe(self, host: str, timeout: float, o: LinkOptions) -> list[float | None]:
        if o.method != "tcp":
            rtts = await self._icmp(host, timeout, o)
            if rtts is not None:
                return rtts
            if o.method == "icmp":
                raise DeviceError("icmp_not_permitted", "neither ICMP sockets nor raw sockets are allowed here")
        return list(await asyncio.gather(*(self._spaced_tcp(i, host, timeout, o) for i in range(o.probes))))

    async def _spaced_tcp(self, i: int, host: str, timeout: float, o: LinkOptions) -> float | None:
        await asyncio.sleep(i * o.probe_interval)
        return await tcp_probe(host, o.port, timeout)

    async def _icmp(self, host: str, timeout: float, o: LinkOptions) -> list[float | None] | None:
        """A burst of echoes, or None when this system permits no ICMP sockets to us."""
        modes = [self._icmp_privileged] if self._icmp_privileged is not None else [False, True]
        for privileged in modes:
            try:
                h = await icmplib.async_ping(
                    host, count=o.probes, interval=o.probe_interval, timeout=timeout, privileged=privileged
                )
            except icmplib.SocketPermissionError:
                continue
            except icmplib.NameLookupError as err:
                raise DeviceError("name_lookup", str(err)) from None
            except icmplib.ICMPLibError as err:
                raise DeviceError("icmp_error", str(err)) from None
            self._icmp_privileged = privileged
            return [r / 1000.0 for r in h.rtts] + [None] * (h.packets_sent - h.packets_received)
        return None
