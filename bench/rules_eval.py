"""Microbenchmark of the rules evaluator: microseconds per reading, per tick and per alarm transition.

A room as the plans describe it: recorders, cameras, an NVR, a UPS, a 24-port switch, two links, noise
and door sensors, the agent's host; a two-session exam day. Run: ``python bench/rules_eval.py``.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from examwatch.edge.config import AgentSettings, Config, Device
from examwatch.kernel.model import Reading
from examwatch.rules.config import Schedule, Window
from examwatch.rules.engine import build_engine

KINDS = {f"rec{i}": "recorder" for i in range(4)} | {f"cam{i}": "camera" for i in range(4)}
KINDS |= {
    "nvr1": "nvr",
    "ups1": "ups",
    "sw1": "switch",
    "wan": "link",
    "wan2": "link",
    "mic": "noise",
    "door1": "door",
    "host": "host",
}
METRICS = {
    "recorder": [
        ("battery_percent", 50, 90),
        ("storage_used_ratio", 0.1, 0.8),
        ("recording_active", 1, 1),
        ("device_online", 1, 1),
    ],
    "camera": [("battery_percent", 50, 90), ("storage_used_ratio", 0.1, 0.8), ("recording_active", 1, 1)],
    "nvr": [("storage_ok", 1, 1), ("storage_used_ratio", 0.1, 0.8)],
    "ups": [
        ("power_on_battery", 0, 0),
        ("ups_runtime_seconds", 1200, 3000),
        ("ups_charge_percent", 90, 100),
        ("input_voltage_volts", 215, 235),
    ],
    "switch": [("link_up", 1, 1)],
    "link": [("link_up", 1, 1), ("link_rtt_seconds", 0.001, 0.02), ("link_loss_ratio", 0, 0.01)],
    "noise": [("noise_db", 35, 55)],
    "door": [("door_open", 0, 0)],
    "host": [("cpu_temperature_celsius", 40, 60), ("storage_used_ratio", 0.2, 0.5), ("outbox_used_ratio", 0, 0.1)],
}


def config() -> Config:
    day = Schedule(
        sessions=[
            Window(start=datetime(2024, 5, 28, 8, 30), end=datetime(2024, 5, 28, 9, 50)),
            Window(start=datetime(2024, 5, 28, 10, 20), end=datetime(2024, 5, 28, 11, 40)),
        ]
    )
    devices = [Device(name=n, kind=k, protocol="bench", interval=10.0) for n, k in KINDS.items()]  # type: ignore[arg-type]
    return Config(agent=AgentSettings(site="yz1", room="r3"), devices=devices, schedule=day)


def readings(n: int, t0: float, rng: random.Random) -> list[Reading]:
    out = []
    names = list(KINDS)
    for i in range(n):
        name = rng.choice(names)
        kind = KINDS[name]
        metric, lo, hi = rng.choice(METRICS[kind])
        device = f"{name}/port{rng.randrange(24)}" if kind == "switch" else name
        out.append(Reading(device, metric, rng.uniform(lo, hi), t0 + i * 0.01))
    return out


def measure(fn, repeat: int = 7) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rng = random.Random(1)
    cfg = config()
    engine = build_engine(cfg.agent, cfg.devices, cfg.rules, cfg.schedule)
    t0 = datetime(2024, 5, 28, 9, 0).timestamp()
    state, _ = engine.evaluate(engine.initial_state(), readings(2000, t0, rng), t0 + 20)  # warm: every series seen
    rows = []

    n = 20_000
    stream = readings(n, t0 + 20, rng)

    def one_by_one() -> None:
        s = state
        for r in stream:
            s, _ = engine.evaluate(s, [r], r.ts)

    rows.append(("1 reading per evaluate (the live path)", measure(one_by_one) / n * 1e6, "µs per reading"))

    batches = [stream[i : i + 100] for i in range(0, n, 100)]

    def batched() -> None:
        s = state
        for b in batches:
            s, _ = engine.evaluate(s, b, b[-1].ts)

    rows.append(("batches of 100 readings", measure(batched) / n * 1e6, "µs per reading"))

    ticks = 20_000

    def tick() -> None:
        s = state
        for i in range(ticks):
            s, _ = engine.evaluate(s, [], t0 + 20 + i * 0.0005)

    rows.append(("empty tick (timers and silence check)", measure(tick) / ticks * 1e6, "µs per tick"))

    flips = [Reading("rec0", "battery_percent", v, t0 + 30 + i * 0.01) for i, v in enumerate([10.0, 80.0] * 2000)]

    def transitions() -> None:
        s = state
        for r in flips:
            s, _ = engine.evaluate(s, [r], r.ts)

    rows.append(
        ("raise or clear (builds the Chinese event)", measure(transitions) / len(flips) * 1e6, "µs per transition")
    )

    print(f"{len(KINDS)} devices, {len(engine.rules)} rules, {len(state.tracks)} open tracks after warm-up\n")
    print("| case | time | unit |")
    print("|---|---:|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value:.1f} | {unit} |")


if __name__ == "__main__":
    main()
