"""Gateway scrape cost: one Prometheus scrape of a whole county, built from the database at scrape time.

Fills a real gateway database through the real ingest engine (every room's status naming its devices'
kinds, one readings message per room with every device's metrics), then times the exporter's page as
Prometheus fetches it: rendered to the text format (wall and CPU time, the machine may be shared), and
fetched over HTTP from the real endpoint with gzip, as Prometheus asks for it. Each room also exports
its phase and its rejection counters at 0.

    python bench/gateway_scrape.py [--rooms 500 2000 10000] [--devices 10] [--runs 5] [--against REV]

The first scrape reads every key and builds the series' labels (``full read``); the next ones read values
only (the median). ``--against REV`` also renders, on the same database and alternating with this tree's,
the page of the exporter module of git revision REV (one that takes this tree's store), for a before/after
ratio in one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examwatch.gateway import store
from examwatch.gateway.config import Config
from examwatch.gateway.exporter import Exposition, GatewayCollector, serve, stop
from examwatch.gateway.ingest import Engine, Message
from examwatch.kernel import wire
from examwatch.kernel.model import Reading

DEVICES = [
    ("recorder", ["battery_percent", "recording_active", "storage_used_ratio", "device_online"]),
    ("camera", ["recording_active", "storage_used_ratio", "device_online"]),
    ("ups", ["power_on_battery", "ups_charge_percent", "ups_runtime_seconds", "input_voltage_volts"]),
    ("link", ["link_up", "link_rtt_seconds", "link_loss_ratio"]),
    ("door", ["door_open", "battery_percent"]),
    ("noise", ["noise_db", "battery_percent"]),
    ("host", ["cpu_temperature_celsius", "memory_used_ratio", "storage_used_ratio", "outbox_used_ratio"]),
]


def fill(engine: Engine, rooms: list[str], keys: dict[str, bytes], n_devices: int, t0: float) -> int:
    rng = random.Random(1)
    devices = [(f"{kind}{i}", kind, metrics) for i in range(n_devices) for kind, metrics in [DEVICES[i % len(DEVICES)]]]
    msgs, readings = [], 0
    for a in rooms:
        status = msgspec.json.encode(wire.Status(state="online", phase="during", kinds={d: k for d, k, _ in devices}))
        msgs.append(
            Message(wire.topic(a, "status"), wire.encode(keys[a], a, 0, t0, "status", status, epoch=1), False, t0)
        )
        body = [Reading(d, m, rng.random(), t0 - rng.random() * 60) for d, _, metrics in devices for m in metrics]
        readings += len(body)
        msgs.append(
            Message(
                wire.topic(a, "readings"),
                wire.encode(keys[a], a, 1, t0, "readings", msgspec.json.encode(body), epoch=1),
                False,
                t0,
            )
        )
    for i in range(0, len(msgs), 5000):
        engine.ingest(msgs[i : i + 5000], t0)
    return readings


def exporter_of(rev: str) -> object:
    """The exporter module of git revision ``rev``, loaded beside this tree's."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{rev}:gateway/exporter.py"], cwd=root, check=True, capture_output=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "exporter_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("exporter_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(n_rooms: int, n_devices: int, runs: int, before: object = None) -> dict[str, float]:
    rooms = [f"site{i // 40:03d}/room{i % 40:02d}" for i in range(n_rooms)]
    keys = {a: random.Random(a).randbytes(32) for a in rooms}
    with tempfile.TemporaryDirectory() as d:
        engine = Engine(Config(), store.connect(Path(d) / "gw.db"), keys)
        readings = fill(engine, rooms, keys, n_devices, time.time())
        # What the gateway's writer does as it goes (SQLite's autocheckpoint): the rows in the database
        # file, not a fill's whole history in the WAL for every read to look up.
        engine.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        collector = GatewayCollector(str(Path(d) / "gw.db"), engine.stats)
        page = Exposition(collector).page
        old = before.GatewayCollector(str(Path(d) / "gw.db"), engine.stats) if before else None  # type: ignore[attr-defined]
        times, cpu, old_cpu, text = [], [], [], b""
        for _ in range(runs + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            text = page()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            if old is not None:
                start_cpu = time.process_time()
                old.render()
                old_cpu.append(time.process_time() - start_cpu)
        server, _ = serve("127.0.0.1:0", collector)
        http, gz = [], 0
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.server_address[1]}/metrics", headers={"Accept-Encoding": "gzip"}
        )
        for _ in range(runs):
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as r:
                gz = len(r.read())
            http.append(time.perf_counter() - start)
        stop(server)
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    return {
        "readings": readings,
        "series": series,
        "bytes": len(text),
        "gzip": gz,
        "full": times[0],
        "median": statistics.median(times[1:]),
        "cpu": statistics.median(cpu[1:]),
        "max": max(times[1:]),
        "before": statistics.median(old_cpu[1:]) if old_cpu else 0.0,
        "http": statistics.median(http),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rooms", type=int, nargs="+", default=[500, 2000, 10000])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--against", metavar="REV", help="also time the exporter of this git revision")
    args = ap.parse_args()
    before = exporter_of(args.against) if args.against else None
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"One scrape of the county gateway, {args.devices} devices per room, median of {args.runs}")
    print(f"{os.cpu_count()} cores, load average {load} (1/5/15 min) at the start\n")
    against = f" | {args.against} CPU |" if before else " |"
    print(
        "| rooms | latest readings | series | page size (gzip) | full read | render (median) | CPU | max | HTTP+gzip"
        + against
    )
    print("|---:" * (10 if before else 9) + "|")
    for n in args.rooms:
        r = run(n, args.devices, args.runs, before)
        old = f" | {r['before'] * 1000:,.0f} ms ({r['before'] / r['cpu']:.1f}x) |" if before else " |"
        print(
            f"| {n:,} | {r['readings']:,} | {r['series']:,} | {r['bytes'] / 1e6:.1f} MB ({r['gzip'] / 1e6:.1f} MB) "
            f"| {r['full'] * 1000:,.0f} ms | {r['median'] * 1000:,.0f} ms | {r['cpu'] * 1000:,.0f} ms "
            f"| {r['max'] * 1000:,.0f} ms | {r['http'] * 1000:,.0f} ms" + old
        )
    print(f"\nload average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
