"""WeCom group robot (企业微信群机器人): markdown message to …/cgi-bin/webhook/send?key=<key>.

Contract (WeCom 群机器人配置说明): the key in the URL is the credential (no signature); markdown content at
most 4096 bytes, UTF-8; at most 20 messages a minute per robot (errcode 45009 when exceeded); the answer is
``{"errcode": 0, "errmsg": "ok"}``, any other errcode a failure (93000: invalid webhook key).
"""

from __future__ import annotations

from typing import Any

from examwatch.channels.base import coded_answer, post_json
from examwatch.channels.message import Message, markdown
from examwatch.channels.settings import Channel

MAX_CONTENT = 4096
RATE_CODES = {45009}
SIGN_CODES = {93000}


def clip(text: str, limit: int) -> str:
    """The text cut to ``limit`` UTF-8 bytes on a character boundary, marked when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    mark = "\n…（内容过长，已截断）"
    return data[: limit - len(mark.encode())].decode(errors="ignore") + mark


def payload(m: Message) -> dict[str, Any]:
    return {"msgtype": "markdown", "markdown": {"content": clip(markdown(m), MAX_CONTENT)}}


def send(ch: Channel, m: Message, http: Any, now: float) -> None:
    coded_answer(post_json(http, ch.url, payload(m)), "errcode", RATE_CODES, SIGN_CODES)
