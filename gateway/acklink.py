"""The signed acknowledgement link in a message: opens a small Chinese form (name, note) that acknowledges.

The link is ``<ack_url>/api/v1/ack/link?kind=alarm&id=<id>&exp=<unix s>&sig=<HMAC-SHA256(key, kind\\nid\\nexp)>``:
whoever holds the message may acknowledge that one alarm or incident until ``exp`` (the raise plus
``[notify] ack_link_hours``), nothing else. The form posts the same four fields back, so a forged request
from another site needs the signature (CSRF-safe without a session). The key is the gateway's own, in
``<state_dir>/ack-link.key`` (created on first start, owner-only). Pure apart from ``load_key``.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

KINDS = ("alarm", "incident")
SIG_CHARS = 32  # hex characters of the signature kept in the link (128 bits)


class LinkError(ValueError):
    """The link's signature is wrong or it has expired."""


def load_key(state_dir: str | Path) -> bytes:
    """The gateway's link key, made on first use (owner-only file)."""
    path = Path(state_dir) / "ack-link.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


def sign(key: bytes, kind: str, item_id: str, exp: int) -> str:
    return hmac.new(key, f"{kind}\n{item_id}\n{exp}".encode(), hashlib.sha256).hexdigest()[:SIG_CHARS]


def link(base_url: str, key: bytes, kind: str, item_id: str, exp: int) -> str:
    query = urlencode({"kind": kind, "id": item_id, "exp": exp, "sig": sign(key, kind, item_id, exp)})
    return f"{base_url.rstrip('/')}/api/v1/ack/link?{query}"


def check(key: bytes, kind: str, item_id: str, exp: int, sig: str, now: float) -> None:
    """Raise LinkError unless the link was signed with ``key`` and has not expired."""
    if not key or not hmac.compare_digest(sig, sign(key, kind, item_id, exp)):
        raise LinkError("链接无效（签名不符）")
    if now > exp:
        raise LinkError("链接已过期，请用 examwatch ack 命令或值班台确认")


_PAGE = """<!doctype html><html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 1em auto; padding: 0 1em">{body}</body></html>"""


def page(title: str, text: str) -> bytes:
    return _PAGE.format(
        title=html.escape(title), body=f"<h3>{html.escape(title)}</h3><p>{html.escape(text)}</p>"
    ).encode()


def form(signed: dict[str, Any]) -> bytes:
    """The confirmation form of a checked link (``kind``, ``id``, ``exp``, ``sig``), posting them back."""
    kind, item_id = str(signed["kind"]), str(signed["id"])
    what = "告警" if kind == "alarm" else "事件"
    hidden = "".join(
        f'<input type="hidden" name="{k}" value="{html.escape(str(signed[k]))}">' for k in ("kind", "id", "exp", "sig")
    )
    body = (
        f"<h3>确认{what}</h3><p>编号：{html.escape(item_id)}</p>"
        f'<form method="post" action="/api/v1/ack/link">{hidden}'
        '<p><label>确认人姓名<br><input name="who" required maxlength="64"></label></p>'
        '<p><label>处理情况<br><textarea name="note" rows="3" maxlength="1000"></textarea></label></p>'
        '<p><button type="submit">确认</button></p></form>'
    )
    return _PAGE.format(title=f"确认{what}", body=body).encode()


__all__ = ["KINDS", "LinkError", "check", "form", "link", "load_key", "page", "sign"]
