"""The plans' forms as plain data, built from the facts alone (pure: no clock, no I/O).

What the system knows (times to the second in the site's time zone, rooms, devices, fault texts, who
acknowledged and when) is filled in; what only people know comes from their notes; a field nobody wrote is
``None`` and the renderers print it as a visible blank (BLANK), never a guess. People's texts are cleaned
of characters no document may hold and bounded in length here, once, for both renderers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from examwatch.gateway.records.facts import Alarm, Event
from examwatch.kernel.model import DEVICE_KIND_NAMES

BLANK = "（未填写）"
TEXT_MAX = 500  # characters of one note shown; the rest stays in the database
NOTES_MAX = 20  # notes of one category shown in one field
ROWS_MAX = 1000  # rows of one table (about 60 pages)
LEVELS = {1: "一级", 2: "二级", 3: "三级"}
CATEGORIES = {
    "ack": "确认",
    "cause": "原因",
    "measure": "措施",
    "spare": "备用设备",
    "result": "结果",
    "summary": "总结",
    "close": "关闭",
}
ALARM_STATES = {"raised": "报警", "updated": "级别变化", "cleared": "解除"}
CHANGES = {
    "opened": "事件开启",
    "joined": "考场加入",
    "left": "考场恢复",
    "escalated": "事件升级",
    "closed": "事件结束",
}
# XML 1.0 cannot hold these (python-docx refuses them; a PDF would show boxes): people's input may have them
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class Field:
    label: str
    value: str | None  # None: nobody wrote it (printed as a visible blank)
    wide: bool = False  # the whole row
    tall: bool = False  # room to write by hand when blank


@dataclass(frozen=True)
class Table:
    heading: str
    columns: tuple[str, ...]
    widths: tuple[int, ...]  # of the page's width, in per cent: fixed (auto widths cost WeasyPrint a lot)
    rows: list[tuple[str, ...]]
    empty: str = "无"

    def __post_init__(self) -> None:
        assert len(self.widths) == len(self.columns) and sum(self.widths) == 100
        if len(self.rows) > ROWS_MAX:  # a page costs WeasyPrint about 0.3 s: a flood of alarms must not
            more = f"另有 {len(self.rows) - ROWS_MAX} 行未列出，见系统记录"
            self.rows[ROWS_MAX:] = [("……", more, *[""] * (len(self.columns) - 2))]


@dataclass(frozen=True)
class Form:
    title: str
    subtitle: str  # the scope: the event's id or the day
    grid: list[list[Field]]  # rows of one or two fields
    tables: list[Table] = field(default_factory=list)
    after: list[list[Field]] = field(default_factory=list)  # fields below the tables (a day's summary)
    remark: str = ""  # the plan's deadline and where the facts come from
    signatures: tuple[str, ...] = ("填报人", "审核人", "日期")


def clean(text: str, limit: int = TEXT_MAX) -> str:
    text = _UNPRINTABLE.sub("", text).strip()
    return text if len(text) <= limit else text[:limit] + "……（超长部分见系统记录）"


class Clock:
    """Unix times as the site's wall clock, to the second."""

    def __init__(self, tz: str) -> None:
        self.tz, self.zone = tz, ZoneInfo(tz)

    def __call__(self, ts: float | None) -> str:
        if ts is None:
            return ""
        return datetime.fromtimestamp(ts, self.zone).strftime("%Y-%m-%d %H:%M:%S")

    def hms(self, ts: float) -> str:
        return datetime.fromtimestamp(ts, self.zone).strftime("%H:%M:%S")


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}小时{m:02d}分{s:02d}秒" if h else f"{m}分{s:02d}秒"


def device(a: Alarm) -> str:
    """The device as staff name it: its kind's Chinese name and its number (the agent's device name)."""
    name = DEVICE_KIND_NAMES.get(a.kind, "")
    return f"{name}（{a.row['device']}）" if name else str(a.row["device"])


def people(notes: Iterable[dict[str, Any]], *categories: str, clock: Clock, room: str = "") -> str | None:
    """The notes of these categories, one a line with who and when; None if there are none."""
    lines = [
        f"{room}{clean(n['text']) or '（无说明）'}（{clean(n['who'], 64)}，{clock(n['at'])}）"
        for n in notes
        if n["category"] in categories
    ]
    if len(lines) > NOTES_MAX:
        lines = [*lines[:NOTES_MAX], f"另有 {len(lines) - NOTES_MAX} 条，见系统记录"]
    return "\n".join(lines) or None


def event_notes(ev: Event, *categories: str, clock: Clock) -> str | None:
    """An event's own notes, then those on each of its rooms' alarms (marked with the room)."""
    parts = [people(ev.notes, *categories, clock=clock)] if ev.kind == "incident" else []
    parts += [people(a.notes, *categories, clock=clock, room=_room_tag(ev, a)) for a in ev.alarms]
    text = "\n".join(p for p in parts if p)
    return text or None


def _room_tag(ev: Event, a: Alarm) -> str:
    return f"{a.row['room']}：" if ev.kind == "incident" else ""


def _ack(notes: list[dict[str, Any]], clock: Clock) -> tuple[str | None, str | None, float | None]:
    """The first acknowledgement: who, when (text), when (time)."""
    ack = next((n for n in notes if n["category"] == "ack"), None)
    if ack is None:
        return None, None, None
    return clean(ack["who"], 64), clock(ack["at"]), ack["at"]


def timeline(ev: Event, clock: Clock) -> Table:
    """Every transition of the event's alarms (room times), the gateway's decisions and people's notes."""
    rows: list[tuple[float, tuple[str, ...]]] = []
    for a in ev.alarms:
        for e in a.events:
            what = ALARM_STATES.get(e["state"], e["state"])
            text = clean(str(e["event"].get("message", a.row["message"])), 200)
            rows.append((e["at"], (clock(e["at"]), a.row["room"], f"{what}（{LEVELS.get(e['level'], '')}）", text, "")))
        for n in a.notes:
            rows.append((n["at"], _note_row(n, a.row["room"], clock)))
    for c in ev.changes:
        what = CHANGES.get(c["what"], c["what"])
        rows.append(
            (c["at"], (clock(c["at"]), "、".join(c["rooms"]), what, f"{LEVELS.get(c['level'], '')}（网关判定）", ""))
        )
    if ev.kind == "incident":
        rows += [(n["at"], _note_row(n, "全部", clock)) for n in ev.notes]
    rows.sort(key=lambda r: r[0])
    return Table("事件时间线", ("时间", "考场", "事项", "内容", "人员"), (21, 10, 15, 42, 12), [r for _, r in rows])


def _note_row(n: dict[str, Any], room: str, clock: Clock) -> tuple[str, ...]:
    what = CATEGORIES.get(n["category"], n["category"])
    return clock(n["at"]), room, what, clean(n["text"]) or "（无说明）", clean(n["who"], 64)


def _header(ev: Event, clock: Clock, due: tuple[str, float]) -> list[list[Field]]:
    rooms = "、".join(ev.rooms)
    kind = "事件" if ev.kind == "incident" else "报警"
    return [
        [Field("事件名称", clean(ev.title, 200), wide=True)],
        [Field("事件编号", ev.id), Field("响应级别", LEVELS.get(ev.level, str(ev.level)))],
        [Field("发生时间", clock(ev.opened_at)), Field(due[0], clock(due[1]))],
        [Field("地点", f"考点 {ev.site}，考场 {rooms}", wide=True)],
        [Field(f"{kind}状态", _state(ev, clock), wide=True)],
    ]


def _state(ev: Event, clock: Clock) -> str:
    if ev.closed_at is not None and not ev.active:
        return f"已结束（{clock(ev.closed_at)}，历时 {duration(ev.closed_at - ev.opened_at)}）"
    return f"进行中：{len(ev.active)} 个考场尚未恢复（{'、'.join(ev.active)}）"


def fault(a: Alarm) -> str:
    """What went wrong, as the room said when it raised the alarm (the row's message is the latest, e.g. the clear)."""
    raised: dict[str, Any] = next((e["event"] for e in a.events if e["state"] == "raised"), {})
    return clean(str(raised.get("message") or a.row["message"]), 200)


def _equipment(ev: Event) -> str:
    return "\n".join(f"{a.row['room']}：{device(a)}，{fault(a)}" for a in ev.alarms) or "无"


def _trend(ev: Event, clock: Clock) -> str:
    """Where it went: joined, escalated, recovered rooms, from the gateway's record of the incident."""
    steps = [
        f"{clock(c['at'])} {CHANGES.get(c['what'], c['what'])}（{'、'.join(c['rooms'])}，{LEVELS.get(c['level'], '')}）"
        for c in ev.changes
        if c["what"] in ("joined", "escalated", "left")
    ]
    return "\n".join([*steps, _state(ev, clock)])


def _impact(ev: Event, clock: Clock) -> str:
    lines = []
    for a in ev.alarms:
        r = a.row
        end = f"至 {clock(r['cleared_at'])} 恢复，历时 {duration(r['cleared_at'] - r['raised_at'])}"
        phase = next((e["event"].get("phase") for e in a.events if e["event"].get("phase")), None)
        when = {"during": "，考试期间", "before": "，考前", "after": "，考后"}.get(phase or "", "")
        lines.append(
            f"{r['room']}：{device(a)} 自 {clock(r['raised_at'])} 起"
            f"{end if r['cleared_at'] is not None else '，尚未恢复'}{when}"
        )
    scale = f"共 {len(ev.rooms)} 个考场" + (f"（考点共 {ev.site_rooms} 个）" if ev.site_rooms else "")
    return "\n".join([scale, *lines])


def first(ev: Event, clock: Clock) -> Form:
    who, when, _ = _ack(ev.notes or [n for a in ev.alarms for n in a.notes], clock)
    grid = _header(ev, clock, ("首报时限", ev.opened_at + 3 * 3600))
    grid += [
        [Field("规模", _impact(ev, clock).split("\n", 1)[0]), Field("涉及单位", f"考点 {ev.site}")],
        [Field("涉及考场", "、".join(ev.rooms), wide=True)],
        [Field("受影响设备", _equipment(ev), wide=True)],
        [Field("发展趋势", _trend(ev, clock), wide=True)],
        [Field("伤亡及威胁", None, wide=True, tall=True)],
        [Field("确认人", who), Field("确认时间", when)],
        [Field("初步处置", event_notes(ev, "ack", "measure", clock=clock), wide=True, tall=True)],
    ]
    return Form("突发事件首报", ev.id, grid, [timeline(ev, clock)], remark=_remark("首报应在事件发生后 3 小时内报出"))


def followup(ev: Event, clock: Clock) -> Form:
    grid = _header(ev, clock, ("首报时限", ev.opened_at + 3 * 3600))
    grid += [
        [Field("事件原因", event_notes(ev, "cause", clock=clock), wide=True, tall=True)],
        [Field("影响范围", _impact(ev, clock), wide=True)],
        [Field("已采取措施", event_notes(ev, "measure", "spare", clock=clock), wide=True, tall=True)],
        [Field("进展", _trend(ev, clock), wide=True)],
        [Field("处置结果", event_notes(ev, "result", clock=clock), wide=True, tall=True)],
    ]
    return Form("突发事件续报", ev.id, grid, [timeline(ev, clock)], remark=_remark("续报随事件进展及时报送"))


def final(ev: Event, clock: Clock) -> Form:
    grid = _header(ev, clock, ("首报时限", ev.opened_at + 3 * 3600))
    grid += [
        [Field("事件经过", _impact(ev, clock), wide=True)],
        [Field("事件原因", event_notes(ev, "cause", clock=clock), wide=True, tall=True)],
        [Field("处置措施", event_notes(ev, "measure", "spare", clock=clock), wide=True, tall=True)],
        [Field("处置结果", event_notes(ev, "result", clock=clock), wide=True, tall=True)],
        [Field("评估与总结", event_notes(ev, "summary", "close", clock=clock), wide=True, tall=True)],
    ]
    return Form("突发事件终报", ev.id, grid, [timeline(ev, clock)], remark=_remark("终报在事件处置结束后报送"))


def l1(ev: Event, clock: Clock) -> list[Form]:
    """One 一级响应处置记录表 per alarm (an incident's: one per room's alarm)."""
    return [_l1(ev, a, clock) for a in ev.alarms] or [_l1_empty(ev)]


def _l1(ev: Event, a: Alarm, clock: Clock) -> Form:
    r = a.row
    who, when, at = _ack(a.notes, clock)
    if at is not None:
        late = at - r["raised_at"] > 5 * 60
        when = f"{when}（报警后 {duration(at - r['raised_at'])}{'，超过 5 分钟' if late else ''}）"
    names = sorted({clean(n["who"], 64) for n in a.notes if n["category"] in ("ack", "measure", "result", "spare")})
    grid = [
        [Field("考点", r["site"]), Field("考场", r["room"])],
        [Field("发生时间", clock(r["raised_at"])), Field("报警级别", LEVELS.get(r["level"], str(r["level"])))],
        [Field("设备", DEVICE_KIND_NAMES.get(a.kind, a.kind) or None), Field("设备编号", r["device"])],
        [Field("故障现象", fault(a), wide=True)],
        [Field("故障原因", people(a.notes, "cause", clock=clock), wide=True, tall=True)],
        [Field("备用设备使用", people(a.notes, "spare", clock=clock), wide=True, tall=True)],
        [Field("处置人", "、".join(names) or who), Field("反馈时间", when)],
        [Field("处置措施", people(a.notes, "ack", "measure", clock=clock), wide=True, tall=True)],
        [
            Field("恢复时间", clock(r["cleared_at"]) if r["cleared_at"] is not None else "尚未恢复"),
            Field("记录表时限", clock(r["raised_at"] + 24 * 3600)),
        ],
        [Field("处置结果", people(a.notes, "result", clock=clock), wide=True, tall=True)],
    ]
    single = replace(ev, kind="alarm", alarms=[a], changes=[], notes=a.notes)
    return Form(
        "一级响应处置记录表",
        r["id"],
        grid,
        [timeline(single, clock)],
        remark=_remark("现场处置后 5 分钟内反馈执行组组长；本表在 24 小时内填报"),
    )


def _l1_empty(ev: Event) -> Form:
    return Form("一级响应处置记录表", ev.id, [[Field("说明", "该事件没有可列出的报警", wide=True)]])


def _remark(deadline: str) -> str:
    return f"{deadline}。时间为考场设备记录的原始时间（精确到秒）；标注“{BLANK}”处须由处置人员据实填写，系统不代填。"
