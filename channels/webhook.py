"""A generic JSON webhook, signed: for a county's own system.

Headers: ``X-Examwatch-Timestamp`` (Unix seconds), ``X-Examwatch-Signature: sha256=<hex HMAC-SHA256(key=secret,
msg="<timestamp>.<body>")>``, ``Idempotency-Key`` (the message's key, percent-encoded; the same for every retry).
Any 2xx answer confirms; the receiver should drop a repeated Idempotency-Key and a timestamp older than five minutes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote

import msgspec

from examwatch.channels.base import post_json
from examwatch.channels.message import Message, markdown
from examwatch.channels.settings import Channel


def body(m: Message) -> bytes:
    doc = {
        "key": m.key,
        "thread": m.thread,
        "kind": m.kind,
        "level": m.level,
        "title": m.title,
        "text": markdown(m),
        "items": msgspec.to_builtins(m.items),
    }
    return json.dumps(doc, ensure_ascii=False, sort_keys=True).encode()


def signature(secret: str, timestamp: int, data: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + data, hashlib.sha256).hexdigest()


def headers(m: Message, secret: str, timestamp: int, data: bytes) -> dict[str, str]:
    # Header values are ASCII; a county's name in a key is not.
    out = {"Idempotency-Key": quote(m.key, safe="/:"), "X-Examwatch-Timestamp": str(timestamp)}
    if secret:
        out["X-Examwatch-Signature"] = signature(secret, timestamp, data)
    return out


def send(ch: Channel, m: Message, http: Any, now: float) -> None:
    data = body(m)
    post_json(http, ch.url, None, headers(m, ch.secret_value(), int(now), data), content=data)
