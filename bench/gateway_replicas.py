"""Gateway ingest on PostgreSQL with 1 and 2 replicas, and on SQLite for reference, in one run.

Each replica is a process with the real ingest engine (signature check, ledger claimed by key, readings,
latest values) on one PostgreSQL database, fed its share of the messages as a shared subscription would
split them (by turns); SQLite has its one gateway. The PostgreSQL server is Debian's, started here in a
temporary directory (simulators/postgres.py: fsync off, synchronous_commit on). Reports readings per second
of wall time, all replicas together, from the first message to the last commit.

    python bench/gateway_replicas.py [--agents 400] [--messages 20] [--readings 50] [--batch 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway_ingest import messages
from examwatch.gateway import pg, store
from examwatch.gateway.config import Config, GatewaySettings
from examwatch.gateway.ingest import Engine, Message
from examwatch.simulators import postgres as pgserver


def _replica(where: store.Where, keys: dict[str, bytes], share: list[Message], batch: int, go, done) -> None:
    engine = Engine(Config(gateway=GatewaySettings(batch_max=batch)), store.connect(where), keys)
    engine.role = "follower" if isinstance(where, store.Postgres) else "alone"
    go.wait()
    for i in range(0, len(share), batch):
        engine.ingest(share[i : i + batch], time.time())
    done.put(time.perf_counter())


def run(where: store.Where, replicas: int, msgs: list[Message], keys: dict[str, bytes], batch: int) -> float:
    """Wall seconds for ``replicas`` processes to store ``msgs`` between them."""
    store.connect(where).close()  # migrated once, before the clock starts
    pg.close_pools()  # a pool's threads do not survive a fork: each replica makes its own
    ctx = mp.get_context("fork")
    go, done = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_replica, args=(where, keys, msgs[i::replicas], batch, go, done)) for i in range(replicas)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every replica connected and loaded
    start = time.perf_counter()
    go.set()
    end = max(done.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return end - start


def count(where: store.Where) -> int:
    conn = store.connect(where, readonly=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0])
    finally:
        conn.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--agents", type=int, default=400)
    p.add_argument("--messages", type=int, default=20, help="messages per agent")
    p.add_argument("--readings", type=int, default=50, help="readings per message")
    p.add_argument("--batch", type=int, default=2000, help="messages per transaction")
    a = p.parse_args()
    agents = [f"site{i // 40:03d}/room{i % 40:02d}" for i in range(a.agents)]
    keys = {ag: random.Random(ag).randbytes(32) for ag in agents}
    msgs = messages(agents, keys, a.messages, a.readings, time.time())
    total = len(msgs) * a.readings
    print(f"gateway ingest by store, {a.agents} agents x {a.messages} messages x {a.readings} readings = {total:,}")
    print(f"readings, {a.batch} messages per transaction\n")
    print("| store | replicas | wall s | readings/s |")
    print("|---|---:|---:|---:|")
    server = pgserver.Postgres()
    server.init()
    server.start()
    try:
        with tempfile.TemporaryDirectory() as d:
            cases: list[tuple[str, int, store.Where]] = [("SQLite", 1, Path(d) / "gw.db")]
            cases += [("PostgreSQL", n, store.Postgres(server.new_database())) for n in (1, 2)]
            for name, n, where in cases:
                wall = run(where, n, msgs, keys, a.batch)
                assert count(where) == total, (name, n, count(where), total)
                print(f"| {name} | {n} | {wall:.2f} | {total / wall:,.0f} |")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
