"""The intake: what every collector hands its readings to, and the bell that wakes the agent's writer."""

from __future__ import annotations

import contextlib
import math
import queue
from collections import deque
from collections.abc import Iterable

from examwatch.collectors import Health
from examwatch.kernel.model import Reading

QUEUE_MAX = 20_000  # readings waiting for the writer; past it a collector's readings are dropped and counted


class Intake:
    """The accumulator every collector writes to: thread-safe, bounded, never blocks a collector.

    A poll's readings arrive in one ``add_all`` (one wake of the writer per poll, not one per reading);
    a deque, not a ``queue.Queue``: its appends are atomic and take no lock. The writer sleeps on a
    ``SimpleQueue`` rung at most once per sleep: a wake in C costs a third of a ``threading.Event``'s."""

    def __init__(self, health: Health) -> None:
        self.q: deque[Reading] = deque()
        self._bell: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._rung = False  # the bell holds a ring the writer has not taken
        self.health = health

    def add(self, reading: Reading) -> None:
        self.add_all((reading,))

    def add_all(self, readings: Iterable[Reading]) -> None:
        kept = []
        for r in readings:
            if math.isfinite(r.value):
                kept.append(r)
            else:  # the county refuses a message holding one: never let it out
                self.health.drop("intake", "not_finite", device=r.device, metric=r.metric)
        room = QUEUE_MAX - len(self.q)
        if len(kept) > room:
            for _ in range(len(kept) - max(room, 0)):
                self.health.drop("intake", "queue_full")
            kept = kept[: max(room, 0)]
        self.q.extend(kept)
        if kept:
            self.wake()  # after the extend: the writer forgets the ring before it takes

    def wake(self) -> None:
        """Wake the writer (readings, acks, the agent stopping). A ring that races the writer's ``sleep``
        at worst wakes it once more for nothing; none is lost."""
        if not self._rung:
            self._rung = True
            self._bell.put(None)

    def sleep(self, seconds: float) -> None:
        """The writer: wait up to ``seconds`` for a ring, then forget every ring (it takes what is queued)."""
        with contextlib.suppress(queue.Empty):
            self._bell.get(timeout=seconds) if seconds > 0 else self._bell.get_nowait()
        while not self._bell.empty():  # the rings of producers that saw the bell unrung at once
            self._bell.get_nowait()
        self._rung = False  # after emptying it: a ring from now on stays in the bell for the next sleep
