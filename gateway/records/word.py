"""Forms -> DOCX (python-docx), for editing and signing: the same tables as the PDF.

Word picks a run's font for Chinese from ``w:rFonts/@w:eastAsia``, not from the font name python-docx sets
(that is the Latin one): every run gets both, so Chinese shows in the CJK font and not in a fallback.
"""

from __future__ import annotations

import copy
import io

from examwatch.gateway.records.forms import BLANK, Field, Form, Table

BODY_FONT = "宋体"  # SimSun: on every Chinese Windows; LibreOffice maps it through fontconfig (Noto Serif CJK)
HEAD_FONT = "黑体"  # SimHei: titles and labels
GREY = (0x77, 0x77, 0x77)


def render(forms: list[Form], made: str, who: str) -> bytes:
    import docx
    from docx.enum.section import WD_ORIENT
    from docx.enum.text import WD_ALIGN_PARAGRAPH
    from docx.shared import Mm, Pt

    doc = docx.Document()
    section = doc.sections[0]
    section.orientation, section.page_width, section.page_height = WD_ORIENT.PORTRAIT, Mm(210), Mm(297)
    section.left_margin = section.right_margin = Mm(16)
    section.top_margin, section.bottom_margin = Mm(18), Mm(18)
    normal = doc.styles["Normal"]
    normal.font.size = Pt(10.5)
    _fonts(normal.element.get_or_add_rPr(), BODY_FONT)
    for i, form in enumerate(forms):
        if i:
            doc.add_page_break()
        title = doc.add_paragraph()
        title.alignment = WD_ALIGN_PARAGRAPH.CENTER
        _run(title, form.title, bold=True, size=18, font=HEAD_FONT)
        _run(doc.add_paragraph(), f"编号：{form.subtitle}　　生成：{made}（{who}）", size=9)
        _grid(doc, form.grid)
        for table in form.tables:
            _list(doc, table)
        if form.after:
            _grid(doc, form.after)
        _run(doc.add_paragraph(), form.remark, size=8.5)
        signs = doc.add_paragraph()
        signs.paragraph_format.space_before = Pt(18)
        _run(signs, "　　".join(f"{s}：＿＿＿＿＿＿＿＿" for s in form.signatures))
    out = io.BytesIO()
    doc.save(out)
    return out.getvalue()


def _fonts(rpr, font: str) -> None:
    from docx.oxml.ns import qn

    fonts = rpr.get_or_add_rFonts()
    for attr in ("w:ascii", "w:hAnsi", "w:eastAsia"):
        fonts.set(qn(attr), font)


def _run(par, text: str, *, bold: bool = False, size: float = 0, font: str = BODY_FONT, grey: bool = False):
    from docx.shared import Pt, RGBColor

    run = par.add_run(text)  # "\n" becomes a line break
    run.bold = bold or None
    if size:
        run.font.size = Pt(size)
    if grey:
        run.font.color.rgb = RGBColor(*GREY)
    _fonts(run._element.get_or_add_rPr(), font)
    return run


def _grid(doc, rows: list[list[Field]]) -> None:
    from docx.enum.text import WD_ALIGN_PARAGRAPH
    from docx.shared import Mm

    table = doc.add_table(rows=len(rows), cols=4)
    table.style = "Table Grid"
    for cells, fields in zip(table.rows, rows, strict=True):
        for j, f in enumerate(fields[:2]):
            label, value = cells.cells[2 * j], cells.cells[2 * j + 1]
            if f.wide or len(fields) == 1:
                value = value.merge(cells.cells[3])
            label.paragraphs[0].alignment = WD_ALIGN_PARAGRAPH.CENTER
            _run(label.paragraphs[0], f.label, bold=True, font=HEAD_FONT)
            if f.value is None:
                _run(value.paragraphs[0], BLANK, grey=True)
            else:
                _run(value.paragraphs[0], f.value)
        if any(f.tall for f in fields):
            cells.height = Mm(16)
    for row in table.rows:
        for k, width in enumerate((Mm(30), Mm(59), Mm(30), Mm(59))):
            row.cells[k].width = width


def _list(doc, t: Table) -> None:
    from docx.oxml import OxmlElement
    from docx.oxml.ns import qn
    from docx.shared import Mm

    _run(doc.add_paragraph(), t.heading, bold=True, font=HEAD_FONT)
    table = doc.add_table(rows=1, cols=len(t.columns))
    table.style = "Table Grid"
    header = table.rows[0]
    header._tr.get_or_add_trPr().append(OxmlElement("w:tblHeader"))  # repeated on every page
    for cell, name in zip(header.cells, t.columns, strict=True):
        _run(cell.paragraphs[0], name, bold=True, size=9.5, font=HEAD_FONT)
    if not t.rows:
        row = table.add_row()
        merged = row.cells[0].merge(row.cells[-1])
        _run(merged.paragraphs[0], t.empty, size=9)
    else:
        # One row built through python-docx, the others copied from it with their texts set: adding runs one by
        # one costs python-docx about a millisecond each (a day log has thousands of cells).
        model = table.add_row()
        for cell in model.cells:
            _run(cell.paragraphs[0], "-", size=9)
        text_tag = qn("w:t")
        for values in t.rows:
            tr = copy.deepcopy(model._tr)
            for tc, value in zip(tr.iterchildren(qn("w:tc")), values, strict=True):
                wt = next(tc.iter(text_tag))
                wt.text = value.replace("\n", " ")
                wt.set("{http://www.w3.org/XML/1998/namespace}space", "preserve")
            table._tbl.append(tr)
        table._tbl.remove(model._tr)
    for row in table.rows:
        for cell, width in zip(row.cells, t.widths, strict=False):
            cell.width = Mm(178 * width / 100)
