"""The notifier's pure parts: exact messages and payloads, routing by roster and filters, deadlines and
escalation with a controlled clock, acknowledgement in the timeline, duplicates, flapping, storms."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import msgspec

from examwatch.channels import alertmanager, dingtalk, feishu, webhook, wecom
from examwatch.gateway.notify.core import Ack, Event, Planner, State
from examwatch.gateway.notify.messages import Item, Links, alarm_message
from examwatch.gateway.notify.settings import Channel, Notify, Roster

T0 = 1780000000.0  # 2026-05-29 04:26:40 Beijing time
CHANNELS = [
    Channel(name="tech", type="dingtalk", url="http://x/robot/send?access_token=a"),
    Channel(name="lead", type="wecom", url="http://x/send?key=k"),
    Channel(name="group", type="feishu", url="http://x/hook"),
    Channel(name="county", type="email", host="h", sender="a@b", to=["c@d"]),
    Channel(name="am", type="alertmanager", url="http://am", levels=[2, 3]),
]
ROSTER = [
    Roster(site="s1", technicians=["tech"], group_lead=["lead"], leading_group=["group"]),
    Roster(site="*", county_office=["county"]),
]
CLASSES = {"recording_stopped": "recording", "link_down": "network"}


def planner(**notify: object) -> Planner:
    settings = msgspec.convert({"ack_url": "http://gw:8080", "grafana_url": "http://g/d/room", **notify}, Notify)
    return Planner(settings, CHANNELS, ROSTER, CLASSES)


def alarm(
    room: str = "101",
    what: str = "raised",
    level: int = 2,
    at: float = T0,
    rule: str = "recording_stopped",
    n: int = 1,
    site: str = "s1",
) -> Event:
    return Event(
        kind="alarm",
        id=f"{site}/{room}/{rule}/{n}",
        site=site,
        room=room,
        level=level,
        what=what,
        at=at,
        raised_at=T0,
        rule=rule,
        device="nvr",
        metric="recording",
        value=0.0,
        message="录像中断",
        action="立即检查录像机并改用备用录像",
    )


def keys(out: list[tuple[str, object]]) -> list[tuple[str, str]]:
    return [(ch, m.key) for ch, m in out]  # type: ignore[attr-defined]


def test_the_alarm_message_in_chinese_with_deadline_links_and_action():
    m = alarm_message(
        key="k",
        kind="raised",
        item=Item(id="s1/101/r/1", site="s1", room="101", rule="r", level=2, starts_at=T0, summary="录像中断"),
        device="nvr",
        value=0.0,
        metric="recording",
        action="立即检查录像机",
        deadlines=[600.0, 1800.0],
        links=Links("http://gw:8080", "http://g/d/room"),
    )
    assert m.title == "【二级告警】s1 101：录像中断"
    assert m.lines == [
        "**考点**：s1　**考场**：101",
        "**设备**：nvr",
        "**读数**：recording 0",
        "**开始**：05-29 04:26:40",
        "**处置**：立即检查录像机",
        "**时限**：请于 04:36 前上报领导小组，04:56 前决策",
        "确认：`examwatch ack s1/101/r/1 --who 姓名 --note 处理情况`",
        "[处理记录与确认](http://gw:8080/api/v1/alarms/timeline?id=s1%2F101%2Fr%2F1)",
        "[监控面板](http://g/d/room?var-site=s1&var-room=101)",
        "编号：s1/101/r/1",
    ]
    text = "\n\n".join(["### " + m.title, *m.lines])
    assert dingtalk.payload(m) == {"msgtype": "markdown", "markdown": {"title": m.title, "text": text}}
    assert wecom.payload(m) == {"msgtype": "markdown", "markdown": {"content": text}}


def test_platform_signatures_follow_their_documented_recipes():
    # DingTalk: HmacSHA256(key=secret, msg="<ms>\n<secret>"), base64, URL-encoded into the query.
    expect = base64.b64encode(hmac.new(b"SECabc", b"1700000000000\nSECabc", hashlib.sha256).digest()).decode()
    assert dingtalk.sign("SECabc", 1700000000000) == expect
    url = dingtalk.signed_url("https://oapi.dingtalk.com/robot/send?access_token=t", "SECabc", 1700000000000)
    assert url.startswith("https://oapi.dingtalk.com/robot/send?access_token=t&timestamp=1700000000000&sign=")
    assert "+" not in url.split("sign=")[1] and "/" not in url.split("sign=")[1]
    # Feishu: HmacSHA256(key="<s>\n<secret>", msg=""), base64, in the body with the timestamp as a string.
    m = alarm_message(
        key="k",
        kind="cleared",
        item=Item(id="a", site="s1", room="101", level=1, firing=False, starts_at=T0, ends_at=T0 + 60, summary="断网"),
        device="sw",
        value=None,
        metric="",
        action="",
        deadlines=[],
        links=Links(),
    )
    body = feishu.payload(m, "fsecret", 1700000000)
    assert body == {
        "timestamp": "1700000000",
        "sign": base64.b64encode(hmac.new(b"1700000000\nfsecret", b"", hashlib.sha256).digest()).decode(),
        "msg_type": "interactive",
        "card": {
            "header": {"title": {"tag": "plain_text", "content": "【已恢复】s1 101：断网"}, "template": "green"},
            "elements": [{"tag": "markdown", "content": "\n".join(m.lines)}],
        },
    }
    data = webhook.body(m)
    assert json.loads(data)["items"] == [
        {
            "id": "a",
            "site": "s1",
            "room": "101",
            "level": 1,
            "firing": False,
            "starts_at": T0,
            "ends_at": T0 + 60,
            "summary": "断网",
        }
    ]
    h = webhook.headers(m, "whsecret", 1700000000, data)
    assert (
        h["X-Examwatch-Signature"]
        == "sha256=" + hmac.new(b"whsecret", b"1700000000." + data, hashlib.sha256).hexdigest()
    )
    assert h["Idempotency-Key"] == "k"


def test_alertmanager_alerts_have_labels_and_end_when_cleared():
    m = alarm_message(
        key="k",
        kind="raised",
        item=Item(id="s1/101/r/1", site="s1", room="101", rule="link_down", level=2, starts_at=T0, summary="断网"),
        device="sw",
        value=None,
        metric="",
        action="",
        deadlines=[600.0],
        links=Links(),
    )
    [a] = alertmanager.payload(m, T0 + 5, 240.0)
    assert a["labels"] == {
        "alertname": "link_down",
        "site": "s1",
        "room": "101",
        "level": "2",
        "severity": "critical",
        "examwatch_id": "s1/101/r/1",
    }
    assert (a["startsAt"], a["endsAt"]) == ("2026-05-28T20:26:40.000Z", "2026-05-28T20:30:45.000Z")
    cleared = msgspec.structs.replace(m, items=[msgspec.structs.replace(m.items[0], firing=False, ends_at=T0 + 90)])
    assert alertmanager.payload(cleared, T0 + 100, 240.0)[0]["endsAt"] == "2026-05-28T20:28:10.000Z"


def test_wecom_content_is_clipped_to_its_byte_limit_on_a_character_boundary():
    m = alarm_message(
        key="k",
        kind="raised",
        item=Item(id="a", site="s1", room="1", level=1, starts_at=T0, summary="考" * 3000),
        device="d",
        value=None,
        metric="",
        action="",
        deadlines=[],
        links=Links(),
    )
    content = wecom.payload(m)["markdown"]["content"]
    assert len(content.encode()) <= 4096 and content.endswith("已截断）")


def test_routing_by_roster_tier_and_channel_filters():
    p = planner()
    out, _ = p.step([alarm(level=2)], {}, T0)
    assert keys(out) == [
        ("tech", "s1/101/recording_stopped/1:raised:2"),
        ("lead", "s1/101/recording_stopped/1:raised:2"),
        ("am", "s1/101/recording_stopped/1:raised:2"),
    ]
    out, _ = p.step([alarm(room="102", level=1, rule="link_down")], {}, T0)
    assert [ch for ch, _ in out] == ["tech"]  # level 1 starts at the technicians; the Alertmanager takes 2 and 3
    out, _ = p.step([alarm(site="s2", level=2)], {}, T0)
    assert [ch for ch, _ in out] == ["am"]  # no roster for s2: only the unrostered channel


def test_unacknowledged_level_2_escalates_after_ten_minutes_and_again_at_thirty():
    p = planner()
    p.step([alarm()], {}, T0)
    assert p.step([], {}, T0 + 599)[0] == []
    out, lines = p.step([], {}, T0 + 600)
    assert keys(out) == [(ch, "s1/101/recording_stopped/1:escalated:1") for ch in ("tech", "lead", "group", "am")]
    assert out[0][1].title == "【二级告警·未确认，逐级上报】s1 101：录像中断"
    assert "**上报至**：考点领导小组（超时未确认）" in out[0][1].lines
    assert lines == [("s1/101/recording_stopped/1", T0 + 600, "escalated", "考点领导小组")]
    out, _ = p.step([], {}, T0 + 1800)
    assert [ch for ch, _ in out] == ["tech", "lead", "group", "county", "am"]  # the county office now too


def test_acknowledged_alarm_does_not_escalate_and_the_ack_is_in_the_timeline():
    p = planner()
    p.step([alarm()], {}, T0)
    out, lines = p.step([], {"s1/101/recording_stopped/1": Ack(T0 + 120, "张老师", "已换备用录像机")}, T0 + 121)
    assert keys(out) == [(ch, "s1/101/recording_stopped/1:acked") for ch in ("tech", "lead", "am")]
    assert out[0][1].lines[:2] == ["**确认人**：张老师　**时间**：05-29 04:28:40", "**说明**：已换备用录像机"]
    assert lines == [("s1/101/recording_stopped/1", T0 + 120, "acked", "张老师：已换备用录像机")]
    assert p.step([], {"s1/101/recording_stopped/1": Ack(T0 + 120, "张老师")}, T0 + 3600) == ([], [])


def test_a_cleared_alarm_sends_resolved_to_whoever_had_it_and_stops_escalating():
    p = planner()
    p.step([alarm()], {}, T0)
    p.step([], {}, T0 + 600)  # escalated to the leading group
    out, _ = p.step([alarm(what="cleared", at=T0 + 700)], {}, T0 + 700)
    assert [ch for ch, _ in out] == ["tech", "lead", "group", "am"]
    assert out[0][1].title.startswith("【已恢复】") and out[0][1].items[0].firing is False
    assert p.step([], {}, T0 + 9000) == ([], [])


def test_the_same_transition_twice_is_sent_once_and_state_survives_a_restart():
    p = planner()
    out1, _ = p.step([alarm(), alarm()], {}, T0)
    assert len(out1) == 3
    restored = planner()
    restored.state = msgspec.json.decode(msgspec.json.encode(p.state), type=State)
    assert restored.step([alarm()], {}, T0 + 1) == ([], [])
    assert len(restored.step([], {}, T0 + 600)[0]) == 4


def test_flapping_is_held_as_one_message_with_the_count():
    p = planner(flap_count=3, flap_window=600.0, storm_window=0.0)
    sent = []
    for n in range(6):  # raise and clear six times in six minutes
        sent += p.step([alarm(n=n, at=T0 + 60 * n)], {}, T0 + 60 * n)[0]
        sent += p.step([alarm(n=n, what="cleared", at=T0 + 60 * n + 30)], {}, T0 + 60 * n + 30)[0]
    kinds = [m.kind for ch, m in sent if ch == "tech"]
    assert kinds == ["raised", "cleared", "raised", "cleared", "flapping"]
    flap = next(m for ch, m in sent if ch == "tech" and m.kind == "flapping")
    assert "**反复**：已告警 3 次，期间的告警与恢复合并为本条，不再逐条发送" in flap.lines
    out, _ = p.step([], {}, T0 + 300 + 30 + 600)  # quiet for the window: one closing message with the count
    assert [m.kind for ch, m in out if ch == "tech"] == ["cleared"]
    assert out[0][1].lines[0] == "**反复**：期间共告警 6 次，现已稳定恢复"


def test_forty_rooms_at_once_give_two_messages_per_channel_with_the_list():
    p = planner(storm_window=10.0)
    sent = []
    for i in range(40):
        sent += p.step([alarm(room=f"{100 + i}", at=T0 + i * 0.1)], {}, T0 + i * 0.1)[0]
    sent += p.step([], {}, T0 + 11)[0]
    per = {ch: [m for c, m in sent if c == ch] for ch in ("tech", "lead", "am")}
    assert [len(v) for v in per.values()] == [2, 2, 2]
    storm = per["tech"][1]
    assert storm.title == "【二级告警·批量】s1：39 个考场同时告警"
    assert storm.lines[1] == "- 101：录像中断（二级）" and len(storm.items) == 39
    assert len(alertmanager.payload(storm, T0, 60)) == 39  # Alertmanager still gets one alert per room


def test_many_escalations_in_one_step_go_out_as_one_list_per_channel():
    p = planner(storm_window=0.0)
    for i in range(10):
        p.step([alarm(room=f"{100 + i}", level=1, rule="link_down")], {}, T0)
    out, lines = p.step([], {}, T0 + 300)
    assert [ch for ch, _ in out] == ["tech", "lead"] and len(lines) == 10
    assert out[0][1].title == "【超时未确认】10 项告警，已逐级上报"


def test_incident_updates_are_one_thread_and_room_changes_within_seconds_go_as_one():
    p = planner(storm_window=10.0)
    inc = Event(
        kind="incident",
        id="inc-1",
        site="s1",
        rooms=["101", "102"],
        level=2,
        what="opened",
        at=T0,
        raised_at=T0,
        rule="network",
        message="考点多个考场网络中断",
    )
    out, _ = p.step([inc], {}, T0)
    assert out[0][1].title == "【二级事件·发生】s1：考点多个考场网络中断"
    assert "**涉及考场**：101、102" in out[0][1].lines
    joined = msgspec.structs.replace(inc, what="joined", rooms=["101", "102", "103"], at=T0 + 5)
    more = msgspec.structs.replace(inc, what="joined", rooms=["101", "102", "103", "104"], at=T0 + 6)
    assert p.step([joined, joined, more], {}, T0 + 6) == ([], [])  # held: within the storm window
    out, _ = p.step([], {}, T0 + 10)
    assert {m.thread for _, m in out} == {"inc-1"} and len(out) == 3
    assert out[0][1].title == "【二级事件·考场变化】s1：考点多个考场网络中断"
    assert "**涉及考场**：101、102、103、104" in out[0][1].lines
    closed = msgspec.structs.replace(inc, what="closed", rooms=[], at=T0 + 60)
    out, _ = p.step([closed], {}, T0 + 60)
    assert out[0][1].title == "【已恢复】s1：考点多个考场网络中断"
