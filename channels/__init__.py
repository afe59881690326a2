"""The incident channels, usable by the gateway's notifier and by a room agent that cannot reach the county:
one module per channel type with its ``payload`` (pure, exact) and ``send`` (httpx or smtplib, raises
``SendError``); ``settings.Channel`` is one channel's configuration, ``message.Message`` what is sent.

A bot that answers HTTP 200 with an error code in its body has NOT delivered: every bot module checks the
body itself (apprise does not: it reports success on any 200, so it is not used).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from examwatch.channels import alertmanager, dingtalk, email, feishu, webhook, wecom
from examwatch.channels.base import SendError, client
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


__all__ = ["SENDERS", "Channel", "Message", "SendError", "client", "send_once"]
