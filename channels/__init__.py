"""The incident channels, usable by the gateway's notifier and by a room agent that cannot reach the county:
one module per channel type with its ``payload`` (pure, exact) and ``send`` (httpx or smtplib, raises
``base.SendError``); ``settings.Channel`` is one channel's configuration, ``message.Message`` what is sent,
``send.send_once`` sends one. This package file imports nothing: a config check or an agent without
``[fallback]`` must not load httpx.

A bot that answers HTTP 200 with an error code in its body has NOT delivered: every bot module checks the
body itself (apprise does not: it reports success on any 200, so it is not used).
"""
