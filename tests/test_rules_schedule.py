"""Exam phases and secrecy windows, from the schedule's local times."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from examwatch.rules.config import Schedule, Window
from examwatch.rules.schedule import PHASES, Calendar, in_window, phase_at

SH = ZoneInfo("Asia/Shanghai")


def at(text: str, tz: ZoneInfo = SH) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def w(start: str, end: str) -> Window:
    return Window(start=datetime.fromisoformat(start), end=datetime.fromisoformat(end))


# The 2024 monitoring day (DOMAIN.md) plus the PE tests next morning: a two-day exam.
MONITORING = Schedule(
    sessions=[
        w("2024-05-28T08:30", "2024-05-28T09:50"),
        w("2024-05-28T10:20", "2024-05-28T11:40"),
        w("2024-05-28T14:00", "2024-05-28T14:30"),
        w("2024-05-29T09:00", "2024-05-29T10:00"),
    ],
    before_days=3,
    after_hours=12,
)


@pytest.mark.parametrize(
    ("moment", "phase"),
    [
        ("2024-05-20T10:00", "idle"),  # more than 3 days ahead
        ("2024-05-25T08:31", "before"),  # 3 days before the first session
        ("2024-05-28T07:59", "before"),
        ("2024-05-28T08:30", "during"),  # a session's start is inside it
        ("2024-05-28T09:49:59", "during"),
        ("2024-05-28T09:50", "between"),  # its end is not
        ("2024-05-28T12:00", "between"),  # lunch
        ("2024-05-28T14:15", "during"),
        ("2024-05-28T22:00", "between"),  # the night of a multi-day exam
        ("2024-05-29T08:59", "between"),
        ("2024-05-29T09:30", "during"),
        ("2024-05-29T10:00", "after"),
        ("2024-05-29T21:59", "after"),
        ("2024-05-29T22:00", "idle"),  # after_hours = 12 over
    ],
)
def test_phases_of_a_two_day_exam(moment: str, phase: str) -> None:
    assert phase_at(MONITORING, at(moment)) == phase


def test_days_apart_are_separate_exams_after_then_before() -> None:
    s = Schedule(
        sessions=[w("2024-06-07T09:00", "2024-06-07T11:30"), w("2024-06-12T09:00", "2024-06-12T11:00")],
        before_days=3,
        after_hours=24,
    )
    cal = Calendar(s)
    assert cal.phase(at("2024-06-07T20:00")) == "after"
    assert cal.phase(at("2024-06-08T12:00")) == "idle"
    assert cal.phase(at("2024-06-09T10:00")) == "before"
    assert cal.phase(at("2024-06-12T10:00")) == "during"


def test_no_sessions_is_always_idle() -> None:
    assert phase_at(Schedule(), at("2024-05-28T09:00")) == "idle"


def test_schedule_times_are_read_in_the_schedules_time_zone() -> None:
    berlin = Schedule(timezone="Europe/Berlin", sessions=[w("2024-05-28T08:30", "2024-05-28T09:50")])
    shanghai = Schedule(timezone="Asia/Shanghai", sessions=[w("2024-05-28T08:30", "2024-05-28T09:50")])
    moment = at("2024-05-28T09:00", ZoneInfo("Europe/Berlin"))  # 15:00 in Shanghai
    assert phase_at(berlin, moment) == "during"
    assert phase_at(shanghai, moment) != "during"


def test_overlapping_sessions_merge() -> None:
    s = Schedule(sessions=[w("2024-05-28T08:30", "2024-05-28T10:00"), w("2024-05-28T09:00", "2024-05-28T09:30")])
    assert phase_at(s, at("2024-05-28T09:45")) == "during"


def test_secrecy_windows() -> None:
    windows = [w("2024-05-28T07:30", "2024-05-28T08:00"), w("2024-05-28T11:40", "2024-05-28T12:10")]
    assert in_window(windows, at("2024-05-28T07:45"))
    assert not in_window(windows, at("2024-05-28T08:00"))
    assert not in_window(windows, at("2024-05-28T03:00"))
    assert in_window(windows, at("2024-05-28T12:00"))
    assert not in_window([], at("2024-05-28T12:00"))
    utc = at("2024-05-27T23:45", ZoneInfo("UTC"))  # 07:45 in Shanghai
    assert in_window(windows, utc, "Asia/Shanghai") and not in_window(windows, utc, "UTC")


def test_phase_names() -> None:
    assert PHASES == ("before", "during", "between", "after", "idle")
