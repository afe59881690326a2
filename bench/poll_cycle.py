"""CPU time per poll cycle of one exam room: an SNMP UPS, a switch, two cameras, a serial UPS, a noise meter.

Side by side in one run: our collectors (SNMP through pysnmp, Megatec and Modbus through pyserial/pymodbus), and
net-snmp's ``snmpget``/``snmpbulkwalk`` doing the same SNMP requests (one snmpget for a device's scalars, one
snmpbulkwalk per table column, as net-snmp walks one subtree per call). Our CPU is this process's
(``time.process_time``: parsing and Readings included); net-snmp's is its child processes' user+sys
(``resource.getrusage(RUSAGE_CHILDREN)``). The simulators run as child processes that are only reaped
after the measurement, so their CPU is in neither figure.

    python bench/poll_cycle.py [cycles]
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examwatch.collectors.base import Health
from examwatch.collectors.snmp import SnmpCollector, SnmpOptions, profile_named
from examwatch.edge.config import Device
from examwatch.simulators.snmp import MODELS, SnmpSimulator

ROOM = {"ups": "ups", "switch": "switch", "cam1": "camera", "cam2": "camera"}  # community -> model


class Sink:
    def __init__(self) -> None:
        self.count = 0

    def add(self, reading: object) -> None:
        self.count += 1

    def add_all(self, readings: list[object]) -> None:
        self.count += len(readings)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def netsnmp_commands(address: str) -> list[list[str]]:
    cmds = []
    for community, model in ROOM.items():
        profile = profile_named(MODELS[model].profile)
        base = ["-v2c", "-c", community, "-On", "-t", "2", "-r", "1", address]
        if profile.scalars:
            cmds.append(["snmpget", *base, *(".".join(map(str, o)) for o in profile.scalars.values())])
        for table in profile.tables:
            for col in table.columns.values():
                cmds.append(["snmpbulkwalk", "-Cr25", *base, ".".join(map(str, col))])
    return cmds


async def ours(devices: list[Device], serial: list[Device], cycles: int) -> tuple[float, float, int]:
    from examwatch import collectors as registry

    sink, health = Sink(), Health()
    snmp = SnmpCollector(devices, sink, health)
    collectors: list[tuple[object, Device]] = [(snmp, d) for d in devices]
    for d in serial:  # each serial device on its own port, with its protocol's collector
        collectors.append((registry.get(d.protocol)([d], sink, health), d))

    async def cycle() -> None:
        await asyncio.gather(*(c.poll_once(d) for c, d in collectors))  # type: ignore[attr-defined]

    for _ in range(5):  # warm up: engine, profiles, serial port open
        await cycle()
    offline = [name for name, h in health.devices.items() if not h.online]
    if offline:
        raise SystemExit(f"devices offline before measuring: {offline}")
    cpu, wall, n0 = time.process_time(), time.perf_counter(), sink.count
    for _ in range(cycles):
        await cycle()
    return (time.process_time() - cpu) / cycles, (time.perf_counter() - wall) / cycles, (sink.count - n0) // cycles


def snmp_only(devices: list[Device], cycles: int) -> tuple[float, int]:
    async def run() -> tuple[float, int]:
        cpu, _, n = await ours(devices, [], cycles)
        return cpu, n

    return asyncio.run(run())


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    if not shutil.which("snmpget"):
        raise SystemExit("net-snmp's snmpget is needed (apt-get install snmp)")
    with tempfile.TemporaryDirectory() as tmp:
        sim = SnmpSimulator(Path(tmp), ROOM)
        sim.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            devices = [
                Device(name=c, kind="ups" if m == "ups" else "switch" if m == "switch" else "camera", protocol="snmp",
                       address=sim.address, profile=MODELS[m].profile, interval=10, timeout=2, retries=1,
                       options=SnmpOptions(community=c))
                for c, m in ROOM.items()
            ]  # fmt: skip
            from examwatch import collectors as registry

            serial: list[Device] = []
            root = Path(__file__).resolve().parent.parent
            # (protocol, simulator module, profile, extra options): a serial UPS and an RS485 noise meter on pty pairs
            for protocol, simulator, profile in (
                ("megatec", "examwatch.simulators.megatec", "pack-voltage"),
                ("modbus_noise", "examwatch.simulators.modbus_noise", "generic-u16x10"),
            ):
                dev_end, agent_end = Path(tmp) / f"{protocol}-device", Path(tmp) / f"{protocol}-agent"
                procs.append(
                    subprocess.Popen(["socat", f"pty,raw,echo=0,link={dev_end}", f"pty,raw,echo=0,link={agent_end}"])
                )
                while not (dev_end.exists() and agent_end.exists()):
                    time.sleep(0.02)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", simulator, str(dev_end)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        cwd=root,
                    )
                )
                serial.append(Device(name=protocol, kind="ups" if protocol == "megatec" else "noise", protocol=protocol,
                                     address=str(agent_end), profile=profile, interval=10, timeout=1, retries=1,
                                     options=registry.get(protocol).Options()))  # fmt: skip
            time.sleep(0.5)

            snmp_cpu, snmp_readings = snmp_only(devices, cycles)
            room_cpu, room_wall, room_readings = asyncio.run(ours(devices, serial, cycles))

            cmds = netsnmp_commands(sim.address)
            for cmd in cmds:  # warm up and check they answer
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            before, wall = children_cpu(), time.perf_counter()
            for _ in range(cycles):
                for cmd in cmds:
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            net_cpu = (children_cpu() - before) / cycles
            net_wall = (time.perf_counter() - wall) / cycles
        finally:
            for p in procs:
                p.terminate()
            sim.stop()
            for p in procs:
                p.wait()

    ms = 1000
    print(
        f"## CPU per poll cycle ({cycles} cycles; SNMP: UPS-MIB UPS, 25-port switch, 2 cameras with HOST-RESOURCES "
        "storage)\n"
    )
    print("| what | CPU ms / cycle | wall ms / cycle | readings / cycle | processes / cycle |")
    print("|---|---:|---:|---:|---:|")
    print(f"| examwatch SNMP collector (4 devices, pysnmp asyncio) | {snmp_cpu * ms:.1f} | | {snmp_readings} | 0 |")
    print(
        f"| examwatch whole room (4 SNMP + serial UPS + noise meter) | {room_cpu * ms:.1f} | {room_wall * ms:.1f} | "
        f"{room_readings} | 0 |"
    )
    print(f"| of which serial UPS and noise meter (difference) | {(room_cpu - snmp_cpu) * ms:.1f} | | | 0 |")
    print(
        f"| net-snmp snmpget + snmpbulkwalk, same SNMP requests | {net_cpu * ms:.1f} | {net_wall * ms:.1f} | "
        f"(text only) | {len(cmds)} |"
    )
    print(f"\nnet-snmp / examwatch SNMP CPU ratio: {net_cpu / snmp_cpu:.1f}x")


if __name__ == "__main__":
    main()
