"""A whole simulated exam room: every field device examwatch speaks to, started together.

Used by the end-to-end tests and by the demo. Each device speaks its real protocol on loopback or a pty
pair; ``fault(name)`` puts one into a named fault while everything runs, ``recover(name)`` puts it back,
and ``devices_toml()`` is the ``[[devices]]`` part of an agent config that watches them all.

    room = SimulatedRoom(workdir)
    room.start()
    room.fault("ups_on_battery")     # the SNMP UPS loses mains
    ...
    room.stop()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from examwatch.simulators.isapi import IsapiSimulator
from examwatch.simulators.megatec import MegatecSimulator
from examwatch.simulators.modbus_noise import NoiseMeterBus
from examwatch.simulators.nut import NutSimulator
from examwatch.simulators.serial_pty import PtyPair
from examwatch.simulators.snmp import SnmpSimulator, first_port_up

ISAPI_PASSWORD = "sim-pass"  # the simulator's own test credential


class SimulatedRoom:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.snmp = SnmpSimulator(self.workdir)
        self.nut = NutSimulator(self.workdir, ups="nutups")
        self.ups_pty = PtyPair(self.workdir, "ups")
        self.noise_pty = PtyPair(self.workdir, "noise")
        self.megatec: MegatecSimulator | None = None
        self.noise: NoiseMeterBus | None = None
        self.isapi = IsapiSimulator(password=ISAPI_PASSWORD)
        self.monitored_port: str | None = None

    def start(self) -> None:
        self.snmp.start()
        self.snmp.set_state("ups", "healthy")  # the recordings' own states would alarm (see simulators/snmp.py)
        self.snmp.set_state("nvr", "healthy")
        self.nut.start()
        self.ups_pty.start()
        self.megatec = MegatecSimulator(str(self.ups_pty.device))
        self.megatec.start()
        self.noise_pty.start()
        self.noise = NoiseMeterBus(str(self.noise_pty.device))
        self.noise.add_meter("generic-u16x10", slave=1, db=42.0)
        self.noise.start()
        self.isapi.start()
        self.monitored_port = first_port_up(self.snmp.recording("switch"))

    def stop(self) -> None:
        for stop in (
            self.isapi.stop,
            getattr(self.noise, "stop", None),
            self.noise_pty.stop,
            getattr(self.megatec, "stop", None),
            self.ups_pty.stop,
            self.nut.stop,
            self.snmp.stop,
        ):
            if stop is not None:
                with contextlib.suppress(Exception):  # stop the rest whatever one of them does
                    stop()

    # --- faults: name -> (cause, undo), and the alarm the default rule pack raises for each ---

    def _faults(self) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
        assert self.megatec is not None and self.noise is not None
        meg, noise = self.megatec, self.noise
        return {
            "ups_on_battery": (
                lambda: self.snmp.set_state("ups", "on_battery"),
                lambda: self.snmp.set_state("ups", "healthy"),
            ),
            "ups_charge_low": (
                lambda: self.snmp.set_state("ups", "low_charge"),
                lambda: self.snmp.set_state("ups", "healthy"),
            ),
            "switch_port_down": (
                lambda: self.snmp.set_state("switch", "link_down"),
                lambda: self.snmp.set_state("switch", "recorded"),
            ),
            "nvr_disk_failed": (
                lambda: self.snmp.set_state("nvr", "disk_failed"),
                lambda: self.snmp.set_state("nvr", "healthy"),
            ),
            "nut_on_battery": (lambda: self.nut.set_state("on_battery"), lambda: self.nut.set_state("online")),
            "serial_ups_on_battery": (lambda: meg.set_mode("battery"), lambda: meg.set_mode("line")),
            "noise_high": (lambda: noise.set_db(85.0, 1), lambda: noise.set_db(42.0, 1)),
            "camera_disk_error": (lambda: self.isapi.set_disk(2, "error"), lambda: self.isapi.set_disk(2, "ok")),
        }

    FAULTS = (
        "ups_on_battery",
        "ups_charge_low",
        "switch_port_down",
        "nvr_disk_failed",
        "nut_on_battery",
        "serial_ups_on_battery",
        "noise_high",
        "camera_disk_error",
    )

    def fault(self, name: str) -> None:
        self._faults()[name][0]()

    def recover(self, name: str) -> None:
        self._faults()[name][1]()

    def devices_toml(self, interval: float = 2.0) -> str:
        """The agent's ``[[devices]]`` for this room, polling every ``interval`` seconds."""
        common = f"interval = {interval}\ntimeout = 1.0\nretries = 0\n"
        snmp = self.snmp.address
        return f"""
[[devices]]
name = "ups1"
kind = "ups"
protocol = "snmp"
address = "{snmp}"
community = "ups"
profile = "ups-mib"
{common}
[[devices]]
name = "switch1"
kind = "switch"
protocol = "snmp"
address = "{snmp}"
community = "switch"
profile = "if-mib"
parts = ["port{self.monitored_port}"]
{common}
[[devices]]
name = "nvr1"
kind = "nvr"
protocol = "snmp"
address = "{snmp}"
community = "nvr"
profile = "hikvision-nvr"
{common}
[[devices]]
name = "ups2"
kind = "ups"
protocol = "nut"
address = "{self.nut.address}"
{common}
[[devices]]
name = "ups3"
kind = "ups"
protocol = "megatec"
address = "{self.ups_pty.agent}"
profile = "pack-voltage"
{common}
[[devices]]
name = "noise1"
kind = "noise"
protocol = "modbus_noise"
address = "{self.noise_pty.agent}"
profile = "generic-u16x10"
slave = 1
{common}
[[devices]]
name = "cam1"
kind = "camera"
protocol = "isapi"
address = "{self.isapi.address}"
password = "{ISAPI_PASSWORD}"
{common}"""
