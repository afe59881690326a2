"""Feishu / Lark custom bot (自定义机器人): an interactive card with a markdown element, signed in the body.

Contract (飞书 自定义机器人使用指南): body fields ``timestamp`` (seconds, as a string, within an hour of the
server's clock) and ``sign`` = base64(HmacSHA256(key="<timestamp>\\n<secret>", msg="")); the answer is
``{"code": 0, "msg": "success"}``; code 19021 is a signature mismatch, 11232 the rate limit (100 a minute,
5 a second per bot); request body at most 20 KB.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from examwatch.channels.base import SendError, coded_answer, post_json
from examwatch.channels.message import Message
from examwatch.channels.settings import Channel
from examwatch.channels.wecom import clip

RATE_CODES = {11232}
SIGN_CODES = {19021}
TEMPLATES = {1: "orange", 2: "red", 3: "red"}


def sign(secret: str, timestamp: int) -> str:
    return base64.b64encode(hmac.new(f"{timestamp}\n{secret}".encode(), b"", hashlib.sha256).digest()).decode()


def payload(m: Message, secret: str = "", timestamp: int = 0) -> dict[str, Any]:
    resolved = m.kind in ("acked",) or (m.items and not any(i.firing for i in m.items))
    body: dict[str, Any] = {}
    if secret:
        body = {"timestamp": str(timestamp), "sign": sign(secret, timestamp)}
    body |= {
        "msg_type": "interactive",
        "card": {
            "header": {
                "title": {"tag": "plain_text", "content": m.title},
                "template": "green" if resolved else TEMPLATES.get(m.level, "red"),
            },
            "elements": [{"tag": "markdown", "content": clip("\n".join(m.lines), 16 * 1024)}],
        },
    }
    return body


def send(ch: Channel, m: Message, http: Any, now: float) -> None:
    answer = post_json(http, ch.url, payload(m, ch.secret_value(), int(now)))
    if isinstance(answer, dict) and "code" not in answer and "StatusCode" in answer:  # the older answer form
        answer = {"code": answer["StatusCode"], "msg": answer.get("StatusMessage", "")}
    if answer is None:
        raise SendError("bad_answer", "empty answer")
    coded_answer(answer, "code", RATE_CODES, SIGN_CODES)
