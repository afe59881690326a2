"""Polling on threads, for protocols whose I/O is a blocking call on a kept connection (upsd's TCP).

A ``BlockingPollingCollector`` polls each device on a thread of its own that sleeps between polls, so the
event loop never wakes for it. On a Pi's core the loop's round trips cost a poll more than the poll itself
(a NUT ``LIST VAR``: 0.8 ms of CPU through asyncio, 0.5 ms on a thread: issue 13). Readings, health and the
device_online accounting are the ``PollingCollector``'s; the thread only replaces the loop's scheduling.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from examwatch.collectors.base import DeviceError, PollingCollector
from examwatch.kernel.model import Reading

T = TypeVar("T")


def retry_blocking(attempt: Callable[[], T], tries: int, final: Collection[str] = ()) -> T:
    """``base.retry`` for a blocking ``attempt``: again at once while it raises ``DeviceError``, not after a
    reason in ``final``; the last error is raised."""
    for left in range(max(1, tries) - 1, -1, -1):
        try:
            return attempt()
        except DeviceError as err:
            if not left or err.reason in final:
                raise
    raise AssertionError("unreachable")


class BlockingPollingCollector(PollingCollector):
    """Subclasses implement ``poll_blocking(device) -> list[Reading]``: blocking I/O bounded by the device's
    timeout and retries, ``DeviceError`` on failure. It runs on the device's thread while the agent runs, and
    on a worker thread for a single ``poll_once`` (the readiness check)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def poll_blocking(self, device: Any) -> list[Reading]:
        raise NotImplementedError

    async def poll(self, device: Any) -> list[Reading]:
        return await asyncio.to_thread(self.poll_blocking, device)

    async def run(self, stop: asyncio.Event) -> None:
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._loop_blocking, args=(d,), name=f"{self.protocol}:{d.name}", daemon=True)
            for d in self.devices
        ]
        for t in self._threads:
            t.start()
        try:
            await stop.wait()
        finally:
            self._stopping.set()  # a thread ends after its poll: within the device's timeout and retries
            longest = max((d.timeout * (d.retries + 1) + 1 for d in self.devices), default=0.0)
            await asyncio.to_thread(self._join, time.monotonic() + longest)

    def alive(self) -> bool:
        return self._stopping.is_set() or all(t.is_alive() for t in self._threads)

    def _join(self, deadline: float) -> None:
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _loop_blocking(self, device: Any) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                readings = self.poll_blocking(device)
            except DeviceError as err:
                self._failed(device, err, started)
            except Exception as err:  # a bug or an unexpected library error: a state, not a dead thread
                self._failed(device, DeviceError("error", f"{type(err).__name__}: {err}"), started)
            else:
                self._succeeded(device, readings, started)
            self._stopping.wait(max(0.0, self.watch_interval(device) - (time.monotonic() - started)))


__all__ = ["BlockingPollingCollector", "retry_blocking"]
