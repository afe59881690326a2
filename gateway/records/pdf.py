"""Forms -> PDF: an HTML page from a Jinja2 template (autoescaped: notes are people's input), printed by
WeasyPrint with the CJK fonts fontconfig finds (Debian's fonts-noto-cjk), embedded as subsets.

WeasyPrint (and Pango under it) is imported here only, when a PDF is asked for: the gateway does not load it.
"""

from __future__ import annotations

from importlib import resources

import jinja2

from examwatch.gateway.records.forms import BLANK, Form

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("examwatch.gateway.records", "templates"),
    autoescape=True,  # every value is text, never markup: a note "<b>" prints as "<b>"
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def html(forms: list[Form], made: str, who: str) -> str:
    css = resources.files("examwatch.gateway.records").joinpath("templates", "form.css").read_text(encoding="utf-8")
    return _env.get_template("form.html").render(forms=forms, made=made, who=who, css=css, blank=BLANK)


def render(forms: list[Form], made: str, who: str) -> bytes:
    import weasyprint

    return weasyprint.HTML(string=html(forms, made, who), url_fetcher=_nothing).write_pdf()


def _nothing(url: str, *args: object, **kwargs: object) -> dict[str, object]:
    """The page loads nothing from outside (no links, images or imports): any URL in it is refused."""
    raise ValueError(f"records fetch nothing: {url[:80]}")
