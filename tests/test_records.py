"""The plans' records from a scripted power incident: what the PDF and the DOCX say, blanks left blank,
Chinese in an embedded CJK font, every file kept with its hash, people's notes escaped and bounded."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import docx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examwatch.gateway import records, store
from examwatch.gateway.records import RecordError, pdf, word
from examwatch.gateway.records.forms import BLANK, ROWS_MAX, TEXT_MAX, Field, Form, Table, clean
from tests.records_support import alarm_id, scripted_incident

ARTIFACTS = Path(__file__).parent / "artifacts"
DAY = "2024-05-28"
# the rooms' own times (101 and 102 raise, 101 acknowledged, 101 and 102 clear)
ROOM_TIMES = ("2024-05-28 08:31:05", "2024-05-28 08:31:12", "2024-05-28 08:34:25", "2024-05-28 08:46:10")
RECEIVED = "08:31:07"  # when the gateway received 101's raise: never on a form


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("records") / "gateway.db"
    return path, scripted_incident(path)


@pytest.fixture
def conn(db, tmp_path):
    copy = tmp_path / "gateway.db"  # each test its own copy: reports and notes it adds stay its own
    shutil.copy(db[0], copy)
    c = store.connect(copy)
    yield c
    c.close()


def pdf_text(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "r.pdf"
    path.write_bytes(data)
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, check=True, text=True).stdout


def docx_cells(data: bytes, tmp_path: Path) -> list[list[str]]:
    """Every table row of the document as its cells' texts (merged cells repeat, as python-docx gives them)."""
    path = tmp_path / "r.docx"
    path.write_bytes(data)
    d = docx.Document(str(path))
    return [[c.text for c in row.cells] for t in d.tables for row in t.rows]


def docx_text(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "r.docx"
    path.write_bytes(data)
    d = docx.Document(str(path))
    return "\n".join([p.text for p in d.paragraphs] + ["\t".join(r) for r in docx_cells(data, tmp_path)])


def field(cells: list[list[str]], label: str) -> str:
    """The value next to a label in the form's grid."""
    for row in cells:
        if label in row:
            return row[row.index(label) + 1]
    raise AssertionError(f"no field {label!r} in {cells}")


def test_first_report_pdf_holds_the_timeline_in_chinese_with_an_embedded_cjk_font(conn, db, tmp_path):
    name, ctype, data = records.render_and_store(conn, form="first", incident=db[1], fmt="pdf", who="测试员")
    assert (ctype, name) == ("application/pdf", "examwatch-first-s1_power_" + db[1].rsplit("/", 1)[1] + ".pdf")
    text = pdf_text(data, tmp_path)
    for fact in (
        "突发事件首报",
        db[1],
        "二级",
        "101、102",
        "UPS（ups1）",
        "演示中学考点 101考场：市电中断，UPS 电池供电",  # the fault as raised, not the later "restored" text
        "王老师",  # who acknowledged the incident, and when
        "2024-05-28 08:33:05",
        "2024-05-28 11:31:05",  # the first report is due within 3 hours
        "共 2 个考场（考点共 5 个）",
        *ROOM_TIMES,
    ):
        assert fact in text, fact
    assert RECEIVED not in text
    assert BLANK in text  # nobody wrote about casualties: a visible blank
    assert "\ufffd" not in text and "□" not in text
    fonts = subprocess.run(["pdffonts", str(tmp_path / "r.pdf")], capture_output=True, check=True, text=True).stdout
    cjk = [line for line in fonts.splitlines() if "CJK" in line]
    assert cjk and all(line.split()[-5:-3] == ["yes", "yes"] for line in cjk), fonts  # embedded subsets
    assert not [line for line in fonts.splitlines()[2:] if "CJK" not in line and " no " in line], fonts


def test_followup_leaves_the_cause_blank_and_carries_the_measures_pdf_and_docx(conn, db, tmp_path):
    _, _, data = records.render_and_store(conn, form="followup", incident=db[1], fmt="docx", who="测试员")
    cells = docx_cells(data, tmp_path)
    assert field(cells, "事件原因") == BLANK  # no one gave a cause
    assert field(cells, "处置结果") == BLANK
    measures = field(cells, "已采取措施")
    assert "两考场改由备用电源供电（王老师，2024-05-28 08:36:05）" in measures
    assert "101：启用备用UPS，编号 UPS-07（张老师，2024-05-28 08:36:15）" in measures
    assert "101：UPS（ups1） 自 2024-05-28 08:31:05 起至 2024-05-28 08:46:10 恢复" in field(cells, "影响范围")
    text = docx_text(data, tmp_path)
    assert all(t in text for t in ROOM_TIMES) and RECEIVED not in text
    _, _, data = records.render_and_store(conn, form="followup", incident=db[1], fmt="pdf", who="测试员")
    text = pdf_text(data, tmp_path)
    assert "突发事件续报" in text and BLANK in text and "两考场改由备用电源供电" in text


def test_final_report_has_blanks_for_the_evaluation(conn, db, tmp_path):
    _, _, data = records.render_and_store(conn, form="final", incident=db[1], fmt="docx", who="测试员")
    cells = docx_cells(data, tmp_path)
    assert field(cells, "评估与总结") == BLANK and field(cells, "事件原因") == BLANK
    assert "已结束（2024-05-28 08:47:50" in field(cells, "事件状态")  # when the gateway closed it
    store.add_note(conn, "incident", db[1], "李校长", "summary", "备用电源切换及时，考试未受影响", 1716857000.0)
    _, _, data = records.render_and_store(conn, form="final", incident=db[1], fmt="docx", who="测试员")
    assert (
        field(docx_cells(data, tmp_path), "评估与总结")
        == "备用电源切换及时，考试未受影响（李校长，2024-05-28 08:43:20）"
    )


def test_level1_record_of_one_alarm(conn, tmp_path):
    _, _, data = records.render_and_store(conn, form="l1", incident=alarm_id("101"), fmt="docx", who="测试员")
    cells = docx_cells(data, tmp_path)
    assert (field(cells, "考场"), field(cells, "设备"), field(cells, "设备编号")) == ("101", "UPS", "ups1")
    assert field(cells, "发生时间") == "2024-05-28 08:31:05"
    assert field(cells, "故障原因") == BLANK and field(cells, "处置结果") == BLANK
    assert field(cells, "备用设备使用") == "启用备用UPS，编号 UPS-07（张老师，2024-05-28 08:36:15）"
    assert field(cells, "处置人") == "张老师"
    assert field(cells, "反馈时间") == "2024-05-28 08:34:25（报警后 3分20秒）"
    assert field(cells, "记录表时限") == "2024-05-29 08:31:05"  # within 24 hours
    assert field(cells, "恢复时间") == "2024-05-28 08:46:10"
    # 102 was never acknowledged: no handler, no feedback time
    _, _, data = records.render_and_store(conn, form="l1", incident=alarm_id("102"), fmt="pdf", who="测试员")
    text = pdf_text(data, tmp_path)
    assert "一级响应处置记录表" in text and "2024-05-28 08:31:12" in text and text.count(BLANK) >= 4


def test_an_incidents_level1_records_are_one_per_room(conn, db, tmp_path):
    _, _, data = records.render_and_store(conn, form="l1", incident=db[1], fmt="docx", who="测试员")
    rooms = [row[3] for row in docx_cells(data, tmp_path) if row[:3] == ["考点", "s1", "考场"]]
    assert rooms == ["101", "102"]


def test_day_forms_list_every_alarm_and_acknowledgement(conn, tmp_path):
    _, _, data = records.render_and_store(conn, form="day", day=DAY, fmt="pdf", who="测试员")
    text = pdf_text(data, tmp_path)
    for fact in (
        *(t[11:] for t in ROOM_TIMES),
        "已到场，确认市电中断",
        "已通知供电部门",
        "张老师",
        "王老师",
        "s1/101",
        "s1/102",
    ):
        assert fact in text, fact
    _, _, data = records.render_and_store(conn, form="county", day=DAY, fmt="docx", who="测试员", county="某某县招办")
    cells = docx_cells(data, tmp_path)
    assert field(cells, "填报单位") == "某某县招办" and field(cells, "考场数") == "5"
    assert field(cells, "报警") == "2 条（二级 2）" and field(cells, "总体评估") == BLANK
    assert any(row[:3] == ["08:31:05", "s1", "101、102"] for row in cells)  # the incident
    _, _, data = records.render_and_store(conn, form="county", day=DAY, fmt="docx", who="测试员")
    assert field(docx_cells(data, tmp_path), "填报单位") == BLANK  # no county name configured
    _, _, data = records.render_and_store(conn, form="school", day=DAY, fmt="docx", who="测试员")
    cells = docx_cells(data, tmp_path)
    [row] = [r for r in cells if r[1] == "102"]
    assert row[:5] == ["08:31:12", "102", "UPS（ups1）", "演示中学考点 102考场：市电中断，UPS 电池供电", "二级"]
    assert row[5:] == ["未确认", "", "08:47:48"]
    assert "101：启用备用UPS，编号 UPS-07（张老师，08:36:15）" in field(cells, "原因及处置")
    assert field(cells, "总结") == BLANK
    # the day before has nothing: the forms say so rather than being empty
    _, _, data = records.render_and_store(conn, form="school", day="2024-05-27", fmt="pdf", who="测试员")
    assert "本日无报警" in pdf_text(data, tmp_path)


def test_docx_runs_name_the_east_asian_font(conn, db, tmp_path):
    _, _, data = records.render_and_store(conn, form="first", incident=db[1], fmt="docx", who="测试员")
    (tmp_path / "r.docx").write_bytes(data)
    d = docx.Document(str(tmp_path / "r.docx"))
    runs = [r for t in d.tables for row in t.rows for c in row.cells for p in c.paragraphs for r in p.runs]
    runs += [r for p in d.paragraphs for r in p.runs]
    chinese = [r for r in runs if any("\u4e00" <= ch <= "\u9fff" for ch in r.text)]
    assert chinese
    qn = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}eastAsia"
    assert {r._element.rPr.rFonts.get(qn) for r in chinese} <= {"宋体", "黑体"}


def test_every_report_is_kept_and_an_edited_file_does_not_verify(conn, db):
    _, _, data = records.render_and_store(conn, form="first", incident=db[1], fmt="pdf", who="测试员")
    row = records.verify(conn, data)
    assert row is not None and (row["form"], row["scope"], row["format"], row["who"]) == (
        "first",
        db[1],
        "pdf",
        "测试员",
    )
    stored = conn.execute("SELECT content FROM reports WHERE id = ?", [row["id"]]).fetchone()[0]
    assert stored == data
    edited = bytearray(data)
    edited[len(edited) // 2] ^= 1
    assert records.verify(conn, bytes(edited)) is None
    assert records.verify(conn, data + b"\n") is None


def test_peoples_notes_are_escaped_cleaned_and_bounded(conn, db, tmp_path):
    markup = '<b>粗体</b><script>alert(1)</script><img src="http://x/y.png">'
    hostile = markup + "\x00\x0b" + "长" * 3000
    assert store.add_note(conn, "incident", db[1], "<i>某人</i>\x07", "cause", hostile, 1716856500.0)
    _, forms = records.build(conn, form="followup", incident=db[1])
    page = pdf.html(forms, "2024-05-28 09:00:00", "测试员")
    assert "&lt;b&gt;粗体&lt;/b&gt;&lt;script&gt;" in page and "<script>" not in page and "<img" not in page
    assert "&lt;i&gt;某人&lt;/i&gt;" in page
    kept = 500 - len(markup)  # characters of one note, control characters removed first
    assert "长" * kept + "……（超长部分见系统记录）" in page and "长" * (kept + 1) not in page
    _, _, data = records.render_and_store(conn, form="followup", incident=db[1], fmt="docx", who="测试员\x00")
    cause = field(docx_cells(data, tmp_path), "事件原因")  # python-docx refuses \x00: it was removed first
    assert cause.startswith('<b>粗体</b><script>alert(1)</script><img src="http://x/y.png">长长')
    _, _, data = records.render_and_store(conn, form="followup", incident=db[1], fmt="pdf", who="测试员")
    assert "<b>粗体</b>" in pdf_text(data, tmp_path)


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"form": "first", "day": DAY}, "请给出事件编号"),
        ({"form": "county", "incident": "x"}, "请给出日期"),
        ({"form": "first", "incident": "s1/nope"}, "没有编号为"),
        ({"form": "day", "day": "2024-13-01"}, "应为 YYYY-MM-DD"),
        ({"form": "day", "day": "2024-5-1"}, "应为 YYYY-MM-DD"),
        ({"form": "weekly", "day": DAY}, "没有表"),
        ({"form": "day", "day": DAY, "fmt": "odt"}, "格式"),
    ],
)
def test_what_cannot_be_made_is_said_and_nothing_is_kept(conn, kw, why):
    with pytest.raises(RecordError, match=why):
        records.render_and_store(conn, **{"fmt": "pdf", "who": "测试员", **kw})
    assert conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0] == 0


def test_a_page_as_png_for_people_to_look_at(conn, db, tmp_path):
    """An artefact, not a check of looks: tests/artifacts/records-*.png (docs/img/records-first.png is one)."""
    ARTIFACTS.mkdir(exist_ok=True)
    for form, scope in (
        ("first", {"incident": db[1]}),
        ("l1", {"incident": alarm_id("101")}),
        ("county", {"day": DAY}),
    ):
        _, _, data = records.render_and_store(conn, form=form, fmt="pdf", who="测试员", **scope)
        (tmp_path / f"{form}.pdf").write_bytes(data)
        out = ARTIFACTS / f"records-{form}"
        subprocess.run(
            [
                "pdftoppm",
                "-png",
                "-r",
                "80",
                "-f",
                "1",
                "-l",
                "1",
                "-singlefile",
                str(tmp_path / f"{form}.pdf"),
                str(out),
            ],
            check=True,
        )
        assert out.with_suffix(".png").stat().st_size > 10_000


def test_the_records_load_no_renderer_until_a_file_is_asked_for():
    """The gateway (and the desk, when it imports the records) must not pay for WeasyPrint, Pango or python-docx."""
    code = (
        "import sys, examwatch.gateway.main, examwatch.gateway.records; "
        "print(sorted(m for m in ('weasyprint', 'docx', 'jinja2', 'pydyf') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=700))
def test_any_note_text_renders_escaped_in_both_formats(text):
    """Whatever people type (control characters, lone surrogates, markup) becomes text in the page and the DOCX."""
    shown = clean(text) or "-"
    assert len(shown) <= TEXT_MAX + 20 and not any(ch in shown for ch in "\x00\x0b\ufffe")

    def tags(value: str, who: str) -> int:  # the page's markup: the same whatever the text
        page = pdf.html([Form("记录", "x", [[Field("原因", value, wide=True)]])], "2024-05-28 09:00:00", who)
        return page.split("<body>", 1)[1].count("<")

    assert tags(shown, clean(text, 64)) == tags("-", "-")
    word.render([Form("记录", "x", [[Field("原因", shown)]])], "", clean(text, 64))  # python-docx refuses bad XML


def test_an_incident_lists_only_its_fault_classs_alarms(conn, db, tmp_path):
    """101's network alarm at the same time is in the day log, not in the power incident's reports."""
    conn.execute(
        "INSERT INTO alarms (id, site, room, rule, level, state, device, message, raised_at, updated_at, source) "
        "VALUES ('s1/101/link_down/sw1/1', 's1', '101', 'link_down', 1, 'raised', 'sw1', '网络中断', ?, ?, 'agent')",
        [1716856300.0, 1716856300.0],
    )
    _, _, data = records.render_and_store(conn, form="followup", incident=db[1], fmt="docx", who="测试员")
    assert "网络中断" not in docx_text(data, tmp_path)
    _, _, data = records.render_and_store(conn, form="day", day=DAY, fmt="docx", who="测试员")
    assert "网络中断" not in docx_text(data, tmp_path)  # no transition stored: the log lists transitions
    _, _, data = records.render_and_store(conn, form="school", day=DAY, fmt="docx", who="测试员")
    assert "网络中断" in docx_text(data, tmp_path) and "尚未恢复" in docx_text(data, tmp_path)


def test_a_long_table_is_cut_and_says_so():
    rows = [(str(i), "x") for i in range(ROWS_MAX + 5)]
    t = Table("表", ("a", "b"), (50, 50), rows)
    assert len(t.rows) == ROWS_MAX + 1 and t.rows[-1] == ("……", "另有 5 行未列出，见系统记录")


def test_the_next_days_log_carries_an_alarm_still_active(conn, tmp_path):
    conn.execute("UPDATE alarms SET state = 'raised', cleared_at = NULL WHERE id = ?", [alarm_id("102")])
    _, _, data = records.render_and_store(conn, form="day", day="2024-05-29", fmt="docx", who="测试员")
    [row] = [r for r in docx_cells(data, tmp_path) if "s1/102" in r]
    assert row[:5] == ["00:00:00", "s1/102", "UPS（ups1）", "二级", "持续"]
    assert row[5] == "演示中学考点 102考场：市电中断，UPS 电池供电（自 2024-05-28 08:31:12 起）"


def test_a_single_alarm_has_a_first_report_too(conn, tmp_path):
    """A level-2 alarm of one room (no incident) is reported upward like an incident."""
    _, _, data = records.render_and_store(conn, form="first", incident=alarm_id("102"), fmt="docx", who="测试员")
    cells = docx_cells(data, tmp_path)
    assert field(cells, "地点") == "考点 s1，考场 102" and field(cells, "响应级别") == "二级"
    assert field(cells, "确认人") == BLANK  # nobody acknowledged 102's alarm itself
