"""A gateway on PostgreSQL catching up with a backlog the broker kept for it (the county's rooms went on
sending while it was down, or faster than it stores): it stores every message once, and its API answers
throughout (the duty desk stays usable while the gateway catches up), and no room's clock is judged by a
heartbeat that waited in the broker (every room's clock alarm once came with a backlog, and the leader's
rereading of so many open alarms, a round trip each, stalled its ingest further)."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import pytest

from tests.support import until
from tests.support.feed import Feed
from tests.support.gateway import GatewayProc, start
from tests.test_gateway_replicas import check_exactly_once, leaders, metric, rooms, stored

pytestmark = pytest.mark.integration

BACKLOG = 30_000  # messages
ANSWER_WITHIN = 10.0  # s: "answers at all" (a request that waits this long is a desk that does not work)


class Asker:
    """Asks the API for the agents' list, one request after another; records the slowest wait and failures, and
    the most messages the gateway had received and not stored."""

    def __init__(self, gw: GatewayProc, path: str = "/api/v1/agents") -> None:
        self.gw, self.path = gw, path
        self.asked, self.failed, self.slowest, self.behind = 0, [], 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            t = time.monotonic()
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.gw.api_port}{self.path}", timeout=ANSWER_WITHIN
                ) as r:
                    r.read()
            except OSError as err:
                self.failed.append(f"{type(err).__name__}: {err}")
            self.asked += 1
            self.slowest = max(self.slowest, time.monotonic() - t)
            self.behind = max(self.behind, metric(self.gw, "examwatch_gateway_broker_unacknowledged") or 0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(ANSWER_WITHIN + 5)


@pytest.mark.timeout(300)
def test_a_backlog_on_postgresql_is_stored_once_while_the_api_answers(tmp_path, mosquitto, postgres, procs):
    dsn, roster = postgres.new_database(), rooms(1000)
    gw = GatewayProc(
        tmp_path,
        mosquitto.port,
        roster,
        extra=f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n',
        broker='client_id = "gw1"\nshare_group = "county-3b9f0e27c4a1"',
    )
    feed = Feed(mosquitto.port, roster, period=0.5)
    procs.append(feed)
    start(procs, gw)
    until(lambda: leaders([gw]) == 1, what="the leader")
    time.sleep(1.0)  # its subscription to the statuses confirmed
    gw.stop(signal.SIGKILL)  # its session stays: the broker keeps its share while it is down
    feed.online()  # heartbeats first and last in the backlog: they waited in the broker, the rooms' clocks are right
    feed.start()
    until(lambda: feed.published() >= BACKLOG, timeout=120, what=f"a backlog of {BACKLOG:,} messages")
    feed.stop()
    feed.online()
    feed.drain()
    gw.start()
    asker = Asker(gw)
    behind = "examwatch_gateway_broker_unacknowledged"  # received, not yet stored
    db = stored(dsn)
    check_exactly_once(db, feed)
    until(lambda: metric(gw, behind) == 0, what="everything stored is acknowledged")
    asker.stop()
    assert asker.failed == [] and asker.asked > 10, (asker.failed[:3], asker.asked)
    assert asker.behind > 0  # the backlog was seen in the metrics while it was stored
    until(lambda: leaders([gw]) == 1, what="the leader")
    time.sleep(2)  # a tick or two after the last heartbeat
    assert db.execute("SELECT rule, COUNT(*) FROM alarms GROUP BY rule").fetchall() == []  # no clock alarm
    print(f"{feed.published()} messages of backlog; API asked {asker.asked} times, slowest {asker.slowest:.2f} s")
