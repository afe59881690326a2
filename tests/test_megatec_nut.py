"""The Megatec simulator checked against a real peer: NUT's nutdrv_qx driver reads the status we set."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from examwatch.simulators.megatec import MegatecSimulator
from examwatch.simulators.serial_pty import PtyPair

DRIVER = Path("/lib/nut/nutdrv_qx")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not DRIVER.exists(), reason="Debian nut-server (nutdrv_qx) not installed"),
]


def nut_dump(port: Path, statepath: Path) -> dict[str, str]:
    """Run the driver once (``-d 1``: dump after one update and exit) and return its variables."""
    env = dict(os.environ, NUT_STATEPATH=str(statepath), NUT_CONFPATH=str(statepath))
    cmd = [str(DRIVER), "-s", "sim", "-x", f"port={port}", "-x", "protocol=megatec", "-d", "1"]
    if os.geteuid() == 0:
        cmd += ["-u", "root"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)


@pytest.mark.parametrize(("mode", "status"), [("line", "OL"), ("battery", "OB"), ("battery_low", "OB LB")])
def test_nutdrv_qx_reads_the_simulated_status(tmp_path: Path, mode: str, status: str) -> None:
    with PtyPair(tmp_path, "ups") as pair:
        sim = MegatecSimulator(str(pair.device))
        sim.set_mode(mode)  # type: ignore[arg-type]
        sim.start()
        try:
            nut = nut_dump(pair.agent, tmp_path)
        finally:
            sim.stop()
    assert nut["ups.status"] == status
    assert nut["driver.version.data"].startswith("Megatec")
    assert float(nut["battery.voltage"]) == sim.state.battery_voltage
    assert float(nut["input.voltage"]) == sim.state.input_voltage
    assert int(nut["ups.load"]) == sim.state.load_percent
    assert nut["ups.firmware"] == "V1.0" and float(nut["battery.voltage.nominal"]) == 12.0  # from I and F
