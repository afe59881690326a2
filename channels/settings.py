"""One channel's settings (the gateway's ``[[channels]]``, the agent's ``[fallback.channel]``): where a message
goes and how, checked the same way wherever it is configured."""

from __future__ import annotations

from pathlib import Path

from examwatch.kernel.config import Strict

CHANNEL_TYPES = ("dingtalk", "wecom", "feishu", "email", "webhook", "alertmanager")
# Messages a minute the platform accepts from one robot (its documentation); 0: no documented limit.
RATE_LIMITS = {"dingtalk": 20, "wecom": 20, "feishu": 100, "email": 0, "webhook": 0, "alertmanager": 0}
MIN_GAPS = {"feishu": 0.2}  # s between two sends: Feishu also allows at most 5 a second


class Channel(Strict, kw_only=True):
    """One place messages go: a group robot, a mailbox list, a webhook or an Alertmanager."""

    name: str
    type: str
    url: str = ""  # robot webhook (with its access_token / key), webhook URL, or Alertmanager base URL
    secret: str = ""  # robot signing secret (DingTalk "SEC...", Feishu), webhook HMAC key; never logged
    secret_file: str = ""
    # e-mail (TLS only: "starttls" or "implicit")
    host: str = ""
    port: int = 0
    tls: str = "starttls"
    username: str = ""
    password: str = ""
    password_file: str = ""
    sender: str = ""
    to: list[str] = []
    ca_file: str = ""  # trust this CA (a county's own) for the mail server or the webhook
    # routing filters: empty means any
    levels: list[int] = []
    sites: list[str] = []
    classes: list[str] = []  # fault classes: network, power, recording, secrecy, noise, system
    room_kinds: list[str] = []  # e.g. exam, secrecy ([notify] room_kinds names them)
    phases: list[str] = []  # exam phases (before, during, ...)
    rate_per_minute: int = -1  # -1: the platform's documented limit
    repost_interval: float = 60.0  # alertmanager: re-post active alerts this often (below its resolve_timeout)
    timeout: float = 10.0

    def secret_value(self) -> str:
        return Path(self.secret_file).read_text(encoding="utf-8").strip() if self.secret_file else self.secret

    def password_value(self) -> str:
        return Path(self.password_file).read_text(encoding="utf-8").strip() if self.password_file else self.password

    def rate(self) -> int:
        return RATE_LIMITS.get(self.type, 0) if self.rate_per_minute < 0 else self.rate_per_minute

    def min_gap(self) -> float:
        return MIN_GAPS.get(self.type, 0.0) if self.rate_per_minute < 0 else 0.0


def channel_issues(c: Channel) -> list[tuple[tuple[str, ...], str]]:
    """Every problem with one channel's settings, as (key path below the channel, message)."""
    issues: list[tuple[tuple[str, ...], str]] = []
    if c.type not in CHANNEL_TYPES:
        issues.append((("type",), f"one of {', '.join(CHANNEL_TYPES)}"))
    elif c.type == "email":
        if c.tls not in ("starttls", "implicit"):
            issues.append((("tls",), 'e-mail is sent over TLS only: "starttls" or "implicit"'))
        if not c.host or not c.sender or not c.to:
            issues.append(((), "e-mail needs host, sender and to"))
    elif not c.url.startswith(("https://", "http://")):
        issues.append((("url",), "an http(s) URL"))
    if not 0 < c.timeout <= 120 or not 1 <= c.repost_interval <= 3600 or c.rate_per_minute > 10_000:
        issues.append(((), "timeout 0-120 s, repost_interval 1-3600 s, rate_per_minute up to 10000"))
    if any(lv not in (1, 2, 3) for lv in c.levels):
        issues.append((("levels",), "levels are 1, 2 or 3"))
    return issues


__all__ = ["CHANNEL_TYPES", "MIN_GAPS", "RATE_LIMITS", "Channel", "channel_issues"]
