"""Sending one message on one channel now: the registry of senders and ``send_once``. Imported only by what
sends (the gateway's notifier, the agent's fallback when it is enabled): the platform modules bring httpx."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from examwatch.channels import alertmanager, dingtalk, email, feishu, webhook, wecom
from examwatch.channels.base import client
from examwatch.channels.message import Message
from examwatch.channels.settings import Channel

SENDERS: dict[str, Callable[[Channel, Message, Any, float], None]] = {
    "dingtalk": dingtalk.send,
    "wecom": wecom.send,
    "feishu": feishu.send,
    "email": email.send,
    "webhook": webhook.send,
    "alertmanager": alertmanager.send,
}


def send_once(ch: Channel, m: Message, now: float) -> None:
    """Send ``m`` on ``ch`` now with a client of its own; raises SendError unless the channel confirmed."""
    http = client(ch) if ch.type != "email" else None
    try:
        SENDERS[ch.type](ch, m, http, now)
    finally:
        if http is not None:
            http.close()


__all__ = ["SENDERS", "send_once"]
