"""The systemd units in deploy/systemd: hardened (systemd's own rating), yet allowing what each process needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"


def settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("unit", ["examwatch-agent.service", "examwatch-gateway.service"])
def test_systemd_rates_the_unit_2_or_better(unit):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    run = subprocess.run([exe, "security", "--offline=yes", str(UNITS / unit)], capture_output=True, text=True)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
    assert found, run.stdout[-2000:] + run.stderr
    assert float(found.group(1)) <= 2.0, run.stdout


def test_both_units_are_watched_and_bounded():
    for unit in ("examwatch-agent.service", "examwatch-gateway.service"):
        s = settings(unit)
        assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
        assert int(s["WatchdogSec"][0]) > 0 and s["MemoryMax"] and s["Restart"] == ["always"]


def test_the_units_still_allow_what_the_processes_need():
    agent = settings("examwatch-agent.service")
    assert agent["SupplementaryGroups"] == ["dialout"]  # serial UPSes and RS485 meters
    assert "PrivateDevices" not in agent and {"char-ttyUSB rw", "char-ttyAMA rw"} <= set(agent["DeviceAllow"])
    families = agent["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"} <= set(families)  # devices, ICMP sockets, psutil
    assert "ProcSubset" not in agent  # psutil reads /proc/meminfo, /proc/stat
    assert agent["StateDirectory"] == ["examwatch"]
    gateway = settings("examwatch-gateway.service")
    assert gateway["StateDirectory"] == ["examwatch-gateway"] and gateway["ProtectSystem"] == ["strict"]
    assert "--config /etc/examwatch/gateway.toml" in gateway["ExecStart"][0]
