"""What every channel module shares: the HTTP client, a bounded JSON POST, the bots' error codes.

A bot that answers HTTP 200 with an error code in its body has NOT delivered: every bot module checks the
body itself (apprise does not: it reports success on any 200, so it is not used).
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import httpx

from examwatch.channels.settings import Channel

MAX_ANSWER = 64 * 1024  # a bot's answer is a small JSON object; anything bigger is not one


class SendError(Exception):
    """The channel did not confirm; ``reason`` is a bounded label for the metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def client(ch: Channel) -> httpx.Client:
    verify: Any = ssl.create_default_context(cafile=ch.ca_file) if ch.ca_file else True
    return httpx.Client(timeout=ch.timeout, verify=verify, follow_redirects=False, trust_env=False)


def post_json(
    http: httpx.Client, url: str, body: Any, headers: dict[str, str] | None = None, content: bytes | None = None
) -> Any:
    """POST and return the decoded JSON answer; transport errors and non-2xx answers raise SendError."""
    data = content if content is not None else json.dumps(body, ensure_ascii=False).encode()
    try:
        with http.stream(
            "POST", url, content=data, headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        ) as r:
            answer = b""
            for chunk in r.iter_bytes():  # read at most MAX_ANSWER: the far end is not trusted
                answer += chunk
                if len(answer) > MAX_ANSWER:
                    raise SendError("bad_answer", "answer too large")
    except httpx.TimeoutException as err:
        raise SendError("timeout", type(err).__name__) from None
    except httpx.HTTPError as err:  # the URL carries the robot's token: name the error, not the URL
        raise SendError("connect", type(err).__name__) from None
    if r.status_code == 429:
        raise SendError("rate_limited", "HTTP 429")
    if not 200 <= r.status_code < 300:
        raise SendError("http_status", f"HTTP {r.status_code}")
    if not answer:
        return None
    try:
        return json.loads(answer)
    except (ValueError, RecursionError):  # not JSON, or 64 KiB of brackets
        return None


def coded_answer(answer: Any, field: str, rate_codes: set[int], sign_codes: set[int]) -> None:
    """Raise unless the bot's JSON answer carries ``field`` == 0."""
    if not isinstance(answer, dict) or not isinstance(answer.get(field), int):
        raise SendError("bad_answer", f"no {field} in the answer")
    code = answer[field]
    if code == 0:
        return
    text = str(answer.get("errmsg") or answer.get("msg") or "")[:120]
    if code in rate_codes:
        raise SendError("rate_limited", f"{field} {code} {text}")
    if code in sign_codes:
        raise SendError("signature", f"{field} {code} {text}")
    raise SendError("errcode", f"{field} {code} {text}")
