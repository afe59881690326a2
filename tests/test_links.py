"""Network links: the routing table parser, and probes against real sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from examwatch.collectors.base import Health
from examwatch.collectors.links import (
    DEFAULT_GATEWAY,
    ROUTE_TABLE,
    LinkOptions,
    LinksCollector,
    default_route,
    parse_routes,
    summarize,
)
from examwatch.edge.config import Device
from tests.support import Recorder, RulesRecorder, run_for, running, wait_until

HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
# A Raspberry Pi with wired Ethernet (metric 100) and a 4G USB dongle as backup (metric 700),
# as NetworkManager/dhcpcd set them up.
DUAL = HEADER + (
    "eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
    "wwan0\t00000000\t012BA8C0\t0003\t0\t0\t700\t00000000\t0\t0\t0\n"
    "eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
    "wwan0\t002BA8C0\t00000000\t0001\t0\t0\t700\t00FFFFFF\t0\t0\t0\n"
)
# The Ethernet cable is pulled: its default route is gone, the dongle carries the traffic.
BACKUP_ONLY = HEADER + (
    "wwan0\t00000000\t012BA8C0\t0003\t0\t0\t700\t00000000\t0\t0\t0\n"
    "wwan0\t002BA8C0\t00000000\t0001\t0\t0\t700\t00FFFFFF\t0\t0\t0\n"
)


def test_parse_routes_and_pick_the_default() -> None:
    routes = parse_routes(DUAL)
    assert [(r.interface, r.destination, r.gateway, r.metric) for r in routes[:2]] == [
        ("eth0", "0.0.0.0", "192.168.1.1", 100),
        ("wwan0", "0.0.0.0", "192.168.43.1", 700),
    ]
    assert routes[2].mask == "255.255.255.0" and routes[2].destination == "192.168.1.0"
    d = default_route(routes)
    assert d is not None and (d.interface, d.gateway) == ("eth0", "192.168.1.1")
    b = default_route(parse_routes(BACKUP_ONLY))
    assert b is not None and b.interface == "wwan0"
    assert default_route(parse_routes(HEADER)) is None
    assert parse_routes(HEADER + "garbage line\neth0\tZZZZ\t0\t0003\t0\t0\t0\t0\n") == []


def test_summarize_a_burst() -> None:
    got = {r.metric: r.value for r in summarize("wan", [0.010, None, 0.030, None], 0.0)}
    assert got == {"link_up": 1.0, "link_loss_ratio": 0.5, "link_rtt_seconds": pytest.approx(0.020)}
    lost = {r.metric: r.value for r in summarize("wan", [None, None], 0.0)}
    assert lost == {"link_up": 0.0, "link_loss_ratio": 1.0}


# --- real sockets -----------------------------------------------------------------------------------------------


class Platform:
    """A TCP service on loopback standing in for the exam platform; ``cut()`` makes it stop answering.

    A listening socket that stops accepting, with its one-slot accept queue filled, drops new SYNs:
    connects time out exactly as they do towards a host behind a dead link.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepting = threading.Event()
        self.accepting.set()
        self.stopped = threading.Event()
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            if not self.accepting.is_set():
                time.sleep(0.02)
                continue
            try:
                conn, _ = self.sock.accept()
                conn.close()
            except OSError:
                pass

    def cut(self) -> None:
        self.accepting.clear()
        time.sleep(0.1)  # let the accept loop notice
        for _ in range(2):  # fill the accept queue
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.held.append(s)
        time.sleep(0.1)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        for s in self.held:
            s.close()
        self.sock.close()


@pytest.fixture
def platform() -> Iterator[Platform]:
    p = Platform()
    yield p
    p.close()


def link(name: str, address: str, **opts: object) -> Device:
    o = {"method": "tcp", "probes": 3, "probe_interval": 0.05} | opts
    return Device(
        name=name,
        kind="link",
        protocol="links",
        address=address,
        interval=0.3,
        timeout=0.3,
        retries=0,
        options=LinkOptions(**o),
    )  # type: ignore[arg-type]


def poll(c: LinksCollector) -> None:
    async def go() -> None:
        for d in c.devices:
            await c.poll_once(d)

    asyncio.run(go())


def test_tcp_probes_up_refused_and_silent(platform: Platform) -> None:
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()  # nothing listens: the kernel answers with a reset
    acc = Recorder()
    c = LinksCollector(
        [link("platform", "127.0.0.1", port=platform.port), link("closed", "127.0.0.1", port=refused_port)],
        acc,
        Health(),
    )
    poll(c)
    assert acc.latest("platform", "link_up") == 1.0 and acc.latest("platform", "link_loss_ratio") == 0.0
    assert 0 < (acc.latest("platform", "link_rtt_seconds") or 0) < 0.3
    assert acc.latest("closed", "link_up") == 1.0  # refused still proves the host is reachable
    platform.cut()
    poll(c)
    assert acc.latest("platform", "link_up") == 0.0 and acc.latest("platform", "link_loss_ratio") == 1.0
    assert acc.latest("platform", "device_online") == 1.0  # the link is down, the collector is fine


def test_link_loss_shows_within_one_interval(platform: Platform) -> None:
    acc = Recorder()
    dev = link("platform", "127.0.0.1", port=platform.port)
    c = LinksCollector([dev], acc, Health())

    async def go() -> None:
        async with running(c):
            await acc.reaches("platform", "link_up", 1.0, 5)
            await asyncio.to_thread(platform.cut)
            await acc.reaches("platform", "link_up", 0.0, dev.interval + dev.timeout + 1)

    asyncio.run(go())


def test_silent_target_does_not_stall_others(platform: Platform) -> None:
    silent = Platform()
    silent.cut()
    acc = Recorder()
    c = LinksCollector(
        [
            link("platform", "127.0.0.1", port=platform.port),
            link("dead", "127.0.0.1", port=silent.port, probes=5, probe_interval=0.2),
        ],
        acc,
        Health(),
    )

    try:
        run_for(c, 2.0)
    finally:
        silent.close()
    assert sum(1 for r in acc.readings if r.device == "platform" and r.metric == "link_up" and r.value == 1.0) >= 4
    assert acc.latest("dead", "link_up") == 0.0


def icmp_permitted() -> bool:
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ping_group_range").read_text().split())
    return os.geteuid() == 0 or lo <= os.getegid() <= hi


@pytest.mark.skipif(not icmp_permitted(), reason="no ICMP sockets for this user (ping_group_range) and not root")
def test_icmp_echo_to_loopback() -> None:
    acc = Recorder()
    poll(LinksCollector([link("lo", "127.0.0.1", method="icmp")], acc, Health()))
    assert acc.latest("lo", "link_up") == 1.0 and acc.latest("lo", "link_loss_ratio") == 0.0
    assert 0 < (acc.latest("lo", "link_rtt_seconds") or 0) < 0.3


def test_unknown_host_is_a_device_state() -> None:
    acc, health = Recorder(), Health()
    poll(LinksCollector([link("bad", "no-such-host.invalid", method="icmp")], acc, health))
    if icmp_permitted():
        assert health.devices["bad"].errors["name_lookup"] == 1
    else:
        assert health.devices["bad"].errors["icmp_not_permitted"] == 1
    assert acc.latest("bad", "device_online") == 0.0


@pytest.mark.skipif(not ROUTE_TABLE.exists(), reason="no /proc/net/route")
def test_primary_link_from_this_machines_routing_table() -> None:
    route = default_route(parse_routes(ROUTE_TABLE.read_text()))
    acc = Recorder()
    primary = route.interface if route else "eth0"
    c = LinksCollector(
        [
            link("wan", DEFAULT_GATEWAY, primary_interface=primary, probes=1),
            link("wan-backup-view", DEFAULT_GATEWAY, primary_interface="wwan-not-here", probes=1),
        ],
        acc,
        Health(),
    )
    poll(c)
    assert acc.latest("wan", "link_primary_active") == (1.0 if route else 0.0)
    assert acc.latest("wan-backup-view", "link_primary_active") == 0.0
    assert acc.latest("wan", "link_up") is not None and acc.latest("wan", "device_online") == 1.0


def test_config_check_burst_must_fit_the_poll_budget() -> None:
    from examwatch.edge.config import ConfigError, loads

    base = (
        '[agent]\nsite = "s"\nroom = "r"\n[[devices]]\nname = "wan"\nkind = "link"\nprotocol = "links"\n'
        'address = "default-gateway"\n'
    )
    loads(base + 'primary_interface = "eth0"\n')
    with pytest.raises(ConfigError) as err:
        loads(base + "timeout = 1\nretries = 0\nprobes = 20\nprobe_interval = 1.0\n")
    assert "devices[0].probes" in str(err.value)


def test_platform_unreachable_raises_link_down(platform: Platform) -> None:
    """Real sockets -> collector -> the default rule pack (``for`` shortened to 0)."""
    from examwatch.edge.config import loads

    cfg = loads(
        '[agent]\nsite = "s1"\nroom = "r1"\n[[devices]]\nname = "platform"\nkind = "link"\nprotocol = "links"\n'
        f'address = "127.0.0.1"\nmethod = "tcp"\nport = {platform.port}\nprobes = 3\nprobe_interval = 0.05\n'
        "interval = 0.3\ntimeout = 0.3\nretries = 0\n[rules.link_down]\nfor = 0\n"
    )
    alarms = RulesRecorder(cfg)
    c = LinksCollector(cfg.devices, alarms, Health())

    async def go() -> None:
        async with running(c):
            await asyncio.sleep(0.5)
            assert alarms.raised == []
            await asyncio.to_thread(platform.cut)
            d = cfg.devices[0]
            await wait_until(lambda: "link_down" in alarms.raised, d.interval + d.timeout + 1, "link_down raised")

    asyncio.run(go())


def test_the_exam_platform_profile_wants_an_http_answer_where_a_bare_connect_is_not_enough(platform: Platform) -> None:
    """A web service behind a proxy: the connect succeeds even when nothing answers; the profile asks HTTP."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answering(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def web(name: str, address: str, profile: str = "exam-platform", **opts: object) -> Device:
        return Device(name=name, kind="link", protocol="links", address=address, profile=profile, interval=0.3,
                      timeout=0.5, retries=0, options=LinkOptions(probes=2, probe_interval=0.05, **opts))  # type: ignore[arg-type]  # fmt: skip

    try:
        acc = Recorder()
        devices = [
            web("platform", f"http://127.0.0.1:{server.server_address[1]}/health"),
            web("proxy", f"http://127.0.0.1:{platform.port}/"),  # accepts and hangs up: no HTTP answer
            web("proxy-tcp", "127.0.0.1", profile="default", method="tcp", port=platform.port),
        ]
        poll(LinksCollector(devices, acc, Health()))
    finally:
        server.shutdown()
        server.server_close()
    assert acc.latest("platform", "link_up") == 1.0 and acc.latest("platform", "link_loss_ratio") == 0.0
    assert acc.latest("proxy", "link_up") == 0.0
    assert acc.latest("proxy-tcp", "link_up") == 1.0  # what the default profile's connect would have said


def test_a_device_key_overrides_its_profile_and_a_url_needs_the_http_method() -> None:
    from examwatch.collectors.links import settings

    p = LinksCollector.load_profile("county-broker")
    assert (p.method, p.port) == ("tcp", 8883)
    assert settings(p, LinkOptions(port=1883)).port == 1883 and settings(p, None) is p
    url = Device(name="x", kind="link", protocol="links", address="https://platform.example/", profile="gateway",
                 options=LinkOptions())  # fmt: skip
    assert [k for k, _ in LinksCollector.check(url)] == ["address"]
