"""A new protocol is one module: the example collector of docs/collectors.md, defined here and registered
under a test name, is configured, sampled, checked by `config check`, probed by `examwatch check` and
polled by the real agent runtime, without any change outside its own definition."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from examwatch.cli import main as cli
from examwatch.collectors.base import REGISTRY, DeviceError, PollingCollector, register
from examwatch.edge.config import ConfigError, loads, sample_text
from examwatch.edge.runtime import Agent
from examwatch.kernel.model import Reading
from examwatch.simulators.broker import free_port
from tests.support import wait_until

# --- the example of docs/collectors.md, as a protocol module would hold it ------------------------------


class TextFileOptions(msgspec.Struct, forbid_unknown_fields=True):
    metric: str = "noise_db"  # which catalog metric the number is


class TextFileCollector(PollingCollector):
    """A meter whose vendor logger writes its latest reading, one number, into a text file."""

    protocol = "textfile_example"
    Options = TextFileOptions
    needs_address = "a text-file meter needs address = the file's path"
    reasons = {"no_file": "读数文件不存在：检查记录程序是否在运行", "not_a_number": "读数文件内容不是数字"}
    sample = """
[[devices]]                     # example: a meter whose logger writes its reading into a file
name = "noise-file"
kind = "noise"
protocol = "textfile_example"
address = "/run/noise-logger/level"
"""

    async def poll(self, device: Any) -> list[Reading]:
        try:
            text = Path(device.address).read_bytes()[:64].decode("ascii", errors="replace")  # bounded
        except FileNotFoundError:
            raise DeviceError("no_file", device.address) from None
        try:
            value = float(text)
        except ValueError:
            raise DeviceError("not_a_number", repr(text[:20])) from None
        if not math.isfinite(value):
            raise DeviceError("not_a_number", text[:20])
        return [Reading(device.name, device.options.metric, value, time.time())]


@pytest.fixture
def textfile() -> Iterator[type[TextFileCollector]]:
    register(TextFileCollector)
    try:
        yield TextFileCollector
    finally:
        REGISTRY.pop(TextFileCollector.protocol)


def room(tmp_path: Path, level: Path, extra: str = "") -> str:
    return f"""
[agent]
site = "s1"
room = "r9"
state_dir = "{tmp_path / "state"}"
[exporter]
listen = "127.0.0.1:{free_port()}"
[[devices]]
name = "noise-file"
kind = "noise"
protocol = "textfile_example"
address = "{level}"
interval = 0.2
{extra}
"""


# --- the whole path --------------------------------------------------------------------------------------


def test_its_options_and_checks_are_validated(textfile, tmp_path):
    cfg = loads(room(tmp_path, tmp_path / "level", 'metric = "noise_db"'))
    assert cfg.devices[0].options == TextFileOptions("noise_db")
    with pytest.raises(ConfigError) as exc:
        loads(room(tmp_path, tmp_path / "level", 'metirc = "noise_db"'))
    assert [i.path for i in exc.value.issues] == [("devices", 0, "metirc")]
    with pytest.raises(ConfigError) as exc:
        loads(room(tmp_path, tmp_path / "level").replace(f'address = "{tmp_path / "level"}"', ""))
    assert [(i.path, i.message) for i in exc.value.issues] == [(("devices", 0, "address"), textfile.needs_address)]


def test_its_sample_block_is_in_the_sample_and_valid(textfile, tmp_path, capsys):
    assert textfile.sample in sample_text()
    assert "noise-file" in {d.name for d in loads(sample_text()).devices}
    assert cli(["config", "sample"]) == 0
    path = tmp_path / "agent.toml"
    path.write_text(capsys.readouterr().out, encoding="utf-8")
    assert cli(["config", "check", str(path)]) == 0
    assert "ok (xx-school-1/secrecy" in capsys.readouterr().out


def test_the_readiness_check_probes_it_and_says_its_reasons(textfile, tmp_path, capsys):
    level = tmp_path / "level"
    level.write_text("41.5\n")
    config = tmp_path / "agent.toml"
    config.write_text(room(tmp_path, level), encoding="utf-8")
    assert cli(["check", "--config", str(config), "--wait", "0.5", "--json"]) == 0
    row = {c["id"]: c for c in json.loads(capsys.readouterr().out)["checks"]}["device:noise-file"]
    assert row["status"] == "ok" and "1 项读数" in row["detail"] and "textfile_example" in row["item"]

    level.unlink()
    assert cli(["check", "--config", str(config), "--wait", "0.5", "--json"]) == 1
    row = {c["id"]: c for c in json.loads(capsys.readouterr().out)["checks"]}["device:noise-file"]
    assert row["status"] == "fail" and "读数文件不存在" in row["detail"]


def test_the_agent_runtime_polls_it(textfile, tmp_path):
    level = tmp_path / "level"
    level.write_text("38\n")
    agent = Agent(loads(room(tmp_path, level)))

    async def serve_until_read() -> None:
        stop = asyncio.Event()
        serving = asyncio.create_task(agent.serve(stop))
        try:
            await wait_until(lambda: ("noise-file", "noise_db") in agent.current, 20, "a noise_db reading stored")
            level.write_text("nonsense")
            await wait_until(
                lambda: agent.health.devices["noise-file"].errors["not_a_number"],
                20,
                "the garbled file counted as not_a_number",
            )
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)

    asyncio.run(serve_until_read())
    assert agent.current[("noise-file", "noise_db")].value == 38.0
    assert agent.health.devices["noise-file"].online is False  # the garbled file is a device state
