"""`examwatch demo` (the README's first command, after set-up): the whole site runs and the county sees
every step of the scripted morning, including the cross-room incident."""

from __future__ import annotations

import re

import pytest

from examwatch.simulators.demo import main

pytestmark = pytest.mark.integration


def test_the_demo_site_plays_its_scenario_and_the_county_sees_every_step(tmp_path, capsys):
    assert main(str(tmp_path / "demo"), duration=0.1, scenario=True, speed=10, usual_ports=False) == 0
    out = capsys.readouterr().out
    assert "市电中断，UPS 电池供电" in out
    assert "考点多个考场网络中断: 101, 102" in out
    assert "保密室门在非开启时段被打开" in out
    assert "县级网关没有看到预期的结果" not in out
    assert re.search(r"值班台: +http://127\.0\.0\.1:\d+/  登录：值班员 / \S{8,}", out)  # the desk and its demo log-in
