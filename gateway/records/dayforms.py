"""The exam day's forms: the county's and each school's incident report (县级 / 校级应急事件报告表) and the
day log of every alarm and acknowledgement. Pure, like forms.py."""

from __future__ import annotations

from collections import Counter

from examwatch.gateway.records.facts import ALARMS_MAX, Alarm, Day
from examwatch.gateway.records.forms import (
    ALARM_STATES,
    CATEGORIES,
    LEVELS,
    Clock,
    Field,
    Form,
    Table,
    clean,
    device,
    fault,
    people,
)


class DayClock(Clock):
    """The day's own times as HH:MM:SS (the form names the day), any other as the full date and time."""

    def __init__(self, clock: Clock, d: Day) -> None:
        super().__init__(clock.tz)
        self.start, self.end = d.start, d.end

    def __call__(self, ts: float | None) -> str:
        if ts is not None and self.start <= ts < self.end:
            return self.hms(ts)
        return super().__call__(ts)


def _counts(alarms: list[Alarm]) -> str:
    by = Counter(a.row["level"] for a in alarms)
    parts = "，".join(f"{LEVELS.get(lv, lv)} {by[lv]}" for lv in sorted(by))
    return f"{len(alarms)} 条" + (f"（{parts}）" if parts else "")


def _handled(a: Alarm, clock: Clock) -> tuple[str, str]:
    """Who acknowledged and when, or what is missing."""
    ack = next((n for n in a.notes if n["category"] == "ack"), None)
    if ack is None:
        return "未确认", ""
    return clean(ack["who"], 64), clock(ack["at"])


def _recovered(a: Alarm, clock: Clock) -> str:
    return clock(a.row["cleared_at"]) if a.row["cleared_at"] is not None else "尚未恢复"


def county(d: Day, clock: Clock, county_name: str) -> Form:
    """The county's form: its sites and rooms, the day's counts, every incident and level-2+ alarm."""
    clock = DayClock(clock, d)
    rooms = sum(len(r) for r in d.sites.values())
    rows: list[tuple[str, ...]] = [
        (
            clock(inc.opened_at),
            inc.site,
            "、".join(inc.rooms),
            clean(inc.title, 200),
            LEVELS.get(inc.level, ""),
            _incident_ack(inc.notes, clock),
            clock(inc.closed_at) if inc.closed_at is not None else "尚未结束",
        )
        for inc in d.incidents
    ]
    rows += [
        (
            clock(a.row["raised_at"]),
            a.row["site"],
            a.row["room"],
            fault(a),
            LEVELS.get(a.row["level"], ""),
            " ".join(_handled(a, clock)).strip(),
            _recovered(a, clock),
        )
        for a in d.alarms
        if a.row["level"] >= 2
    ]
    rows.sort(key=lambda r: r[0])
    grid = [
        [Field("填报单位", clean(county_name, 100) or None), Field("考试日期", d.day.isoformat())],
        [Field("考点数", str(len(d.sites))), Field("考场数", str(rooms))],
        [Field("报警", _counts(d.alarms)), Field("多考场事件", f"{len(d.incidents)} 起")],
    ]
    table = Table(
        "二级及以上事件和报警",
        ("时间", "考点", "考场", "事件", "级别", "确认", "恢复/结束"),
        (10, 10, 10, 33, 7, 19, 11),
        rows,
        empty="本日无二级及以上事件",
    )
    after = [
        [Field("处置情况", None, wide=True, tall=True)],
        [Field("总体评估", None, wide=True, tall=True)],
    ]
    return Form(
        "县级应急事件报告表", d.day.isoformat(), grid, [table], after, remark=_remark(d), signatures=_signatures()
    )


def _incident_ack(notes: list[dict], clock: Clock) -> str:
    ack = next((n for n in notes if n["category"] == "ack"), None)
    return f"{clean(ack['who'], 64)} {clock(ack['at'])}" if ack else "未确认"


def school(d: Day, clock: Clock) -> list[Form]:
    """One form per site (school): every alarm of its rooms that day, with who handled it."""
    sites = sorted(set(d.sites) | {a.row["site"] for a in d.alarms})
    return [_school(d, site, clock) for site in sites]


def _school(d: Day, site: str, clock: Clock) -> Form:
    clock = DayClock(clock, d)
    alarms = [a for a in d.alarms if a.row["site"] == site]
    rows: list[tuple[str, ...]] = [
        (
            clock(a.row["raised_at"]),
            a.row["room"],
            device(a),
            fault(a),
            LEVELS.get(a.row["level"], ""),
            *_handled(a, clock),
            _recovered(a, clock),
        )
        for a in alarms
    ]
    causes = "\n".join(
        p
        for a in alarms
        if (p := people(a.notes, "cause", "measure", "spare", "result", clock=clock, room=f"{a.row['room']}："))
    )
    grid = [
        [Field("学校（考点）", site), Field("考试日期", d.day.isoformat())],
        [Field("考场数", str(len(d.sites.get(site, [])))), Field("报警", _counts(alarms))],
    ]
    table = Table(
        "报警及处置",
        ("时间", "考场", "设备", "故障", "级别", "确认人", "确认时间", "恢复时间"),
        (10, 7, 13, 31, 7, 10, 11, 11),
        rows,
        "本日无报警",
    )
    after = [
        [Field("原因及处置", causes or None, wide=True, tall=True)],
        [Field("总结", None, wide=True, tall=True)],
    ]
    return Form(
        "校级应急事件报告表",
        f"{site} {d.day.isoformat()}",
        grid,
        [table],
        after,
        remark=_remark(d),
        signatures=_signatures(),
    )


def day_log(d: Day, clock: Clock) -> Form:
    """Every alarm transition (room times) and every note written that day, in time order."""
    clock = DayClock(clock, d)
    names = {a.row["id"]: a for a in d.alarms}
    incidents = {inc.id: f"{inc.site}/{'、'.join(inc.rooms)}" for inc in d.incidents}
    rows: list[tuple[float, tuple[str, ...]]] = []
    for a in d.alarms:
        where = f"{a.row['site']}/{a.row['room']}"
        if a.row["raised_at"] < d.start:  # still active from before: the day's log says so at its start
            since = f"{fault(a)}（自 {clock(a.row['raised_at'])} 起）"
            rows.append(
                (d.start, (clock(d.start), where, device(a), LEVELS.get(a.row["level"], ""), "持续", since, ""))
            )
        for e in a.events:
            if d.start <= e["at"] < d.end:
                what = ALARM_STATES.get(e["state"], e["state"])
                text = clean(str(e["event"].get("message", a.row["message"])), 200)
                rows.append((e["at"], (clock(e["at"]), where, device(a), LEVELS.get(e["level"], ""), what, text, "")))
    for n in d.notes:
        on = names.get(n["item_id"])
        where = f"{on.row['site']}/{on.row['room']}" if on else incidents.get(n["item_id"], clean(n["item_id"], 64))
        rows.append(
            (
                n["at"],
                (
                    clock(n["at"]),
                    where,
                    device(on) if on else "多考场事件",
                    "",
                    CATEGORIES.get(n["category"], n["category"]),
                    clean(n["text"]) or "（无说明）",
                    clean(n["who"], 64),
                ),
            )
        )
    rows.sort(key=lambda r: r[0])
    table = Table(
        "报警与确认记录",
        ("时间", "考点/考场", "设备", "级别", "事项", "内容", "人员"),
        (10, 12, 15, 7, 10, 35, 11),
        [r for _, r in rows],
        "本日无报警和确认",
    )
    grid = [[Field("日期", d.day.isoformat()), Field("报警", _counts(d.alarms))]]
    return Form("值班日志", d.day.isoformat(), grid, [table], remark=_remark(d))


def _remark(d: Day) -> str:
    more = f"；报警过多，仅列前 {ALARMS_MAX} 条，其余见系统记录" if d.truncated else ""
    return (
        f"本表由网关按时间线生成，时间为考场设备记录的原始时间（{d.day.isoformat()}，精确到秒）{more}。"
        "空白处由人员据实填写。"
    )


def _signatures() -> tuple[str, ...]:
    return ("填报人", "审核人", "负责人", "日期")
