"""Room agent: event-to-alarm latency over a real mosquitto, and resident memory and CPU at idle.

    python bench/agent_latency.py [--events 1000] [--idle-seconds 60]

Starts mosquitto on a free port and `examwatch agent run` as a separate process (a secrecy room with
20 MQTT sensors: the door, noise meters, recorders). Latency: the door opens and closes EVENTS times; each
event is timed from the sensor's publish to the arrival of the agent's signed alarm transition (raised
or cleared) on the county topic, so it spans both MQTT hops, the rules, the SQLite commit and the uplink.
Idle: the 20 sensors report every 10 s as real ones do; RSS and CPU of the agent process are sampled.
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examwatch.simulators.broker import Mosquitto, free_port, wait_port

SENSORS = 20


def config(port: int, exporter: int, state: Path) -> str:
    devices = [
        'name = "door"\nkind = "door"\nprotocol = "mqtt"\ntopic = "z2m/door"\nprofile = "zigbee2mqtt_contact"\n'
        "interval = 60"
    ]
    devices += [
        f'name = "noise{i}"\nkind = "noise"\nprotocol = "mqtt"\ntopic = "z2m/noise{i}"\nprofile = "zigbee2mqtt_noise"\n'
        "interval = 60"
        for i in range(9)
    ]
    devices += [
        f'name = "rec{i}"\nkind = "recorder"\nprotocol = "mqtt"\ntopic = "rec/{i}"\nprofile = "recorder_json"\n'
        "interval = 60\navailability = false"
        for i in range(SENSORS - 10)
    ]
    return (
        f'[agent]\nsite = "bench"\nroom = "secrecy"\nkind = "secrecy_room"\nstate_dir = "{state}"\n'
        f'[mqtt]\nport = {port}\n[exporter]\nlisten = "127.0.0.1:{exporter}"\n'
        f'[uplink]\nenabled = true\nport = {port}\nsigning_key = "{"cd" * 32}"\n'
        + "".join(f"[[devices]]\n{d}\n" for d in devices)
    )


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    args = ap.parse_args()

    from examwatch.kernel import wire

    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        exporter = free_port()
        cfg = Path(tmp) / "agent.toml"
        cfg.write_text(config(broker.port, exporter, Path(tmp) / "state"), encoding="utf-8")
        agent = subprocess.Popen(
            [sys.executable, "-m", "examwatch", "--log-level", "warning", "agent", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        wait_port(exporter, 20)
        time.sleep(1.0)

        arrived = threading.Event()
        got: list[str] = []

        def on_message(client, userdata, msg):
            env = wire.decode(msg.payload)
            got.append(json.loads(bytes(env.body))["state"])
            arrived.set()

        sub = mqtt.Client(CallbackAPIVersion.VERSION2)
        sub.on_message = on_message
        sub.connect("127.0.0.1", broker.port)
        sub.subscribe("examwatch/v1/bench/secrecy/alarms", qos=1)
        sub.loop_start()
        pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        time.sleep(0.5)

        latencies = []
        for i in range(args.events):
            arrived.clear()
            opened = i % 2 == 0
            t0 = time.perf_counter()
            pub.publish("z2m/door", json.dumps({"contact": not opened}), qos=1)
            if not arrived.wait(5):
                raise SystemExit(f"event {i}: no alarm transition within 5 s")
            latencies.append(time.perf_counter() - t0)
        assert got.count("raised") == got.count("cleared") == args.events // 2, got[:10]

        # idle: 20 sensors reporting every 10 s, staggered
        proc = psutil.Process(agent.pid)
        stop = threading.Event()

        def sensors() -> None:
            n = 0
            while not stop.is_set():
                for i in range(9):
                    pub.publish(f"z2m/noise{i}", json.dumps({"noise": 40 + n % 5, "battery": 80}))
                for i in range(SENSORS - 10):
                    pub.publish(
                        f"rec/{i}",
                        json.dumps({"battery": 90, "recording": True, "storage": {"free_mb": 5000, "total_mb": 16000}}),
                    )
                pub.publish("z2m/door", json.dumps({"contact": True, "battery": 95}))
                n += 1
                stop.wait(10)

        feeder = threading.Thread(target=sensors, daemon=True)
        feeder.start()
        time.sleep(2)
        cpu0 = proc.cpu_times()
        t0 = time.monotonic()
        rss = []
        while time.monotonic() - t0 < args.idle_seconds:
            rss.append(proc.memory_info().rss)
            time.sleep(1)
        cpu1 = proc.cpu_times()
        stop.set()
        cpu_share = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (time.monotonic() - t0)

        agent.terminate()
        agent.wait(20)
        sub.loop_stop()
        pub.loop_stop()
        broker.stop()

    ms = [x * 1000 for x in latencies]
    print("| metric | value |\n|---|---|")
    print(f"| door events (each one alarm transition) | {len(ms)} |")
    print(f"| event-to-alarm latency p50 | {statistics.median(ms):.1f} ms |")
    print(f"| event-to-alarm latency p99 | {percentile(ms, 99):.1f} ms |")
    print(f"| event-to-alarm latency max | {max(ms):.1f} ms |")
    print(f"| agent RSS at idle, 20 sensors (max of {len(rss)} samples) | {max(rss) / 2**20:.1f} MiB |")
    print(f"| agent CPU at idle, 20 sensors reporting every 10 s | {cpu_share * 100:.2f} % of one core |")


if __name__ == "__main__":
    main()
