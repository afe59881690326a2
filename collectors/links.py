"""Network links: can the room reach its gateway and the exam platform, how fast, and over which link.

Each configured target is probed with a burst of ICMP echoes where the system allows it (unprivileged
ICMP sockets when ``net.ipv4.ping_group_range`` covers us, raw sockets as root) and TCP connects
otherwise; a refused connection still proves the host is there. The burst gives link_loss_ratio and the
mean link_rtt_seconds; link_up is 1 when any probe came back.

How to probe depends on the target, so it is a profile (``collectors/profiles/links/``): ``default`` as
above, ``gateway`` ICMP only, ``county-broker`` TCP to 8883, ``exam-platform`` an HTTPS request (ICMP and
a bare connect say nothing about a web service behind a proxy). A device's own keys override its profile's.

The plans' remedy for a network outage is "switch to the backup link", so the agent also says which
interface carries the default route, read from ``/proc/net/route`` (link_primary_active is 1 while it is
the configured primary interface, 0 while traffic goes over the backup, e.g. a 4G dongle).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import icmplib
import msgspec

from examwatch.collectors import profiles
from examwatch.collectors.base import DeviceError, PollingCollector, register
from examwatch.kernel.config import Port, Strict
from examwatch.kernel.model import Reading

ROUTE_TABLE = Path("/proc/net/route")
DEFAULT_GATEWAY = "default-gateway"  # the address that means "whatever the default route points at"

Method = Literal["auto", "icmp", "tcp", "http"]
Probes = Annotated[int, msgspec.Meta(ge=1, le=100)]  # per poll: the window loss and RTT are measured over
Spacing = Annotated[float, msgspec.Meta(ge=0, le=10)]  # seconds between probes in a burst (0: back to back)


class LinkProfile(Strict, kw_only=True):
    """How to probe a kind of target."""

    description: str = ""
    method: Method = "auto"
    port: Port = 443  # for TCP and HTTP probes
    probes: Probes = 5
    probe_interval: Spacing = 0.2
    tls: bool = True  # HTTP probes: HTTPS, the certificate checked
    http_path: str = "/"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"/[\x21-\x7e]{0,200}", self.http_path):
            raise ValueError("http_path: '/' and printable ASCII, no spaces")


class LinkOptions(Strict):
    """A device's keys; each left out is its profile's."""

    method: Method | None = None
    port: Port | None = None
    probes: Probes | None = None
    probe_interval: Spacing | None = None
    primary_interface: str = ""  # e.g. "eth0": report link_primary_active for the default route


def settings(profile: LinkProfile, o: LinkOptions | None) -> LinkProfile:
    """The profile with the device's own keys over it."""
    if o is None:
        return profile
    own = {k: getattr(o, k) for k in ("method", "port", "probes", "probe_interval") if getattr(o, k) is not None}
    return msgspec.structs.replace(profile, **own)


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


def http_target(address: str, p: LinkProfile) -> tuple[str, int, bool, str]:
    """(host, port, tls, path) of an HTTP probe: a URL address says it all, a host takes the profile's."""
    if "://" not in address:
        return address, p.port, p.tls, p.http_path
    url = urlsplit(address)
    tls = url.scheme == "https"
    return url.hostname or "", url.port or (443 if tls else 80), tls, url.path or "/"


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5]\d\d[ \r\n]")


async def http_probe(host: str, port: int, tls: ssl.SSLContext | None, path: str, timeout: float) -> float | None:
    """A HEAD request; the time to the status line, or None when no HTTP answer came (nor a valid certificate)."""
    start = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None)
            writer.write(
                f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: examwatch\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readline()  # bounded by the stream's 64 KiB limit
    except (OSError, TimeoutError, ValueError):  # ssl.SSLError is an OSError; ValueError: a line past the limit
        return None
    finally:
        if writer is not None:
            writer.close()
    return time.monotonic() - start if _STATUS_LINE.match(line) else None


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
    profile_schema = LinkProfile
    default_profile = "default"
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
profile = "gateway"             # ICMP; "county-broker" (TCP 8883), "exam-platform" (HTTPS), "default" (ping, else TCP)
primary_interface = "eth0"      # link_primary_active is 0 while the default route is on the backup link
"""

    @classmethod
    def check(cls, device: Any) -> list[tuple[str, str]]:
        issues = super().check(device)
        try:
            o = settings(cls.load_profile(device.profile or cls.default_profile), device.options)
        except profiles.ProfileError:
            return issues  # the profile's own issue is already there
        if "://" in device.address and o.method != "http":
            issues.append(("address", 'a URL is probed by HTTP: method = "http" or profile = "exam-platform"'))
        # The framework gives a poll timeout x (retries + 1) + 1 s; the burst must fit in it.
        if (o.probes - 1) * o.probe_interval + device.timeout > device.timeout * (device.retries + 1) + 1:
            issues.append(("probes", "probes x probe_interval does not fit in the poll's time budget"))
        return issues

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._icmp_privileged: bool | None = None  # how ICMP works here; None: not found out yet
        self._tls: ssl.SSLContext | None = None  # made at the first HTTPS probe (loading CAs takes 0.1-0.4 s)

    async def poll(self, device: Any) -> list[Reading]:
        o = settings(self.profile(device), device.options)
        primary_interface = device.options.primary_interface if device.options else ""
        now = time.time()
        route = default_route(parse_routes(ROUTE_TABLE.read_text())) if ROUTE_TABLE.exists() else None
        out = []
        if primary_interface:
            primary = route is not None and route.interface == primary_interface
            out.append(Reading(device.name, "link_primary_active", float(primary), now))
        target = device.address
        if target == DEFAULT_GATEWAY:
            if route is None:  # no default route: nothing beyond this network is reachable
                return out + summarize(device.name, [None] * o.probes, now)
            target = route.gateway
        rtts = await self._probe(target, device.timeout, o)
        return out + summarize(device.name, rtts, time.time())

    async def _probe(self, host: str, timeout: float, o: LinkProfile) -> list[float | None]:
        if o.method == "http":
            return list(await asyncio.gather(*(self._spaced_http(i, host, timeout, o) for i in range(o.probes))))
        if o.method != "tcp":
            rtts = await self._icmp(host, timeout, o)
            if rtts is not None:
                return rtts
            if o.method == "icmp":
                raise DeviceError("icmp_not_permitted", "neither ICMP sockets nor raw sockets are allowed here")
        return list(await asyncio.gather(*(self._spaced_tcp(i, host, timeout, o) for i in range(o.probes))))

    async def _spaced_tcp(self, i: int, host: str, timeout: float, o: LinkProfile) -> float | None:
        await asyncio.sleep(i * o.probe_interval)
        return await tcp_probe(host, o.port, timeout)

    async def _spaced_http(self, i: int, address: str, timeout: float, o: LinkProfile) -> float | None:
        host, port, tls, path = http_target(address, o)
        if tls and self._tls is None:
            self._tls = ssl.create_default_context()
        await asyncio.sleep(i * o.probe_interval)
        return await http_probe(host, port, self._tls if tls else None, path, timeout)

    async def _icmp(self, host: str, timeout: float, o: LinkProfile) -> list[float | None] | None:
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
