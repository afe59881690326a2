"""The notifier at run time: one thread follows the gateway's timeline and plans; one sender thread per
channel drains that channel's outbox rows in order, so a channel that is down delays nobody else.

Each thread has its own connection to the gateway's store. Nothing here is called by ingest.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from examwatch.channels import alertmanager
from examwatch.channels.base import SendError, client
from examwatch.channels.send import SENDERS, send_once
from examwatch.gateway import store
from examwatch.gateway.notify import outbox, source
from examwatch.gateway.notify.core import Planner, State
from examwatch.gateway.notify.settings import Channel, Notify, Roster

log = structlog.get_logger("examwatch.gateway.notify")

STEP = 0.05  # s between looks at the timeline (two indexed reads: cheap; sets the latency floor)
KEEP = 30 * 86400.0  # s sent messages and the notifier's timeline are kept


class Stats:
    def __init__(self, channels: list[str]) -> None:
        self.sent: Counter[str] = Counter({c: 0 for c in channels})
        self.failed: Counter[tuple[str, str]] = Counter()
        self.resent: Counter[str] = Counter({c: 0 for c in channels})  # possibly a duplicate (after a kill)
        self.up: dict[str, int] = {c: 1 for c in channels}


class Notifier:
    def __init__(
        self,
        db_path: store.Where,
        county: str,
        settings: Notify,
        channels: list[Channel],
        roster: list[Roster],
        classes: dict[str, str],
        clock: Callable[[], float] = time.time,
        ack_key: bytes = b"",
    ) -> None:
        self.db_path = db_path
        self.ack_key = ack_key
        self.county = county or "county"
        self.settings = settings
        self.channels = channels
        self.roster = roster
        self.classes = classes
        self.clock = clock
        self.stats = Stats([c.name for c in channels])
        self.stop_event = threading.Event()
        self.wake = {c.name: threading.Event() for c in channels}
        self.threads: list[threading.Thread] = []
        self._ending: list[threading.Thread] = []  # the threads asked to stop, finishing what they had in hand
        self.collector = NotifyCollector(self)
        self._first: tuple[dict[str, int], list[Any]] | None = None

    def start(self) -> None:
        """Start planning and sending; after ``stop``, only once its threads have ended (``stopped``)."""
        if not self.channels:
            return  # nowhere to send: no tables, no threads
        self.stop_event.clear()
        conn = outbox.connect(self.db_path)
        try:
            if outbox.load(conn, "cursors") is None:
                # First start: the alarms open now, then the timeline from its end as it is now (no history).
                self._first = (source.timeline_end(conn), source.open_alarms(conn))
            for ch, n in outbox.recover(conn).items():
                if ch in self.stats.resent:
                    self.stats.resent[ch] += n
                    log.warning("notify_resend_after_restart", channel=ch, rows=n)
        finally:
            conn.close()
        self.threads = [threading.Thread(target=self._follow, name="notify-planner", daemon=True)]
        self.threads += [
            threading.Thread(target=self._send_loop, args=(c,), name=f"notify-{c.name}", daemon=True)
            for c in self.channels
        ]
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        """Every planner and sender thread still runs (none started when no channel is configured)."""
        return all(t.is_alive() for t in self.threads)

    def stop(self, wait: float = 15.0) -> None:
        """Ask every thread to end, and wait ``wait`` s at most for each. With 0 they end by themselves after the
        step or send in hand (a replica losing the lead does not hold its ingest loop up for a slow robot)."""
        self.stop_event.set()
        for w in self.wake.values():
            w.set()
        self._ending, self.threads = self.threads, []
        for t in self._ending if wait > 0 else []:
            t.join(wait)

    def stopped(self) -> bool:
        """Every thread of the last start has ended: it may start again."""
        return not any(t.is_alive() for t in self._ending)

    # --- planning -------------------------------------------------------------------------------------

    def _follow(self) -> None:
        conn = outbox.connect(self.db_path)
        raw = outbox.load(conn, "planner")
        state = msgspec.json.decode(raw, type=State) if raw else State()
        cursors = msgspec.json.decode(outbox.load(conn, "cursors") or b"{}", type=dict[str, int])
        first: list[Any] = []  # a first start's open alarms, until committed with the first step
        if self._first is not None:
            cursors, first = self._first
        planner = Planner(self.settings, self.channels, self.roster, self.classes, state, self.ack_key)
        failures, pruned, stale = 0, 0.0, False
        while not self.stop_event.wait(STEP):
            try:
                if stale:  # reload the last committed state: what was planned but not stored is planned again
                    raw = outbox.load(conn, "planner")
                    planner.state, stale = msgspec.json.decode(raw, type=State) if raw else State(), False
                now = self.clock()
                if now - pruned > 3600:
                    outbox.prune(conn, now - KEEP)
                    pruned = now
                events, new_cursors = source.read_new(conn, cursors)
                acks = source.read_acks(conn, [t for t, th in planner.state.threads.items() if not th.acked])
                out, lines = planner.step(first + events, acks, now)
                if out or lines or new_cursors != cursors or self._first is not None:
                    outbox.commit_step(
                        conn,
                        {"planner": msgspec.json.encode(planner.state), "cursors": msgspec.json.encode(new_cursors)},
                        out,
                        lines,
                        now,
                    )
                    cursors, first, self._first = new_cursors, [], None
                    for ch in {c for c, _ in out}:
                        if ch in self.wake:
                            self.wake[ch].set()
                failures = 0
            except Exception as err:  # a bad row, a locked database or one out of reach must not end notifications
                failures += 1
                if failures == 1:
                    log.error("notify_plan_failed", error=f"{type(err).__name__}: {err}")
                stale = True
        conn.close()

    # --- sending ----------------------------------------------------------------------------------------

    def _send_loop(self, ch: Channel) -> None:
        conn = outbox.connect(self.db_path)
        lane = _Lane(self, ch, conn)
        while not self.stop_event.is_set():
            try:
                lane.once()
            except Exception as err:  # a database hiccup must not end this channel's deliveries
                log.error("notify_sender_error", channel=ch.name, error=f"{type(err).__name__}: {err}")
                self.stop_event.wait(1.0)
        lane.close()
        conn.close()

    def _channel_alarm(self, conn: Any, name: str, down: bool, reason: str) -> None:
        try:
            source.channel_alarm(conn, self.county, name, down, reason, self.clock())
        except Exception as err:
            log.error("notify_alarm_failed", channel=name, error=f"{type(err).__name__}: {err}")


class _Lane:
    """One channel's sender: the head of its outbox first, within the platform's rate, retried with backoff."""

    def __init__(self, n: Notifier, ch: Channel, conn: Any) -> None:
        self.n, self.ch, self.conn = n, ch, conn
        self.http: Any = None
        self.send = SENDERS[ch.type]
        self.window: deque[float] = deque()  # send times within the last minute
        self.rate = ch.rate()
        self.reposter = alertmanager.Reposter(ch) if ch.type == "alertmanager" else None
        if self.reposter:
            for m in outbox.sent_messages(conn, ch.name):
                self.reposter.sent(m)
        self.failing, self.last_reason = 0, ""

    def close(self) -> None:
        if self.http is not None:
            self.http.close()

    def once(self) -> None:
        n, ch, conn = self.n, self.ch, self.conn
        now = n.clock()
        row = outbox.head(conn, ch.name)
        if row is None or row.due > now:
            if self.reposter and self.reposter.due(now) and self.failing == 0:
                try:
                    self.reposter.repost(self._http(), now)
                except SendError as err:
                    n.stats.failed[(ch.name, err.reason)] += 1
                    self.reposter.last = now
            wake = n.wake[ch.name]
            wake.wait(min(1.0, row.due - now) if row else 1.0)
            wake.clear()
            return
        while self.window and now - self.window[0] >= 60.0:
            self.window.popleft()
        if self.rate and len(self.window) >= self.rate:
            n.stop_event.wait(60.0 - (now - self.window[0]))
            return
        if self.window and now - self.window[-1] < self.ch.min_gap():
            n.stop_event.wait(self.ch.min_gap() - (now - self.window[-1]))
            return
        outbox.mark_sending(conn, row.id)
        self.window.append(now)
        try:
            self.send(ch, row.message, self._http(), now)
        except Exception as err:
            self._failed(row, err, now)
            return
        outbox.mark_sent(conn, row.id, n.clock())
        n.stats.sent[ch.name] += 1
        if self.reposter:
            self.reposter.sent(row.message)
        if self.failing:
            log.info("notify_recovered", channel=ch.name, after=self.failing)
        self.failing, self.last_reason = 0, ""
        if not n.stats.up[ch.name]:
            n.stats.up[ch.name] = 1
            n._channel_alarm(conn, ch.name, False, "")

    def _http(self) -> Any:
        if self.http is None and self.ch.type != "email":
            try:
                self.http = client(self.ch)
            except (OSError, ValueError) as err:  # a CA file missing or unreadable
                raise SendError("tls", type(err).__name__) from None
        return self.http

    def _failed(self, row: outbox.Row, err: Exception, now: float) -> None:
        n, ch = self.n, self.ch
        reason = err.reason if isinstance(err, SendError) else "internal"
        self.failing += 1
        n.stats.failed[(ch.name, reason)] += 1
        delay = min(n.settings.retry_max, n.settings.retry_base * 2 ** min(row.attempts, 16))
        outbox.mark_failed(self.conn, row.id, str(err), now + delay)
        if reason != self.last_reason:  # once per kind of failure, not once per retry
            log.warning("notify_failed", channel=ch.name, reason=reason, detail=str(err)[:200], retry_in=delay)
            self.last_reason = reason
        if self.failing >= n.settings.failing_after and n.stats.up[ch.name]:
            n.stats.up[ch.name] = 0
            n._channel_alarm(self.conn, ch.name, True, reason)


class NotifyCollector:
    """``examwatch_notify_*``: per channel, sent and failed (by reason), queue length, up."""

    def __init__(self, notifier: Notifier) -> None:
        self.n = notifier
        self._conn: Any = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        if not self.n.channels:
            return  # no channels configured: no notifier, no series
        s = self.n.stats
        sent = CounterMetricFamily("examwatch_notify_sent", "messages a channel confirmed", labels=["channel"])
        for ch, v in list(s.sent.items()):
            sent.add_metric([ch], v)
        failed = CounterMetricFamily(
            "examwatch_notify_failed", "send attempts that failed, by reason", labels=["channel", "reason"]
        )
        for (ch, reason), v in list(s.failed.items()):
            failed.add_metric([ch, reason], v)
        resent = CounterMetricFamily(
            "examwatch_notify_resent_after_restart",
            "messages sent again after a kill (each possibly a duplicate)",
            labels=["channel"],
        )
        for ch, v in list(s.resent.items()):
            resent.add_metric([ch], v)
        up = GaugeMetricFamily("examwatch_notify_up", "1 unless the channel keeps failing", labels=["channel"])
        for ch, v in list(s.up.items()):
            up.add_metric([ch], v)
        queue = GaugeMetricFamily("examwatch_notify_queue", "messages waiting for the channel", labels=["channel"])
        with self._lock:
            if self._conn is None:
                self._conn = outbox.connect(self.n.db_path)
            lengths = outbox.queue_lengths(self._conn)
        for ch in s.sent:
            queue.add_metric([ch], lengths.get(ch, 0))
        yield from (sent, failed, resent, up, queue)


def test_channel(ch: Channel, county: str, now: float) -> None:
    """Send one test message to ``ch`` now, bypassing the outbox; raises SendError when it is not confirmed."""
    from examwatch.gateway.notify.messages import system_message

    m = system_message(
        key=f"test:{now}",
        thread="test",
        title="【测试】examwatch 通知渠道测试",
        text=f"这是一条测试消息：渠道“{ch.name}”配置正确，能收到考点设备告警。",
        firing=False,
        at=now,
        site=county or "county",
    )
    send_once(ch, m, now)


def notifier_for(
    cfg: Any, db_path: store.Where, clock: Callable[[], float] = time.time, ack_key: bytes = b""
) -> Notifier:
    """The notifier of a gateway config (``gateway.config.Config``)."""
    from examwatch.gateway.correlate import rule_classes

    classes = {rule: c.fault_class for rule, c in rule_classes(cfg.correlation_rules()).items()}
    return Notifier(db_path, cfg.gateway.county, cfg.notify, cfg.channels, cfg.roster, classes, clock, ack_key)
