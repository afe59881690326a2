"""Gateway ingest throughput: 1,000 simulated rooms, signed messages, batched into SQLite.

Feeds the real ingest engine (signature check, idempotence ledger, readings, latest values) with
messages as they come off the broker, in batches as the ingest loop takes them. Reports readings per
second of wall time and per second of CPU time (one core: the ingest loop is one thread).

    python bench/gateway_ingest.py [--agents 1000] [--messages 20] [--readings 50] [--batch 2000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examwatch.gateway import store
from examwatch.gateway.config import Config, GatewaySettings
from examwatch.gateway.ingest import Engine, Message
from examwatch.kernel import wire
from examwatch.kernel.model import Reading

METRICS = [
    "battery_percent",
    "storage_used_ratio",
    "recording_active",
    "ups_charge_percent",
    "link_rtt_seconds",
    "noise_db",
    "door_open",
    "device_online",
]


def messages(agents: list[str], keys: dict[str, bytes], per_agent: int, per_message: int, t0: float) -> list[Message]:
    rng = random.Random(1)
    out = []
    for seq in range(1, per_agent + 1):
        for a in agents:
            ts = t0 + seq
            body = msgspec.json.encode(
                [
                    Reading(f"dev{i % 10}", METRICS[i % len(METRICS)], rng.random() * 100, ts + i * 0.001)
                    for i in range(per_message)
                ]
            )
            out.append(
                Message(
                    wire.topic(a, "readings"), wire.encode(keys[a], a, seq, ts, "readings", body, epoch=1), False, ts
                )
            )
    return out


def run(n_agents: int, per_agent: int, per_message: int, batch: int) -> dict[str, float]:
    agents = [f"site{i // 40:03d}/room{i % 40:02d}" for i in range(n_agents)]
    keys = {a: random.Random(a).randbytes(32) for a in agents}
    msgs = messages(agents, keys, per_agent, per_message, time.time())
    with tempfile.TemporaryDirectory() as d:
        conn = store.connect(Path(d) / "gw.db")
        engine = Engine(Config(gateway=GatewaySettings(batch_max=batch)), conn, keys)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(msgs), batch):
            engine.ingest(msgs[i : i + batch], time.time())
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stored = conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
        assert stored == len(msgs) * per_message, (stored, len(msgs) * per_message)
    return {"messages": len(msgs), "readings": stored, "wall": wall, "cpu": cpu}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--messages", type=int, default=20, help="messages per agent")
    p.add_argument("--readings", type=int, nargs="*", default=[10, 50, 200], help="readings per message")
    p.add_argument("--batch", type=int, default=2000, help="messages per transaction")
    a = p.parse_args()
    print(f"gateway ingest, {a.agents} agents, {a.messages} messages each, {a.batch} messages per transaction\n")
    print("| readings/message | messages | readings | wall s | readings/s | readings/s per CPU-second |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in a.readings:
        r = run(a.agents, a.messages, n, a.batch)
        print(
            f"| {n} | {r['messages']:,} | {r['readings']:,} | {r['wall']:.2f} | {r['readings'] / r['wall']:,.0f} "
            f"| {r['readings'] / r['cpu']:,.0f} |"
        )


if __name__ == "__main__":
    main()
