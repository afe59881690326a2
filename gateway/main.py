"""``examwatch gateway run --config FILE``: subscribe, ingest, correlate, export, serve the API."""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time

import sdnotify
import structlog

from examwatch.gateway import acklink, store
from examwatch.gateway import config as gwconfig
from examwatch.gateway.api import ApiServer
from examwatch.gateway.exporter import GatewayCollector, serve
from examwatch.gateway.ingest import Engine, Message
from examwatch.gateway.mqtt import Subscriber
from examwatch.gateway.notify.worker import notifier_for
from examwatch.kernel.config import ConfigError

log = structlog.get_logger("examwatch.gateway")


class Gateway:
    """The gateway's parts sharing one stop event; ``run`` is the ingest loop (one writer)."""

    def __init__(self, cfg: gwconfig.Config) -> None:
        self.cfg = cfg
        self.db_path = cfg.store_where()
        self.stop_event = threading.Event()
        self.conn = store.connect(self.db_path)
        self.engine = Engine(cfg, self.conn, cfg.agent_keys())
        self.inbox: queue.SimpleQueue[tuple[int, int, Message]] = queue.SimpleQueue()
        self.subscriber = Subscriber(cfg.broker, self.inbox)
        ack_key = acklink.load_key(cfg.gateway.state_dir)  # signs the acknowledgement links in messages
        self.api = ApiServer(cfg.api.listen, self.db_path, cfg.api_token(), ack_key)
        self.exporter = GatewayCollector(self.db_path, self.engine.stats, broker=self.subscriber, api=self.api)
        self.notifier = notifier_for(cfg, self.db_path, ack_key=ack_key)

    def run(self) -> None:
        http, _ = serve(self.cfg.exporter.listen, self.exporter, self.notifier.collector)
        self.api_thread = self.api.start()
        self.notifier.start()
        self.subscriber.start()
        log.info(
            "gateway_started",
            agents=len(self.engine.agents),
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
                    self.engine.ingest([m for _, _, m in batch], now)
                    for conn in {c for c, _, _ in batch}:
                        self.subscriber.ack(conn, [mid for c, mid, _ in batch if c == conn])
                if now - last_tick >= 1.0:
                    self.engine.tick(now, self.subscriber.up_since)
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
            http.shutdown()
            self.conn.close()
            log.info("gateway_stopped")

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
