"""DingTalk custom robot (自定义机器人): markdown message, signed URL (加签).

Contract (DingTalk open platform, 自定义机器人): POST the webhook URL (…/robot/send?access_token=…) with
``&timestamp=<ms>&sign=<urlencoded base64(HmacSHA256(key=secret, msg="<timestamp>\\n<secret>"))>``; the answer
is ``{"errcode": 0, "errmsg": "ok"}``, anything else is a failure (310000: signature or keyword/IP refused;
130101: more than 20 messages a minute, the robot is then throttled for 10 minutes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any
from urllib.parse import quote_plus

from examwatch.channels.base import coded_answer, post_json
from examwatch.channels.message import Message, markdown
from examwatch.channels.settings import Channel

RATE_CODES = {130101}
SIGN_CODES = {310000}


def sign(secret: str, timestamp_ms: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def signed_url(url: str, secret: str, timestamp_ms: int) -> str:
    if not secret:
        return url
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}timestamp={timestamp_ms}&sign={quote_plus(sign(secret, timestamp_ms))}"


def payload(m: Message) -> dict[str, Any]:
    return {"msgtype": "markdown", "markdown": {"title": m.title, "text": markdown(m)}}


def send(ch: Channel, m: Message, http: Any, now: float) -> None:
    answer = post_json(http, signed_url(ch.url, ch.secret_value(), int(now * 1000)), payload(m))
    coded_answer(answer, "errcode", RATE_CODES, SIGN_CODES)
