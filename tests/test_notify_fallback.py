"""When the county is unreachable: the room agent sends its level-2 alarms to a site channel itself, once, and
the gateway does not send them there again when the backlog arrives (issue 9, item 7).

Real processes: the agent, mosquitto for its sensors and for the county (behind a socat link that is down),
the gateway, and a local signed-webhook receiver standing for the site's group.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import urlencode

import msgspec
import pytest

from examwatch.channels.settings import Channel
from examwatch.edge.config import AgentSettings, ConfigError, FallbackSettings, loads
from examwatch.edge.fallback import Fallback
from examwatch.edge.store import OutboxReader, OutboxRow, Store
from examwatch.gateway import store
from examwatch.gateway.api import BadRequest, parse_query
from examwatch.gateway.notify import outbox
from examwatch.gateway.notify.core import Event, Planner
from examwatch.gateway.notify.settings import Notify, Roster
from examwatch.kernel.model import AlarmEvent
from examwatch.simulators.broker import Mosquitto, free_port
from tests.notify_support import Bot, publisher, webhook_channels
from tests.support import until
from tests.support.agent import agent_toml, launch_agent
from tests.support.gateway import GatewayProc, Link, key_hex, start, until_subscribed

DOOR = """
[[devices]]
name = "door"
kind = "door"
protocol = "mqtt"
topic = "z2m/door"
profile = "zigbee2mqtt_contact"
interval = 60
"""


def fallback(bot: Bot, enabled: str = "enabled = true\n") -> str:
    return (
        f'[fallback]\n{enabled}after = 2\n[fallback.channel]\nname = "site"\ntype = "webhook"\nurl = "{bot.url}"\n'
        f'secret = "{bot.secret}"\n'
    )


def agent_config(tmp_path: Path, sensors_port: int, county_port: int, exporter_port: int, extra: str) -> Path:
    """A secrecy room outside its windows (an open door is level 2) whose uplink goes to ``county_port``."""
    text = agent_toml(
        sensors_port,
        exporter_port,
        tmp_path / "state",
        kind="secrecy_room",
        room_name="保密室",
        body=DOOR + extra,
        windows=[(60, 90)],
    )
    uplink = f'[uplink]\nenabled = true\nport = {sensors_port}\nsigning_key = "{"ab" * 32}"'
    assert uplink in text
    text = text.replace(
        uplink, f'[uplink]\nenabled = true\nport = {county_port}\nsigning_key = "{key_hex("s1/r1")}"\nheartbeat = 1'
    )
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def door_messages(bot: Bot) -> list[dict]:
    return [b for b in bot.bodies() if b["thread"].startswith("s1/r1/secrecy_door_open/")]


# --- the gateway's side, pure ------------------------------------------------------------------------------


def test_the_planner_leaves_out_the_channels_the_agent_already_told_and_records_it() -> None:
    chans = [
        Channel(name="site", type="webhook", url="http://x/"),
        Channel(name="lead", type="webhook", url="http://y/"),
    ]
    p = Planner(Notify(), chans, [Roster(site="s1", group_lead=["site", "lead"])], {})
    t = 1_700_000_000.0
    ev = Event(
        kind="alarm",
        id="s1/r1/secrecy_door_open/door/1",
        site="s1",
        room="r1",
        level=2,
        what="raised",
        at=t,
        raised_at=t,
        rule="secrecy_door_open",
        device="door",
        message="保密室门被打开",
        notified=["site"],
    )
    out, lines = p.step([ev], {}, t + 1)
    assert [(ch, m.kind) for ch, m in out] == [("lead", "raised")]
    assert (ev.id, t, "direct", "考场终端已直接通知：site") in lines
    cleared = Event(**{**{f: getattr(ev, f) for f in ev.__struct_fields__}, "what": "cleared", "at": t + 60})
    out, _ = p.step([cleared], {}, t + 61)
    assert sorted(ch for ch, m in out if m.kind == "cleared") == ["lead", "site"]  # the clear goes to both


def test_the_fallback_is_off_by_default_and_its_config_is_checked() -> None:
    base = '[agent]\nsite = "s1"\nroom = "r1"\n'
    assert loads(base).fallback.enabled is False
    assert loads(base + "[fallback]\nafter = 5\n").fallback.enabled is False
    with pytest.raises(ConfigError) as err:
        loads(
            base + '[fallback]\nenabled = true\nafter = 0.5\n[fallback.channel]\nname = "x"\ntype = "alertmanager"\n'
            'url = "ftp://h"\n'
        )
    report = err.value.report("agent.toml")
    for part in ("fallback.after", "fallback.enabled", "fallback.channel.type", "fallback.channel.url"):
        assert part in report, report
    # the example in docs/channels.md is a valid agent config
    doc = (Path(__file__).resolve().parent.parent / "docs" / "channels.md").read_text(encoding="utf-8")
    example = next(b for b in re.findall(r"```toml\n(.*?)```", doc, re.S) if "[fallback]" in b)
    cfg = loads(base + '[uplink]\nenabled = true\nsigning_key = "' + "ab" * 32 + '"\n' + example)
    assert cfg.fallback.enabled and cfg.fallback.channel is not None and cfg.fallback.channel.name == "site1-group"


def test_the_notifications_endpoint_takes_one_bounded_id(tmp_path) -> None:
    assert parse_query("/api/v1/notifications", "id=s1/r1/door/1") == {"id": "s1/r1/door/1", "limit": 500}
    for bad in ("", "limit=5", "id=a&id=b", "id=a&limit=0", "id=a&limit=1001", "id=" + "x" * 257, "id=a&who=b"):
        with pytest.raises(BadRequest):
            parse_query("/api/v1/notifications", bad)
    # a gateway whose notifier never ran (no channels): an empty record, not an error
    assert outbox.notifications(store.connect(tmp_path / "gw.db"), "x") == {"timeline": [], "messages": []}


# --- the agent's side, against a real store and a real receiver --------------------------------------------


def _alarm(n: int, level: int = 2, state: str = "raised") -> AlarmEvent:
    t = time.time()
    return AlarmEvent(
        id=f"s1/r1/secrecy_door_open/door/{n}",
        site="s1",
        room="r1",
        rule="secrecy_door_open",
        level=level,
        state=state,
        device="door",
        metric="door_open",
        value=1.0,
        at=t,
        raised_at=t,
        message=f"【二级】s1 r1 door：门 {n} 被打开",
        action="立即到场核查",
    )


def _fallback(tmp_path: Path, bot: Bot, per_minute: int = 10) -> tuple[Store, Fallback]:
    store = Store(tmp_path / "agent.db")
    settings = FallbackSettings(
        enabled=True,
        after=1,
        per_minute=per_minute,
        channel=Channel(name="site", type="webhook", url=bot.url, secret=bot.secret),
    )
    fb = Fallback(settings, AgentSettings(site="s1", room="r1"), str(tmp_path / "agent.db"), down_for=lambda: 60.0)
    fb.open()
    return store, fb


def _queue(store: Store, *events: AlarmEvent) -> None:
    store.write([], list(events), outbox=[("alarms", msgspec.json.encode(e)) for e in events])


def _row(tmp_path: Path, seq: int) -> OutboxRow:
    return next(r for r in OutboxReader(tmp_path / "agent.db").pending(limit=100) if r.seq == seq)


def test_the_fallback_tells_each_level_2_alarm_once_marks_its_row_and_leaves_handed_rows_to_the_county(
    tmp_path,
) -> None:
    bot = Bot("webhook", secret="s")
    store, fb = _fallback(tmp_path, bot)
    try:
        _queue(store, _alarm(1))
        fb.mark(_row(tmp_path, 1))  # the uplink handed row 1 over before the link dropped: the county tells it
        _queue(store, _alarm(2, level=1), _alarm(3), _alarm(4), _alarm(4, state="cleared"))
        fb.step()
        assert [b["thread"] for b in bot.bodies()] == ["s1/r1/secrecy_door_open/door/3"]  # not level 1, not cleared
        assert fb.stats["sent"] == 1
        assert msgspec.json.decode(fb.mark(_row(tmp_path, 3)), type=AlarmEvent).notified == ["site"]
        assert msgspec.json.decode(fb.mark(_row(tmp_path, 1)), type=AlarmEvent).notified == []
        fb.step()
        assert len(bot.bodies()) == 1  # once
        fb.stop()

        # Restarted: it remembers what it told (3, still marked), and row 1, which the old process had handed
        # to its MQTT client but the broker never acknowledged, is now waiting unsent: it is told too.
        _, again = _fallback(tmp_path, bot)
        again.step()
        assert [b["thread"][-1] for b in bot.bodies()] == ["3", "1"]
        assert msgspec.json.decode(again.mark(_row(tmp_path, 3)), type=AlarmEvent).notified == ["site"]
        again.stop()
    finally:
        bot.stop()


def test_the_fallback_keeps_to_its_rate_and_retries_a_channel_that_failed(tmp_path) -> None:
    bot = Bot("webhook", secret="s")
    store, fb = _fallback(tmp_path, bot, per_minute=2)
    try:
        bot.down = True
        _queue(store, _alarm(1), _alarm(2), _alarm(3))
        fb.step()
        assert bot.bodies() == [] and fb.stats["failed:http_status"] == 1 and len(fb.waiting) == 3
        bot.down = False
        fb.step()
        assert bot.bodies() == []  # waits out its backoff
        fb.retry_at = 0.0
        fb.step()
        assert len(bot.bodies()) == 2 and len(fb.waiting) == 1  # two a minute
        fb.stop()
    finally:
        bot.stop()


# --- real processes --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_an_agent_cut_off_from_the_county_tells_the_site_once_and_the_gateway_does_not_repeat_it(
    mosquitto, tmp_path, procs
) -> None:
    bot = Bot("webhook", secret="s3cret")
    county = Mosquitto(tmp_path / "county")
    county.start()
    procs.append(county)
    link = Link(county.port)  # down: the county is unreachable
    procs.append(link)
    exporter_port = free_port()
    config = agent_config(tmp_path, mosquitto.port, link.port, exporter_port, fallback(bot))
    agents = [launch_agent(config, exporter_port, mosquitto.port)]
    agent = agents[0]
    try:
        agent.publish("z2m/door", {"contact": False, "battery": 90})
        until(lambda: door_messages(bot), 30, "the direct message")
        [direct] = door_messages(bot)
        alarm_id = direct["thread"]
        assert direct["kind"] == "raised" and direct["key"] == f"{alarm_id}:direct:2"
        assert direct["title"] == "【县级平台无法连接·考场直报】【二级】s1 保密室 door：保密室门在非开启时段被打开"
        assert "连不上县级平台" in direct["text"] and "**处置**：" in direct["text"]
        # the bot has the message before the agent has its answer and counts it: wait for the count, not a moment
        until(lambda: agent.sample("examwatch_fallback_sent_total") == 1.0, 10, "the direct send counted")
        assert agent.sample("examwatch_fallback_waiting") == 0.0

        # A restart remembers what it told: the alarm is still waiting in the outbox, and is not sent again.
        agent.close()
        agent = launch_agent(config, exporter_port, mosquitto.port, ready=("agent_started", "fallback_armed"))
        agents.append(agent)
        armed = next(json.loads(line) for line in agent.log if '"fallback_armed"' in line)
        assert armed["told_before"] == 1, [b["title"] for b in bot.bodies()]
        time.sleep(2 + 3)  # past ``after`` and a few of the fallback's steps
        assert len(door_messages(bot)) == 1

        # The county comes back with a gateway whose channel is the same group: it records, but does not repeat.
        gw = GatewayProc(tmp_path, county.port, ["s1/r1"], extra=webhook_channels(("site", bot)))
        start(procs, gw)
        watcher = publisher(county.port)
        until_subscribed(gw, watcher)
        link.up()
        until(
            lambda: gw.query("SELECT 1 FROM notify_timeline WHERE thread = ? AND what = 'direct'", alarm_id),
            30,
            "the gateway planned the raise",
        )
        stored = json.loads(
            gw.query("SELECT event FROM alarm_events WHERE alarm_id = ? AND state = 'raised'", alarm_id)[0][0]
        )
        assert stored["notified"] == ["site"]
        assert gw.query("SELECT key FROM notify_outbox WHERE channel = 'site' AND thread = ?", alarm_id) == []

        # Acknowledged and cleared through the gateway: both reach the same channel, after anything queued
        # before them for it (a repeated raise would come first).
        assert gw.post("/api/v1/ack", {"alarm": alarm_id, "who": "张老师", "note": "已到场关门"}, gw.token)[0] == 200
        until(lambda: gw.query("SELECT 1 FROM notify_timeline WHERE thread = ? AND what = 'acked'", alarm_id), 30)
        agent.publish("z2m/door", {"contact": True})
        until(lambda: any(m["kind"] == "cleared" for m in door_messages(bot)), 30, "the clear")
        assert [m["key"] for m in door_messages(bot)] == [
            f"{alarm_id}:direct:2",
            f"{alarm_id}:acked",
            f"{alarm_id}:cleared",
        ]

        # The notifier's record over the API: who was told what, and when.
        done = gw.get(f"/api/v1/notifications?{urlencode({'id': alarm_id})}")
        assert done["id"] == alarm_id
        assert [(e["what"], e["detail"]) for e in done["timeline"]] == [
            ("direct", "考场终端已直接通知：site"),
            ("acked", "张老师：已到场关门"),
            ("resolved", ""),
        ]
        assert [(m["channel"], m["kind"], m["attempts"], m["error"]) for m in done["messages"]] == [
            ("site", "acked", 1, None),
            ("site", "cleared", 1, None),
        ]
        assert all(m["queued"] <= m["sent"] for m in done["messages"])
        assert gw.get("/api/v1/notifications?id=nothing-like-it") == {
            "id": "nothing-like-it",
            "timeline": [],
            "messages": [],
        }
        watcher.loop_stop()
    finally:
        for a in agents:
            a.close()
        bot.stop()


@pytest.mark.integration
def test_without_enabled_the_agent_never_sends_itself(mosquitto, tmp_path) -> None:
    bot = Bot("webhook", secret="s3cret")
    link = Link(free_port())  # never up
    exporter_port = free_port()
    config = agent_config(tmp_path, mosquitto.port, link.port, exporter_port, fallback(bot, enabled=""))
    agent = launch_agent(config, exporter_port, mosquitto.port)
    try:
        agent.publish("z2m/door", {"contact": False, "battery": 90})
        until(lambda: agent.alarm_exported("secrecy_door_open", 2), 10, "the alarm raised")
        time.sleep(2 + 3)  # what ``after`` and the fallback's steps would take if it were on
        assert bot.bodies() == []
        assert not any('"fallback_armed"' in line for line in agent.log)
        assert agent.sample("examwatch_fallback_sent_total") is None
        assert not (tmp_path / "state" / "fallback.db").exists()
    finally:
        agent.close()
        bot.stop()
