"""systemd's notify protocol with the real gateway: READY once serving, WATCHDOG only while the ingest loop runs."""

from __future__ import annotations

import signal
import socket
import sqlite3
import threading
import time

import pytest

from examwatch.gateway import config as gwconfig
from examwatch.gateway.ingest import Message
from examwatch.gateway.main import Gateway
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


def test_the_ingest_loop_waits_no_longer_than_its_timeout_when_a_signal_arrives(tmp_path):
    """SIGTERM's handler running past the wait's end must not turn the wait into one for the next message:
    a quiet gateway (a province at night) would not stop until systemd killed it."""
    cfg = gwconfig.loads(
        f'[gateway]\nstate_dir = "{tmp_path}"\n[api]\nlisten = "127.0.0.1:0"\n[exporter]\nlisten = "127.0.0.1:0"\n'
    )
    gw = Gateway(cfg)
    late = threading.Timer(5, lambda: gw.inbox.put((0, 0, Message("t", b"", False, 0.0))))
    previous = signal.signal(signal.SIGALRM, lambda *_: time.sleep(0.3))  # outlasts the 0.2 s wait
    try:
        late.start()
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        assert gw._take(timeout=0.2) == []  # the wait ended: not the message that came 5 s later
    finally:
        late.cancel()
        signal.signal(signal.SIGALRM, previous)
        gw.api.server_close()
        gw.conn.close()
