"""The Grafana dashboards, checked against a real Prometheus scraping real agents and the real gateway.

Grafana itself is not installable here, so every panel query and template variable is run through
Prometheus's HTTP API with the variables substituted as Grafana would. The room agents hear real sensor
payloads over mosquitto and send them up to the gateway, so the panels fed by them must show data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from examwatch.simulators.broker import Mosquitto, free_port, wait_port
from tests.support import until
from tests.support.gateway import GatewayProc, key_hex

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"
JOBS = {"room": "examwatch-agent", "county": "examwatch-gateway"}
# What Grafana would put in for the built-in and template variables.
SUBSTITUTE = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$site": "s1", "$room": "r1"}
TZ = ZoneInfo("Asia/Shanghai")
NAME = re.compile(r"\bexamwatch_[a-z0-9_]+")


def local(minutes: float) -> str:
    return (datetime.now(TZ) + timedelta(minutes=minutes)).replace(tzinfo=None, microsecond=0).isoformat()


def mqtt_device(name: str, kind: str, topic: str, profile: str, fields: str = "") -> str:
    block = f'[[devices]]\nname = "{name}"\nkind = "{kind}"\nprotocol = "mqtt"\ntopic = "{topic}"\n'
    block += f'profile = "{profile}"\ninterval = 60\n'
    return block + (f"fields = [{fields}]\n" if fields else "")


def agent_config(site_room: str, broker: int, exporter: int, state: Path, kind: str, devices: str) -> str:
    site, room = site_room.split("/")
    return (
        f'[agent]\nsite = "{site}"\nroom = "{room}"\nkind = "{kind}"\nstate_dir = "{state}"\n'
        f"[mqtt]\nport = {broker}\n"
        f'[exporter]\nlisten = "127.0.0.1:{exporter}"\n'
        f'[uplink]\nenabled = true\nport = {broker}\nsigning_key = "{key_hex(site_room)}"\n'
        f"heartbeat = 1.0\nbatch_interval = 0.3\n"
        f'[[devices]]\nname = "pi"\nkind = "host"\nprotocol = "host"\naddress = "{state}"\ninterval = 0.5\n'
        f"{devices}"
        f"[rules.noise_high]\nfor = 0.5\n"
        # a session now, the secrecy room's next opening window only in an hour
        f'[schedule]\ntimezone = "Asia/Shanghai"\n'
        f"[[schedule.sessions]]\nstart = {local(-10)}\nend = {local(60)}\n"
        f"[[schedule.secrecy_windows]]\nstart = {local(60)}\nend = {local(90)}\n"
    )


SECRECY_ROOM_DEVICES = "".join(
    [
        mqtt_device("door", "door", "z2m/door", "zigbee2mqtt_contact"),
        mqtt_device("noise", "noise", "z2m/noise", "zigbee2mqtt_noise"),
        mqtt_device("recorder1", "recorder", "bridge/recorder1", "recorder_json"),
        mqtt_device(
            "ups",
            "ups",
            "bridge/ups",
            "generic_json",
            '{path = "on_battery", metric = "power_on_battery", map = {true = 1, false = 0}}, '
            '{path = "charge", metric = "ups_charge_percent"}, {path = "runtime", metric = "ups_runtime_seconds"}',
        ),
        mqtt_device(
            "uplink",
            "link",
            "bridge/link",
            "generic_json",
            '{path = "up", metric = "link_up"}, {path = "rtt_ms", metric = "link_rtt_seconds", scale = 0.001}, '
            '{path = "loss", metric = "link_loss_ratio"}',
        ),
        # the backup disk is not mounted: a polling device that fails, for the collector-error panels
        '[[devices]]\nname = "backup"\nkind = "host"\nprotocol = "host"\naddress = "/nonexistent/backup"\ninterval = '
        "0.5\n",
    ]
)
EXAM_ROOM_DEVICES = mqtt_device("noise", "noise", "z2m/noise2", "zigbee2mqtt_noise")


class Agent:
    def __init__(self, workdir: Path, site_room: str, broker: int, kind: str, devices: str) -> None:
        self.dir = workdir / site_room.replace("/", "-")
        self.dir.mkdir(parents=True)
        self.exporter = free_port()
        config = self.dir / "agent.toml"
        config.write_text(agent_config(site_room, broker, self.exporter, self.dir, kind, devices), encoding="utf-8")
        self.log = self.dir / "log"
        self.hears_sensors = 'protocol = "mqtt"' in devices
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "examwatch", "agent", "run", "--config", str(config)],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=out,
                stderr=out,
            )

    def ready(self) -> None:
        """Its exporter listens and its sensor subscription is in place (a message before it would be lost)."""
        wait_port(self.exporter, 20)
        if self.hears_sensors:
            until(lambda: "mqtt_connected" in self.log.read_text(errors="replace"), 20, "agent subscribed")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


def get_json(url: str, params: dict[str, str] | None = None) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:  # a bad query answers 400 with the error in the body
        return json.loads(err.read())


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


@dataclass
class Stack:
    prometheus: int
    agent_exporter: int
    gateway_exporter: int

    def query(self, expr: str) -> dict[str, Any]:
        return get_json(f"http://127.0.0.1:{self.prometheus}/api/v1/query", {"query": expr})

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.prometheus}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


def prometheus_config(agents: list[int], gateway: int) -> str:
    return (
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {JOBS['room']}\n    static_configs:\n"
        f"      - targets: [{', '.join(repr(f'127.0.0.1:{p}') for p in agents)}]\n"
        f"  - job_name: {JOBS['county']}\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gateway}']\n"
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two rooms and a third that goes offline, the gateway, and Prometheus scraping them every second."""
    work = tmp_path_factory.mktemp("grafana")
    (work / "broker").mkdir()
    broker = Mosquitto(work / "broker")
    broker.start()
    stoppers: list[Any] = [broker.stop]
    try:
        gateway = GatewayProc(work, broker.port, ["s1/r1", "s1/r2", "s1/r3"])
        gateway.start()
        stoppers.append(gateway.stop)
        secrecy = Agent(work, "s1/r1", broker.port, "secrecy_room", SECRECY_ROOM_DEVICES)
        exam = Agent(work, "s1/r2", broker.port, "exam_room", EXAM_ROOM_DEVICES)
        leaving = Agent(work, "s1/r3", broker.port, "exam_room", "")
        stoppers += [secrecy.stop, exam.stop, leaving.stop]

        config = work / "prometheus.yml"
        config.write_text(prometheus_config([secrecy.exporter, exam.exporter], gateway.metrics_port))
        check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        with open(work / "prometheus.log", "wb") as out:
            prom = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=out,
            )
        stoppers.append(lambda: (prom.terminate(), prom.wait(15)))

        for agent in (secrecy, exam, leaving):
            agent.ready()
        pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        stoppers.append(pub.loop_stop)

        def send(topic: str, payload: Any) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            pub.publish(topic, data, qos=1).wait_for_publish(5)

        send("z2m/door", {"contact": False, "battery": 95, "linkquality": 120})  # secrecy door outside its window
        send("z2m/noise", {"noise": 82, "battery": 60})  # loud in two rooms during a session: a level-2 incident
        send("z2m/noise2", {"noise": 78, "battery": 55})
        send("z2m/noise", b"{not json")  # a garbled payload: counted as dropped input
        send("bridge/recorder1", {"battery": 12, "recording": True, "storage": {"free_mb": 900, "total_mb": 32000}})
        send("bridge/ups", {"on_battery": True, "charge": 76, "runtime": 1500})
        send("bridge/link", {"up": 1, "rtt_ms": 12.5, "loss": 0.01})
        until(lambda: '"s1/r3"' in json.dumps(gateway.get("/api/v1/agents")), 20, "r3 heard by the gateway")
        leaving.stop()  # a clean stop says "offline": one room offline on the county view

        # forgeries once Prometheus has scraped every room's counters at 0, so increase() sees each one
        stack = Stack(port, secrecy.exporter, gateway.metrics_port)
        until(stack.ready, 30, "Prometheus ready")
        until(lambda: stack.value("sum(examwatch_gateway_rejected_total)") == 0, 20, "counters scraped at 0")
        send("examwatch/v1/s1/r1/readings", b'{"forged": true}')  # not signed by r1's key: rejected
        until(lambda: stack.value("sum(examwatch_gateway_rejected_total)") == 1, 20, "rejection scraped")
        send("examwatch/v1/s1/r1/readings", b'{"forged": 2}')
        until(lambda: stack.value("sum(examwatch_gateway_rejected_total)") == 2, 20, "second rejection scraped")
        yield stack
    finally:
        for stop in reversed(stoppers):
            stop()
        shutil.rmtree(work / "tsdb", ignore_errors=True)


def dashboard(name: str) -> dict[str, Any]:
    return json.loads((DASHBOARDS / f"{name}.json").read_text(encoding="utf-8"))


def panels(name: str) -> list[dict[str, Any]]:
    return [p for p in dashboard(name)["panels"] if p["type"] != "row"]


def substitute(expr: str, board: str, **values: str) -> str:
    out = expr.replace("$job", JOBS[board])
    chosen = {**SUBSTITUTE, **{f"${k}": v for k, v in values.items()}}
    for var, value in sorted(chosen.items(), key=lambda kv: -len(kv[0])):  # $__range before $room
        out = out.replace(var, value)
    assert "$" not in out, f"unsubstituted variable in {out}"
    return out


def test_every_panel_query_runs_and_the_fed_panels_show_data(stack: Stack) -> None:
    targets = [(board, p["title"], t["expr"]) for board in JOBS for p in panels(board) for t in p["targets"]]

    def results() -> dict[tuple[str, str, str], dict[str, Any]]:
        return {(b, title, expr): stack.query(substitute(expr, b)) for b, title, expr in targets}

    def settled() -> dict[tuple[str, str, str], dict[str, Any]] | None:
        got = results()
        missing = [k for k, r in got.items() if r["status"] == "success" and not r["data"]["result"]]
        return None if missing else got

    # Data arrives within a few scrapes; rate() and increase() need two samples in the window.
    deadline = time.monotonic() + 25
    got = settled()
    while got is None and time.monotonic() < deadline:
        time.sleep(0.5)
        got = settled()
    got = got or results()
    errors = [(k, r.get("error")) for k, r in got.items() if r["status"] != "success"]
    assert errors == [], errors
    empty = [k[:2] for k, r in got.items() if not r["data"]["result"]]
    assert empty == [], f"panels without data: {empty}"

    def values(board: str, title: str) -> list[tuple[dict[str, str], float]]:
        return [
            (s["metric"], float(s["value"][1]))
            for k, r in got.items()
            if k[:2] == (board, title)
            for s in r["data"]["result"]
        ]

    # The panels say what happened, not just something.
    alarms = {(m["rule"], m["level"]) for m, _ in values("room", "当前告警")}
    assert {("secrecy_door_open", "2"), ("recorder_battery_low", "1"), ("noise_high", "1")} <= alarms
    assert [(m["device"], v) for m, v in values("room", "门磁")] == [("door", 1.0)]
    assert [(m["level"], v) for m, v in values("county", "二级及以上事件")] == [("2", 1.0)]  # noise in r1 and r2
    assert values("county", "离线考场") == [({}, 1.0)]
    assert [(m["class"], m["level"], v) for m, v in values("county", "未结事件（按类别）")] == [("noise", "2", 1.0)]
    assert values("county", "考试阶段") == [({"phase": "during"}, 3.0)]  # the rooms' own schedules: a session now
    assert values("county", "拒收消息") == [({}, 2.0)]
    assert any(m["room"] == "r1" and v > 0 for m, v in values("county", "拒收消息（安全）"))
    assert {(m["room"], m["rule"]) for m, _ in values("county", "二级及以上告警")} >= {("r1", "secrecy_door_open")}

    # 考点 = All: Grafana puts the variable's allValue in
    all_sites = [
        (b, title)
        for b, title, expr in targets
        if b == "county" and not stack.query(substitute(expr, b, site=".*"))["data"]["result"]
    ]
    assert all_sites == []


def test_template_variables_resolve(stack: Stack) -> None:
    """label_values(selector, label) is Grafana's; Prometheus answers it as /api/v1/label/<label>/values."""
    for board in JOBS:
        for var in dashboard(board)["templating"]["list"]:
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
            assert m, var["query"]
            selector = substitute(m.group(1), board)
            got = get_json(
                f"http://127.0.0.1:{stack.prometheus}/api/v1/label/{m.group(2)}/values", {"match[]": selector}
            )
            assert got["status"] == "success", got
            want = {"job": JOBS[board], "site": "s1", "room": "r1"}[var["name"]]
            assert want in got["data"], (board, var["name"], got["data"])


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def referenced_names(board: str) -> set[str]:
    found = set()
    for p in panels(board):
        found.update(NAME.findall(p["description"]))
        for t in p["targets"]:
            found.update(NAME.findall(t["expr"]))
    for var in dashboard(board)["templating"]["list"]:
        found.update(NAME.findall(var["query"]["query"]))
    return found


def test_every_metric_the_dashboards_name_is_exported(stack: Stack) -> None:
    """Compared against real scrapes: a renamed family in an exporter fails here, not on exam day."""
    for board, port in (("room", stack.agent_exporter), ("county", stack.gateway_exporter)):

        def unknown() -> set[str]:
            exported = exported_names(scrape(port))
            return {
                n
                for n in referenced_names(board)
                if n not in exported and re.sub(r"_(bucket|sum|count|total)$", "", n) not in exported
            }

        # a reading's family appears with its first reading: give the sensors' messages time to land
        deadline = time.monotonic() + 15
        while unknown() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert unknown() == set(), f"{board}.json names metrics its exporter does not export"


@pytest.mark.parametrize("board", [*JOBS, "province"])  # the province's queries: tests/test_province.py
def test_dashboard_shape(board: str) -> None:
    """What Grafana needs to load the file, and what the support group needs to read it."""
    d = dashboard(board)
    assert d["uid"] == f"examwatch-{board}"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "examwatch-prom", p["title"]
        assert re.search(r"[\u4e00-\u9fff]", p["title"]), f"title for staff is Chinese: {p['title']}"
        assert NAME.search(p["description"]), f"description names the metric: {p['title']}"
        assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]


def test_provisioning_and_example_scrape_config_fit_the_dashboards() -> None:
    datasource = (ROOT / "grafana/provisioning/datasources/examwatch.yaml").read_text(encoding="utf-8")
    assert re.search(r"^\s+uid: examwatch-prom$", datasource, re.M)
    example = ROOT / "grafana" / "prometheus.yml"
    check = subprocess.run(["promtool", "check", "config", str(example)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = set(re.findall(r"job_name: (\S+)", example.read_text(encoding="utf-8")))
    assert jobs == set(JOBS.values())


@pytest.mark.parametrize("exporter", ["agent_exporter", "gateway_exporter"])
def test_metrics_are_valid_exposition_text(stack: Stack, exporter: str) -> None:
    """Prometheus's own scraper is lenient; a strict parser rejects a whole scrape with, e.g., two HELP lines."""
    with urllib.request.urlopen(f"http://127.0.0.1:{getattr(stack, exporter)}/metrics", timeout=5) as r:
        text = r.read()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
