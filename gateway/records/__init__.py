"""The plans' written records from the gateway's timeline: 一级响应处置记录表, 首报 / 续报 / 终报, the county's
and the schools' incident report forms, the day log; as PDF (printing) or DOCX (editing and signing).

facts.py reads the database, forms.py and dayforms.py build the forms (pure), pdf.py and word.py render them.
Every rendered file is kept in the ``reports`` table with its SHA-256: ``verify`` finds a file by its hash,
so a file edited after it was made is one the gateway never issued (docs/records.md).
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import date
from typing import Any

from examwatch.gateway import duty, store
from examwatch.gateway.config import CorrelationRule, builtin_correlation
from examwatch.gateway.records import dayforms, forms
from examwatch.gateway.records.facts import RecordError, event, exam_day

EVENT_FORMS = ("l1", "first", "followup", "final")  # of an incident or an alarm
DAY_FORMS = ("county", "school", "day")  # of an exam day
FORMS = EVENT_FORMS + DAY_FORMS
FORMATS = {
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}
WHO_MAX = 64


def build(
    conn: store.Db,
    *,
    form: str,
    incident: str | None = None,
    day: str | date | None = None,
    tz: str = "Asia/Shanghai",
    rules: list[CorrelationRule] | None = None,
    county: str = "",
) -> tuple[str, list[forms.Form]]:
    """The forms asked for, with their scope (the event's id or the day); RecordError if they cannot be made."""
    clock, rules = forms.Clock(tz), rules if rules is not None else builtin_correlation()
    if form in EVENT_FORMS:
        if not incident:
            raise RecordError(f"表 {form} 针对一个事件或报警：请给出事件编号（--incident）")
        ev = event(conn, incident, rules)
        if form == "l1":
            return ev.id, forms.l1(ev, clock)
        return ev.id, [{"first": forms.first, "followup": forms.followup, "final": forms.final}[form](ev, clock)]
    if form in DAY_FORMS:
        if not day:
            raise RecordError(f"表 {form} 针对一个考试日：请给出日期（--day YYYY-MM-DD）")
        d = exam_day(conn, parse_day(day), tz, rules)
        if form == "county":
            return d.day.isoformat(), [dayforms.county(d, clock, county)]
        if form == "school":
            return d.day.isoformat(), dayforms.school(d, clock)
        return d.day.isoformat(), [dayforms.day_log(d, clock)]
    raise RecordError(f"没有表 {form[:32]!r}；可选：{'、'.join(FORMS)}")


def parse_day(day: str | date) -> date:
    if isinstance(day, date):
        return day
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
            return date.fromisoformat(day)
    except ValueError:
        pass
    raise RecordError(f"日期 {day[:32]!r} 应为 YYYY-MM-DD")


def render(
    conn: store.Db,
    *,
    form: str,
    incident: str | None = None,
    day: str | date | None = None,
    fmt: str,
    who: str,
    tz: str = "Asia/Shanghai",
    rules: list[CorrelationRule] | None = None,
    county: str = "",
    now: float | None = None,
) -> tuple[str, str, bytes, str]:
    """(filename, content type, the file, its scope); reads only."""
    if fmt not in FORMATS:
        raise RecordError(f"格式 {fmt[:16]!r} 不支持：pdf 或 docx")
    who = forms.clean(who, WHO_MAX) or "（未知）"
    scope, made = build(conn, form=form, incident=incident, day=day, tz=tz, rules=rules, county=county)
    stamp = forms.Clock(tz)(time.time() if now is None else now)
    if fmt == "pdf":
        from examwatch.gateway.records import pdf

        data = pdf.render(made, stamp, who)
    else:
        from examwatch.gateway.records import word

        data = word.render(made, stamp, who)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", scope)[:80].strip("_") or "report"
    return f"examwatch-{form}-{name}.{fmt}", FORMATS[fmt], data, scope


def keep(conn: store.Db, *, form: str, scope: str, fmt: str, who: str, data: bytes, now: float) -> int:
    """Store a rendered file with its hash; the row's id."""
    digest = hashlib.sha256(data).hexdigest()
    return duty.add_report(conn, now, forms.clean(who, WHO_MAX) or "（未知）", form, scope, fmt, digest, data)


def render_and_store(
    conn: store.Db,
    *,
    form: str,
    incident: str | None = None,
    day: str | date | None = None,
    fmt: str,
    who: str,
    tz: str = "Asia/Shanghai",
    rules: list[CorrelationRule] | None = None,
    county: str = "",
) -> tuple[str, str, bytes]:
    """Render a form and keep it in ``reports``: (filename, content type, data). The duty desk's entry point.

    ``incident`` is an incident's id or an alarm's (a single alarm's 一级 record or its reports); ``rules`` are
    the gateway config's correlation rules (default: the built-in ones), which tell an incident's alarms.
    Raises RecordError (a ValueError) with a message for people when the report cannot be made.
    """
    now = time.time()
    name, ctype, data, scope = render(
        conn, form=form, incident=incident, day=day, fmt=fmt, who=who, tz=tz, rules=rules, county=county, now=now
    )
    keep(conn, form=form, scope=scope, fmt=fmt, who=who, data=data, now=now)
    return name, ctype, data


def verify(conn: store.Db, data: bytes) -> dict[str, Any] | None:
    """The stored report this file is, byte for byte (id, created, who, form, scope, format, sha256), or None."""
    return duty.report_by_hash(conn, hashlib.sha256(data).hexdigest())


__all__ = ["DAY_FORMS", "EVENT_FORMS", "FORMATS", "FORMS", "RecordError", "render", "render_and_store", "verify"]
