"""The room agent at run time: collectors -> intake queue -> one writer (rules + store) -> uplink.

Collectors run as asyncio tasks (paho's MQTT thread for the sensors). Everything they read goes through a
bounded queue to a single writer thread, which owns SQLite and the rules state. It evaluates the rules on
every reading as it arrives (the live view and the alarms never wait), but stores readings a few seconds
at a time (``READINGS_HOLD``, or when they go to the county): one transaction per poll cost a 1 s poller
more than the poll. An alarm transition is committed at once (synchronous=FULL), together with the
readings held so far, before the uplink is told. The writer also wakes when a ``for`` duration or a
silent sensor is due.

Everything is scheduled on the monotonic clock; the wall clock only stamps data. A Pi has no real-time
clock, so the wall clock may step by hours (NTP at boot, a fake-hwclock restore): each tick compares the
two, and a step moves the rules' remembered times with it (no false silence) and is reported as the host's
``clock_jump_seconds`` (the ``agent_clock_jump`` alarm).
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from typing import Any

import msgspec
import structlog

from examwatch.collectors import Health
from examwatch.edge import bootstrap, statedir
from examwatch.edge.config import Config, Device
from examwatch.edge.intake import Intake
from examwatch.edge.store import Store, is_corruption, open_checked
from examwatch.kernel import files
from examwatch.kernel.model import AlarmEvent, Reading, base_device
from examwatch.rules.schedule import Calendar

log = structlog.get_logger("examwatch.agent")

# Seconds the writer waits at most for readings: it also wakes when a time-based rule is due (a ``for``
# timer, a silent sensor, a phase change), the self-readings or an uplink batch; its beat proves it alive.
TICK = 2.0
CHORES_SLACK = 1.0  # seconds a chore may wait past its time for readings to wake the writer (see _wait)
WRITER_STALE = 5.0  # seconds without a writer tick before the watchdog stops (a writer stuck on its disk)
BATCH_MAX = 5_000
SELF_METRICS_EVERY = 10.0  # seconds between the agent's own readings (outbox fill, store health)
SELF_METRICS_KEEP = 60.0  # seconds between stored self-readings while none of them changes
# Seconds readings may wait in memory before their transaction: a kill -9 or a power cut loses at most
# these (and CHORES_SLACK) of readings, never an alarm transition (committed at once, with the readings
# held so far).
READINGS_HOLD = 5.0
UNSTORED_MAX = 50_000  # readings held in memory while the disk refuses them (a few MB; alarms always kept)
CLOCK_STEP = (
    1.0  # seconds the wall clock may move apart from the monotonic one between ticks before it counts as a step
)
CLOCK_STEP_HOLD = 3600.0  # seconds ``clock_jump_seconds`` reports a step (keeps its alarm up for people to see)


def with_host_device(cfg: Config) -> Config:
    """Every agent watches its own machine; add the host device when the config names none."""
    if any(d.kind == "host" for d in cfg.devices):
        return cfg
    host = Device(name="host", kind="host", protocol="host", address=cfg.agent.state_dir, interval=30.0)
    return msgspec.structs.replace(cfg, devices=[*cfg.devices, host])


def across_step(readings: list[Reading], step: float, now: float) -> list[Reading]:
    """The readings the writer took as it saw the wall clock step by ``step``, in the new clock's terms. One
    stamped nearer the old clock's time (``now - step``) than the new one's was stamped before the step
    and moves with it, as the rules' remembered times do: else a sensor's last report before a forward
    step would date it a day back (a false silence) and start a ``for`` timer a day early. Only a step
    shorter than the writer's sleep leaves a doubt, of half the step at most."""
    old_now = now - step
    return [
        msgspec.structs.replace(r, ts=r.ts + step) if abs(r.ts - old_now) < abs(r.ts - now) else r for r in readings
    ]


class Agent:
    def __init__(self, cfg: Config) -> None:
        from examwatch.rules.engine import build_engine

        self.cfg = with_host_device(cfg)
        self.host_device = next(d.name for d in self.cfg.devices if d.kind == "host")
        self.health = Health()
        self.intake = Intake(self.health)
        self.engine = build_engine(self.cfg.agent, self.cfg.devices, self.cfg.rules, self.cfg.schedule)
        self.calendar = Calendar(self.cfg.schedule)
        self.current: dict[tuple[str, str], Reading] = {}  # latest reading per (device, metric): the exporter's view
        self.active: dict[str, AlarmEvent] = {}  # alarms firing now, by id
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.writer_beat = time.monotonic()  # the watchdog's proof that the writer lives
        self.uplink: Any = None
        self.fallback: Any = None
        self.store: Store | None = None
        self._outbox = {"used_ratio": 0.0, "dropped": 0}
        self._flushed = 0.0  # when readings last went to the outbox (monotonic)
        self._held: list[Reading] = []  # evaluated, not yet stored (at most READINGS_HOLD seconds)
        self._held_since = 0.0  # monotonic, when the oldest of them arrived
        self._own_kept: tuple[tuple[float, ...], float] = ((), 0.0)  # self-reading values last stored, when
        self._to_flush = True  # stored readings may wait for the outbox (at start: maybe the last run's)
        self._clock_step = (0.0, 0.0)  # the latest wall-clock step: (seconds, monotonic when seen)
        self._tasks: list[asyncio.Task[None]] = []
        self._collectors_running: list[Any] = []
        # batches the disk refused, oldest first: (readings, alarm transitions, evidence)
        self._unstored: list[tuple[list[Reading], list[AlarmEvent], dict[str, list[Reading]]]] = []
        self.store_ok = True
        self.store_set_aside = False  # a corrupt database was set aside at start: ``store_corrupt`` says 1
        self._acks: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self.db_path = os.path.join(self.cfg.agent.state_dir, "agent.db")

    # --- views for the exporter and the readiness check ---

    def outbox_stats(self) -> dict[str, float]:
        return dict(self._outbox)

    def uplink_health(self) -> Any:
        return self.uplink.health() if self.uplink is not None else None

    def phase(self, now: float) -> str:
        return self.calendar.phase(now)

    def healthy(self) -> bool:
        """The writer ticks and every collector still runs (a dead MQTT loop reads no sensor at all)."""
        return (
            self.ready.is_set()
            and time.monotonic() - self.writer_beat < WRITER_STALE
            and not any(t.done() for t in self._tasks)
            and all(c.alive() for c in self._collectors_running)
        )

    # --- the writer thread ---

    def _writer(self) -> None:
        try:
            store, restored = self._open_store()
        except (sqlite3.Error, OSError) as err:  # not corruption (that is set aside): busy, unreadable, full
            log.error("store_open_failed", path=self.db_path, error=f"{type(err).__name__}: {err}")
            return
        state = self.engine.restore(restored) if restored else self.engine.initial_state()
        self.active = {e.id: e for e in restored}
        self.ready.set()
        next_self = 0.0
        last = (time.time(), time.monotonic())
        wait = 0.0
        while True:
            batch = self._take(wait)
            now, mono = time.time(), time.monotonic()
            self.writer_beat = mono
            self._apply_acks(store)
            step = (now - last[0]) - (mono - last[1])
            last = (now, mono)
            if abs(step) >= CLOCK_STEP:
                state = self.engine.rebase(state, step)
                batch = across_step(batch, step, now)
                self._clock_step = (step, mono)
                log.warning("clock_jump", seconds=round(step, 1), hint="校时/检查NTP")
                next_self = 0.0  # report it now
            own: list[Reading] = []
            if mono >= next_self:
                next_self = mono + SELF_METRICS_EVERY
                own = self._own_readings(store, now, mono)
            state, events = self.engine.evaluate(state, [*batch, *own] if own else batch, now)
            for r in (*batch, *own):
                self.current[(r.device, r.metric)] = r
            if own and self._own_changed(own, mono):
                batch += own
            if batch and not self._held:
                self._held_since = mono
            self._held += batch
            stopping = self.stop_event.is_set() and not self.intake.q
            # readings go to the county in batches (its broker and gateway thank us); with an alarm at once,
            # so the county sees the reading that caused it; and whatever is left when we stop
            unsent = self._to_flush or bool(self._held)
            flush = self.uplink is not None and (
                bool(events) or stopping or (unsent and mono - self._flushed >= self.cfg.uplink.batch_interval)
            )
            if events or flush or stopping or self._hold_over(mono):
                self._commit(store, self._held, events, mono, flush)
                self._held = []
            elif self._unstored:
                self._store_backlog(store, False)
            self._outbox = {"used_ratio": store.outbox_used_ratio, "dropped": store.outbox_dropped}
            if stopping:
                break
            wait = self._wait(state, now, mono, next_self)
        store.close()

    def _own_readings(self, store: Store, now: float, mono: float) -> list[Reading]:
        size, seen = self._clock_step
        jumped = abs(size) if mono - seen < CLOCK_STEP_HOLD else 0.0
        return [
            Reading(self.host_device, "outbox_used_ratio", store.outbox_used_ratio, now),
            Reading(self.host_device, "store_ok", 1.0 if self.store_ok else 0.0, now),
            Reading(self.host_device, "store_corrupt", 1.0 if self.store_set_aside else 0.0, now),
            Reading(self.host_device, "clock_jump_seconds", jumped, now),
        ]

    def _own_changed(self, own: list[Reading], mono: float) -> bool:
        """Whether the self-readings are worth storing and sending: the rules and the live view take them
        every ``SELF_METRICS_EVERY``, the county when one changed (the outbox's fill by a percent) or every
        ``SELF_METRICS_KEEP`` (an idle agent's uplink then sends next to nothing between its heartbeats)."""
        values = tuple(round(r.value, 2) for r in own)
        if values == self._own_kept[0] and mono - self._own_kept[1] < SELF_METRICS_KEEP:
            return False
        self._own_kept = (values, mono)
        return True

    def _open_store(self) -> tuple[Store, list[AlarmEvent]]:
        """Open the database; a corrupt one is set aside for a fresh one, and ``store_corrupt`` says so
        with the other self-readings (1 raises the alarm until the agent restarts on a sound database)."""
        opened = open_checked(
            self.db_path,
            retention_s=self.cfg.store.retention_hours * 3600,
            outbox_budget_bytes=int(self.cfg.uplink.outbox_budget_mb * 1024 * 1024),
        )
        if opened.set_aside:
            log.error("store_corrupt", problem=opened.problem, set_aside=str(opened.set_aside))
        self.store_set_aside = opened.set_aside is not None
        self.store = opened.store
        return opened.store, opened.open_alarms

    def _wait(self, state: Any, now: float, mono: float, next_self: float) -> float:
        """Seconds until the writer has something to do without readings. The rules' deadlines (a ``for``
        timer, a silent device, a phase change) hold to the moment; the writer's chores (its beat, the
        self-readings, storing held readings, an uplink batch, the disk's backlog, deleting acknowledged
        outbox rows) may wait ``CHORES_SLACK`` past theirs, so that readings, which wake it anyway, do them on
        the way: a 1 s poller's writer then wakes once a second, not again for each chore (a wake costs a Pi
        more than the chore)."""
        chores = [TICK, next_self - mono]
        if self._held:
            chores.append(self._held_since + READINGS_HOLD - mono)
        if self.uplink is not None and (self._to_flush or self._held):
            chores.append(self._flushed + self.cfg.uplink.batch_interval - mono)
        if self._unstored:
            chores.append(0.5)  # the disk's backlog is tried again
        return max(0.0, min(self.engine.next_due(state, now) - now, min(chores) + CHORES_SLACK))

    def _take(self, wait: float) -> list[Reading]:
        """What arrived, waiting up to ``wait`` seconds for something to."""
        self.intake.sleep(wait)  # forgets the rings before taking: a reading added after the take rings again
        q = self.intake.q
        batch = [q.popleft() for _ in range(min(len(q), BATCH_MAX))]
        if q:
            self.intake.wake()  # more is waiting
        return batch

    def _hold_over(self, mono: float) -> bool:
        """The held readings are due for their transaction: held long enough, or a batch's worth."""
        return bool(self._held) and (mono - self._held_since >= READINGS_HOLD or len(self._held) >= BATCH_MAX)

    def _commit(self, store: Store, batch: list[Reading], events: list[AlarmEvent], mono: float, flush: bool) -> None:
        evidence = {}
        if events:  # what the alarm's device last said, kept with the transition
            by_device: dict[str, list[Reading]] = defaultdict(list)
            for (device, _), r in self.current.items():
                by_device[base_device(device)].append(r)
            evidence = {e.id: by_device.get(base_device(e.device), []) for e in events}
        for e in events:  # the live view and the log at once, even when the disk refuses them
            if e.state == "cleared":
                self.active.pop(e.id, None)
            else:
                self.active[e.id] = e
            # nested: flat, the alarm's "level" would collide with the log line's own level
            log.info("alarm", alarm=msgspec.structs.asdict(e))
        self._unstored.append((batch, events, evidence))
        if flush:
            self._flushed = mono
        self._store_backlog(store, flush)

    def _store_backlog(self, store: Store, flush: bool) -> None:
        """Write what is not stored yet, oldest first. A failing disk (full, worn out) keeps the agent
        running: the batches wait in memory (readings bounded, alarms never dropped), ``store_ok`` goes to
        0 so the rules raise the alarm, and the next cycle tries again."""
        sent = False
        while self._unstored:
            batch, events, evidence = self._unstored[0]
            outbox = [("alarms", msgspec.json.encode(e)) for e in events] if self.uplink is not None else []
            last = len(self._unstored) == 1
            try:
                store.write(
                    batch,
                    events,
                    evidence=evidence,
                    outbox=outbox,
                    flush_readings=self.cfg.uplink.batch_max if flush and last and self.uplink else 0,
                )
            except sqlite3.Error as err:
                reason = "corrupt" if is_corruption(err) else "disk_full" if "full" in str(err) else "write_failed"
                self.health.drop("store", reason, error=str(err))
                self._set_store_ok(False)
                self._bound_backlog()
                break
            self._unstored.pop(0)
            self._set_store_ok(True)
            if flush and last:
                self._to_flush = False
            elif batch:
                self._to_flush = True
            sent = sent or bool(outbox) or (flush and last)
        if sent and self.uplink is not None:
            self.uplink.notify()

    def _set_store_ok(self, ok: bool) -> None:
        if ok != self.store_ok:
            self.store_ok = ok
            log.warning("store_recovered" if ok else "store_failing", backlog=len(self._unstored))
            self.intake.add(Reading(self.host_device, "store_ok", 1.0 if ok else 0.0, time.time()))

    def _bound_backlog(self) -> None:
        readings = sum(len(b) for b, _, _ in self._unstored)
        while readings > UNSTORED_MAX and any(b for b, _, _ in self._unstored):
            i = next(i for i, (b, _, _) in enumerate(self._unstored) if b)
            batch, events, evidence = self._unstored[i]
            self._unstored[i] = ([], events, evidence)  # readings go, the alarms stay
            readings -= len(batch)
            self.health.drop("store", "backlog_full")

    def _apply_acks(self, store: Store) -> None:
        while not self._acks.empty():
            seqs = self._acks.get()
            try:
                store.ack(seqs)
            except sqlite3.Error:  # a full disk refuses even deletes; they are re-sent and deduplicated later
                self.health.drop("store", "ack_failed")
                return

    def _acked(self, seqs: list[int]) -> None:
        # The writer deletes them (one thread writes SQLite) at its next wake, a chore like the others: the
        # uplink counts acked rows off itself, so nothing waits for the deletion.
        self._acks.put(list(seqs))

    # --- run ---

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.serve(stop)

    async def serve(self, stop: asyncio.Event) -> None:
        """Start everything, run until ``stop`` is set, then stop in order."""
        from examwatch.edge import exporter

        cfg = self.cfg
        files.private_dir(cfg.agent.state_dir)
        lock = statedir.StateLock(cfg.agent.state_dir)  # held until the process ends, however it ends
        if cfg.uplink.enabled:
            from examwatch.edge.uplink import Uplink

            self.uplink = Uplink(
                cfg.uplink,
                agent_id=cfg.agent_id,
                db_path=self.db_path,
                on_acked=self._acked,
                phase=lambda: self.calendar.phase(time.time()),
                kinds={d.name: d.kind for d in cfg.devices},
            )
            if cfg.fallback.enabled:
                from examwatch.edge.fallback import Fallback

                self.fallback = Fallback(cfg.fallback, cfg.agent, self.db_path, self.uplink.down_for)
                self.uplink.body_of = self.fallback.mark
        writer = threading.Thread(target=self._writer, name="writer", daemon=True)
        writer.start()
        while not self.ready.wait(0.05):
            if not writer.is_alive():
                raise RuntimeError("the store could not be opened; see the log")
            await asyncio.sleep(0)
        if self.uplink is not None:
            self.uplink.start()
        if self.fallback is not None:
            self.fallback.start()
        server, _ = exporter.serve(self, cfg.exporter.listen)
        collectors = self._collectors_running = self._collectors()
        tasks = self._tasks = [asyncio.create_task(c.run(stop), name=c.protocol) for c in collectors]
        watchdog = asyncio.create_task(self._watchdog(stop))
        log.info("agent_started", agent=cfg.agent_id, devices=len(cfg.devices), exporter=cfg.exporter.listen)
        await stop.wait()
        log.info("agent_stopping")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in collectors:
            await c.close()
        watchdog.cancel()
        if self.uplink is not None:
            self.uplink.stop()  # first: acks that arrive while it stops still reach the running writer
        if self.fallback is not None:
            await asyncio.to_thread(self.fallback.stop)
        self.stop_event.set()
        self.intake.wake()
        await asyncio.to_thread(writer.join, 10)
        exporter.stop(server)
        lock.release()
        log.info("agent_stopped")

    def _collectors(self) -> list[Any]:
        return bootstrap.build_all(self.cfg.devices, self.intake, self.health, bootstrap.context(self.cfg))

    async def _watchdog(self, stop: asyncio.Event) -> None:
        """systemd: READY once serving, WATCHDOG only while the writer is proven alive (never free-running)."""
        import sdnotify

        notifier = sdnotify.SystemdNotifier()
        notifier.notify("READY=1")
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        period = usec / 2e6 if usec else 5.0
        while not stop.is_set():
            if self.healthy():
                notifier.notify("WATCHDOG=1")
                notifier.notify(f"STATUS=devices={len(self.cfg.devices)} alarms={len(self.active)}")
            await asyncio.sleep(period)
