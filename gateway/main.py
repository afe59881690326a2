"""``examwatch gateway run --config FILE``: subscribe, ingest, correlate, export, serve the API."""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import sdnotify
import structlog

from examwatch.gateway import acklink, duty, replica, store
from examwatch.gateway import config as gwconfig
from examwatch.gateway.api import ApiServer
from examwatch.gateway.exporter import GatewayCollector, serve
from examwatch.gateway.exporter import stop as stop_exporter
from examwatch.gateway.ingest import Engine, Message
from examwatch.gateway.mqtt import Subscriber
from examwatch.gateway.notify.worker import notifier_for
from examwatch.kernel.config import ConfigError

log = structlog.get_logger("examwatch.gateway")
T = TypeVar("T")


class Gateway:
    """The gateway's parts sharing one stop event; ``run`` is the ingest loop (one writer)."""

    def __init__(self, cfg: gwconfig.Config) -> None:
        self.cfg = cfg
        self.db_path = cfg.store_where()
        self.stop_event = threading.Event()
        self.conn = store.connect(self.db_path)
        self.engine = Engine(cfg, self.conn, cfg.agent_keys())
        # Not a SimpleQueue: its get(timeout) waits for ever once a signal handler (SIGTERM's) outlasts the
        # timeout (CPython 3.11's _queue passes the negative remainder on as "block"), so a quiet gateway would
        # not stop.
        self.inbox: queue.Queue[tuple[int, int, Message]] = queue.Queue()
        self.subscriber = Subscriber(cfg.broker, self.inbox)
        ack_key = acklink.load_key(cfg.gateway.state_dir)  # signs the acknowledgement links in messages
        self.requests: queue.SimpleQueue[tuple[Callable[[], bool], Future[bool]]] = queue.SimpleQueue()
        self.api = ApiServer(
            cfg.api.listen,
            self.db_path,
            cfg.api_token(),
            ack_key,
            users=cfg.api.users,
            roster=list(self.engine.keys),  # the rooms' ids, not their keys
            secrecy_rooms=cfg.api.secrecy_rooms,
            close_incident=self.close_incident,
            read_only=cfg.gateway.mode == "aggregate",  # a province's gateway only looks
            records={"tz": cfg.schedule.timezone, "rules": cfg.correlation_rules(), "county": cfg.gateway.county},
        )
        self.exporter = GatewayCollector(self.db_path, self.engine.stats, broker=self.subscriber, api=self.api)
        self.notifier = notifier_for(cfg, self.db_path, ack_key=ack_key)
        # On PostgreSQL this may be one of several replicas: it leads only while it holds the lock.
        where = self.db_path
        self.leadership = replica.Leadership(where) if isinstance(where, store.Postgres) else None
        self._caught_up = self._rechecked = 0.0
        self._notify = False  # leading, the notifier to start once the last lead's threads have ended

    def leading(self) -> bool:
        return self.engine.role != "follower"

    def run(self) -> None:
        leader = replica.LeaderCollector(self.leading)
        http, _ = serve(self.cfg.exporter.listen, self.exporter, self.notifier.collector, leader)
        self.api_thread = self.api.start()
        if self.leadership is None:
            self.notifier.start()
        else:
            self.engine.role = "follower"
            self.subscriber.follow_status(False)
        self.subscriber.start()
        log.info(
            "gateway_started",
            agents=len(self.engine.agents),
            mode=self.cfg.gateway.mode,
            api=self.cfg.api.listen,
            exporter=self.cfg.exporter.listen,
        )
        systemd = sdnotify.SystemdNotifier()
        systemd.notify("READY=1")
        period, last_tick, last_watchdog = watchdog_period(), 0.0, 0.0
        try:
            while not self.stop_event.is_set():
                batch = self._take(timeout=0.2)
                now = time.time()
                if batch:
                    self.engine.clocks.settled_from = self.subscriber.clocks_from
                    self._stored(self.engine.ingest, [m for _, _, m in batch], now)
                    for conn in {c for c, _, _ in batch}:
                        self.subscriber.ack(conn, [mid for c, mid, _ in batch if c == conn])
                self._serve_requests()
                if now - last_tick >= 1.0:
                    self._lead(now)
                    self._stored(self.engine.tick, now, self.subscriber.up_since)
                    last_tick = now
                # From the ingest loop itself, never a timer of its own: a loop stuck in a write, or a
                # dead API or MQTT thread, stops the pings and systemd restarts us after WatchdogSec.
                if time.monotonic() - last_watchdog >= period and self.healthy():
                    last_watchdog = time.monotonic()
                    systemd.notify("WATCHDOG=1")
                    systemd.notify(
                        f"STATUS=broker {'connected' if self.subscriber.connected else 'NOT connected'}, "
                        f"{len(self.engine.agents)} rooms"
                    )
        finally:
            self.subscriber.stop()
            self.notifier.stop()
            self.api.shutdown()
            stop_exporter(http)
            if self.leadership is not None:
                self.leadership.close()
            self.conn.close()
            log.info("gateway_stopped")

    def close_incident(self, incident_id: str, who: str, note: str) -> bool:
        """From an API thread: the ingest loop, the incidents' one writer, closes it (Engine.close_incident).
        A follower replica does not judge incidents: the leader's desk closes them (NotLeading)."""
        if not self.leading():
            raise duty.NotLeading(incident_id)
        done: Future[bool] = Future()
        self.requests.put((lambda: self.engine.close_incident(incident_id, who, note, time.time()), done))
        return done.result(timeout=10)  # TimeoutError: the loop is stuck (the watchdog sees to that)

    def _serve_requests(self) -> None:
        while True:
            try:
                work, done = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                done.set_result(work())
            except Exception as err:  # the requester sees it; the loop goes on
                log.exception("request_failed")
                done.set_exception(err)

    def _stored(self, step: Callable[..., T], *args: Any) -> T:
        """Run a step that writes; while the database cannot be reached (PostgreSQL restarting), wait and run it
        again from what the database holds. Nothing is acknowledged meanwhile: the broker keeps it all."""
        pause = 0.5
        while True:
            try:
                return step(*args)
            except Exception as err:
                if not store.unavailable(err) or self.stop_event.is_set():
                    raise
                log.warning("gateway_store_unavailable", error=f"{type(err).__name__}: {err}"[:300], retry_in=pause)
            self.stop_event.wait(pause)
            pause = min(pause * 2, 10.0)
            try:
                self.engine.reload(self.conn)
            except Exception as err:
                if not store.unavailable(err):
                    raise

    def _lead(self, now: float) -> None:
        """Take the lead when it is free, give it up when our session is lost; as leader, learn what the
        other replicas stored."""
        if self.leadership is None:
            return
        leading = self.leadership.held()
        if leading != self.leading():
            log.warning("gateway_leader" if leading else "gateway_follower")
            self.engine.role = "leader" if leading else "follower"
            self.subscriber.follow_status(leading)
            self._notify = leading
            if leading:
                self._stored(self.engine.reload, self.conn)  # start from the last leader's state
                self._caught_up = now
            else:
                self.notifier.stop(wait=0)  # its threads end after the send in hand: the ingest does not wait
        if self._notify and self.notifier.stopped():  # a notifier of an earlier lead has ended: start ours
            self._notify = False
            self.notifier.start()
        if leading:
            recheck = now - self._rechecked > replica.RECHECK
            self._caught_up = self._stored(replica.catch_up, self.engine, self._caught_up, recheck)
            self._rechecked = now if recheck else self._rechecked

    def healthy(self) -> bool:
        """The threads beside the ingest loop still run, the notifier's too.

        A broker that is down is not ours to fix by restarting.
        """
        return self.api_thread.is_alive() and self.subscriber.alive() and self.notifier.alive()

    def _take(self, timeout: float) -> list[tuple[int, int, Message]]:
        try:
            batch = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < self.cfg.gateway.batch_max:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return batch


def watchdog_period() -> float:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), as systemd advises; 5 s outside systemd."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        usec = 0
    return usec / 2e6 if usec > 0 else 5.0


def run(config_path: str) -> int:
    try:
        cfg = gwconfig.load(config_path)
        gw = Gateway(cfg)
    except ConfigError as err:
        sys.stderr.write(err.report(config_path))
        return 2
    except (OSError, ValueError) as err:
        print(f"{config_path}: {err}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: gw.stop_event.set())
    gw.run()
    return 0
