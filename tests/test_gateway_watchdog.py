"""systemd's notify protocol with the real gateway: READY once serving, WATCHDOG only while the ingest loop runs."""

from __future__ import annotations

import socket
import sqlite3
import time

import pytest

from tests.support import until
from tests.support.gateway import GatewayProc, start

pytestmark = pytest.mark.integration


def notes(sock: socket.socket, seconds: float) -> list[str]:
    """Every notification received within ``seconds``."""
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


def test_ready_then_watchdog_only_while_the_ingest_loop_makes_progress(mosquitto, procs, tmp_path, monkeypatch):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # what systemd gives a Type=notify service
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: ping every 0.5 s
    gw = GatewayProc(tmp_path, mosquitto.port, ["s1/101"])
    start(procs, gw)
    first = until(lambda: notes(sock, 1.0), what="a notification")
    assert first[0] == "READY=1"
    until(lambda: "WATCHDOG=1" in notes(sock, 1.0), what="watchdog pings")

    # Stall the ingest loop: its next commit waits for this lock (up to SQLite's 30 s busy timeout).
    lock = sqlite3.connect(gw.db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    notes(sock, 3.0)  # the loop's last round before it reaches the lock
    assert "WATCHDOG=1" not in notes(sock, 3.0)  # stuck: systemd would restart it
    lock.execute("COMMIT")
    lock.close()
    until(lambda: "WATCHDOG=1" in notes(sock, 1.0), what="pings again once the loop runs")
    assert gw.proc.poll() is None
    sock.close()
