"""Gateway scrape cost: one Prometheus scrape of a whole county, built from the database at scrape time.

Fills a real gateway database through the real ingest engine (every room's status naming its devices'
kinds, one readings message per room with every device's metrics), then times the exporter's collector
rendered to the text format, as Prometheus would fetch it. Each room also exports its phase and its
rejection counters at 0.

    python bench/gateway_scrape.py [--rooms 500 2000] [--devices 10] [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, generate_latest

from examwatch.gateway import store
from examwatch.gateway.config import Config
from examwatch.gateway.exporter import GatewayCollector
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
        registry = CollectorRegistry()
        registry.register(GatewayCollector(str(Path(d) / "gw.db"), engine.stats))
        times, text = [], b""
        for _ in range(runs):
            start = time.perf_counter()
            text = generate_latest(registry)
            times.append(time.perf_counter() - start)
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    return {
        "readings": readings,
        "series": series,
        "bytes": len(text),
        "median": statistics.median(times),
        "max": max(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rooms", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"One scrape of the county gateway, {args.devices} devices per room, median of {args.runs}\n")
    print("| rooms | latest readings | series | scrape size | scrape time (median) | max |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.rooms:
        r = run(n, args.devices, args.runs)
        print(
            f"| {n:,} | {r['readings']:,} | {r['series']:,} | {r['bytes'] / 1e6:.1f} MB | {r['median'] * 1000:.0f} ms "
            f"| {r['max'] * 1000:.0f} ms |"
        )


if __name__ == "__main__":
    main()
