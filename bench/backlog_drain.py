"""Time to drain one room's one-hour backlog after its link comes back.

A real mosquitto, the real gateway (in this process, its own threads), the real agent Store holding one
hour of outbox rows, and the real Uplink. Measures from the uplink's start until the gateway has stored
every reading and the agent's outbox is empty (every row acknowledged and deleted).

    python bench/backlog_drain.py
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from examwatch.edge.config import UplinkSettings
from examwatch.edge.store import OutboxReader, Store
from examwatch.edge.uplink import Uplink
from examwatch.gateway import store as gwstore
from examwatch.gateway.config import Api, Broker, Config, GatewaySettings, Listen, Security
from examwatch.gateway.main import Gateway
from examwatch.kernel.model import Reading
from examwatch.simulators.broker import free_port, wait_port

AGENT = "site001/room01"
KEY = "ab" * 32
# (what the hour looks like, outbox rows, readings per row): the agent's writer makes one row per batch.
SCENARIOS = [
    ("10 devices every 10 s, a row a second", 3600, 10),
    ("busy room, a row every 0.1 s", 36000, 3),
    ("30 devices x 20 metrics every 5 s, a row a second", 3600, 120),
]


def scenario(workdir: Path, rows: int, per_row: int) -> tuple[float, int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nlog_dest none\n")
    broker = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    cfg = Config(
        gateway=GatewaySettings(state_dir=str(workdir / "gw")),
        broker=Broker(port=port),
        exporter=Listen(listen="127.0.0.1:0"),
        api=Api(listen="127.0.0.1:0"),
        security=Security(keys={AGENT: KEY}),
    )
    gw = Gateway(cfg)
    gw_thread = threading.Thread(target=gw.run, daemon=True)
    gw_thread.start()
    if not gw.subscriber.subscribed.wait(10):
        raise TimeoutError("gateway did not subscribe")
    db = workdir / "agent.db"
    agent_store = Store(db)
    t0 = time.time() - 3600
    for i in range(rows):  # the hour offline, in the writer's own transactions (chunked to be quick)
        ts = t0 + i * 3600 / rows
        agent_store.write(
            [],
            outbox=[
                (
                    "readings",
                    msgspec.json.encode(
                        [Reading(f"dev{j % 30}", "battery_percent", float(j), ts) for j in range(per_row)]
                    ),
                )
            ],
        )
    acks: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
    up = Uplink(
        UplinkSettings(enabled=True, port=port, signing_key=KEY), agent_id=AGENT, db_path=str(db), on_acked=acks.put
    )
    total = rows * per_row
    reader = OutboxReader(db)
    gwdb = None
    start = time.perf_counter()
    up.start()
    try:
        while True:
            with contextlib.suppress(queue.Empty):
                agent_store.ack(acks.get(timeout=0.05))
            if gwdb is None and (workdir / "gw" / "gateway.db").exists():
                gwdb = gwstore.connect(workdir / "gw" / "gateway.db", readonly=True)
            if (
                reader.count() == 0
                and gwdb is not None
                and gwdb.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == total
            ):
                break
            if not gw_thread.is_alive():
                raise RuntimeError("the gateway stopped; see its log above")
            if time.perf_counter() - start > 600:
                raise TimeoutError("backlog not drained in 10 minutes")
        return time.perf_counter() - start, total
    finally:
        up.stop()
        gw.stop_event.set()
        gw_thread.join(10)
        broker.terminate()
        broker.wait(10)


def main() -> None:
    print("one room's one-hour backlog, drained after reconnect (real mosquitto, gateway, Store, Uplink)\n")
    print("| hour of | outbox rows | readings | drain s | rows/s | readings/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows, per_row in SCENARIOS:
        with tempfile.TemporaryDirectory() as d:
            secs, total = scenario(Path(d), rows, per_row)
        print(f"| {name} | {rows:,} | {total:,} | {secs:.2f} | {rows / secs:,.0f} | {total / secs:,.0f} |")


if __name__ == "__main__":
    main()
