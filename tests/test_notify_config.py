"""The channels' config: the documented example parses; mistakes are all reported with their key paths;
``examwatch gateway test-channel`` sends one test message and says whether the platform confirmed it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from examwatch.edge.config import ConfigError
from examwatch.gateway.config import loads
from tests.notify_support import Bot

ROOT = Path(__file__).resolve().parent.parent


def docs_example() -> str:
    text = (ROOT / "docs" / "channels.md").read_text(encoding="utf-8")
    return re.search(r"```toml\n(.*?)```", text, re.S).group(1)


def test_the_documented_example_is_a_valid_config():
    cfg = loads(docs_example())
    assert [c.type for c in cfg.channels] == ["dingtalk", "wecom", "feishu", "email", "webhook", "alertmanager"]
    assert cfg.notify.deadlines.level2 == [600.0, 1800.0]
    assert cfg.roster[1].county_office == ["county-mail"]


def test_every_mistake_is_reported_at_once():
    text = """
[[channels]]
name = "a"
type = "dingtalk"
url = "ftp://x"
[[channels]]
name = "a"
type = "sms"
[[channels]]
name = "m"
type = "email"
host = "h"
sender = "s@x"
to = ["t@x"]
tls = "none"
[[roster]]
site = "s1"
technicians = ["nobody"]
[notify.deadlines]
level2 = [1800.0, 600.0]
"""
    with pytest.raises(ConfigError) as err:
        loads(text)
    found = {(tuple(i.path), i.message) for i in err.value.issues}
    paths = {p for p, _ in found}
    assert ("channels", 0, "url") in paths and ("channels", 1, "name") in paths and ("channels", 1, "type") in paths
    assert ("channels", 2, "tls") in paths and ("roster", 0, "technicians") in paths
    assert ("notify", "deadlines", "level2") in paths


def test_test_channel_reports_a_confirmed_send_and_a_refused_one(tmp_path):
    bot = Bot("dingtalk", secret="SECright")
    try:
        cfg = tmp_path / "gw.toml"
        for secret, code in (("SECright", 0), ("SECwrong", 1)):
            cfg.write_text(f'[[channels]]\nname = "tech"\ntype = "dingtalk"\nurl = "{bot.url}"\nsecret = "{secret}"\n')
            done = subprocess.run(
                [sys.executable, "-m", "examwatch", "gateway", "test-channel", "tech", "--config", str(cfg)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == code, done.stderr
            assert secret not in done.stdout + done.stderr
        assert len(bot.bodies()) == 1 and bot.bodies()[0]["markdown"]["title"] == "【测试】examwatch 通知渠道测试"
        assert "310000" in done.stderr and "发送失败" in done.stderr
    finally:
        bot.stop()
