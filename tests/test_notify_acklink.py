"""The signed acknowledgement link in a message: a small Chinese form that acknowledges one alarm, only with
a valid, unexpired signature (issue 9, item 4: "the link in the message")."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from examwatch.gateway import acklink
from examwatch.gateway.notify.messages import Links
from tests.notify_support import Bot, publish_alarm, publisher, raised, wait_subscribed, webhook_channels
from tests.support import until
from tests.support.gateway import GatewayProc, start

KEY = bytes(range(32))


def test_a_link_holds_for_its_own_alarm_until_it_expires() -> None:
    url = acklink.link("https://gw.example.cn:8080/", KEY, "alarm", "s1/101/door/1", 2_000_000_000)
    assert url.startswith(
        "https://gw.example.cn:8080/api/v1/ack/link?kind=alarm&id=s1%2F101%2Fdoor%2F1&exp=2000000000&sig="
    )
    sig = parse_qs(urlsplit(url).query)["sig"][0]
    acklink.check(KEY, "alarm", "s1/101/door/1", 2_000_000_000, sig, now=1_999_999_999)
    for kind, item, exp, key, now in (
        ("alarm", "s1/102/door/1", 2_000_000_000, KEY, 0),  # another alarm
        ("incident", "s1/101/door/1", 2_000_000_000, KEY, 0),  # another kind
        ("alarm", "s1/101/door/1", 2_000_000_001, KEY, 0),  # a longer life
        ("alarm", "s1/101/door/1", 2_000_000_000, b"other", 0),  # another gateway
        ("alarm", "s1/101/door/1", 2_000_000_000, KEY, 2_000_000_001),
    ):  # expired
        with pytest.raises(acklink.LinkError):
            acklink.check(key, kind, item, exp, sig, now)
    with pytest.raises(acklink.LinkError):
        acklink.check(b"", "alarm", "s1/101/door/1", 2_000_000_000, sig, 0)  # no key: no link is valid


def test_messages_carry_the_link_only_with_a_key_and_an_address() -> None:
    assert not any("点此确认" in line for line in Links("https://gw").ack_lines("alarm", "a", 100.0))
    assert not any("点此确认" in line for line in Links("", ack_key=KEY).ack_lines("alarm", "a", 100.0))
    [line] = [
        x for x in Links("https://gw", ack_key=KEY, ack_ttl=3600).ack_lines("alarm", "a", 100.0) if "点此确认" in x
    ]
    assert line == f"[点此确认]({acklink.link('https://gw', KEY, 'alarm', 'a', 3700)})"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _post_form(url: str, fields: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(
        url,
        data=urlencode(fields).encode(),
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.integration
def test_the_link_in_a_message_opens_a_form_that_acknowledges(mosquitto, tmp_path, procs) -> None:
    bot = Bot("webhook", secret="s")
    gw = GatewayProc(
        tmp_path, mosquitto.port, ["s1/101"], extra=webhook_channels(("tech", bot), notify='ack_url = "ACK"')
    )
    gw.config.write_text(gw.config.read_text().replace('"ACK"', f'"http://127.0.0.1:{gw.api_port}"'))
    start(procs, gw)
    client = publisher(mosquitto.port)
    try:
        wait_subscribed(gw, client, "s1/101")
        ev = raised("101")
        publish_alarm(client, ev, seq=1)
        until(bot.bodies, 30, "the raise")
        link = re.search(r"\[点此确认\]\((http://[^)]+)\)", bot.bodies()[0]["text"]).group(1)
        fields = {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}
        assert fields["kind"] == "alarm" and fields["id"] == ev.id

        status, page = _get(link)
        assert status == 200, page
        assert "确认告警" in page and f'name="sig" value="{fields["sig"]}"' in page
        form_url = f"http://127.0.0.1:{gw.api_port}/api/v1/ack/link"
        forged = {**fields, "sig": "0" * 32, "who": "冒名"}
        assert _post_form(form_url, forged)[0] == 403
        assert _get(link.replace(fields["sig"], "0" * 32))[0] == 403
        expired = {
            **fields,
            "exp": "1",
            "sig": acklink.sign(acklink.load_key(gw.dir), "alarm", ev.id, 1),
            "who": "王老师",
        }
        status, page = _post_form(form_url, expired)
        assert status == 403 and "过期" in page
        assert _post_form(form_url, {**fields, "who": ""})[0] == 400
        assert gw.query("SELECT acked_by FROM alarms WHERE id = ?", ev.id) == [(None,)]

        status, page = _post_form(form_url, {**fields, "who": "王老师", "note": "已换备用录像机"})
        assert status == 200 and "已确认" in page
        assert gw.query("SELECT acked_by, acked_note FROM alarms WHERE id = ?", ev.id) == [("王老师", "已换备用录像机")]
        until(lambda: any(b["kind"] == "acked" for b in bot.bodies()), 30, "the acknowledgement announced")
        done = gw.get(f"/api/v1/notifications?{urlencode({'id': ev.id})}")
        assert ("acked", "王老师：已换备用录像机") in [(e["what"], e["detail"]) for e in done["timeline"]]
        assert 'reason="unauthorized"} 3.0' in gw.metrics()  # the forged, the tampered and the expired
    finally:
        client.loop_stop()
        bot.stop()
