"""The agent's Prometheus page, written by the kernel's text-format writer: what each series says, and that
the agent runs without prometheus_client (its import cost a Pi agent about 2 MiB)."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from examwatch.collectors.base import DeviceError, Health
from examwatch.edge.config import loads
from examwatch.edge.exporter import page
from examwatch.kernel.model import Reading

HOSTILE = 'a "quoted" \\ back\nslash 考场'


def view() -> SimpleNamespace:
    device = '[[devices]]\nname = "ups1"\nkind = "ups"\nprotocol = "nut"\naddress = "u@h"\n'
    cfg = loads('[agent]\nsite = "s1"\nroom = "r101"\n' + device)
    health = Health()
    health.ok("ups1", "nut", 0.01, 1.0, 3)
    health.failed("ups1", "nut", DeviceError("timeout"), 0.5)
    health.drop(HOSTILE, "bad")
    now = time.time()
    current = {
        ("ups1", "ups_charge_percent"): Reading("ups1", "ups_charge_percent", 87.0, now - 1),
        ("host", "cpu_temperature_celsius"): Reading("host", "cpu_temperature_celsius", 1234567.0, now),
    }
    return SimpleNamespace(
        cfg=cfg,
        current=current,
        active={"a": SimpleNamespace(rule="ups_on_battery", level=2, device="ups1")},
        health=health,
        fallback=SimpleNamespace(stats={"sent": 3, "failed:http": 2}, waiting=[1]),
        phase=lambda t: "during",
        outbox_stats=lambda: {"used_ratio": 0.1, "dropped": 5},
        uplink_health=lambda: SimpleNamespace(connected=True, pending=4),
    )


def test_every_series_reads_back_as_the_agent_holds_it() -> None:
    text = page(view())
    families = list(text_string_to_metric_families(text))
    assert len({f.name for f in families}) == len(families)  # a family twice would void the whole scrape
    got = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    ids = {("site", "s1"), ("room", "r101")}
    assert got[("examwatch_ups_charge_percent", frozenset({*ids, ("device", "ups1"), ("kind", "ups")}))] == 87.0
    assert (
        got[("examwatch_cpu_temperature_celsius", frozenset({*ids, ("device", "host"), ("kind", "host")}))] == 1234567.0
    )
    assert got[("examwatch_input_dropped_total", frozenset({*ids, ("source", HOSTILE), ("reason", "bad")}))] == 1
    errors = frozenset({*ids, ("collector", "nut"), ("device", "ups1"), ("reason", "timeout")})
    assert got[("examwatch_collector_errors_total", errors)] == 1
    alarm = frozenset({*ids, ("rule", "ups_on_battery"), ("level", "2"), ("device", "ups1")})
    assert got[("examwatch_alarm_active", alarm)] == 1.0
    assert got[("examwatch_agent_phase", frozenset({*ids, ("phase", "during")}))] == 1.0
    assert got[("examwatch_uplink_pending_messages", frozenset(ids))] == 4.0
    assert got[("examwatch_fallback_failed_total", frozenset({*ids, ("reason", "http")}))] == 2
    info = next(k for k in got if k[0] == "examwatch_agent_info")
    assert dict(info[1])["room_kind"] == "exam_room"
    # label names sorted and numbers in Go's spelling, as prometheus_client wrote them
    assert 'examwatch_cpu_temperature_celsius{device="host",kind="host",room="r101",site="s1"} 1.234567e+06\n' in text


def test_the_agent_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, examwatch.cli, examwatch.edge.runtime, examwatch.edge.exporter, examwatch.edge.uplink\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prometheus_client', 'wsgiref')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
