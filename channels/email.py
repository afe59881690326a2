"""E-mail over TLS only: implicit TLS (SMTPS, port 465) or STARTTLS (587); a server without STARTTLS is
refused, never used in plain text (incident information is confidential). The certificate is verified
(``ca_file`` for a county's own CA)."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from hashlib import sha256
from typing import Any

from examwatch.channels.base import SendError
from examwatch.channels.message import Message, plain
from examwatch.channels.settings import Channel


def build(ch: Channel, m: Message, now: float) -> EmailMessage:
    e = EmailMessage()
    e["Subject"] = m.title
    e["From"] = ch.sender
    e["To"] = ", ".join(ch.to)
    e["Date"] = formatdate(now, localtime=False)
    # The same message always has the same Message-ID: a mail client shows a resent one once.
    e["Message-ID"] = make_msgid(idstring=sha256(m.key.encode()).hexdigest()[:24], domain="examwatch")
    e["X-Examwatch-Thread"] = m.thread
    e.set_content(plain(m))
    return e


def _context(ch: Channel) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ch.ca_file or None)


def send(ch: Channel, m: Message, http: Any, now: float) -> None:
    mail = build(ch, m, now)
    port = ch.port or (465 if ch.tls == "implicit" else 587)
    try:
        if ch.tls == "implicit":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(ch.host, port, timeout=ch.timeout, context=_context(ch))
        else:
            smtp = smtplib.SMTP(ch.host, port, timeout=ch.timeout)
        with smtp:
            if ch.tls != "implicit":
                smtp.ehlo()
                if not smtp.has_extn("starttls"):
                    raise SendError("tls", "the mail server offers no STARTTLS; plain SMTP is refused")
                smtp.starttls(context=_context(ch))
                smtp.ehlo()
            if ch.username:
                smtp.login(ch.username, ch.password_value())
            refused = smtp.send_message(mail)
            if refused:
                raise SendError("refused", f"{len(refused)} recipients refused")
    except SendError:
        raise
    except ssl.SSLError as err:
        raise SendError("tls", type(err).__name__) from None
    except smtplib.SMTPAuthenticationError:
        raise SendError("auth", "login refused") from None
    except (smtplib.SMTPException, OSError) as err:
        raise SendError("connect", type(err).__name__) from None
