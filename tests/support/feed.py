"""Many rooms at once without a process each: one MQTT client publishing every room's signed messages as
its agent would (QoS 1, outbox sequence from 1, retained statuses), for the replica and scale tests."""

from __future__ import annotations

import threading
import time

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from examwatch.kernel import wire
from examwatch.kernel.model import Reading
from tests.support import alarm
from tests.support.gateway import key_hex

EPOCH = 11
READINGS = 3  # per message


class Feed:
    """``rooms`` streaming one readings message each per ``period`` seconds; ``fault`` raises an alarm."""

    def __init__(self, port: int, rooms: list[str], period: float = 1.0) -> None:
        self.rooms, self.period = rooms, period
        self.keys = {r: bytes.fromhex(key_hex(r)) for r in rooms}
        self.seq = dict.fromkeys(rooms, 0)
        self.readings = 0  # published
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="feed", protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def _publish(self, room: str, kind: str, body: bytes, retain: bool = False) -> None:
        with self._lock:
            seq = 0
            if kind != "status":
                self.seq[room] += 1
                seq = self.seq[room]
            payload = wire.encode(self.keys[room], room, seq, time.time(), kind, body, epoch=EPOCH)
        self.client.publish(wire.topic(room, kind), payload, qos=1, retain=retain)

    def online(self) -> None:
        for room in self.rooms:
            body = msgspec.json.encode(wire.Status(state="online", boot=1, conn=1, n=1))
            self._publish(room, "status", body, retain=True)

    def fault(self, room: str, rule: str, state: str = "raised") -> None:
        now = time.time()
        self._publish(room, "alarms", msgspec.json.encode(alarm(room, state, now, now, rule=rule, device="dev1")))

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            for room in self.rooms:
                now = time.time()
                body = msgspec.json.encode(
                    [Reading("dev1", "ups_charge_percent", float(i), now + i * 0.001) for i in range(READINGS)]
                )
                self._publish(room, "readings", body)
                self.readings += READINGS
            self._stop.wait(max(0.0, self.period - (time.monotonic() - start)))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        self.client.loop_stop()
        self.client.disconnect()

    def published(self) -> int:
        """Messages the broker has not acknowledged yet count too: wait for them first (``drain``)."""
        return sum(self.seq.values())

    def drain(self, timeout: float = 30.0) -> None:
        """Until the broker has acknowledged every message (QoS 1)."""
        deadline = time.monotonic() + timeout
        while self.client._out_messages and time.monotonic() < deadline:  # paho exposes no public count
            time.sleep(0.05)
