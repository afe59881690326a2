"""Where an MQTT broker is and how we log in, for every paho client: the sensors', the uplink's, the gateway's."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from examwatch.kernel.config import Port, Strict


class BrokerSettings(Strict, kw_only=True):
    """Where an MQTT broker is and how we log in: the sensors' broker, the uplink's, the gateway's."""

    host: str = "127.0.0.1"
    port: Port = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # empty: the system's CA certificates
    cert_file: str = ""  # client certificate, for brokers that authenticate clients by certificate
    key_file: str = ""


def apply_broker_settings(client: Any, settings: BrokerSettings) -> None:
    """Set up a paho client for ``settings``: login, TLS, and TCP_NODELAY (paho never sets it; without
    it the first messages after connect, a door event or an alarm, can wait ~30 ms in Nagle's buffer)."""
    if settings.username:
        client.username_pw_set(settings.username, settings.password or None)
    if settings.tls:
        client.tls_set(
            ca_certs=settings.ca_file or None, certfile=settings.cert_file or None, keyfile=settings.key_file or None
        )
    client.on_socket_open = _nodelay


def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):  # TLS-wrapped or non-TCP socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


__all__ = ["BrokerSettings", "apply_broker_settings"]
