"""Mains loss on a serial Megatec/Q1 UPS: how soon examwatch and NUT's nutdrv_qx notice, on one simulated UPS.

    python bench/ups_detect.py [--flips 12] [--cpu-seconds 60] [--watch-interval S]

One simulated UPS (simulators/megatec.py), paced like a real 2400-baud line, served on two pty pairs: the
agent (`examwatch agent run`, its Megatec device on the sample's settings and the protocol's defaults) reads
one, NUT's nutdrv_qx (Debian nut-server, its default poll interval) the other. The mains fails and returns
FLIPS times at random moments. examwatch's latency: from the flip to its signed ``ups_on_battery`` alarm
arriving on the county broker (rules, SQLite commit and uplink included). NUT's: from the flip to the driver
pushing ``ups.status OB`` on its socket (what upsd hears; upsmon would hear it later still). Then the
agent's CPU (user + system) over CPU_SECONDS of steady polling, as CPU seconds per minute, and the driver's.
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examwatch.simulators.broker import Mosquitto, free_port, wait_port
from examwatch.simulators.megatec import MegatecSimulator
from examwatch.simulators.serial_pty import PtyPair
from tests.support.agent import Watcher, agent_toml

DRIVER = Path("/lib/nut/nutdrv_qx")


class NutWatcher:
    """Listens on nutdrv_qx's socket as upsd does (DUMPALL, then pushed SETINFO lines); times each status."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 30
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"nutdrv_qx made no socket {path}")
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.sock.sendall(b"DUMPALL\n")
        self.statuses: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := self.sock.recv(4096):
            now = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"SETINFO ups.status "):
                    with self.lock:
                        self.statuses.append((now, line.split(b" ", 2)[2].strip(b'"').decode()))

    def first(self, after: float, on_battery: bool) -> float | None:
        with self.lock:
            return next((t for t, s in self.statuses if t >= after and ("OB" in s.split()) == on_battery), None)


def wait_for(check, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.005)
    return None


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} | {max(xs):.2f}" if xs else "– | –"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flips", type=int, default=12)
    ap.add_argument("--cpu-seconds", type=float, default=60.0)
    ap.add_argument("--watch-interval", type=float, default=0.0, help="set the device's; 0: the protocol's default")
    ap.add_argument("--baud", type=int, default=2400)
    args = ap.parse_args()
    if not DRIVER.exists():
        sys.exit("needs Debian's nut-server (/lib/nut/nutdrv_qx)")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours, theirs = PtyPair(work, "agent-ups"), PtyPair(work, "nut-ups")
        ours.start()
        theirs.start()
        sim = MegatecSimulator(str(ours.device), baud=args.baud)
        twin = sim.twin(str(theirs.device))
        sim.start()
        twin.start()
        broker = Mosquitto(work)
        broker.start()
        watcher = Watcher(broker.port)
        exporter = free_port()
        watch = f"watch_interval = {args.watch_interval}\n" if args.watch_interval else ""
        body = (  # the sample's Megatec block
            f'[[devices]]\nname = "ups3"\nkind = "ups"\nprotocol = "megatec"\naddress = "{ours.agent}"\n'
            f'profile = "pack-voltage"\ninterval = 5.0\ntimeout = 1.0\n{watch}'
        )
        cfg = work / "agent.toml"
        cfg.write_text(agent_toml(broker.port, exporter, work / "state", body=body), encoding="utf-8")
        agent = subprocess.Popen(
            [sys.executable, "-m", "examwatch", "--log-level", "warning", "agent", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
        )
        env = dict(os.environ, NUT_STATEPATH=str(work), NUT_CONFPATH=str(work))
        nut_cmd = [str(DRIVER), "-s", "sim", "-x", f"port={theirs.agent}", "-x", "protocol=megatec", "-F"]
        if os.geteuid() == 0:
            nut_cmd += ["-u", "root"]
        nut = subprocess.Popen(nut_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(exporter, timeout=20)
            nut_socket = NutWatcher(work / "nutdrv_qx-sim")
            time.sleep(3)  # both have opened their ports and asked F and I
            lost: dict[str, list[float]] = {"examwatch": [], "nut": []}
            back: dict[str, list[float]] = {"examwatch": [], "nut": []}
            rng = random.Random(12)
            for _ in range(args.flips):
                for mode, into in (("battery", lost), ("line", back)):
                    time.sleep(rng.uniform(2.5, 4.5))  # any phase of either poll cycle
                    flip = time.monotonic()
                    sim.set_mode(mode)  # type: ignore[arg-type]
                    state = "raised" if mode == "battery" else "cleared"
                    ew = wait_for(
                        lambda s=state, f=flip: next(
                            (
                                t
                                for t, e in list(watcher.alarms)
                                if t >= f and e.rule == "ups_on_battery" and e.state == s
                            ),
                            None,
                        ),
                        15,
                    )
                    nt = wait_for(lambda f=flip, m=mode: nut_socket.first(f, m == "battery"), 15)
                    if ew is not None:
                        into["examwatch"].append(ew - flip)
                    if nt is not None:
                        into["nut"].append(nt - flip)
            me, driver = psutil.Process(agent.pid), psutil.Process(nut.pid)
            c0, d0, t0 = cpu(me), cpu(driver), time.monotonic()
            time.sleep(args.cpu_seconds)
            span = time.monotonic() - t0
            agent_cpu, nut_cpu = (cpu(me) - c0) / span * 60, (cpu(driver) - d0) / span * 60
        finally:
            agent.terminate()
            nut.terminate()
            agent.wait(10)
            nut.wait(10)
            watcher.close()
            broker.stop()
            sim.stop()
            twin.stop()
            ours.stop()
            theirs.stop()

    print(f"\n{args.flips} mains failures and returns, Megatec simulator paced at {args.baud} baud, one run")
    print(f"examwatch: Megatec watch_interval {args.watch_interval or 'default'}, interval 5 s; NUT 2.8.0 defaults\n")
    print("| who | mains lost: median s | max s | mains back: median s | max s | missed | CPU s per minute |")
    print("|---|---|---|---|---|---|---|")
    for who, load in (
        ("examwatch (alarm at the county broker)", agent_cpu),
        ("NUT nutdrv_qx (driver socket)", nut_cpu),
    ):
        key = "examwatch" if who.startswith("examwatch") else "nut"
        missed = 2 * args.flips - len(lost[key]) - len(back[key])
        print(f"| {who} | {summary(lost[key])} | {summary(back[key])} | {missed} | {load:.2f} |")
    print(f"\nplatform: {os.cpu_count()} CPUs, {sys.platform}, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
