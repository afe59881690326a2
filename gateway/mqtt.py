"""The gateway's subscription to every site of the county: persistent session, acknowledged after storing.

paho acknowledges QoS 1 messages as soon as ``on_message`` returns unless told otherwise; a gateway that
crashed between that and its commit would lose them. So acknowledgement is manual: the ingest thread
acknowledges a batch only after its transaction committed. A message not acknowledged before a
disconnect is sent again by the broker after reconnect (the ledger drops the copy).

Replicas (``share_group``) share the rooms' readings and alarms through an MQTT v5 shared subscription
(``$share/<group>/examwatch/v1/+/+/readings`` and ``.../alarms``): the broker gives each message to one of
them. The statuses are not shared: only the leader subscribes to them (``follow_status``), and being
retained, every room's last word reaches a new leader at once. A replica stopped on purpose unsubscribes
first, so its session stops taking a share while it is down; one that was killed gets its share again
when it comes back under the same client_id (messages are never handed to another member meanwhile).

The link's state (connected or not, failed attempts) is exported, and every change of it is logged once:
a gateway that cannot reach its broker sees no room, and must say so rather than look quietly healthy.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from examwatch.gateway.config import Broker
from examwatch.gateway.ingest import Message
from examwatch.kernel.broker import apply_broker_settings
from examwatch.kernel.wire import TOPIC_ROOT

log = structlog.get_logger("examwatch.gateway.mqtt")

# MQTT v5 Maximum Packet Size we announce: the broker never sends us more (deploy/mosquitto sets the same
# max_packet_size for what it accepts from the rooms).
MAX_PACKET = 256 * 1024
STATUS = f"{TOPIC_ROOT}/+/+/status"
SETTLE = 30.0  # s after messages may last have waited in the broker before heartbeats judge the rooms' clocks


class Subscriber:
    def __init__(self, cfg: Broker, inbox: queue.Queue[tuple[int, int, Message]]) -> None:
        self.cfg = cfg
        self.inbox = inbox  # (connection number, mid, message)
        self.connection = 0  # bumped at every connect: mids are only valid on the connection they came on
        self.up_since: float | None = None
        self.subscribed = threading.Event()  # set once the broker confirmed our subscription
        self.connected = False  # connected and subscribed: we hear the rooms
        self.connect_failures = 0  # attempts that failed: unreachable, or refused by the broker
        self._state = ""  # the link's last logged state: connected, unreachable, refused <reason>, lost
        self._lock = threading.Lock()
        self._status = True  # whether we follow the statuses (a replica only while it leads)
        self.unacked = 0  # messages of this connection received and not yet acknowledged (stored)
        # Our time when messages may last have waited in the broker's queue: a connect to our kept session (its
        # backlog comes first), or a moment with ``receive_maximum`` of ours unacknowledged (we are behind).
        self.queued_at = 0.0
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=mqtt.MQTTv5)
        c.manual_ack_set(True)
        c.reconnect_delay_set(min_delay=1, max_delay=15)
        apply_broker_settings(c, cfg)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry
        props.ReceiveMaximum = self.cfg.receive_maximum
        props.MaximumPacketSize = MAX_PACKET
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()

    def topics(self) -> list[str]:
        """Our subscriptions besides the statuses'."""
        if not self.cfg.share_group:
            return [f"{TOPIC_ROOT}/+/+/+"]
        return [f"$share/{self.cfg.share_group}/{TOPIC_ROOT}/+/+/{kind}" for kind in ("readings", "alarms")]

    def follow_status(self, on: bool) -> None:
        """Subscribe to the rooms' statuses, or leave them to the leader (replicas only)."""
        self._status = on
        if self.connected:
            self._subscribe_status(self.client)

    def _subscribe_status(self, client: mqtt.Client) -> None:
        if self.cfg.share_group:
            if self._status:
                client.subscribe(STATUS, qos=1)
            else:
                client.unsubscribe(STATUS)

    def stop(self) -> None:
        if self.cfg.share_group and self.connected:  # out of the group: no share queued for us while we are down
            self.client.unsubscribe([*self.topics(), STATUS])
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def clocks_from(self) -> float:
        """From when a heartbeat tells its room's clock: one that waited in the broker makes the clock look behind
        by the wait (a backlog once raised every room's clock alarm), so not until SETTLE s after ``queued_at``."""
        return self.queued_at + SETTLE

    def alive(self) -> bool:
        """paho's network thread still runs (an exception in a callback ends it, and with it all intake)."""
        thread = self.client._thread  # paho exposes no public check
        return thread is not None and thread.is_alive()

    def ack(self, connection: int, mids: list[int]) -> None:
        """Acknowledge stored messages; those from an earlier connection will come again anyway."""
        with self._lock:
            if connection != self.connection:
                return
            self.unacked -= sum(1 for mid in mids if mid)
        for mid in mids:
            if mid:
                self.client.ack(mid, 1)

    def _changed(self, state: str, event: str, **details: Any) -> None:
        """Log the link's state once per change, not once per retry (a broker down for a day is one line)."""
        if state == self._state:
            return
        self._state = state
        (log.info if state == "connected" else log.warning)(event, host=self.cfg.host, port=self.cfg.port, **details)

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.connect_failures += 1
            self._changed(f"refused {rc}", "gateway_broker_refused", reason=str(rc))
            return
        with self._lock:
            self.connection += 1
            self.unacked = 0
            if flags.session_present:  # what the broker kept for us comes first
                self.queued_at = time.time()
        self._changed("connected", "gateway_broker_connected", session_present=flags.session_present)
        client.subscribe([(t, 1) for t in self.topics()])
        self._subscribe_status(client)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        if any(rc.is_failure for rc in codes):
            self._changed(
                "subscription refused",
                "gateway_broker_subscription_refused",
                reason=", ".join(map(str, codes)),
                hint="the broker's gateway role (site plan's dynamic-security.json) must allow examwatch/v1/# "
                "and $share/<share_group>/examwatch/v1/#, with share_group as in county/share-group",
            )
            return
        # Rooms are judged silent only a whole heartbeat_timeout after this: from when we can hear them.
        self.up_since = time.time()
        self.connected = True
        self.subscribed.set()

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        self.connect_failures += 1
        self._changed(
            "unreachable",
            "gateway_broker_unreachable",
            ever_connected=self.connection > 0,
            hint="no room can be heard and no room is judged silent until the broker is reached",
        )

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if self.connected:
            self._changed("lost", "gateway_broker_lost", reason=str(rc))
        self.connected = False
        self.up_since = None

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        now = time.time()
        if m.qos:
            with self._lock:
                self.unacked += 1
                if self.unacked >= self.cfg.receive_maximum:  # the broker holds the rest back: a queue builds
                    self.queued_at = now
        self.inbox.put(
            (self.connection, m.mid if m.qos else 0, Message(m.topic, bytes(m.payload), bool(m.retain), now))
        )
