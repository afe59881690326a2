"""Gateway scrape cost: one Prometheus scrape of a whole county, built from the database at scrape time.

Fills a real gateway database through the real ingest engine (every room's status naming its devices'
kinds, one readings message per room with every device's metrics), then times the exporter's page as
Prometheus fetches it: rendered to the text format (wall and CPU time, the machine may be shared), and
fetched over HTTP from the real endpoint with gzip, as Prometheus asks for it. Each room also exports
its phase and its rejection counters at 0.

    python bench/gateway_scrape.py [--rooms 500 2000 10000] [--devices 10] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examwatch.gateway import store
from examwatch.gateway.config import Config
from examwatch.gateway.exporter import Exposition, GatewayCollector, serve
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


def run(n_rooms: int, n_devices: int, runs: int) -> dict[str, float]:
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
        times, cpu, text = [], [], b""
        for _ in range(runs):
            start, start_cpu = time.perf_counter(), time.process_time()
            text = page()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
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
        server.shutdown()
        server.server_close()
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    return {
        "readings": readings,
        "series": series,
        "bytes": len(text),
        "gzip": gz,
        "median": statistics.median(times),
        "cpu": statistics.median(cpu),
        "max": max(times),
        "http": statistics.median(http),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rooms", type=int, nargs="+", default=[500, 2000, 10000])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"One scrape of the county gateway, {args.devices} devices per room, median of {args.runs}")
    print(f"{os.cpu_count()} cores, load average {load} (1/5/15 min) at the start\n")
    print("| rooms | latest readings | series | page size (gzip) | render (median) | CPU | max | HTTP+gzip |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.rooms:
        r = run(n, args.devices, args.runs)
        print(
            f"| {n:,} | {r['readings']:,} | {r['series']:,} | {r['bytes'] / 1e6:.1f} MB ({r['gzip'] / 1e6:.1f} MB) "
            f"| {r['median'] * 1000:.0f} ms | {r['cpu'] * 1000:.0f} ms | {r['max'] * 1000:.0f} ms "
            f"| {r['http'] * 1000:.0f} ms |"
        )
    print(f"\nload average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
