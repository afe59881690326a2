"""``examwatch report``: a form to a file from a gateway's config, the file verified, clear refusals (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.records_support import alarm_id, scripted_incident


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examwatch", "report", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("gw")
    incident = scripted_incident(d / "gateway.db")
    config = d / "gateway.toml"
    config.write_text(f'[gateway]\nstate_dir = "{d}"\ncounty = "某某县招生考试办公室"\n', encoding="utf-8")
    return config, incident


def test_report_to_a_file_that_verifies_until_it_is_edited(site, tmp_path):
    config, incident = site
    out = tmp_path / "首报.pdf"
    r = _cli("--config", str(config), "--incident", incident, "--form", "first", "--out", str(out), "--who", "王老师")
    assert r.returncode == 0, r.stderr
    assert "已存档可核验" in r.stdout and out.stat().st_mode & 0o077 == 0  # confidential: owner only
    text = subprocess.run(["pdftotext", str(out), "-"], capture_output=True, text=True, check=True).stdout
    assert "突发事件首报" in text and "2024-05-28 08:31:05" in text
    r = _cli("--config", str(config), "--verify", str(out))
    assert r.returncode == 0 and "核验通过" in r.stdout and "王老师" in r.stdout, r.stdout + r.stderr
    data = bytearray(out.read_bytes())
    data[-100] ^= 0x20
    out.write_bytes(data)
    r = _cli("--config", str(config), "--verify", str(out))
    assert r.returncode == 1 and "未通过核验" in r.stdout


def test_docx_for_a_day_and_a_level1_record(site, tmp_path):
    config, _ = site
    r = _cli("--config", str(config), "--day", "2024-05-28", "--form", "county", "--out", str(tmp_path / "c.docx"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.docx").read_bytes()[:2] == b"PK"
    r = _cli("--config", str(config), "--incident", alarm_id("102"), "--form", "l1", "--out", str(tmp_path / "l1.docx"))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--day", "2024-05-28", "--form", "first", "--out", "x.pdf"], "请用 --incident"),
        (["--incident", "x", "--form", "county", "--out", "x.pdf"], "请用 --day"),
        (["--incident", "s1/no-such", "--form", "final", "--out", "x.pdf"], "没有编号为 's1/no-such' 的事件或报警"),
        (["--day", "28/05/2024", "--form", "day", "--out", "x.pdf"], "应为 YYYY-MM-DD"),
        (["--day", "2024-05-28", "--form", "day", "--out", "x.odt"], "以 .pdf 或 .docx 结尾"),
        (["--day", "2024-05-28", "--out", "x.pdf"], "需要 --form 和 --out"),
        (["--verify", "no-such-file.pdf"], "no-such-file.pdf"),
    ],
)
def test_refusals_say_why_and_write_nothing(site, tmp_path, args, why):
    config, _ = site
    r = subprocess.run(
        [sys.executable, "-m", "examwatch", "report", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and why in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


def test_a_config_without_a_database_is_refused(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path / "none"}"\n', encoding="utf-8")
    r = _cli("--config", str(config), "--day", "2024-05-28", "--form", "day", "--out", str(tmp_path / "d.pdf"))
    assert r.returncode == 2 and "没有网关数据库" in r.stderr
