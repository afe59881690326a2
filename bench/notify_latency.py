"""Alarm delivery latency, end to end: a secrecy-room door sensor event -> the room agent -> the county
broker -> the gateway (ingest, notifier, outbox) -> a webhook receiver; beside Alertmanager's figure for the
same alerts in the same run (gateway -> Alertmanager API v2 -> Alertmanager's webhook).

    python bench/notify_latency.py [--events 1000]

Real processes on loopback: mosquitto, `examwatch agent run`, `examwatch gateway run`, and (when the Debian
package is installed) prometheus-alertmanager with group_wait 0. The door opens and closes EVENTS times;
each opening raises a level-2 alarm and each closing clears it: every event is one message to the webhook,
timed from the sensor's publish to the webhook's receipt. Flap and storm damping are off here (one door
opening 500 times is exactly what damping would hold back): this measures the path, not the policy.
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examwatch.simulators.broker import Mosquitto, free_port, wait_port  # noqa: E402

KEY = "cd" * 32


class Receiver(ThreadingHTTPServer):
    """Records (arrival time, JSON body) of every POST."""

    daemon_threads = True

    def __init__(self) -> None:
        self.got: list[tuple[float, Any]] = []
        self.arrived = threading.Condition()
        super().__init__(("127.0.0.1", free_port()), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        t = time.perf_counter()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        with self.server.arrived:
            self.server.got.append((t, body))
            self.server.arrived.notify_all()


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "examwatch", "--log-level", "warning", *args],
        cwd=ROOT,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def alertmanager(tmp: Path, hook: Receiver) -> tuple[subprocess.Popen[bytes], str] | None:
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        return None
    port = free_port()
    cfg = tmp / "am.yml"
    cfg.write_text(
        "route:\n  receiver: hook\n  group_by: ['examwatch_id']\n  group_wait: 0s\n  group_interval: 1s\n"
        f"  repeat_interval: 1h\nreceivers:\n- name: hook\n  webhook_configs:\n  - url: {hook.url}\n"
        "    send_resolved: true\n"
    )
    with open(tmp / "am.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.path={tmp / 'am'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    wait_port(port, 20)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Mosquitto(tmp)
        broker.start()
        hook, am_hook = Receiver(), Receiver()
        am = alertmanager(tmp, am_hook)
        api, metrics, agent_exporter = free_port(), free_port(), free_port()
        am_channel = f'[[channels]]\nname = "am"\ntype = "alertmanager"\nurl = "{am[1]}"\n' if am else ""
        (tmp / "gw.toml").write_text(
            f'[gateway]\nstate_dir = "{tmp / "gw"}"\n[broker]\nport = {broker.port}\n'
            f'[exporter]\nlisten = "127.0.0.1:{metrics}"\n[api]\nlisten = "127.0.0.1:{api}"\n'
            f'[[channels]]\nname = "hook"\ntype = "webhook"\nurl = "{hook.url}"\nsecret = "bench"\n{am_channel}'
            f'[notify]\nstorm_window = 0.0\nflap_window = 0.001\n[security.keys]\n"bench/secrecy" = "{KEY}"\n'
        )
        gateway = spawn(["gateway", "run", "--config", str(tmp / "gw.toml")], tmp / "gw.log")
        wait_port(api, 20)
        time.sleep(1.0)  # its subscription in place
        (tmp / "agent.toml").write_text(
            f'[agent]\nsite = "bench"\nroom = "secrecy"\nkind = "secrecy_room"\nstate_dir = "{tmp / "agent"}"\n'
            f'[mqtt]\nport = {broker.port}\n[exporter]\nlisten = "127.0.0.1:{agent_exporter}"\n'
            f'[uplink]\nenabled = true\nport = {broker.port}\nsigning_key = "{KEY}"\n'
            '[[devices]]\nname = "door"\nkind = "door"\nprotocol = "mqtt"\ntopic = "z2m/door"\n'
            'profile = "zigbee2mqtt_contact"\ninterval = 60\n'
        )
        agent = spawn(["agent", "run", "--config", str(tmp / "agent.toml")], tmp / "agent.log")
        wait_port(agent_exporter, 20)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        time.sleep(1.0)

        sent_at: list[float] = []
        latencies: list[float] = []
        try:
            for i in range(args.events):
                opened = i % 2 == 0
                t0 = time.perf_counter()
                sent_at.append(t0)
                pub.publish("z2m/door", json.dumps({"contact": not opened}), qos=1)
                with hook.arrived:
                    if not hook.arrived.wait_for(lambda: len(hook.got) > i, 10):
                        raise SystemExit(f"event {i}: nothing at the webhook within 10 s (see {tmp}/gw.log)")
                    t, body = hook.got[i]
                assert body["kind"] == ("raised" if opened else "cleared"), body["kind"]
                latencies.append(t - t0)
            time.sleep(3)  # Alertmanager's stragglers
            raises = sent_at[0::2]
            firing = [t for t, b in am_hook.got if b["status"] == "firing"]
            am_lat = [t - t0 for t, t0 in zip(firing, raises, strict=False)] if am else []
        finally:
            agent.terminate()
            gateway.terminate()
            agent.wait(20)
            gateway.wait(20)
            if am:
                am[0].terminate()
                am[0].wait(10)
            pub.loop_stop()
            broker.stop()

    ms = [x * 1000 for x in latencies]
    print("| metric | value |\n|---|---|")
    print(f"| level-2 door events (raise or clear), each one webhook message | {len(ms)} |")
    print(f"| sensor -> agent -> broker -> gateway -> webhook, p50 | {statistics.median(ms):.1f} ms |")
    print(f"| same, p99 | {percentile(ms, 99):.1f} ms |")
    print(f"| same, max | {max(ms):.1f} ms |")
    if am_lat:
        am_ms = [x * 1000 for x in am_lat]
        print(f"| same alerts via Alertmanager (group_wait 0) to its webhook, firing only, n | {len(am_ms)} |")
        print(f"| via Alertmanager, p50 | {statistics.median(am_ms):.1f} ms |")
        print(f"| via Alertmanager, p99 | {percentile(am_ms, 99):.1f} ms |")


if __name__ == "__main__":
    main()
