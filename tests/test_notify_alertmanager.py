"""A real Prometheus Alertmanager (Debian prometheus-alertmanager) receives our alerts over API v2 and
routes them to a local webhook receiver: the round trip, the re-posting while active, and the resolution."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from examwatch.gateway import store
from examwatch.gateway.notify.settings import Channel, Notify
from examwatch.gateway.notify.worker import Notifier
from examwatch.simulators.broker import free_port, wait_port
from tests.notify_support import raised, store_alarm
from tests.support import until

BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = pytest.mark.skipif(BINARY is None, reason="apt-get install prometheus-alertmanager")


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", free_port()), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[tuple[str, Receiver]]:
    receiver = Receiver()
    port = free_port()
    cfg = tmp_path / "alertmanager.yml"
    cfg.write_text(
        "route:\n  receiver: hook\n  group_by: ['examwatch_id']\n  group_wait: 0s\n  group_interval: 1s\n"
        "  repeat_interval: 1h\nreceivers:\n- name: hook\n  webhook_configs:\n"
        f"  - url: http://127.0.0.1:{receiver.server_address[1]}/am\n    send_resolved: true\n"
    )
    with open(tmp_path / "am.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                BINARY,
                f"--config.file={cfg}",
                f"--storage.path={tmp_path / 'am'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        wait_port(port, 20)
        yield f"http://127.0.0.1:{port}", receiver
    finally:
        proc.terminate()
        proc.wait(10)
        receiver.shutdown()


def am_alerts(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as r:
        return json.loads(r.read())


def test_alerts_round_trip_through_alertmanager_and_resolve(alertmanager, tmp_path):
    url, receiver = alertmanager
    path = str(tmp_path / "gateway.db")
    conn = store.connect(path)
    n = Notifier(
        path,
        "某县",
        Notify(retry_base=0.2, retry_max=1.0, storm_window=0.0),
        [Channel(name="am", type="alertmanager", url=url, repost_interval=1.0)],
        [],
        {},
    )
    n.start()
    try:
        store_alarm(conn, raised("101"))
        firing = until(lambda: [p for p in receiver.posts if p["status"] == "firing"], 30, "routed to the receiver")
        [alert] = firing[0]["alerts"]
        assert alert["labels"] == {
            "alertname": "recording_stopped",
            "site": "s1",
            "room": "101",
            "level": "2",
            "severity": "critical",
            "examwatch_id": "s1/101/recording_stopped/1",
        }
        assert alert["annotations"]["summary"] == "101 录像中断"
        [stored] = am_alerts(url)
        assert (
            stored["status"]["state"] == "active" and stored["labels"]["examwatch_id"] == "s1/101/recording_stopped/1"
        )
        first_end = stored["endsAt"]
        # Re-posted while active: Alertmanager's end time moves on, so it never resolves it by itself.
        until(lambda: am_alerts(url)[0]["endsAt"] > first_end, 20, "re-posted")
        store_alarm(conn, raised("101", state="cleared"))
        resolved = until(lambda: [p for p in receiver.posts if p["status"] == "resolved"], 30, "resolution routed")
        assert resolved[0]["alerts"][0]["labels"]["examwatch_id"] == "s1/101/recording_stopped/1"
        until(lambda: am_alerts(url) == [], 20, "no active alert left")
        time.sleep(2.5)  # the reposter must not bring a cleared alert back
        assert am_alerts(url) == []
    finally:
        n.stop()
        conn.close()


def test_a_restarted_notifier_keeps_re_posting_what_is_still_firing(alertmanager, tmp_path):
    url, _ = alertmanager
    path = str(tmp_path / "gateway.db")
    conn = store.connect(path)
    channel = Channel(name="am", type="alertmanager", url=url, repost_interval=1.0)
    n = Notifier(path, "某县", Notify(storm_window=0.0), [channel], [], {})
    n.start()
    try:
        store_alarm(conn, raised("101"))
        until(lambda: am_alerts(url), 30, "the alert is in Alertmanager")
    finally:
        n.stop()
    ends = am_alerts(url)[0]["endsAt"]
    n = Notifier(path, "某县", Notify(storm_window=0.0), [channel], [], {})  # a new process, the same database
    n.start()
    try:
        until(lambda: am_alerts(url)[0]["endsAt"] > ends, 20, "re-posted by the restarted notifier")
    finally:
        n.stop()
        conn.close()
