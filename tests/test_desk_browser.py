"""The duty desk in a real headless Chromium (Debian's, driven by Playwright) against a real gateway and broker.

A raised alarm appears without reload within 2 s of being stored, its countdown runs down, it is
acknowledged from the page and the room's tile changes colour; an incident's page draws its timeline;
a wrong password is refused; a request without the CSRF token is refused (403); a viewer cannot
acknowledge. Screenshots go to tests/artifacts/ (not kept in git; the good ones are copied to docs/img/).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from tests.support import until
from tests.support.desk import PASSWORD, alarm, desk_site

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium (tests/run.sh installs it)"),
]
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SHOWN = 2000  # ms: a stored alarm must be on the page within this, without reload (the requirement)
RED, ORANGE, GREEN = "rgb(211, 47, 47)", "rgb(245, 124, 0)", "rgb(46, 125, 50)"


@pytest.fixture
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def site(mosquitto, procs, tmp_path):
    return desk_site(procs, tmp_path, mosquitto.port)


def logged_in(browser, gw, name: str, password: str = PASSWORD, **context):
    page = browser.new_context(locale="zh-CN", timezone_id="Asia/Shanghai", **context).new_page()
    page.goto(f"http://127.0.0.1:{gw.api_port}/")
    page.fill("#login-form [name=name]", name)
    page.fill("#login-form [name=password]", password)
    page.click("#login-form button")
    return page


def colour(page, agent: str) -> str:
    return page.eval_on_selector(f'[data-agent="{agent}"]', "el => getComputedStyle(el).backgroundColor")


def seconds_left(text: str) -> int:
    m, s = re.search(r"剩余 (\d+):(\d\d)", text).groups()
    return int(m) * 60 + int(s)


def stored(gw, alarm_id: str, **fields) -> bool:
    return any(a["id"] == alarm_id and fields.items() <= a.items() for a in gw.get("/api/v1/alarms")["alarms"])


def test_a_raised_alarm_appears_counts_down_is_acknowledged_and_its_tile_changes(site, browser):
    gw, rooms = site
    ARTIFACTS.mkdir(exist_ok=True)
    page = logged_in(browser, gw, "值班员", viewport={"width": 1280, "height": 1000})
    page.wait_for_selector("#desk:not([hidden]) .tile")
    assert page.locator("#rooms .tile").count() == 4 and page.locator("#secrecy .tile").count() == 1
    assert "未连接" in page.inner_text('[data-agent="s1/101"]')  # never heard of: grey

    ev = alarm("s1", "101", "ups_on_battery", 1, time.time())
    rooms.send(ev)
    until(lambda: stored(gw, ev.id), what="the alarm stored")
    item = page.wait_for_selector(f'li.alarm[data-id="{ev.id}"]', timeout=SHOWN)  # no reload: the event stream
    assert "UPS 市电中断" in item.inner_text()
    due = item.query_selector(".due")
    first = seconds_left(due.inner_text())
    assert 240 < first <= 300 and "反馈" in due.inner_text()
    page.wait_for_function(
        "([el, first]) => { const m = el.textContent.match(/剩余 (\\d+):(\\d\\d)/);"
        " return m && m[1] * 60 + +m[2] < first; }",
        arg=[due, first],
        timeout=5000,
    )
    assert colour(page, "s1/101") == RED

    page.click('[data-agent="s1/101"]')  # the room: its alarm history
    page.wait_for_selector(f"#panel td:has-text('{ev.message}')")
    assert "考场 s1/101" in page.inner_text("#panel h2")
    page.click("#panel-close")
    item.query_selector("[data-open-alarm]").click()
    page.fill('#panel form[data-act="ack"] [name=note]', "已到场，UPS 供电正常")
    page.click('#panel form[data-act="ack"] button')
    page.wait_for_selector('#panel .due.done:has-text("已确认")')
    page.click("#panel-close")
    page.wait_for_selector('[data-agent="s1/101"][data-taken="true"]', timeout=SHOWN)
    assert colour(page, "s1/101") not in (RED, GREEN)  # acknowledged, still active: the lighter red
    assert stored(gw, ev.id, acked_by="值班员", acked_note="已到场，UPS 供电正常")

    # a second room with the fault: an incident, and its page with the timeline and the reports' links
    rooms.send(alarm("s1", "102", "ups_on_battery", 1, time.time()))
    page.wait_for_selector("li.incident [data-open-incident]").click()
    page.wait_for_selector("#panel svg.timeline")
    assert page.locator("#panel svg.timeline rect").count() == 2
    links = page.eval_on_selector_all("#panel .reports a", "els => els.map(a => a.getAttribute('href'))")
    assert any(re.fullmatch(r"/desk/reports\?incident=s1%2Fpower%2F\d+&form=first&format=pdf", h) for h in links)
    assert any(re.fullmatch(r"/desk/reports\?day=\d{4}-\d\d-\d\d&form=county&format=docx", h) for h in links)
    answer = page.request.get(f"http://127.0.0.1:{gw.api_port}{links[0]}")
    assert answer.status == 200 and answer.headers["content-type"] == "application/pdf" and answer.body()[:4] == b"%PDF"
    page.select_option('#panel form[data-act="note"] [name=category]', "measure")
    page.fill('#panel form[data-act="note"] [name=text]', "两个考场 UPS 供电，已通知电工检查配电箱")
    page.click('#panel form[data-act="note"] button')
    page.wait_for_selector("#panel td:has-text('已通知电工检查配电箱')")  # the panel redrawn with the note
    page.wait_for_selector("#panel svg.timeline")
    page.screenshot(path=str(ARTIFACTS / "desk-incident.png"), full_page=True)
    page.click("#panel-close")
    page.screenshot(path=str(ARTIFACTS / "desk.png"), full_page=True)

    rooms.send(alarm("s1", "101", "ups_on_battery", 1, time.time(), state="cleared", raised_at=ev.raised_at))
    page.wait_for_function(
        "([sel, green]) => getComputedStyle(document.querySelector(sel)).backgroundColor === green",
        arg=['[data-agent="s1/101"]', GREEN],
    )
    phone = logged_in(browser, gw, "值班员", viewport={"width": 390, "height": 844}, device_scale_factor=2)
    phone.wait_for_selector("li.incident")
    phone.screenshot(path=str(ARTIFACTS / "desk-phone.png"), full_page=True)


def test_wrong_password_csrf_and_a_viewer_are_refused(site, browser):
    gw, rooms = site
    page = logged_in(browser, gw, "值班员", "not the password")
    assert page.wait_for_selector("#login-error:has-text('用户名或密码错误')")
    assert page.is_hidden("#desk")

    ev = alarm("s1", "bmj", "ups_on_battery", 1, time.time())
    rooms.send(ev)
    until(lambda: stored(gw, ev.id), what="the alarm stored")
    post = """async ([path, body, csrf]) => {
        const headers = {"Content-Type": "application/json"};
        if (csrf) headers["X-CSRF-Token"] = (await (await fetch("/desk/session")).json()).csrf;
        return (await fetch(path, {method: "POST", headers, body: JSON.stringify(body)})).status;
    }"""
    ack = {"kind": "alarm", "id": ev.id, "note": "x"}
    duty = logged_in(browser, gw, "值班员")
    duty.wait_for_selector(f'li.alarm[data-id="{ev.id}"]')
    assert duty.evaluate(post, ["/desk/api/ack", ack, False]) == 403  # the session cookie alone: refused

    viewer = logged_in(browser, gw, "查看员")
    viewer.wait_for_selector('#secrecy [data-agent="s1/bmj"]')  # the secrecy room, shown apart
    viewer.click(f'li.alarm[data-id="{ev.id}"] [data-open-alarm]')
    viewer.wait_for_selector("#panel:has-text('只读账号')")
    assert viewer.locator('#panel form[data-act="ack"]').count() == 0
    assert viewer.evaluate(post, ["/desk/api/ack", ack, True]) == 403  # with the token: the role still refuses
    assert duty.evaluate(post, ["/desk/api/ack", ack, True]) == 200
    assert stored(gw, ev.id, acked_by="值班员")
