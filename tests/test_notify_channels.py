"""The notifier against local robots that implement each platform's contract: exact fields, signatures,
error codes counted as failures and retried, rate limits respected, a failing channel delaying nobody."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from examwatch.gateway import store
from examwatch.gateway.notify import outbox
from examwatch.gateway.notify.settings import Channel, Notify, Roster
from examwatch.gateway.notify.worker import Notifier
from tests.notify_support import Bot, raised, store_alarm
from tests.support import until

FAST = Notify(retry_base=0.2, retry_max=0.5, storm_window=0.0, failing_after=3, flap_count=100)


@pytest.fixture
def bots() -> Iterator[list[Bot]]:
    started: list[Bot] = []
    yield started
    for b in started:
        b.stop()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[str, object]]:
    path = str(tmp_path / "gateway.db")
    conn = store.connect(path)
    yield path, conn
    conn.close()


def run(path: str, channels: list[Channel], settings: Notify = FAST, roster: list[Roster] | None = None) -> Notifier:
    n = Notifier(path, "某县", settings, channels, roster or [], {"recording_stopped": "recording"})
    n.start()
    return n


def metric(n: Notifier, name: str, **labels: str) -> float:
    for fam in n.collector.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def room_alarms(bot: Bot) -> list[str]:
    return [b["key"] for b in bot.bodies() if "notify_channel_down" not in b["key"]]


def test_every_bot_gets_the_alarm_signed_and_in_its_own_format(db, bots):
    path, conn = db
    ding, wecom, feishu, hook = (
        Bot("dingtalk", "SECding"),
        Bot("wecom", key="wk"),
        Bot("feishu", "fsec"),
        Bot("webhook", "whk"),
    )
    bots += [ding, wecom, feishu, hook]
    n = run(
        path,
        [
            Channel(name="d", type="dingtalk", url=ding.url, secret="SECding"),
            Channel(name="w", type="wecom", url=wecom.url),
            Channel(name="f", type="feishu", url=feishu.url, secret="fsec"),
            Channel(name="h", type="webhook", url=hook.url, secret="whk"),
        ],
    )
    try:
        store_alarm(conn, raised("101"))
        until(lambda: all(len(b.bodies()) == 1 for b in bots), 20, "every bot has the alarm")
        title = "【二级告警】s1 101：101 录像中断"
        assert ding.bodies()[0]["markdown"]["title"] == title
        assert ding.bodies()[0]["markdown"]["text"].startswith(f"### {title}\n\n**考点**：s1　**考场**：101")
        assert wecom.bodies()[0]["markdown"]["content"].startswith(f"### {title}")
        assert feishu.bodies()[0]["card"]["header"]["title"]["content"] == title
        assert feishu.bodies()[0]["card"]["header"]["template"] == "red"
        assert hook.bodies()[0]["title"] == title and hook.bodies()[0]["key"] == "s1/101/recording_stopped/1:raised:2"
        assert hook.headers_seen[0]["Idempotency-Key"] == "s1/101/recording_stopped/1:raised:2"
        assert all(b.answers == [0] for b in bots)
        store_alarm(conn, raised("101", state="cleared"))
        until(lambda: all(len(b.bodies()) == 2 for b in bots), 20, "every bot has the clear")
        assert ding.bodies()[1]["markdown"]["title"] == "【已恢复】s1 101：101 录像中断"
        until(lambda: metric(n, "examwatch_notify_sent_total", channel="d") == 2, 10, "both confirmed")
        assert metric(n, "examwatch_notify_queue", channel="d") == 0
    finally:
        n.stop()


@pytest.mark.parametrize("platform,code,reason", [("dingtalk", 310000, "signature"), ("feishu", 19021, "signature")])
def test_a_wrong_secret_is_a_counted_failure_and_retried_until_fixed(db, bots, platform, code, reason):
    path, conn = db
    bot = Bot(platform, secret="right")
    bots.append(bot)
    n = run(path, [Channel(name="c", type=platform, url=bot.url, secret="wrong")])
    try:
        store_alarm(conn, raised("101"))
        until(lambda: metric(n, "examwatch_notify_failed_total", channel="c", reason=reason) >= 3, 20, "three refusals")
        assert bot.bodies() == [] and bot.answers.count(code) >= 3
        assert metric(n, "examwatch_notify_queue", channel="c") == 1
        until(lambda: metric(n, "examwatch_notify_up", channel="c") == 0, 10, "channel down")
        # The gateway's own level-1 alarm says so, in Chinese.
        rows = until(
            lambda: conn.execute("SELECT level, message FROM alarms WHERE rule = 'notify_channel_down'").fetchall()
        )
        assert rows[0][0] == 1 and rows[0][1].startswith("通知渠道“c”持续发送失败（signature）")
        bot.secret = "wrong"  # the robot's secret now matches the configured one
        until(lambda: len(bot.bodies()) >= 1, 20, "delivered after the fix")
        assert bot.bodies()[0].get("markdown", bot.bodies()[0].get("card")) is not None
        until(lambda: metric(n, "examwatch_notify_up", channel="c") == 1, 10, "channel up again")
    finally:
        n.stop()


@pytest.mark.parametrize("platform,code", [("dingtalk", 40035), ("wecom", 40058), ("feishu", 9499)])
def test_an_errcode_answer_with_http_200_is_a_failure_and_retried(db, bots, platform, code):
    path, conn = db
    bot = Bot(platform)
    bot.fail_with = code
    bots.append(bot)
    n = run(path, [Channel(name="c", type=platform, url=bot.url)])
    try:
        store_alarm(conn, raised("101"))
        until(
            lambda: metric(n, "examwatch_notify_failed_total", channel="c", reason="errcode") >= 2,
            20,
            "two error answers counted",
        )
        assert bot.answers.count(code) >= 2
        assert metric(n, "examwatch_notify_sent_total", channel="c") == 0
        bot.fail_with = None
        until(lambda: metric(n, "examwatch_notify_sent_total", channel="c") == 1, 20, "confirmed once it answers 0")
        assert len(bot.bodies()) == 1
    finally:
        n.stop()


def test_dingtalk_rate_limit_is_respected_and_a_rate_refusal_is_retried(db, bots):
    path, conn = db
    bot = Bot("dingtalk")
    bots.append(bot)
    n = run(path, [Channel(name="d", type="dingtalk", url=bot.url)])
    try:
        for i in range(25):
            store_alarm(conn, raised(f"{100 + i}"))
        until(lambda: len(bot.bodies()) == 20, 20, "the first twenty")
        time.sleep(2.0)
        assert len(bot.bodies()) == 20 and 130101 not in bot.answers  # we held the rest, the robot refused none
        assert metric(n, "examwatch_notify_queue", channel="d") == 5
    finally:
        n.stop()
    # A channel configured above the robot's limit gets refusals: counted by reason, kept for a retry.
    bot2 = Bot("wecom", per_minute=3)
    bots.append(bot2)
    n = run(path, [Channel(name="w", type="wecom", url=bot2.url, rate_per_minute=100)])
    try:
        for i in range(5):
            store_alarm(conn, raised(f"{200 + i}"))
        until(lambda: 45009 in bot2.answers, 20, "a rate refusal")
        # the robot keeps its answer before we have read it: the count follows a moment later
        until(
            lambda: metric(n, "examwatch_notify_failed_total", channel="w", reason="rate_limited") >= 1,
            10,
            "the refusal counted as rate_limited",
        )
        assert len(bot2.bodies()) == 3 and metric(n, "examwatch_notify_queue", channel="w") == 2
    finally:
        n.stop()


def test_a_channel_down_catches_up_in_order_once_while_the_other_is_on_time(db, bots):
    path, conn = db
    slow, fine = Bot("webhook", "s"), Bot("webhook", "s")
    bots += [slow, fine]
    slow.down = True
    n = run(
        path,
        [
            Channel(name="slow", type="webhook", url=slow.url, secret="s"),
            Channel(name="fine", type="webhook", url=fine.url, secret="s"),
        ],
    )
    try:
        for i in range(10):
            store_alarm(conn, raised(f"{100 + i}"))
            until(lambda: len(room_alarms(fine)) == i + 1, 20, f"fine has alarm {i}")  # on time, one by one
        assert slow.bodies() == []
        until(lambda: metric(n, "examwatch_notify_up", channel="slow") == 0, 20, "slow marked down")
        slow.down = False
        until(lambda: len(room_alarms(slow)) >= 10, 30, "slow caught up")
        assert (
            room_alarms(slow) == room_alarms(fine) == [f"s1/{100 + i}/recording_stopped/1:raised:2" for i in range(10)]
        )
        keys = [b["key"] for b in slow.bodies()]
        assert len(keys) == len(set(keys))  # each once
        # The other channel was told that this one was down, and that it is back.
        until(lambda: len([b for b in fine.bodies() if "notify_channel_down" in b["key"]]) == 2, 20, "down and back")
        down = [b for b in fine.bodies() if "notify_channel_down" in b["key"]]
        assert [b["kind"] for b in down] == ["raised", "cleared"]
        assert down[0]["title"].startswith("【一级告警】某县 gateway：通知渠道“slow”持续发送失败")
        assert down[1]["title"].startswith("【已恢复】某县 gateway：通知渠道“slow”已恢复")
        assert metric(n, "examwatch_notify_failed_total", channel="slow", reason="http_status") >= 3
        assert metric(n, "examwatch_notify_failed_total", channel="fine", reason="http_status") == 0
        timeline = outbox.timeline(conn, "s1/100/recording_stopped/1")  # type: ignore[arg-type]
        assert [e["what"] for e in timeline] == ["sent"]
        assert msgspec.json.decode(conn.execute("SELECT message FROM notify_outbox LIMIT 1").fetchone()[0])["key"]
    finally:
        n.stop()


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"{" * 100_000, "bad_answer"),
        (b"[" * 50_000, "bad_answer"),
        (b"<html>ok</html>", "bad_answer"),
        (b"", "bad_answer"),
    ],
)
def test_a_hostile_or_broken_answer_is_a_bounded_failure(bots, raw, reason):
    from examwatch.channels import dingtalk
    from examwatch.channels.base import SendError, client
    from examwatch.gateway.notify.messages import Message

    bot = Bot("dingtalk")
    bot.raw = raw
    bots.append(bot)
    ch = Channel(name="d", type="dingtalk", url=bot.url)
    with client(ch) as http, pytest.raises(SendError) as err:
        dingtalk.send(ch, Message(key="k", thread="t", kind="test", level=1, title="t"), http, time.time())
    assert err.value.reason == reason


def test_a_first_start_tells_the_alarms_open_now_but_not_the_history(db, bots):
    path, conn = db
    hook = Bot("webhook", "s")
    bots.append(hook)
    store_alarm(conn, raised("101"))
    store_alarm(conn, raised("101", state="cleared"))  # over before the notifier existed: history
    store_alarm(conn, raised("102"))  # still open
    n = run(path, [Channel(name="h", type="webhook", url=hook.url, secret="s")])
    try:
        until(hook.bodies, 20, "something sent")
        store_alarm(conn, raised("103"))
        until(lambda: len(room_alarms(hook)) == 2, 20, "the new one too")
        assert room_alarms(hook) == ["s1/102/recording_stopped/1:raised:2", "s1/103/recording_stopped/1:raised:2"]
    finally:
        n.stop()
    n = run(path, [Channel(name="h", type="webhook", url=hook.url, secret="s")])  # a restart: nothing again
    try:
        store_alarm(conn, raised("104"))
        until(lambda: len(room_alarms(hook)) == 3, 20, "the next new one")
        assert room_alarms(hook)[-1] == "s1/104/recording_stopped/1:raised:2"
    finally:
        n.stop()


def test_a_stop_without_waiting_leaves_the_send_in_hand_to_end_and_then_starts_again(db, bots):
    """A replica losing the lead stops its notifier without waiting (its ingest loop must go on): the send in
    hand ends by itself, and the notifier starts again, once that is over, when the lead comes back."""
    path, conn = db
    bot = Bot("webhook", "whk")
    bot.delay = 3.0  # a slow robot: the stop lands mid-send
    bots.append(bot)
    n = run(path, [Channel(name="h", type="webhook", url=bot.url, secret="whk")])
    try:
        store_alarm(conn, raised("101"))
        until(lambda: bot.arrived, 20, "the send under way")
        n.stop(wait=0)
        assert not n.stopped() and n.alive()  # returned at once, the send still in hand; nothing counts as dead
        until(n.stopped, 20, "the send in hand ended")
        assert len(bot.bodies()) == 1
        store_alarm(conn, raised("102"))
        n.start()  # the lead again
        until(lambda: len(room_alarms(bot)) == 2, 20, "the new alarm sent")
    finally:
        n.stop()
