"""End-to-end alarm lag at 1,000 and 10,000 simulated rooms: a real mosquitto, a real gateway process.

Each room has its own signing key (in the gateway's keys file) and sends what its agent sends: a retained
``online`` status at connect and every heartbeat (30 s), a signed readings message every ``--period`` s
(rooms spread evenly over the period), outbox sequence numbers from 1. Every second after a warm-up one
random room raises an alarm; the lag of each is the time from that room's publish to the alarm being
visible in the gateway's API (``GET /api/v1/alarms``) and in its database, both polled every 50 ms (so
the figures include up to 50 ms of polling).

The rooms are simulated by ``--publishers`` processes, each ONE MQTT connection publishing for its share of
the rooms, on a broker without ACL (as tests/support/feed.py does). 10,000 real connections would need
10,000 paho threads on this machine and measure the simulator, not the gateway; what it leaves out is the
broker's per-connection cost (keepalives, 10,000 sockets, an ACL check per publish), small beside the
gateway's signature check and store. After the rooms stop, the gateway has ``DRAIN`` seconds to store every
(agent, epoch, seq) that was published; what it has not is counted ("not stored": a gateway that fell behind
still has it queued in the broker). With ``--replicas 1,2`` the same runs on PostgreSQL with that many replica
processes sharing the feed (a shared subscription), one PostgreSQL started here (simulators/postgres.py).

    python bench/gateway_lag.py [--rooms 1000,10000] [--replicas 0,1,2] [--alarms 60] [--period 5] [--readings 10]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examwatch.gateway import store
from examwatch.kernel import wire
from examwatch.kernel.model import AlarmEvent, Reading
from examwatch.simulators import postgres as pgserver
from examwatch.simulators.broker import Mosquitto, free_port, wait_port

EPOCH = 7
HEARTBEAT = 30.0  # s, the agents' default
POLL = 0.05  # s between looks at the API and the database
DRAIN = 120.0  # s the gateway is given after the rooms stop to store what the broker still holds
SHARE_GROUP = "lag-7c1e5b0a93d2f6e4"  # the replicas' share group (docs/scaling.md)
METRICS = ["ups_charge_percent", "link_rtt_seconds", "noise_db", "recording_active", "storage_used_ratio"]


def room_names(n: int) -> list[str]:
    """Sites of 30 rooms, like a county's schools."""
    return [f"s{i // 30:04d}/r{i % 30:02d}" for i in range(n)]


# --- the rooms (one publisher process each share) ------------------------------------------------------------


def publisher(port: int, keys: dict[str, bytes], period: float, readings: int, start: float,
              alarms: list[tuple[float, str, str]], stop_at: float, out: Any) -> None:  # fmt: skip
    """Publish for ``keys``' rooms until ``stop_at`` (wall clock); put (published seqs, alarm publish times)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rooms-{os.getpid()}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(2000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    rooms = list(keys)
    seq = dict.fromkeys(rooms, 0)
    sent_at: dict[str, float] = {}
    late = 0.0  # how far the publisher fell behind its schedule at worst

    last: list[mqtt.MQTTMessageInfo] = []

    def send(room: str, kind: str, body: bytes) -> float:
        if kind != "status":
            seq[room] += 1
        now = time.time()
        payload = wire.encode(keys[room], room, seq[room] if kind != "status" else 0, now, kind, body, epoch=EPOCH)
        last[:] = [c.publish(wire.topic(room, kind), payload, qos=1, retain=kind == "status")]
        return now

    def status(room: str) -> None:
        send(room, "status", msgspec.json.encode(wire.Status(state="online", boot=1, conn=1, n=1)))

    for room in rooms:
        status(room)
    # one timeline: each room's readings (and heartbeats) at its own phase of the period, and the alarms
    step = period / max(1, len(rooms))
    next_reading = {room: start + i * step for i, room in enumerate(rooms)}
    beat_every = max(1, round(HEARTBEAT / period))
    pending = sorted(alarms)
    i = 0
    while time.time() < stop_at:
        now = time.time()
        room = rooms[i % len(rooms)]
        due = next_reading[room]
        if pending and pending[0][0] <= due:
            at, who, alarm_id = pending.pop(0)
            time.sleep(max(0.0, at - time.time()))
            late = max(late, time.time() - at)
            site, name = who.split("/")
            event = AlarmEvent(id=alarm_id, site=site, room=name, rule="link_down", level=1, state="raised",
                               device="sw1", at=at, raised_at=at, message="网络中断")  # fmt: skip
            sent_at[alarm_id] = send(who, "alarms", msgspec.json.encode(event))
            continue
        time.sleep(max(0.0, due - now))
        late = max(late, time.time() - due)
        ts = time.time()
        body = msgspec.json.encode([Reading("dev1", METRICS[k % len(METRICS)], float(k), ts) for k in range(readings)])
        send(room, "readings", body)
        next_reading[room] = due + period
        if seq[room] % beat_every == 0:
            status(room)
        i += 1
    if last:
        last[0].wait_for_publish(60)  # the broker has everything (it acknowledges in order)
    c.disconnect()
    c.loop_stop()
    out.put((seq, sent_at, late))


# --- the gateway ----------------------------------------------------------------------------------------------


class Gateway:
    """One gateway process (replica ``n`` of a share group when ``dsn`` is a PostgreSQL database)."""

    def __init__(self, workdir: Path, broker_port: int, keys_file: Path, dsn: str = "", n: int = 1) -> None:
        self.dir = workdir / f"gateway-{n}"
        self.dir.mkdir(parents=True)
        self.api = free_port()
        self.config = self.dir / "gateway.toml"
        replica = f'client_id = "gw-{n}"\nshare_group = "{SHARE_GROUP}"\n' if dsn else ""
        backend = f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n' if dsn else ""
        self.config.write_text(
            f'[gateway]\nstate_dir = "{self.dir}"\n[broker]\nport = {broker_port}\n{replica}'
            f'[exporter]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[api]\nlisten = "127.0.0.1:{self.api}"\ntoken = "t0ken"\n'
            f'[security]\nkeys_file = "{keys_file}"\n{backend}'
        )
        self.where: store.Where = store.Postgres(dsn) if dsn else self.dir / "gateway.db"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        root = Path(__file__).resolve().parent.parent
        with open(self.dir / "log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "examwatch", "gateway", "run", "--config",
                                          str(self.config)], cwd=root, stdout=log, stderr=log)  # fmt: skip
        wait_port(self.api, 60)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def api_alarms(self) -> set[str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.api}/api/v1/alarms?state=raised&limit=200")
        req.add_header("Authorization", "Bearer t0ken")
        with urllib.request.urlopen(req, timeout=10) as r:
            return {a["id"] for a in json.loads(r.read())["alarms"]}

    def query(self, sql: str, *args: Any) -> list[Any]:
        conn = store.connect(self.where, readonly=True)
        try:
            return [tuple(r) for r in conn.execute(sql, list(args)).fetchall()]
        finally:
            conn.close()


def watch(look: Any, seen: dict[str, float], stop: threading.Event) -> None:
    """Record when each alarm id first appears in ``look()``."""
    while not stop.is_set():
        try:
            ids = look()
        except Exception:  # a busy gateway or database: look again
            ids = set()
        now = time.time()
        for alarm_id in ids:
            seen.setdefault(alarm_id, now)
        stop.wait(POLL)


class Usage:
    """CPU seconds (of the processes and their children) and peak RSS (of the processes) over a window."""

    def __init__(self, *pids: int) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.rss = 0
        self.cpu0 = self._cpu()

    def _cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            for q in [p, *p.children(recursive=True)]:
                try:
                    t = q.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        return total

    def sample(self) -> None:
        self.rss = max(self.rss, sum(p.memory_info().rss for p in self.procs))

    def cpu(self) -> float:
        return self._cpu() - self.cpu0


# --- one run --------------------------------------------------------------------------------------------------


def run(rooms: int, alarms: int, period: float, readings: int, publishers: int, warmup: float,
        replicas: int) -> dict[str, Any]:  # fmt: skip
    """``replicas`` 0: one gateway on SQLite; n: n replicas on one PostgreSQL."""
    with tempfile.TemporaryDirectory(prefix="examwatch-lag-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker")
        broker.start()
        names = room_names(rooms)
        keys = {r: secrets.token_bytes(32) for r in names}  # each room its own key
        keys_file = work / "agent-keys"
        fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{room} {key.hex()}\n" for room, key in keys.items())
        server = None
        if replicas:
            server = pgserver.Postgres()
            server.init()
            server.start()
            dsn = server.new_database()
            gws = [Gateway(work, broker.port, keys_file, dsn, n) for n in range(1, replicas + 1)]
        else:
            gws = [Gateway(work, broker.port, keys_file)]
        try:
            for g in gws:
                g.start()
            r = _measure(broker, gws, server, names, keys, alarms, period, readings, publishers, warmup)
        finally:
            for g in gws:
                g.stop()
            broker.stop()
            if server:
                server.cleanup()
    return r | {"rooms": rooms, "store": f"PostgreSQL, {replicas} replica(s)" if replicas else "SQLite"}


def _measure(broker: Mosquitto, gws: list[Gateway], server: Any, names: list[str], keys: dict[str, bytes],
             alarms: int, period: float, readings: int, publishers: int, warmup: float) -> dict[str, Any]:  # fmt: skip
    time.sleep(2.0)  # subscribed
    t0 = time.time() + 2.0
    first = t0 + warmup
    picked = random.choices(names, k=alarms)
    schedule = [(first + k, room, f"{room}/link_down/sw1/{k}") for k, room in enumerate(picked)]
    stop_at = first + alarms + 2.0
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    # the rooms that raise the alarms have a publisher of their own: lightly loaded, it publishes on time,
    # whereas the bulk's publishers may queue in their MQTT client on a loaded machine ("behind" below)
    alarming = sorted(set(picked))
    others = [r for r in names if r not in set(alarming)]
    shares = [alarming, *(others[p::publishers] for p in range(publishers))]
    procs = []
    for share in shares:
        mine = set(share)
        args = (broker.port, {r: keys[r] for r in share}, period, readings, t0,
                [a for a in schedule if a[1] in mine], stop_at, out)  # fmt: skip
        procs.append(ctx.Process(target=publisher, args=args))
    for p in procs:
        p.start()
    assert broker.proc and all(g.proc for g in gws)

    def usage() -> dict[str, Usage]:
        pids = {"gateway": [g.proc.pid for g in gws if g.proc], "broker": [broker.proc.pid if broker.proc else 0]}
        if server:
            pids["postgresql"] = [int((server.data / "postmaster.pid").read_text().split()[0])]
        return {k: Usage(*v) for k, v in pids.items()}

    in_api: dict[str, float] = {}
    in_db: dict[str, float] = {}
    stop = threading.Event()
    gw = gws[-1]  # any replica serves the API from the shared database
    db_look = lambda: {r[0] for r in gw.query("SELECT id FROM alarms WHERE rule = 'link_down'")}  # noqa: E731
    watchers = [threading.Thread(target=watch, args=(gw.api_alarms, in_api, stop), daemon=True),
                threading.Thread(target=watch, args=(db_look, in_db, stop), daemon=True)]  # fmt: skip
    for w in watchers:
        w.start()
    while time.time() < first:
        time.sleep(0.2)
    measured_from, use = time.time(), usage()
    while time.time() < stop_at:
        for u in use.values():
            u.sample()
        time.sleep(1.0)
    wall = time.time() - measured_from
    cpu = {k: u.cpu() / wall for k, u in use.items()}
    window = (measured_from, measured_from + wall)
    taken = gw.query("SELECT COUNT(*) FROM ledger WHERE received >= ? AND received < ?", *window)[0][0]
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    seqs: dict[str, int] = {}
    sent_at: dict[str, float] = {}
    late = 0.0
    for s, a, lt in results:
        seqs |= s
        sent_at |= a
        late = max(late, lt)
    published = sum(seqs.values())
    rate = published / (stop_at - t0)  # what the rooms sent, readings and alarms (statuses aside)
    deadline = time.time() + DRAIN  # let the gateway drain what the broker still holds
    while time.time() < deadline and gw.query("SELECT COUNT(*) FROM ledger")[0][0] < published:
        time.sleep(1.0)
    time.sleep(2 * POLL + 0.5)
    stop.set()
    stored = dict(gw.query("SELECT agent, COUNT(*) FROM ledger WHERE epoch = ? GROUP BY agent", EPOCH))
    # the ledger's key is (agent, epoch, seq): a room's count below its last seq is that many not stored (yet:
    # a gateway that fell behind still has them queued in the broker, which holds them without limit here)
    lost = sum(max(0, seqs[r] - stored.get(r, 0)) for r in seqs)
    lag_api = sorted(in_api[a] - t for a, t in sent_at.items() if a in in_api)
    lag_db = sorted(in_db[a] - t for a, t in sent_at.items() if a in in_db)
    return {
        "alarms": len(sent_at),
        "api": lag_api,
        "db": lag_db,
        "unseen": len(sent_at) - len(lag_api),
        "published": published,
        "lost": lost,
        "late": late,
        "rate": rate,
        "cost": cpu["gateway"] * wall / max(1, taken),  # gateway CPU s per message received in the window
        "cpu": cpu,
        "rss": {k: u.rss for k, u in use.items()},
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def row(r: dict[str, Any]) -> str:
    def lag(v: list[float]) -> str:
        return f"{pct(v, 0.5) * 1000:.0f} / {pct(v, 0.99) * 1000:.0f} / {max(v, default=float('nan')) * 1000:.0f}"

    def use(what: str) -> str:
        rss = r["rss"].get(what, 0) / 2**20
        return (
            f"{r['cpu'][what]:.0%}" + (f" / {rss:.0f} MiB" if what != "postgresql" else "") if what in r["cpu"] else "-"
        )

    return (
        f"| {r['store']} | {r['rooms']:,} | {r['rate']:,.0f} | {r['alarms']} | {lag(r['api'])} | {lag(r['db'])} "
        f"| {r['lost']} of {r['published']:,} | {use('gateway')} | {r['cost'] * 1000:.2f} ms "
        f"| {use('broker')} | {use('postgresql')} "
        f"| {r['late']:.1f} s |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rooms", default="1000,10000", help="comma-separated room counts, one run each")
    p.add_argument("--replicas", default="0", help="comma-separated: 0 = one gateway on SQLite, n = n on PostgreSQL")
    p.add_argument("--alarms", type=int, default=60, help="alarms per run, one a second")
    p.add_argument("--period", type=float, default=5.0, help="s between a room's readings messages")
    p.add_argument("--readings", type=int, default=10, help="readings per message")
    p.add_argument("--publishers", type=int, default=2, help="processes simulating the rooms (beside the alarms')")
    p.add_argument("--warmup", type=float, default=15.0, help="s of readings before the first alarm")
    a = p.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; period {a.period:g} s, "
          f"{a.readings} readings/message, {a.publishers} publisher processes")  # fmt: skip
    print("| store | rooms | msgs/s | alarms | API lag p50 / p99 / max ms | DB lag p50 / p99 / max ms "
          f"| not stored {DRAIN:.0f} s after "
          "| gateway CPU / RSS | gateway CPU per message | broker CPU / RSS | PostgreSQL CPU "
          "| publishers behind |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for replicas in (int(x) for x in a.replicas.split(",")):
        for n in (int(x) for x in a.rooms.split(",")):
            r = run(n, a.alarms, a.period, a.readings, a.publishers, a.warmup, replicas)
            print(row(r), flush=True)
            if r["unseen"]:
                print(f"  {r['unseen']} alarms never seen in the API", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
