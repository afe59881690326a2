"""Agent footprint against collectd, side by side in one run on the same simulated devices (issue 13).

    python bench/footprint.py [--seconds 60] [--source DIR]

Starts snmpsim (the UPS-MIB recording), upsd with dummy-ups, the rest of the simulated room
(simulators/room.py) and mosquitto, then, all at the same time so they share the machine's load:

- collectd (Debian collectd-core, a long-running C daemon) polling the UPS over SNMP (one GET of the ten
  UPS-MIB OIDs of the ups-mib profile; v2c, and in a second collectd v3 SHA/AES) and, in a third, the upsd
  UPS (LIST VAR), every second;
- `examwatch agent run` polling only the SNMP UPS (profile ups-mib; v2c, and v3 through pysnmp), only the
  NUT UPS, every second;
- an agent with no device configured (the host collector is added by itself), the idle baseline;
- an agent watching the whole sample room: every protocol of the sample config, at the sample's intervals.

After a warm-up it samples each process's CPU (all threads) and RSS over the same window and prints a
markdown table for docs/benchmarks.md: CPU ms per poll (the process's CPU per second at a 1 s interval;
for the agents also less the idle agent's), RSS, and the agents' start-up time to ``agent_started``
(store open, rules loaded, collectors built, exporter serving: alarm-ready), and then the RSS that each
protocol's collector adds to the agent's imports. ``--source DIR`` runs the
agents from another checkout of the tree (e.g. the commit before a change), for before/after figures.

The agents run on a virtualenv holding only the project's runtime dependencies, as a room's Pi installs
them (made once, kept under ~/.cache/examwatch-bench): a development environment holds test tools that
libraries import when present (structlog imports greenlet, which playwright brings: 1.1 MiB of RSS).
``--python`` runs them on another interpreter instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psutil

from examwatch.simulators.broker import Mosquitto, free_port, wait_port
from examwatch.simulators.room import SimulatedRoom
from examwatch.simulators.snmp import V3_AUTH_KEY, V3_PRIV_KEY, V3_USER, SnmpSimulator, recording_path

REPO = Path(__file__).resolve().parents[1]

# The ten scalars of collectors/profiles/snmp/ups-mib.toml, in one GET as the agent sends them.
UPS_MIB_OIDS = [
    "1.3.6.1.2.1.33.1.2.1.0",
    "1.3.6.1.2.1.33.1.2.3.0",
    "1.3.6.1.2.1.33.1.2.4.0",
    "1.3.6.1.2.1.33.1.3.3.1.2.1",
    "1.3.6.1.2.1.33.1.3.3.1.3.1",
    "1.3.6.1.2.1.33.1.4.1.0",
    "1.3.6.1.2.1.33.1.4.4.1.2.1",
    "1.3.6.1.2.1.33.1.4.4.1.5.1",
    "1.3.6.1.2.1.33.1.6.1.0",
    "1.3.6.1.2.1.33.1.7.3.0",
]


# --- collectd ---------------------------------------------------------------------------------------------


def collectd_conf(work: Path, plugin_block: str, name: str) -> Path:
    """A minimal collectd.conf: interval 1, the plugin, and csv into ``work`` (the proof that it polls)."""
    types = work / f"{name}.types.db"
    # A type with ten gauges, so that one <Data> block is one GET of the ten OIDs (Table false).
    types.write_text("ups10 " + ", ".join(f"v{i}:GAUGE:U:U" for i in range(10)) + "\n")
    conf = work / f"{name}.conf"
    conf.write_text(
        f'Hostname "bench"\nFQDNLookup false\nBaseDir "{work}"\nPIDFile "{work}/{name}.pid"\n'
        f'TypesDB "/usr/share/collectd/types.db" "{types}"\nInterval 1\n'
        "LoadPlugin logfile\n"
        f'<Plugin logfile>\n  LogLevel "warning"\n  File "{work}/{name}.log"\n</Plugin>\n'
        f'LoadPlugin csv\n<Plugin csv>\n  DataDir "{work}/{name}-csv"\n</Plugin>\n' + plugin_block
    )
    return conf


def collectd_snmp_block(address: str, community: str, v3: bool = False) -> str:
    host, port = address.rsplit(":", 1)
    oids = " ".join(f'"{o}"' for o in UPS_MIB_OIDS)
    auth = (
        f'    Version 3\n    Username "{V3_USER}"\n    SecurityLevel "authPriv"\n    AuthProtocol "SHA"\n'
        f'    AuthPassphrase "{V3_AUTH_KEY}"\n    PrivacyProtocol "AES"\n    PrivacyPassphrase "{V3_PRIV_KEY}"\n'
        f'    Context "{community}"\n'
        if v3
        else f'    Version 2\n    Community "{community}"\n'
    )
    return (
        "LoadPlugin snmp\n<Plugin snmp>\n"
        f'  <Data "ups">\n    Type "ups10"\n    Table false\n    Values {oids}\n  </Data>\n'
        f'  <Host "ups1">\n    Address "udp:{host}:{port}"\n{auth}'
        '    Collect "ups"\n    Interval 1\n    Timeout 1\n    Retries 0\n  </Host>\n</Plugin>\n'
    )


def collectd_nut_block(address: str) -> str:
    return f'LoadPlugin nut\n<Plugin nut>\n  UPS "{address}"\n</Plugin>\n'


def start_collectd(conf: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("collectd") or "/usr/sbin/collectd"
    return subprocess.Popen([exe, "-f", "-C", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- examwatch agents -------------------------------------------------------------------------------------


def source_tree(source: Path, work: Path) -> Path:
    """A folder from which ``python -m examwatch`` imports ``source``'s tree: the installed namespace as
    pyproject's package-dir maps it (examwatch/<sub> -> the top-level folder), as links."""
    root = work / "source"
    pkg = root / "examwatch"
    pkg.mkdir(parents=True)
    for f in (source / "examwatch").glob("*.py"):
        (pkg / f.name).symlink_to(f)
    package_dir = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in package_dir.items():
        if name != "examwatch":  # examwatch.kernel -> kernel/, ...
            (pkg / name.removeprefix("examwatch.")).symlink_to(source / folder)
    return root


def agent_config(work: Path, name: str, broker: int, devices: str) -> tuple[Path, int]:
    exporter = free_port()
    state = work / f"{name}-state"
    conf = work / f"{name}.toml"
    conf.write_text(
        f'[agent]\nsite = "bench"\nroom = "{name}"\nkind = "exam_room"\nstate_dir = "{state}"\n'
        f'[mqtt]\nport = {broker}\n[exporter]\nlisten = "127.0.0.1:{exporter}"\n'
        f'[uplink]\nenabled = true\nport = {broker}\nsigning_key = "{"cd" * 32}"\n{devices}\n'
    )
    return conf, exporter


class Agent:
    def __init__(self, name: str, conf: Path, exporter: int, cwd: Path, python: str) -> None:
        self.name, self.exporter = name, exporter
        self.log = conf.with_suffix(".log")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [python, "-m", "examwatch", "agent", "run", "--config", str(conf)],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(cwd)},
        )
        self.ready_after: float | None = None

    def poll_ready(self) -> bool:
        if self.ready_after is None and b'"agent_started"' in self.log.read_bytes():
            self.ready_after = time.perf_counter() - self.started
        if self.proc.poll() is not None:
            raise RuntimeError(f"agent {self.name} exited: {self.log.read_text()[-2000:]}")
        return self.ready_after is not None

    def errors(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if '"level": "error"' in line][:3]


def snmp_device(address: str, interval: float, v3: bool = False) -> str:
    auth = (
        f'version = "3"\nuser = "{V3_USER}"\nauth_key = "{V3_AUTH_KEY}"\npriv_key = "{V3_PRIV_KEY}"\ncontext = "ups"\n'
        if v3
        else 'community = "ups"\n'
    )
    return (
        f'[[devices]]\nname = "ups1"\nkind = "ups"\nprotocol = "snmp"\naddress = "{address}"\n{auth}'
        f'profile = "ups-mib"\ninterval = {interval}\ntimeout = 1.0\nretries = 0\n'
    )


def nut_device(address: str, interval: float) -> str:
    return (
        f'[[devices]]\nname = "ups2"\nkind = "ups"\nprotocol = "nut"\naddress = "{address}"\n'
        f"interval = {interval}\ntimeout = 1.0\nretries = 0\n"
    )


def room_devices(room: SimulatedRoom, platform_port: int) -> str:
    """Every protocol of the sample config (edge/sample.toml and the collectors' samples), at their intervals."""
    return room.devices_toml(interval=10.0) + (
        '\n[[devices]]\nname = "secrecy-door"\nkind = "door"\nprotocol = "mqtt"\n'
        'topic = "zigbee2mqtt/secrecy-door"\nprofile = "zigbee2mqtt_contact"\ninterval = 3600.0\navailability = true\n'
        '\n[[devices]]\nname = "uplink-net"\nkind = "link"\nprotocol = "links"\naddress = "127.0.0.1"\n'
        f'method = "tcp"\nport = {platform_port}\ninterval = 10.0\n'
    )


def start_alone(work: Path, name: str, broker: int, devices: str, cwd: Path, python: str) -> float:
    """Seconds from exec to ``agent_started`` for one agent with nothing else starting beside it."""
    conf, exporter = agent_config(work, name, broker, devices)
    agent = Agent(name, conf, exporter, cwd, python)
    try:
        deadline = time.monotonic() + 60
        while not agent.poll_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {name} not started within 60 s")
            time.sleep(0.01)
        assert agent.ready_after is not None
        return agent.ready_after
    finally:
        agent.proc.terminate()
        agent.proc.wait(10)


def runtime_python() -> str:
    """An interpreter with the project's runtime dependencies and nothing else (no test extras)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    tag = hashlib.sha256("\n".join([sys.version, *deps]).encode()).hexdigest()[:12]
    venv = Path.home() / ".cache" / "examwatch-bench" / f"agent-{tag}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *deps], check=True)
    return str(python)


# --- measuring --------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid``, in nanoseconds from the scheduler (schedstat): user and system
    times tick in 10 ms, a quarter of a millisecond per second over a 40 s window, as much as what is compared."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except (OSError, ValueError, IndexError):  # no schedstat (an older or other kernel), or a thread just ended
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


PROTOCOLS = ("snmp", "snmp v3", "nut", "megatec", "modbus_noise", "isapi", "links", "mqtt", "host")

# RSS of a process that imports the agent, then builds one collector of a protocol, as the agent does at
# start (SNMPv3: with one v3 device, which loads pysnmp): what that protocol adds, its libraries included.
_RSS_OF_PROTOCOL = """
import asyncio, sys
import examwatch.edge.runtime
from examwatch.collectors import Health, get

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

class Acc:
    def add(self, reading): pass
    def add_all(self, readings): pass

async def build():
    protocol, _, variant = sys.argv[1].partition(" ")
    if not protocol:
        return
    devices = []
    if variant == "v3":
        from examwatch.collectors.snmp import SnmpOptions
        from examwatch.edge.config import Device
        options = SnmpOptions(version="3", user="u", auth_key="authkey12", priv_key="privkey12")
        devices = [Device(name="sw", kind="switch", protocol="snmp", address="127.0.0.1", options=options)]
    get(protocol)(devices, Acc(), Health())

base = rss()
asyncio.run(build())
print(f"{base:.1f} {rss() - base:.1f}")
"""


def rss_by_protocol(cwd: Path, python: str = sys.executable) -> dict[str, tuple[float, float]]:
    out = {}
    for protocol in ("", *PROTOCOLS):
        run = subprocess.run(
            [python, "-c", _RSS_OF_PROTOCOL, protocol],
            check=False,
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(cwd)},
        )
        base, added = run.stdout.split() if run.returncode == 0 else ("nan", "nan")
        out[protocol or "(none)"] = (float(base), float(added))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0, help="measuring window, after the warm-up")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--source", type=Path, default=REPO, help="the tree the agents run from")
    ap.add_argument("--python", help="the agents' interpreter (default: a virtualenv of the runtime dependencies)")
    args = ap.parse_args()
    python = args.python or runtime_python()
    work = Path(tempfile.mkdtemp(prefix="examwatch-footprint-"))
    work.chmod(0o755)  # snmpsim and upsd drop privileges and must read their files
    snmp = SnmpSimulator(work / "snmp", {"ups": "ups"})
    room = SimulatedRoom(work / "room")
    broker = Mosquitto(work / "broker")
    platform_srv = subprocess.Popen(  # the exam platform's port for the link probe: accepts, closes
        [sys.executable, "-c", _TCP_SERVICE, str(platform_port := free_port())], stdout=subprocess.DEVNULL
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    agents: list[Agent] = []
    try:
        snmp.start()
        snmp.set_state("ups", "healthy")
        room.start()
        broker.start()
        wait_port(platform_port)
        nut_address = room.nut.address  # ups@host:port, as both collectd and the agent take it
        procs["collectd snmp (one GET, 10 OIDs)"] = start_collectd(
            collectd_conf(work, collectd_snmp_block(snmp.address, "ups"), "collectd-snmp")
        )
        procs["collectd snmp v3 SHA/AES (one GET, 10 OIDs)"] = start_collectd(
            collectd_conf(work, collectd_snmp_block(snmp.address, "ups", v3=True), "collectd-snmpv3")
        )
        procs["collectd nut (LIST VAR)"] = start_collectd(
            collectd_conf(work, collectd_nut_block(nut_address), "collectd-nut")
        )
        cwd = source_tree(args.source.resolve(), work)  # the runtime virtualenv does not hold the project
        for name, devices in (
            ("examwatch snmp ups-mib (one GET, 10 OIDs)", snmp_device(snmp.address, 1.0)),
            ("examwatch snmp v3 SHA/AES ups-mib (one GET, 10 OIDs)", snmp_device(snmp.address, 1.0, v3=True)),
            ("examwatch nut (LIST VAR)", nut_device(nut_address, 1.0)),
            ("examwatch agent with no device polled", ""),
            ("examwatch whole sample room (9 devices, 8 protocols)", room_devices(room, platform_port)),
        ):
            short = f"agent{len(agents)}"
            conf, exporter = agent_config(work, short, broker.port, devices)
            agents.append(Agent(name, conf, exporter, cwd, python))
        deadline = time.monotonic() + 60
        while not all(a.poll_ready() for a in agents):
            if time.monotonic() > deadline:
                raise TimeoutError("agents not started within 60 s")
            time.sleep(0.02)
        time.sleep(args.warmup)
        pids = {name: p.pid for name, p in procs.items()} | {a.name: a.proc.pid for a in agents}
        cpu0, t0 = {n: cpu_seconds(p) for n, p in pids.items()}, time.monotonic()
        rss: dict[str, list[float]] = {n: [] for n in pids}
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1.0)
            for n, p in pids.items():
                rss[n].append(rss_mib(p))
        elapsed = time.monotonic() - t0
        cpu = {n: (cpu_seconds(p) - cpu0[n]) / elapsed * 1000 for n, p in pids.items()}
        report(work, args, python, elapsed, cpu, rss, agents)
        print("\n| protocol | RSS MiB the agent's imports | added by the protocol's collector |")
        print("|---|---:|---:|")
        for protocol, (base, added) in rss_by_protocol(cwd, python).items():
            print(f"| {protocol} | {base:.1f} | {added:.1f} |")
        for a in agents:  # the start-up of one agent alone, as after a reboot
            a.proc.terminate()
            a.proc.wait(10)
        devices = room_devices(room, platform_port)
        starts = [start_alone(work, f"alone{i}", broker.port, devices, cwd, python) for i in range(3)]
        print(f"\nwhole sample room agent started alone, to alarm-ready: {', '.join(f'{s:.2f}' for s in starts)} s")
    finally:
        for a in agents:
            a.proc.terminate()
        for p in [*procs.values(), platform_srv]:
            p.terminate()
        for p in [*(a.proc for a in agents), *procs.values(), platform_srv]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
        room.stop()
        snmp.stop()


def report(
    work: Path, args: argparse.Namespace, python: str, elapsed: float, cpu: dict[str, float], rss: dict, agents: list
) -> None:
    idle = cpu["examwatch agent with no device polled"]
    for name in ("collectd-snmp", "collectd-snmpv3", "collectd-nut"):  # a csv row per poll: proof it polled
        rows = sum(len(f.read_text().splitlines()) - 1 for f in (work / f"{name}-csv").rglob("*") if f.is_file())
        if rows <= 0:
            sys.exit(f"{name} recorded nothing: {(work / f'{name}.log').read_text()[-1000:]}")
    print(f"\n{platform.machine()}, Python {platform.python_version()}, source {args.source}, agents on {python}, "
          f"{elapsed:.0f} s window after {args.warmup:.0f} s warm-up, all processes running at once\n")  # fmt: skip
    print("| process | CPU ms per poll (per s) | less idle agent | RSS MiB (max) | start-up to alarm-ready s |")
    print("|---|---:|---:|---:|---:|")
    for name, ms in cpu.items():
        agent = next((a for a in agents if a.name == name), None)
        net = f"{ms - idle:.1f}" if agent and agent.name != "examwatch agent with no device polled" else ""
        start = f"{agent.ready_after:.2f}" if agent and agent.ready_after else ""
        print(f"| {name} | {ms:.1f} | {net} | {max(rss[name]):.1f} | {start} |")
    for a in agents:
        if errs := a.errors():
            print(f"\n{a.name}: errors in its log, e.g. {errs[0][:300]}")


_TCP_SERVICE = """
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=64)
while True:
    srv.accept()[0].close()
"""

if __name__ == "__main__":
    assert recording_path("ups").is_file()
    main()
