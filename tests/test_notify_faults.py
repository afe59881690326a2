"""The notifier inside a real gateway process, fed through a real broker: a channel down while alarms keep
coming, the gateway SIGKILLed mid-send, forty rooms failing at once, and an acknowledgement by the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.notify_support import Bot, publish_alarm, publisher, raised, wait_subscribed, webhook_channels
from tests.support import until
from tests.support.gateway import ROOT, GatewayProc, start

FAST = "retry_base = 0.2\nretry_max = 1.0\nfailing_after = 3\nstorm_window = 0.0\n"


@pytest.fixture
def bots():
    started: list[Bot] = []
    yield started
    for b in started:
        b.stop()


def alarm_keys(bot: Bot) -> list[str]:
    return [
        b["key"] for b in bot.bodies() if b["kind"] in ("raised", "cleared") and "notify_channel_down" not in b["key"]
    ]


def metric(gw: GatewayProc, line_start: str) -> float:
    for line in gw.metrics().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_channel_down_for_ten_room_minutes_gets_everything_once_in_order(tmp_path, mosquitto, procs, bots):
    slow, fine = Bot("webhook", "s1"), Bot("webhook", "s2")
    bots += [slow, fine]
    rooms = [f"s1/{100 + i}" for i in range(10)]
    # Deadlines beyond the test: only the raises and clears go out (escalation is tested on its own).
    gw = GatewayProc(
        tmp_path,
        mosquitto.port,
        rooms,
        extra=webhook_channels(("slow", slow), ("fine", fine), notify=FAST + "[notify.deadlines]\nlevel2 = [3600.0]\n"),
    )
    start(procs, gw)
    mqtt = publisher(mosquitto.port)
    wait_subscribed(gw, mqtt, rooms[0])
    slow.down = True
    t0 = time.time() - 600  # ten minutes of room time: one raise and one clear a minute
    expected = []
    for i, agent in enumerate(rooms):
        room = agent.split("/")[1]
        ev = raised(room, at=t0 + 60 * i)
        publish_alarm(mqtt, ev, 1)
        expected.append(f"{ev.id}:raised:2")
        until(lambda: alarm_keys(fine) == expected, 20, f"the other channel has alarm {i} on time")
        publish_alarm(mqtt, raised(room, at=t0 + 60 * i + 30, state="cleared"), 2)
        expected.append(f"{ev.id}:cleared")
        until(lambda: alarm_keys(fine) == expected, 20, f"the other channel has clear {i} on time")
    assert slow.bodies() == []
    until(lambda: metric(gw, 'examwatch_notify_up{channel="slow"}') == 0, 20, "slow marked down")
    assert metric(gw, 'examwatch_notify_queue{channel="slow"}') == 20
    down = gw.query("SELECT level, message FROM alarms WHERE rule = 'notify_channel_down' AND state != 'cleared'")
    assert down and down[0][0] == 1
    slow.down = False
    until(lambda: len(alarm_keys(slow)) == 20, 30, "slow caught up")
    assert alarm_keys(slow) == expected  # in order, each once
    keys = [b["key"] for b in slow.bodies()]
    assert len(keys) == len(set(keys))
    until(lambda: metric(gw, 'examwatch_notify_up{channel="slow"}') == 1, 20, "slow up again")
    mqtt.loop_stop()


def test_sigkill_mid_send_loses_nothing_and_duplicates_at_most_one_per_kill(tmp_path, mosquitto, procs, bots):
    hook = Bot("webhook", "k")
    hook.delay = 0.15  # each send takes a while: the kills land inside sends
    bots.append(hook)
    rooms = [f"s1/{100 + i}" for i in range(30)]
    gw = GatewayProc(tmp_path, mosquitto.port, rooms, extra=webhook_channels(("hook", hook), notify=FAST))
    start(procs, gw)
    mqtt = publisher(mosquitto.port)
    wait_subscribed(gw, mqtt, rooms[0])
    expected = []
    for agent in rooms:
        ev = raised(agent.split("/")[1])
        publish_alarm(mqtt, ev, 1)
        expected.append(f"{ev.id}:raised:2")
    kills, resent = 0, 0.0
    for _ in range(3):
        until(lambda: len(hook.bodies()) >= 5 * (kills + 1), 30, "some sent")
        gw.stop(signal.SIGKILL)
        kills += 1
        gw.start()
        # The notifier has counted what it found half-sent once the gateway says it started.
        until(lambda: gw.log().count("gateway_started") == kills + 1, 20, "restarted")
        resent += metric(gw, 'examwatch_notify_resent_after_restart_total{channel="hook"}')
    until(lambda: set(expected) <= set(alarm_keys(hook)), 60, "everything delivered")
    keys = alarm_keys(hook)
    duplicates = len(keys) - len(set(keys))
    assert duplicates <= kills and duplicates <= resent <= kills
    assert [k for i, k in enumerate(keys) if k not in keys[:i]] == expected  # first deliveries in order
    mqtt.loop_stop()


def test_forty_rooms_at_once_give_a_bounded_number_of_messages_per_channel(tmp_path, mosquitto, procs, bots):
    a, b = Bot("webhook", "a"), Bot("webhook", "b")
    bots += [a, b]
    rooms = [f"s1/{100 + i}" for i in range(40)]
    gw = GatewayProc(
        tmp_path,
        mosquitto.port,
        rooms,
        extra=webhook_channels(("a", a), ("b", b), notify="retry_base = 0.2\nstorm_window = 10.0\n"),
    )
    start(procs, gw)
    mqtt = publisher(mosquitto.port)
    wait_subscribed(gw, mqtt, rooms[0])
    for agent in rooms:
        publish_alarm(mqtt, raised(agent.split("/")[1]), 1)
    until(lambda: gw.query("SELECT COUNT(*) FROM alarms")[0][0] == 40, 60, "all stored")
    until(lambda: any(x["kind"] == "storm" for x in a.bodies()), 30, "the list went out")
    time.sleep(3)  # whatever else the forty cause (incident updates) has had time to go out
    for bot in (a, b):
        kinds = [x["kind"] for x in bot.bodies()]
        assert kinds.count("raised") == 1 and kinds.count("storm") <= 2
        # The first room, the list, the incident's opening, its escalation to level 3 and one room update.
        assert len(kinds) <= 6, kinds
        listed = {i["room"] for x in bot.bodies() if x["kind"] in ("raised", "storm") for i in x["items"]}
        assert listed == {r.split("/")[1] for r in rooms}  # every room named somewhere
    mqtt.loop_stop()


def test_an_unacknowledged_alarm_is_resent_and_an_ack_by_the_cli_stops_it(tmp_path, mosquitto, procs, bots):
    hook = Bot("webhook", "k")
    bots.append(hook)
    # Deadlines of seconds: re-sent at 3 s, 6 s, then every 3 s, until acknowledged.
    gw = GatewayProc(
        tmp_path,
        mosquitto.port,
        ["s1/101", "s1/102"],
        extra=webhook_channels(
            ("hook", hook), notify="retry_base = 0.2\nstorm_window = 0.0\n[notify.deadlines]\nlevel2 = [3.0, 6.0]\n"
        ),
    )
    start(procs, gw)
    mqtt = publisher(mosquitto.port)
    wait_subscribed(gw, mqtt, "s1/101")
    publish_alarm(mqtt, raised("101"), 1)
    publish_alarm(mqtt, raised("102"), 1)
    until(
        lambda: (
            {x["key"] for x in hook.bodies()}
            >= {"s1/101/recording_stopped/1:raised:2", "s1/102/recording_stopped/1:raised:2"}
        ),
        20,
        "both sent",
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EXAMWATCH_TOKEN": gw.token}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "examwatch",
            "ack",
            "s1/101/recording_stopped/1",
            "--who",
            "张老师",
            "--note",
            "已换备用录像机",
            "--url",
            f"http://127.0.0.1:{gw.api_port}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr

    def rows(prefix: str) -> list[tuple[int, str]]:
        return gw.query("SELECT id, key FROM notify_outbox WHERE key LIKE ? ORDER BY id", prefix + "%")

    [(acked_row, _)] = until(lambda: rows("s1/101/recording_stopped/1:acked"), 20, "ack announced")
    # 102, never acknowledged, keeps coming: twice more after 101's acknowledgement ...
    until(
        lambda: len([i for i, _ in rows("s1/102/recording_stopped/1:escalated:") if i > acked_row]) >= 2,
        30,
        "102 re-sent twice after the ack",
    )
    # ... while 101 stopped: nothing planned for it after the step that saw its acknowledgement.
    assert [k for i, k in rows("s1/101/recording_stopped/1:escalated:") if i > acked_row] == []
    timeline = gw.query(
        "SELECT what, detail FROM notify_timeline WHERE thread = ? ORDER BY at, rowid", "s1/101/recording_stopped/1"
    )
    assert ("acked", "张老师：已换备用录像机") in timeline
    assert gw.get("/api/v1/alarms?room=101")["alarms"][0]["acked_by"] == "张老师"
    assert "s1/101/recording_stopped/1:acked" in {x["key"] for x in hook.bodies()}
    mqtt.loop_stop()
