"""When the rules next need the clock: the agent's writer sleeps until then instead of evaluating every second
(issue 13: an idle agent's CPU), so a moment missed here is an alarm raised late."""

from __future__ import annotations

import math

from examwatch.rules.config import Schedule
from examwatch.rules.schedule import Calendar
from tests.support import Driver, config
from tests.test_rules_schedule import MONITORING, at, w


def test_phase_and_window_never_change_before_the_next_change() -> None:
    s = Schedule(
        sessions=MONITORING.sessions,
        before_days=MONITORING.before_days,
        after_hours=MONITORING.after_hours,
        secrecy_windows=[w("2024-05-28T07:30", "2024-05-28T08:00"), w("2024-05-28T13:10", "2024-05-28T13:30")],
    )
    cal = Calendar(s)
    changes = 0
    t = at("2024-05-24T00:00")
    while t < at("2024-05-30T12:00"):
        nxt = cal.next_change(t)
        assert nxt > t
        if math.isfinite(nxt):
            before = nxt - 0.001
            assert (cal.phase(before), cal.in_window(before)) == (cal.phase(t), cal.in_window(t)), t
        t += 60.0
        changes += (cal.phase(t), cal.in_window(t)) != (cal.phase(t - 60.0), cal.in_window(t - 60.0))
    assert changes >= 10  # the walk did cross the phases and the windows
    assert Calendar(Schedule()).next_change(0.0) == math.inf


def test_a_for_timer_is_due_when_it_runs_out_and_raises_then_not_before() -> None:
    start = at("2024-05-28T08:30")
    d = Driver(config({"rec": "recorder"}, schedule=MONITORING, interval=100.0))
    t0 = start + 60
    d.feed("rec", "recording_active", 0, t0)  # recording_stopped: for = 30, level 1 during a session
    assert d.engine.next_due(d.state, t0) == t0 + 30
    assert d.tick(t0 + 29.99) == []
    assert [(e.rule, e.state) for e in d.tick(t0 + 30)] == [("recording_stopped", "raised")]
    # nothing pending now: the device falling silent (3 intervals) or the session's end, whichever is first
    assert d.engine.next_due(d.state, t0 + 30) == min(t0 + 300, at("2024-05-28T09:50"))


def test_a_silent_device_is_due_three_intervals_after_it_last_spoke() -> None:
    d = Driver(config({"rec": "recorder"}, interval=10.0))
    d.feed("rec", "recording_active", 1, 1000.0)
    assert d.engine.next_due(d.state, 1000.0) == 1030.0
    assert d.tick(1029.9) == []
    assert [(e.rule, e.state) for e in d.tick(1030.0)] == [("device_silent", "raised")]


def test_a_device_that_keeps_speaking_moves_its_silence_on_and_the_writer_sleeps_to_it() -> None:
    """Each reading puts the device's silence three intervals after it, at once: the writer sleeps to that
    moment, not to the deadline the first reading set (a wake a few polls later that sweeps for nothing)."""
    d = Driver(config({"rec": "recorder", "cam": "camera"}, interval=1.0))
    d.feed("cam", "device_online", 1, 1000.0)
    for t in (1000.0, 1001.0, 1002.0, 1003.0, 1004.5):
        d.feed("rec", "device_online", 1, t)
        d.feed("cam", "device_online", 1, t)
        assert d.engine.next_due(d.state, t) == t + 3.0
    d.feed("rec", "device_online", 1, 1005.5)  # the camera stays quiet: its silence is the next
    assert d.engine.next_due(d.state, 1005.5) == 1007.5
    assert [(e.device, e.state) for e in d.tick(1007.5)] == [("cam", "raised")]
    assert d.engine.next_due(d.state, 1007.5) == 1008.5  # the recorder's; the camera's is raised


def test_a_timer_whose_level_is_off_waits_for_the_phase_not_the_clock() -> None:
    d = Driver(config({"rec": "recorder"}, schedule=MONITORING, interval=1e6))
    lunch = at("2024-05-28T12:00")  # between sessions: recording_stopped is level 0
    d.feed("rec", "recording_active", 0, lunch)
    d.tick(lunch + 60)  # its 30 s are over, but nothing may be raised until the afternoon session
    assert d.engine.next_due(d.state, lunch + 60) == at("2024-05-28T14:00")
    assert [(e.rule, e.state) for e in d.tick(at("2024-05-28T14:00"))] == [("recording_stopped", "raised")]
