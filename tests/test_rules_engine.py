"""The evaluator against the default pack: thresholds, hysteresis, for, silence, phases, overrides, restore."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from examwatch.kernel.model import Reading
from examwatch.rules.config import RuleOverride, Schedule, Window
from examwatch.rules.engine import build_engine
from examwatch.rules.model import Rule
from examwatch.rules.pack import DEFAULT_RULES, effective_rules, load_pack, override_issues
from tests.support import Driver, config

SH = ZoneInfo("Asia/Shanghai")


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=SH).timestamp()


def w(start: str, end: str) -> Window:
    return Window(start=datetime.fromisoformat(start), end=datetime.fromisoformat(end))


HOURLY = 3600.0  # report interval for tests that span minutes: keeps the silence rule out of them

EXAM_DAY = Schedule(
    sessions=[w("2024-05-28T08:30", "2024-05-28T09:50"), w("2024-05-28T10:20", "2024-05-28T11:40")],
    secrecy_windows=[w("2024-05-28T07:30", "2024-05-28T08:00")],
)


# --- thresholds, hysteresis, for ---


def test_battery_low_raises_once_and_clears_past_the_clear_value() -> None:
    d = Driver(config({"rec1": "recorder"}))
    (e,) = d.feed("rec1", "battery_percent", 15, 100)
    assert (e.state, e.rule, e.level, e.device, e.value, e.at, e.since) == (
        "raised",
        "recorder_battery_low",
        1,
        "rec1",
        15,
        100,
        100,
    )
    assert "第一中学 第3考场 rec1" in e.message and "录音笔电量低" in e.message and "15%" in e.message
    assert "启用备用录音笔" in e.action and "5 分钟内" in e.action
    assert d.feed("rec1", "battery_percent", 10, 101) == []  # still low: nothing new
    assert d.feed("rec1", "battery_percent", 25, 102) == []  # inside the band: stays raised
    (c,) = d.feed("rec1", "battery_percent", 30, 103)
    assert (c.state, c.id, c.raised_at, c.at) == ("cleared", e.id, 100, 103)
    assert "已恢复" in c.message
    assert d.active() == {}


def test_ids_are_stable_per_occurrence_and_new_for_the_next() -> None:
    d = Driver(config({"rec1": "recorder"}))
    first = d.feed("rec1", "battery_percent", 15, 100)[0].id
    assert d.feed("rec1", "battery_percent", 50, 110)[0].id == first
    second = d.feed("rec1", "battery_percent", 15, 120)[0].id
    assert second != first and "yz1/r3" in second and "recorder_battery_low" in second and "rec1" in second


def test_link_down_needs_ten_seconds_and_fires_on_a_tick() -> None:
    d = Driver(config({"wan": "link"}))
    assert d.feed("wan", "link_up", 0, 100) == []
    assert d.tick(109.5) == []
    (e,) = d.tick(110)
    assert (e.rule, e.since, e.at, e.level) == ("link_down", 100, 110, 1)
    assert "切换备用线路" in e.action
    (c,) = d.feed("wan", "link_up", 1, 111)
    assert c.state == "cleared"


def test_a_break_in_the_condition_restarts_the_for_timer() -> None:
    d = Driver(config({"wan": "link"}))
    d.feed("wan", "link_up", 0, 100)
    d.feed("wan", "link_up", 1, 105)
    d.feed("wan", "link_up", 0, 106)
    assert d.tick(115) == []
    assert [e.since for e in d.tick(116)] == [106]


def test_for_is_judged_at_each_readings_time_in_a_batch() -> None:
    d = Driver(config({"wan": "link"}))
    batch = [Reading("wan", "link_up", 0, 100), Reading("wan", "link_up", 1, 105)]
    assert d.run(batch, 130) == []  # the link was down 5 s, although `now` is 30 s later
    assert d.active() == {}


def test_switch_ports_inherit_the_switch_kind_and_alarm_separately() -> None:
    d = Driver(config({"sw1": "switch"}))
    d.run([Reading("sw1/port3", "link_up", 0, 100), Reading("sw1/port4", "link_up", 1, 100)], 100)
    (e,) = d.tick(110)
    assert e.device == "sw1/port3" and e.rule == "link_down"


def test_unknown_devices_bad_quality_and_nan_are_ignored() -> None:
    d = Driver(config({"rec1": "recorder"}))
    assert d.run([Reading("ghost", "battery_percent", 1, 100)], 100) == []
    assert d.run([Reading("rec1", "battery_percent", 1, 100, "bad")], 100) == []
    assert d.run([Reading("rec1", "battery_percent", float("nan"), 100)], 100) == []
    assert d.active() == {}


def test_evaluate_leaves_the_given_state_untouched() -> None:
    d = Driver(config({"rec1": "recorder"}))
    before = d.state
    d.feed("rec1", "battery_percent", 15, 100)
    assert before.tracks == {} and before.pending == frozenset()
    again, events = d.engine.evaluate(before, [Reading("rec1", "battery_percent", 15, 100)], 100)
    assert len(events) == 1 and again.open_alarms()[0].id == events[0].id


# --- availability and silence ---


def test_device_offline_reading_raises_availability() -> None:
    d = Driver(config({"cam1": "camera"}))
    (e,) = d.feed("cam1", "device_online", 0, 100)
    assert (e.rule, e.level) == ("device_offline", 1)
    assert "摄像机离线" in e.message
    assert d.feed("cam1", "device_online", 1, 101)[0].state == "cleared"


def test_a_device_never_heard_is_silent_counted_from_engine_start() -> None:
    d = Driver(config({"noise1": "noise"}, interval=10))
    assert d.tick(1000) == []
    assert d.tick(1029) == []
    (e,) = d.tick(1030)  # 3 x interval
    assert (e.rule, e.since, e.metric) == ("device_silent", 1000, None)
    assert "30 秒无数据" in e.message and "应每 10 秒上报" in e.message
    (c,) = d.feed("noise1", "noise_db", 40, 1031)
    assert (c.state, c.id) == ("cleared", e.id)


def test_silence_counts_from_the_last_reading_even_from_a_part() -> None:
    d = Driver(config({"sw1": "switch"}, interval=5))
    d.tick(0)
    d.feed("sw1/port1", "link_up", 1, 10)
    assert d.tick(24) == []
    assert [e.rule for e in d.tick(25)] == ["device_silent"]


def test_a_device_can_fall_silent_again_after_it_spoke() -> None:
    d = Driver(config({"mic": "noise"}, interval=10))
    d.tick(0)
    first = d.tick(30)
    d.feed("mic", "noise_db", 40, 31)
    assert d.tick(60) == []
    second = d.tick(61)
    assert [e.rule for e in first + second] == ["device_silent", "device_silent"]
    assert first[0].id != second[0].id


def test_a_device_silent_while_its_rule_is_off_is_watched_again_once_it_spoke() -> None:
    quiet_before = {"device_silent": RuleOverride(levels={"before": 0})}
    d = Driver(config({"mic": "noise"}, interval=10, rules=quiet_before, schedule=EXAM_DAY))
    t = at("2024-05-28T08:30")  # the first session starts: the rule is on
    d.tick(t - 3600)  # "before": off
    assert d.tick(t - 1800) == []
    assert [e.rule for e in d.tick(t)] == ["device_silent"]  # the phase changed: the silence counts now
    d.feed("mic", "noise_db", 40, t + 1)
    assert d.tick(t + 30) == []
    assert [e.rule for e in d.tick(t + 31)] == ["device_silent"]


def test_host_is_not_watched_for_silence() -> None:
    d = Driver(config({"host": "host"}))
    d.tick(0)
    assert d.tick(10_000) == []


# --- the secrecy room ---


def test_secrecy_room_door_outside_a_window_is_level_2() -> None:
    d = Driver(config({"door1": "door"}, room_kind="secrecy_room", schedule=EXAM_DAY, interval=HOURLY))
    (e,) = d.feed("door1", "door_open", 1, at("2024-05-28T03:00"))
    assert (e.rule, e.level) == ("secrecy_door_open", 2)
    assert "双人核查" in e.action and "10 分钟内报告领导小组" in e.action
    assert d.feed("door1", "door_open", 0, at("2024-05-28T03:01"))[0].state == "cleared"


def test_secrecy_room_door_inside_a_window_says_nothing() -> None:
    d = Driver(config({"door1": "door"}, room_kind="secrecy_room", schedule=EXAM_DAY, interval=HOURLY))
    assert d.feed("door1", "door_open", 1, at("2024-05-28T07:40")) == []
    assert d.feed("door1", "door_open", 0, at("2024-05-28T07:50")) == []
    assert d.active() == {}


def test_secrecy_door_left_open_past_the_window_raises_at_its_end() -> None:
    d = Driver(config({"door1": "door"}, room_kind="secrecy_room", schedule=EXAM_DAY, interval=HOURLY))
    d.feed("door1", "door_open", 1, at("2024-05-28T07:55"))
    (e,) = d.tick(at("2024-05-28T08:00"))
    assert e.rule == "secrecy_door_open" and e.since == at("2024-05-28T07:55")


def test_doors_in_exam_rooms_raise_nothing() -> None:
    d = Driver(config({"door1": "door"}, schedule=EXAM_DAY, interval=HOURLY))
    assert d.feed("door1", "door_open", 1, at("2024-05-28T03:00")) == []


def test_secrecy_sensor_silent_and_offline_replace_the_generic_rules() -> None:
    d = Driver(config({"door1": "door", "ups1": "ups"}, room_kind="secrecy_room", interval=10))
    d.tick(0)
    events = d.tick(30)
    assert sorted((e.rule, e.device, e.level) for e in events) == [
        ("device_silent", "ups1", 1),
        ("secrecy_sensor_silent", "door1", 2),
    ]
    cleared, e = d.feed("door1", "device_online", 0, 31)  # it speaks (to say it is offline)
    assert (cleared.rule, cleared.state) == ("secrecy_sensor_silent", "cleared")
    assert (e.rule, e.level) == ("secrecy_sensor_offline", 2)
    assert "保密室门磁离线" in e.message


def test_disabling_the_secrecy_rule_brings_back_the_generic_one() -> None:
    cfg = config(
        {"door1": "door"}, room_kind="secrecy_room", rules={"secrecy_sensor_offline": RuleOverride(enabled=False)}
    )
    d = Driver(cfg)
    assert [(e.rule, e.level) for e in d.feed("door1", "device_online", 0, 1)] == [("device_offline", 1)]


# --- phases ---


def test_noise_counts_during_a_session_not_between() -> None:
    d = Driver(config({"mic": "noise"}, schedule=EXAM_DAY, interval=HOURLY))
    t = at("2024-05-28T10:00")  # between the two sessions
    d.feed("mic", "noise_db", 80, t)
    assert d.tick(t + 60) == []
    d.feed("mic", "noise_db", 50, t + 120)
    t = at("2024-05-28T10:30")  # during the second
    assert d.feed("mic", "noise_db", 80, t) == []
    assert d.tick(t + 29) == []
    (e,) = d.tick(t + 30)
    assert (e.rule, e.level, e.phase) == ("noise_high", 1, "during")
    assert "80 dB" in e.message and "70 dB" in e.message


def test_noise_alarm_clears_when_the_session_ends_and_returns_with_the_next() -> None:
    d = Driver(config({"mic": "noise"}, schedule=EXAM_DAY, interval=HOURLY))
    t = at("2024-05-28T09:00")
    d.feed("mic", "noise_db", 80, t)
    d.tick(t + 30)
    assert d.active() == {("noise_high", "mic"): 1}
    (c,) = d.tick(at("2024-05-28T09:50"))
    assert (c.state, c.phase) == ("cleared", "between")
    assert d.active() == {}
    (again,) = d.tick(at("2024-05-28T10:20"))  # still loud as the next session starts
    assert (again.state, again.since) == ("raised", t) and again.id != c.id


def test_ups_on_battery_is_level_2_during_a_session_and_updates_at_its_end() -> None:
    d = Driver(config({"ups1": "ups"}, schedule=EXAM_DAY, interval=HOURLY))
    (e,) = d.feed("ups1", "power_on_battery", 1, at("2024-05-28T09:40"))
    assert (e.level, e.phase) == (2, "during")
    (u,) = d.tick(at("2024-05-28T09:50"))
    assert (u.state, u.level, u.id, u.phase) == ("updated", 1, e.id, "between")
    assert "调整为一级" in u.message and "10 分钟内" not in u.action
    (u2,) = d.tick(at("2024-05-28T10:20"))
    assert (u2.state, u2.level) == ("updated", 2)


def test_nvr_disk_failure_level_depends_on_phase() -> None:
    d = Driver(config({"nvr1": "nvr"}, schedule=EXAM_DAY, interval=HOURLY))
    assert d.feed("nvr1", "storage_ok", 0, at("2024-05-28T07:00"))[0].level == 1
    d2 = Driver(config({"nvr1": "nvr"}, schedule=EXAM_DAY, interval=HOURLY))
    assert d2.feed("nvr1", "storage_ok", 0, at("2024-05-28T09:00"))[0].level == 2


# --- overrides ---


def test_override_threshold_and_clear() -> None:
    d = Driver(config({"rec1": "recorder"}, rules={"recorder_battery_low": RuleOverride(threshold=40, clear=50)}))
    assert d.feed("rec1", "battery_percent", 35, 1)[0].state == "raised"
    assert d.feed("rec1", "battery_percent", 45, 2) == []
    assert d.feed("rec1", "battery_percent", 50, 3)[0].state == "cleared"


def test_override_disabled() -> None:
    d = Driver(config({"rec1": "recorder"}, rules={"recorder_battery_low": RuleOverride(enabled=False)}))
    assert d.feed("rec1", "battery_percent", 1, 1) == []


def test_override_for() -> None:
    d = Driver(config({"wan": "link"}, rules={"link_down": RuleOverride(for_=0)}))
    assert [e.rule for e in d.feed("wan", "link_up", 0, 1)] == ["link_down"]


def test_override_levels_per_phase_merge_with_the_packs() -> None:
    cfg = config(
        {"mic": "noise"},
        schedule=EXAM_DAY,
        interval=HOURLY,
        rules={"noise_high": RuleOverride(levels={"during": 2, "between": 1})},
    )
    (rule,) = [r for r in build_engine(cfg.agent, cfg.devices, cfg.rules, cfg.schedule).rules if r.id == "noise_high"]
    assert rule.levels == {"during": 2, "between": 1}
    d = Driver(cfg)
    t = at("2024-05-28T10:00")
    d.feed("mic", "noise_db", 80, t)
    assert d.tick(t + 30)[0].level == 1
    (u,) = d.tick(at("2024-05-28T10:20"))
    assert (u.state, u.level) == ("updated", 2)


def test_override_that_breaks_hysteresis_is_reported() -> None:
    bad = {"recorder_battery_low": RuleOverride(threshold=20, clear=10)}
    assert [p for p, _ in override_issues(bad)] == [("rules", "recorder_battery_low")]
    with pytest.raises(ValueError, match="recorder_battery_low"):
        cfg = config({}, rules=bad)
        build_engine(cfg.agent, cfg.devices, cfg.rules, cfg.schedule)


def test_effective_rules_drop_disabled_ones() -> None:
    ids = {r.id for r in effective_rules({"noise_high": RuleOverride(enabled=False)})}
    assert "noise_high" not in ids and len(ids) == len(DEFAULT_RULES) - 1


# --- restore ---


def test_restore_neither_reraises_nor_forgets_to_clear() -> None:
    d = Driver(config({"rec1": "recorder"}))
    (e,) = d.feed("rec1", "battery_percent", 15, 100)
    after = Driver(config({"rec1": "recorder"}), d.engine.restore([e]))
    assert after.feed("rec1", "battery_percent", 12, 200) == []
    (c,) = after.feed("rec1", "battery_percent", 80, 201)
    assert (c.state, c.id, c.raised_at) == ("cleared", e.id, 100)


def test_restore_keeps_a_silent_device_alarmed_until_it_speaks() -> None:
    d = Driver(config({"mic": "noise"}))
    d.tick(0)
    (e,) = d.tick(30)
    after = Driver(config({"mic": "noise"}), d.engine.restore([e]))
    assert after.tick(1000) == []
    assert after.tick(1040) == []  # not raised again
    (c,) = after.feed("mic", "noise_db", 40, 1041)
    assert (c.state, c.id) == ("cleared", e.id)


def test_restore_relevels_for_the_current_phase() -> None:
    d = Driver(config({"ups1": "ups"}, schedule=EXAM_DAY, interval=HOURLY))
    (e,) = d.feed("ups1", "power_on_battery", 1, at("2024-05-28T09:00"))
    after = Driver(config({"ups1": "ups"}, schedule=EXAM_DAY, interval=HOURLY), d.engine.restore([e]))
    (u,) = after.tick(at("2024-05-28T13:00"))
    assert (u.state, u.level, u.id) == ("updated", 1, e.id)


def test_restore_clears_alarms_whose_rule_or_device_is_gone() -> None:
    d = Driver(config({"rec1": "recorder"}))
    (e,) = d.feed("rec1", "battery_percent", 15, 100)
    after = Driver(config({"rec1": "recorder"}, rules={"recorder_battery_low": RuleOverride(enabled=False)}))
    after.state = after.engine.restore([e])
    (c,) = after.tick(200)
    assert (c.state, c.id) == ("cleared", e.id) and "规则已停用" in c.message
    assert after.tick(201) == []


# --- the pack ---


def test_pack_covers_the_plans_risks() -> None:
    ids = {r.id for r in DEFAULT_RULES}
    assert {
        "recorder_battery_low",
        "camera_battery_low",
        "recorder_storage_full",
        "camera_storage_full",
        "nvr_disk_failed",
        "ups_on_battery",
        "ups_runtime_low",
        "ups_battery_low",
        "ups_fault",
        "link_down",
        "link_loss_high",
        "secrecy_door_open",
        "secrecy_sensor_silent",
        "secrecy_sensor_offline",
        "noise_high",
        "device_offline",
        "device_silent",
        "host_disk_low",
        "host_cpu_hot",
        "outbox_nearly_full",
    } <= ids
    for r in DEFAULT_RULES:
        assert r.title and r.action, r.id


@pytest.mark.parametrize(
    ("device", "kind", "metric", "value", "rule", "level"),
    [
        ("ups1", "ups", "ups_runtime_seconds", 300, "ups_runtime_low", 2),
        ("ups1", "ups", "ups_battery_low", 1, "ups_battery_low", 2),
        ("ups1", "ups", "ups_fault", 1, "ups_fault", 1),
        ("cam1", "camera", "storage_used_ratio", 0.95, "camera_storage_full", 1),
        ("rec1", "recorder", "storage_used_ratio", 0.95, "recorder_storage_full", 1),
        ("host", "host", "storage_used_ratio", 0.95, "host_disk_low", 1),
        ("host", "host", "outbox_used_ratio", 0.85, "outbox_nearly_full", 1),
        ("host", "host", "store_corrupt", 1, "agent_store_corrupt", 1),
    ],
)
def test_pack_rules_fire(device: str, kind: str, metric: str, value: float, rule: str, level: int) -> None:
    d = Driver(config({device: kind}))
    assert [(e.rule, e.level) for e in d.feed(device, metric, value, 1)] == [(rule, level)]


def test_cpu_temperature_and_link_loss_wait_for_their_duration() -> None:
    d = Driver(config({"host": "host", "wan": "link"}, interval=HOURLY))
    d.run([Reading("host", "cpu_temperature_celsius", 85, 0), Reading("wan", "link_loss_ratio", 0.5, 0)], 0)
    assert [e.rule for e in d.tick(30)] == ["link_loss_high"]
    assert [e.rule for e in d.tick(60)] == ["host_cpu_hot"]


def test_a_broken_pack_names_every_problem() -> None:
    text = """
[[rules]]
id = "a"
title = "x"
metric = "no_such_metric"
[[rules]]
id = "a"
title = "y"
kinds = ["toaster"]
metric = "noise_db"
op = ">"
threshold = 70
clear = 75
levels = { lunch = 1 }
"""
    with pytest.raises(ValueError) as err:
        load_pack(text)
    for part in ("no_such_metric", "toaster", "raising side", "lunch", "used twice"):
        assert part in str(err.value)


def test_rule_clears_is_the_far_side_of_clear() -> None:
    r = Rule(id="x", title="x", metric="noise_db", op=">", threshold=70, clear=65)
    assert r.holds(70.1) and not r.holds(70)
    assert not r.clears(65.1) and r.clears(65)


# --- the wall clock steps (a Pi without a real-time clock, NTP setting it) ---

DAY = 86_400.0


@pytest.mark.parametrize("step", [DAY, -DAY])
def test_a_clock_step_rebased_raises_no_silence_and_keeps_counting_real_seconds(step: float) -> None:
    d = Driver(config({"door": "door"}, room_kind="secrecy_room", interval=10))
    d.tick(1000)
    d.feed("door", "door_open", 0, 1005)
    d.state = d.engine.rebase(d.state, step)  # the runtime saw wall - monotonic change by ``step``
    t = 1010 + step
    assert d.tick(t) == []  # 5 real seconds, not a day (+) nor "never" (-)
    d.feed("door", "door_open", 0, t + 10)
    assert d.tick(t + 39) == []
    (e,) = d.tick(t + 40)  # 30 real seconds after its last reading: silent, on time
    assert (e.rule, e.since) == ("secrecy_sensor_silent", t + 10)


def test_a_for_duration_rebased_counts_real_seconds_across_a_step() -> None:
    d = Driver(config({"mic": "noise"}, interval=HOURLY, schedule=EXAM_DAY))
    t = at("2024-05-28T09:00")  # during a session: noise_high holds for 30 s before it is raised
    d.feed("mic", "noise_db", 80, t)
    d.state = d.engine.rebase(d.state, 600)  # still inside the session
    assert d.feed("mic", "noise_db", 80, t + 600 + 10) == []  # 10 real seconds, not 10 minutes
    assert [e.rule for e in d.feed("mic", "noise_db", 80, t + 600 + 30)] == ["noise_high"]


def test_a_first_reading_stamped_before_a_forward_step_does_not_date_the_device_back() -> None:
    """The runtime moves what it took with the step (``across_step``); one it missed still must not make a
    device never heard before silent for a day: its silence counts from the start, as if never heard."""
    d = Driver(config({"door": "door"}, room_kind="secrecy_room", interval=10))
    d.tick(1000)
    d.state = d.engine.rebase(d.state, DAY)
    assert d.run([Reading("door", "door_open", 0, 1005)], DAY + 1006) == []  # stamped on the old clock
    assert d.tick(DAY + 1029) == []
    (e,) = d.tick(DAY + 1030)  # 30 real seconds after the start
    assert (e.rule, e.since) == ("secrecy_sensor_silent", DAY + 1000)


def test_a_reading_stamped_before_the_clock_stepped_back_counts_as_seen_now() -> None:
    d = Driver(config({"door": "door"}, room_kind="secrecy_room", interval=10))
    d.tick(DAY)
    d.state = d.engine.rebase(d.state, -DAY)
    d.run([Reading("door", "door_open", 0, DAY + 1)], 2)  # queued just before the step
    assert d.state.last_seen["door"] == 2
    assert [e.rule for e in d.tick(32)] == ["secrecy_sensor_silent"]  # not a day later
