"""The agent's uplink: sends the outbox to the county broker and reports what the broker acknowledged.

Store-and-forward with nothing lost:
- the outbox (SQLite, written by the agent's single writer thread in the same transaction as the readings
  and alarm transitions it carries) is the only queue that survives a crash; this module only reads it;
- rows go out in ``seq`` order as signed envelopes (``edge.wire``), MQTT v5 QoS 1, persistent session
  (``clean_start=False`` + a session expiry), at most ``window`` of them unacknowledged at a time;
- a row is reported through ``on_acked`` only when the broker sent its PUBACK; the writer then deletes it;
- a publish made while the link is down stays queued inside paho and goes out after reconnect, so it is
  never published twice from here; after a restart every row still in the outbox is sent again (the
  gateway drops duplicates on (agent, seq));
- ``status`` is retained: ``online`` at connect and on every heartbeat, ``offline`` as last will; each
  carries its place (boot, connection, count; see ``wire.Status``), so the county orders them without
  trusting any clock. The will is set again before every connect, for that connection.

Threads: paho's network thread runs the callbacks; they only put events on a queue and wake the
uplink's own worker thread, which does all reading, publishing and bookkeeping. (Taking a lock inside
``on_publish`` would deadlock: paho holds its message lock while calling it and while we publish.)
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from examwatch.edge.config import UplinkSettings, apply_broker_settings
from examwatch.kernel import wire

log = structlog.get_logger("examwatch.uplink")

RETRY_AFTER = 10.0  # seconds before re-sending a row the broker refused (e.g. not authorized)
MAX_PACKET = 64 * 1024  # what the agent receives here is tiny (PUBACKs; nothing it subscribes to is big)
# Seconds paho's network thread waits in select when nothing comes (paho's own: 1): a publish or a packet
# wakes it at once, so the wait only bounds the keepalive check (keepalive >= 10 s).
NETWORK_WAIT = 5.0


class _Client(mqtt.Client):
    def _thread_main(self) -> None:  # paho's loop_start thread (paho 2.x), with NETWORK_WAIT
        try:
            self.loop_forever(timeout=NETWORK_WAIT, retry_first_connection=True)
        finally:
            self._thread = None


class OutboxRowLike(Protocol):
    seq: int
    kind: str
    created: float
    body: bytes


class OutboxReaderLike(Protocol):
    def pending(self, after_seq: int = 0, limit: int = 500) -> list[Any]: ...
    def unacknowledged(self, acked: Iterable[int]) -> tuple[int, set[int]]: ...
    def identity(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class UplinkHealth:
    connected: bool
    pending: int  # outbox rows not yet acknowledged (as of the last count, at most a second old)
    sent: int  # messages handed to the MQTT client since start
    acked: int  # rows acknowledged by the broker since start
    refused: int  # PUBACKs with a failure reason (e.g. not authorized)
    connects: int
    last_error: str
    last_ack: float | None  # unix time of the last acknowledgement


def _default_reader(path: str) -> OutboxReaderLike:
    from examwatch.edge.store import OutboxReader

    return OutboxReader(path)


class Uplink:
    def __init__(
        self,
        cfg: UplinkSettings,
        *,
        agent_id: str,
        db_path: str,
        on_acked: Callable[[list[int]], None],
        client_id: str = "",
        window: int = 200,
        phase: Callable[[], str | None] = lambda: None,
        kinds: dict[str, str] | None = None,
        reader_factory: Callable[[str], OutboxReaderLike] = _default_reader,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.agent = agent_id
        self.db_path = db_path
        self.on_acked = on_acked
        self.window = window
        self.phase = phase
        self.kinds = kinds
        self.clock = clock
        self._reader_factory = reader_factory
        self._key = wire.load_key(cfg.signing_key, cfg.signing_key_file)
        self._client_id = client_id or "examwatch-" + agent_id.replace("/", "-")
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._reader: OutboxReaderLike | None = None
        self._epoch = self._boot = 0  # the outbox database's, read at start
        self._conn = 0  # connections attempted since start (network thread; the will's)
        self._status_conn = self._status_n = 0  # the connection the worker announces on, and its statuses so far
        # worker-thread state
        self._connected = False
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._cursor = 0  # highest seq handed to paho
        self._retry: dict[int, float] = {}  # seq -> when to send it again (monotonic)
        self._last_heartbeat = -cfg.heartbeat  # monotonic
        self._last_count = -1.0
        self._notified = False  # new outbox rows since the worker last counted them
        # read by health() from other threads: plain ints/bools, replaced atomically
        self._pending = 0
        self._settling: set[int] = set()  # acknowledged rows the writer may not have deleted yet
        self._sent = self._acked = self._refused = self._connects = 0
        self._last_error = ""
        self._error_kind = ""
        self._last_ack: float | None = None
        self._down_since: float | None = time.monotonic()  # None while connected
        # the body to publish for a row (the fallback marks alarms it told the site about directly)
        self.body_of: Callable[[OutboxRowLike], bytes] = lambda row: row.body

    # --- public API --------------------------------------------------------------------------------

    def start(self) -> None:
        self._reader = self._reader_factory(self.db_path)
        self._epoch, self._boot = self._reader.identity()
        self._client = self._make_client()
        self._client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=max(10, int(self.cfg.heartbeat * 2)),
            clean_start=False,
            properties=self._connect_properties(),
        )
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """New outbox rows were committed: send them now (alarms must not wait)."""
        self._notified = True
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Say ``offline`` (retained), disconnect and stop. Unacknowledged rows stay in the outbox."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        client = self._client
        if client is None:
            return
        if client.is_connected():
            info = client.publish(
                wire.topic(self.agent, "status"),
                self._status("offline", reason="shutdown", n=wire.LAST),
                qos=1,
                retain=True,
            )
            # connection lost at the same moment: the last will says offline instead
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=min(timeout, 2.0))
            self._drain_events()  # PUBACKs that arrived meanwhile still delete their rows
        client.disconnect()
        client.loop_stop()

    def down_for(self) -> float:
        """Seconds since the link to the county broker was lost (or since start, never connected); 0 while up."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    def health(self) -> UplinkHealth:
        return UplinkHealth(
            connected=self._connected,
            pending=self._pending,
            sent=self._sent,
            acked=self._acked,
            refused=self._refused,
            connects=self._connects,
            last_error=self._last_error,
            last_ack=self._last_ack,
        )

    # --- paho side (network thread): only enqueue and wake ---------------------------------------------

    def _make_client(self) -> mqtt.Client:
        c = _Client(CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(self.window + 2)  # + status messages
        c.reconnect_delay_set(min_delay=1, max_delay=15)
        apply_broker_settings(c, self.cfg)
        c.on_pre_connect = lambda client, _u: self._will(client)
        c.on_connect = lambda _c, _u, flags, rc, _p: self._event("connect", (rc, flags.session_present))
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self._event("disconnect", rc)
        c.on_publish = lambda _c, _u, mid, rc, _p: self._event("puback", (mid, rc))
        return c

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry
        props.MaximumPacketSize = MAX_PACKET  # the broker drops anything bigger instead of sending it to us
        return props

    def _will(self, client: mqtt.Client) -> None:
        """Before each connect: the last will for this connection, outranking its heartbeats."""
        self._conn += 1
        will = self._status("offline", reason="lost", conn=self._conn, n=wire.LAST)
        client.will_set(wire.topic(self.agent, "status"), will, qos=1, retain=True)

    def _event(self, kind: str, data: Any) -> None:
        self._events.put((kind, data))
        self._wake.set()

    # --- worker thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            self._count(reader)
            while not self._stop.is_set():
                self._wake.wait(timeout=self._sleep(time.monotonic()))
                self._wake.clear()
                notified, self._notified = self._notified, False
                self._drain_events()
                now = time.monotonic()  # schedules only: a step of the wall clock must not stop heartbeats
                if self._connected:
                    self._send(reader, now)
                    if now - self._last_heartbeat >= self.cfg.heartbeat:
                        self._heartbeat(now)
                # counted after new rows and once a second while rows wait; acks count themselves off at once
                if notified or (self._pending and time.monotonic() - self._last_count >= 1.0):
                    self._count(reader)
        except Exception as err:  # the uplink must not die silently: the readiness check reads last_error
            self._last_error = f"uplink worker stopped: {type(err).__name__}: {err}"
            log.exception("uplink_worker_failed")
            raise
        finally:
            close = getattr(reader, "close", None)
            if close:
                close()

    def _count(self, reader: OutboxReaderLike) -> None:
        """``pending``: the outbox's rows but those acknowledged, which the writer deletes a moment later
        (counted as pending, they would keep the worker counting twice a second until it has)."""
        rows, self._settling = reader.unacknowledged(self._settling)
        self._pending = rows - len(self._settling)
        self._last_count = time.monotonic()

    def _sleep(self, now: float) -> float:
        """How long the worker may wait for a wake-up: 0.5 s while rows are pending, in flight or due again
        (acks, retries, the backlog count); otherwise nothing changes without a notify or a connection
        event, which wake it, so until the next heartbeat: an idle agent's uplink costs next to no CPU."""
        if self._pending or self._inflight or self._retry:
            return 0.5
        return max(0.5, self._last_heartbeat + self.cfg.heartbeat - now)

    def _drain_events(self) -> None:
        acked: list[int] = []
        while True:
            try:
                kind, data = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "puback":
                mid, rc = data
                seq = self._inflight.pop(mid, None)
                if seq is None:
                    continue  # a status message
                if rc.is_failure:
                    self._set_error(f"broker refused seq {seq}: {rc}", kind=f"refused: {rc}")
                    self._retry[seq] = time.monotonic() + RETRY_AFTER
                    self._refused += 1
                else:
                    acked.append(seq)
            elif kind == "connect":
                rc, session_present = data
                if rc.is_failure:
                    self._set_error(f"connect refused: {rc}", kind=f"connect: {rc}")
                    continue
                self._connected = True
                self._down_since = None
                self._connects += 1
                self._status_conn, self._status_n = self._conn, 0
                if self._error_kind.startswith("connect"):  # that error is over
                    self._last_error = self._error_kind = ""
                self._last_heartbeat = -self.cfg.heartbeat  # announce online at once
                log.info("uplink_connected", host=self.cfg.host, port=self.cfg.port, session_present=session_present)
            elif kind == "disconnect":
                if self._connected:
                    log.warning("uplink_lost", reason=str(data), inflight=len(self._inflight))
                    self._down_since = time.monotonic()
                self._connected = False
        if acked:
            self._acked += len(acked)
            self._settling.update(acked)
            self._pending = max(0, self._pending - len(acked))
            self._last_ack = self.clock()
            self.on_acked(acked)

    def _send(self, reader: OutboxReaderLike, now: float) -> None:
        assert self._client is not None
        due = sorted(s for s, t in self._retry.items() if t <= now)
        for seq in due:
            if len(self._inflight) >= self.window:
                return
            rows = reader.pending(after_seq=seq - 1, limit=1)
            del self._retry[seq]
            if rows and rows[0].seq == seq:
                self._publish(rows[0])
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        for row in reader.pending(after_seq=self._cursor, limit=room):
            if not self._publish(row):
                return
            self._cursor = row.seq

    def _publish(self, row: OutboxRowLike) -> bool:
        assert self._client is not None
        payload = wire.encode(
            self._key, self.agent, row.seq, self.clock(), row.kind, self.body_of(row), epoch=self._epoch
        )
        info = self._client.publish(wire.topic(self.agent, row.kind), payload, qos=1)
        # NO_CONN: paho queued it and sends it after reconnect; publishing it again would duplicate it.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._set_error(f"publish failed: {mqtt.error_string(info.rc)}", kind=f"publish: {info.rc}")
            return False
        self._inflight[info.mid] = row.seq
        self._sent += 1
        return True

    def _heartbeat(self, now: float) -> None:
        assert self._client is not None
        self._status_n += 1
        status = self._status("online", conn=self._status_conn, n=self._status_n)
        self._client.publish(wire.topic(self.agent, "status"), status, qos=1, retain=True)
        self._last_heartbeat = now

    def _status(
        self, state: Literal["online", "offline"], *, n: int, reason: str = "", conn: int | None = None
    ) -> bytes:
        pending = self._pending if state == "online" else None
        body = msgspec.json.encode(
            wire.Status(
                state=state,
                reason=reason,
                pending=pending,
                phase=self.phase(),
                kinds=self.kinds,
                boot=self._boot,
                conn=self._conn if conn is None else conn,
                n=n,
            )
        )
        return wire.encode(self._key, self.agent, 0, self.clock(), "status", body, epoch=self._epoch)

    def _set_error(self, message: str, kind: str) -> None:
        """Keep the latest error for health(); log it when its kind changes, not for every message."""
        if kind != self._error_kind:
            log.warning("uplink_error", error=message)
            self._error_kind = kind
        self._last_error = message


__all__ = ["Uplink", "UplinkHealth"]
