"""The canonical metric catalog: the one vocabulary that profiles map onto and rules and dashboards speak.

Every metric has a base unit. Prometheus exports it as ``examwatch_<name>``; the name already carries the
unit, so a dashboard never has to guess.
"""

from __future__ import annotations

from typing import NamedTuple


class Metric(NamedTuple):
    unit: str
    help: str


METRICS: dict[str, Metric] = {
    # any device
    "device_online": Metric("bool", "1 while the device answers its collector"),
    # recorders, cameras, wireless sensors
    "battery_percent": Metric("percent", "battery charge of a recorder, camera or wireless sensor"),
    "battery_low": Metric("bool", "1 while a wireless sensor reports its battery low (Zigbee2MQTT battery_low)"),
    "battery_voltage_volts": Metric("volts", "battery voltage of a wireless sensor"),
    "radio_link_quality": Metric("count", "Zigbee link quality (LQI, 0-255)"),
    "recording_active": Metric("bool", "1 while the recorder or camera is recording"),
    # storage (recorders, cameras, NVR disks, the agent's own disk)
    "storage_free_bytes": Metric("bytes", "free storage"),
    "storage_total_bytes": Metric("bytes", "storage capacity"),
    "storage_used_ratio": Metric("ratio", "used share of the storage, 0-1"),
    "storage_ok": Metric("bool", "1 while the disk or card reports a healthy status"),
    # power
    "power_on_battery": Metric("bool", "1 while the UPS runs on battery (mains lost)"),
    "ups_charge_percent": Metric("percent", "UPS battery charge"),
    "ups_runtime_seconds": Metric("seconds", "UPS estimated runtime left on battery"),
    "ups_battery_low": Metric("bool", "1 while the UPS reports its battery low"),
    "ups_load_percent": Metric("percent", "UPS output load"),
    "ups_fault": Metric("bool", "1 while the UPS reports a fault"),
    "ups_bypass": Metric("bool", "1 while the UPS output is on bypass or boost/buck"),
    "ups_test_active": Metric("bool", "1 while a UPS self-test runs"),
    "ups_shutdown_pending": Metric("bool", "1 while the UPS has a shutdown pending"),
    "ups_alarms_present": Metric("count", "number of active UPS alarms"),
    "input_voltage_volts": Metric("volts", "mains input voltage"),
    "output_voltage_volts": Metric("volts", "UPS output voltage"),
    "input_frequency_hertz": Metric("hertz", "mains input frequency"),
    # network
    "link_up": Metric("bool", "1 while the link or port is up"),
    "link_rtt_seconds": Metric("seconds", "round-trip time to the link's target"),
    "link_loss_ratio": Metric("ratio", "packet loss to the link's target over the window, 0-1"),
    "link_errors": Metric("count", "interface error count as the device reports it"),
    "link_primary_active": Metric("bool", "1 while the default route uses the primary link, 0 on the backup"),
    # rooms and the secrecy room
    "door_open": Metric("bool", "1 while the door or window is open"),
    "noise_db": Metric("decibels", "sound level"),
    # the agent's own machine
    "cpu_temperature_celsius": Metric("celsius", "CPU temperature of the agent's machine"),
    "memory_available_bytes": Metric("bytes", "memory available on the agent's machine"),
    "memory_used_ratio": Metric("ratio", "used share of the agent's memory, 0-1"),
    "store_ok": Metric("bool", "1 while the agent's local database accepts writes"),
    "store_corrupt": Metric(
        "bool",
        "1 after the agent found its local database corrupt, set it aside and started afresh"
        " (until it restarts on a sound one)",
    ),
    "clock_jump_seconds": Metric(
        "seconds", "size of the latest step of the agent's wall clock within the last hour, 0 if none"
    ),
    "outbox_used_ratio": Metric("ratio", "share of the uplink outbox's disk budget in use, 0-1"),
}


def unit_of(metric: str) -> str:
    return METRICS[metric].unit
