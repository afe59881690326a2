"""When the county is unreachable, the agent tells the site itself (issue 9: off by default, ``[fallback]``).

Its own thread, never the writer's: once the uplink has been down for ``after`` seconds, every level-2
transition (a raise, or a rise to level 2) still waiting in the outbox is sent once to the site channel, at
most ``per_minute`` a minute. What was sent is recorded in ``fallback.db`` beside the agent's database, so a
restart does not send it again.

The gateway does not send it a second time: when the uplink finally publishes that outbox row, ``mark`` adds
the channel's name to the transition's ``notified`` (inside the signed body), and the gateway's notifier
leaves that channel out when it plans the raise. The fallback holds ``lock`` from its check that the row is
not yet handed to the MQTT client, through the send, to the record; the uplink hands an alarm row over
through ``mark`` under the same lock. So a row either left unmarked before the fallback looked at it (then
the county tells people) or leaves marked (the county records, and skips that channel).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import structlog

from examwatch.channels.base import SendError
from examwatch.channels.message import Item, Message
from examwatch.channels.send import send_once
from examwatch.edge.config import AgentSettings, FallbackSettings
from examwatch.kernel import files
from examwatch.kernel.model import AlarmEvent

log = structlog.get_logger("examwatch.fallback")

STEP = 1.0  # s between looks at the uplink and the outbox
MAX_WAITING = 100  # level-2 transitions held for sending at most; more are left to the county (counted)
KEEP = 30 * 86400.0  # s a record of a direct send is kept

_event = msgspec.json.Decoder(AlarmEvent)


def message(ev: AlarmEvent, agent: AgentSettings, down_for: float, timezone: str) -> Message:
    """The direct message, in Chinese: what happened, the plan's action, and that the county is unreachable."""
    site, room = agent.site_name or agent.site, agent.room_name or agent.room
    start = datetime.fromtimestamp(ev.raised_at, ZoneInfo(timezone)).strftime("%m-%d %H:%M:%S")
    lines = [f"**考点**：{site}　**考场**：{room}", f"**设备**：{ev.device}"]
    if ev.value is not None:
        lines.append(f"**读数**：{ev.metric + ' ' if ev.metric else ''}{ev.value:g}")
    lines.append(f"**开始**：{start}")
    if ev.action:
        lines.append(f"**处置**：{ev.action}")
    lines.append(
        f"**说明**：本考场终端已 {max(1, round(down_for / 60))} 分钟连不上县级平台，此告警由考场终端直接发出；"
        "请按预案处置，并电话报告县招办。平台恢复后记录自动补传，本条不再重复通知。"
    )
    lines.append(f"编号：{ev.id}")
    item = Item(
        id=ev.id, site=ev.site, room=ev.room, rule=ev.rule, level=ev.level, starts_at=ev.raised_at, summary=ev.message
    )
    return Message(
        key=f"{ev.id}:direct:{ev.level}",
        thread=ev.id,
        kind="raised",
        level=ev.level,
        title=f"【县级平台无法连接·考场直报】{ev.message}",
        lines=lines,
        items=[item],
    )


class Fallback:
    def __init__(
        self, settings: FallbackSettings, agent: AgentSettings, db_path: str, down_for: Callable[[], float]
    ) -> None:
        assert settings.channel is not None  # the config check requires it when enabled
        self.s = settings
        self.ch = settings.channel
        self.agent = agent
        self.db_path = db_path
        self.record_path = Path(db_path).with_name("fallback.db")
        self.down_for = down_for
        self.lock = threading.Lock()
        self.handed = 0  # the highest alarm row's seq handed to the MQTT client in this run
        self.sent: dict[int, list[str]] = {}  # outbox seq (this epoch) -> channels told directly
        self.sent_ids: set[str] = set()  # alarms told directly: each at most once
        self.waiting: dict[int, AlarmEvent] = {}  # seq -> level-2 transition to send
        self.scanned = 0
        self.recent: deque[float] = deque()  # monotonic times of the sends in the last minute
        limit = self.ch.rate()
        self.per_minute = min(settings.per_minute, limit) if limit else settings.per_minute
        self.failures = 0
        self.retry_at = 0.0
        self.stats: Counter[str] = Counter()  # sent, failed:<reason>, dropped
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: Any = None
        self._record: sqlite3.Connection | None = None
        self._epoch = 0

    # --- the uplink's side -----------------------------------------------------------------------------

    def mark(self, row: Any) -> bytes:
        """The body to publish for an outbox row: an alarm told directly carries the channel in ``notified``."""
        if row.kind != "alarms":
            return bytes(row.body)
        with self.lock:
            self.handed = max(self.handed, row.seq)
            self.waiting.pop(row.seq, None)
            names = self.sent.get(row.seq)
        if not names:
            return bytes(row.body)
        try:
            ev = _event.decode(row.body)
        except msgspec.DecodeError:
            return bytes(row.body)
        return msgspec.json.encode(msgspec.structs.replace(ev, notified=names))

    # --- run -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.open()
        self._thread = threading.Thread(target=self._run, name="fallback", daemon=True)
        self._thread.start()
        log.info("fallback_armed", channel=self.ch.name, after=self.s.after, told_before=len(self.sent_ids))

    def open(self) -> None:
        """Read the outbox's epoch and what was told before (``fallback.db``)."""
        from examwatch.edge.store import OutboxReader

        self._reader = OutboxReader(self.db_path)
        self._epoch = self._reader.identity()[0]
        self._record = sqlite3.connect(str(self.record_path), timeout=30, isolation_level=None, check_same_thread=False)
        files.private_db(self.record_path)
        self._record.execute(
            "CREATE TABLE IF NOT EXISTS sent (alarm_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL,"
            " seq INTEGER NOT NULL, channel TEXT NOT NULL, at REAL NOT NULL)"
        )
        self._record.execute("DELETE FROM sent WHERE at < ?", [time.time() - KEEP])
        for alarm_id, epoch, seq, channel in self._record.execute("SELECT alarm_id, epoch, seq, channel FROM sent"):
            self.sent_ids.add(alarm_id)
            if epoch == self._epoch:
                self.sent.setdefault(seq, []).append(channel)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ch.timeout + 5)
        for conn in (self._reader, self._record):
            if conn is not None:
                conn.close()

    def _run(self) -> None:
        failed_before = False
        while not self._stop.wait(STEP):
            try:
                self.step()
                failed_before = False
            except Exception:  # one bad step must not end the fallback: log it once, try again
                if not failed_before:
                    log.exception("fallback_step_failed")
                failed_before = True

    def step(self) -> None:
        if self.down_for() >= self.s.after:
            self._scan()
            self._send_due()

    def _scan(self) -> None:
        """Pick up the level-2 transitions written since the last look and not yet handed to the uplink."""
        rows = self._reader.conn.execute(
            "SELECT seq, body FROM outbox WHERE kind = 'alarms' AND seq > ? ORDER BY seq LIMIT 500",
            [max(self.scanned, self.handed)],
        ).fetchall()
        for seq, body in rows:
            self.scanned = seq
            try:
                ev = _event.decode(body)
            except msgspec.DecodeError:
                continue
            if ev.state == "cleared":  # over before it was told: the county reports it with the history
                self.waiting = {s: e for s, e in self.waiting.items() if e.id != ev.id}
            elif ev.level >= 2 and ev.id not in self.sent_ids and ev.id not in {e.id for e in self.waiting.values()}:
                if len(self.waiting) >= MAX_WAITING:
                    self.stats["dropped"] += 1
                    continue
                self.waiting[seq] = ev

    def _send_due(self) -> None:
        now = time.monotonic()
        if now < self.retry_at:
            return
        for seq in sorted(self.waiting):
            while self.recent and now - self.recent[0] >= 60:
                self.recent.popleft()
            if len(self.recent) >= self.per_minute or self.down_for() < self.s.after:
                return
            with self.lock:
                ev = self.waiting.pop(seq, None)
                if ev is None or seq <= self.handed:
                    continue  # the uplink took it meanwhile: the county tells people
                try:
                    send_once(self.ch, message(ev, self.agent, self.down_for(), self.s.timezone), time.time())
                except SendError as err:
                    self.waiting[seq] = ev
                    self.failures += 1
                    self.stats[f"failed:{err.reason}"] += 1
                    self.retry_at = now + min(300.0, 5.0 * 2 ** min(self.failures, 6))
                    log.warning(
                        "fallback_send_failed",
                        channel=self.ch.name,
                        alarm=ev.id,
                        reason=err.reason,
                        retry_in=round(self.retry_at - now),
                    )
                    return
                self._remember(seq, ev)
            self.failures = 0
            self.recent.append(now)
            self.stats["sent"] += 1
            log.warning("fallback_sent", channel=self.ch.name, alarm=ev.id, level=ev.level)

    def _remember(self, seq: int, ev: AlarmEvent) -> None:
        self.sent.setdefault(seq, []).append(self.ch.name)
        self.sent_ids.add(ev.id)
        assert self._record is not None
        try:
            self._record.execute(
                "INSERT OR REPLACE INTO sent (alarm_id, epoch, seq, channel, at) VALUES (?,?,?,?,?)",
                [ev.id, self._epoch, seq, self.ch.name, time.time()],
            )
        except sqlite3.Error as err:  # told, and marked in this run; only a restart could tell it again
            log.error("fallback_record_failed", error=str(err))


__all__ = ["Fallback", "message"]
