"""CPU time per poll for the serial, Modbus, ISAPI and link collectors, against the simulators.

The simulators run in their own processes (``python -m simulators.<name>``), so the figures are the
agent's own CPU (``time.process_time``) per poll, as on the Pi. Also: the pure parsers alone.

    python bench/poll_cpu_serial_http.py [cycles]
"""

from __future__ import annotations

import asyncio
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examwatch.collectors import isapi, links, megatec, modbus_noise
from examwatch.collectors.base import Health
from examwatch.edge.config import Device
from examwatch.simulators.broker import free_port, wait_port
from examwatch.simulators.serial_pty import PtyPair

CYCLES = int(sys.argv[1]) if len(sys.argv) > 1 else 200


class NullAcc:
    def add(self, reading: object) -> None:
        pass

    def add_all(self, readings: list[object]) -> None:
        pass


def tcp_service() -> int:
    """A TCP service that accepts and closes at once, standing in for the exam platform."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def sim(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )


async def measure(collector, cycles: int) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """Mean CPU and wall ms per poll of every device once; failed polls counted."""
    for d in collector.devices:  # warm up: open ports, digest challenge, ICMP socket mode
        await collector.poll_once(d)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(cycles):
        await asyncio.gather(*(collector.poll_once(d) for d in collector.devices))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    failed = sum(sum(h.errors.values()) for h in collector.health.devices.values())
    await collector.close()
    return cpu / cycles * 1000, wall / cycles * 1000, failed


def device(name: str, kind: str, protocol: str, address: str, options: object, **kw: object) -> Device:
    return Device(
        name=name,
        kind=kind,
        protocol=protocol,
        address=address,
        interval=1,
        timeout=1,
        retries=0,  # type: ignore[arg-type]
        options=options,
        **kw,
    )


def parse_bench() -> list[tuple[str, float]]:
    q1 = b"(218.0 218.0 219.0 016 50.0 2.27 30.0 00001000\r"
    xml = (Path(__file__).resolve().parent.parent / "tests/data/isapi/nvr-stdcgi-ns.xml").read_bytes()
    route = Path("/proc/net/route").read_text() if Path("/proc/net/route").exists() else ""
    p = modbus_noise.Profile(scale=0.1)
    out = []
    for name, fn in [
        ("megatec.parse_q1", lambda: megatec.parse_q1(q1)),
        ("isapi.parse_storage (2 disks, 2 NAS)", lambda: isapi.parse_storage(xml)),
        ("links.parse_routes (/proc/net/route)", lambda: links.parse_routes(route)),
        ("modbus_noise.decode", lambda: modbus_noise.decode([653], p)),
    ]:
        n = 20000
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((name, (time.perf_counter() - t) / n * 1e6))
    return out


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="examwatch-bench-"))
    ups_pair, noise_pair = PtyPair(work, "ups"), PtyPair(work, "noise")
    ups_pair.start()
    noise_pair.start()
    ports = [free_port(), free_port()]
    procs = [
        sim("examwatch.simulators.megatec", str(ups_pair.device)),
        sim("examwatch.simulators.modbus_noise", str(noise_pair.device), "generic-u16x10"),
    ]
    procs += [sim("examwatch.simulators.isapi", str(p)) for p in ports]
    try:
        for p in ports:
            wait_port(p)
        time.sleep(0.3)  # serial simulators open their ports
        rows = []
        cases = [
            (
                "serial UPS (Megatec Q1, 1 request)",
                megatec.MegatecCollector,
                [device("ups", "ups", "megatec", str(ups_pair.agent), megatec.Options(), profile="pack-voltage")],
            ),
            (
                "noise meter (Modbus RTU, 1 read)",
                modbus_noise.ModbusNoiseCollector,
                [device("noise", "noise", "modbus_noise", str(noise_pair.agent), modbus_noise.Options())],
            ),
            (
                "2 cameras (ISAPI storage, digest)",
                isapi.IsapiCollector,
                [
                    device(f"cam{i}", "camera", "isapi", f"127.0.0.1:{p}", isapi.Options(password="sim-pass"))
                    for i, p in enumerate(ports, 1)
                ],
            ),
            (
                "link (5 TCP probes)",
                links.LinksCollector,
                [
                    device(
                        "wan",
                        "link",
                        "links",
                        "127.0.0.1",
                        links.LinkOptions(method="tcp", port=tcp_service(), probe_interval=0.0),
                    )
                ],
            ),
            (
                "link (5 ICMP echoes, loopback)",
                links.LinksCollector,
                [device("wan", "link", "links", "127.0.0.1", links.LinkOptions(method="icmp", probe_interval=0.0))],
            ),
        ]
        for label, cls, devices in cases:
            c = cls(devices, NullAcc(), Health())
            rows.append((label, *(await measure(c, CYCLES))))
    finally:
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.terminate()
            p.wait(5)
        ups_pair.stop()
        noise_pair.stop()

    print(f"Poll cost per cycle, {CYCLES} cycles, Python {platform.python_version()}, {platform.machine()}\n")
    print("| collector | CPU ms per poll cycle | wall ms per poll cycle | failed polls |")
    print("|---|---:|---:|---:|")
    for label, cpu, wall, failed in rows:
        print(f"| {label} | {cpu:.2f} | {wall:.2f} | {failed} |")
    total = sum(r[1] for r in rows[:4])
    print(f"| **room: serial UPS + noise meter + 2 cameras + link (TCP)** | **{total:.2f}** | | |")
    print("\n| pure parser | µs per call |\n|---|---:|")
    for name, us in parse_bench():
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
