"""Real processes for the gateway and fault-injection tests: the gateway, room agents, and a cuttable link.

The helpers start the real ``examwatch gateway run`` and ``examwatch agent run`` as
subprocesses, and a socat TCP relay that stands for a room's network link.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from examwatch.simulators.broker import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]


def key_hex(agent: str) -> str:
    return (agent.encode().hex() * 32)[:64]


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "examwatch", *args], cwd=ROOT, env=env, stdout=out, stderr=out)


def start(procs: list[Any], *processes: Any) -> None:
    """Start each process in turn and add it to the test's ``procs``, which stops them all at the end."""
    for p in processes:
        p.start()
        procs.append(p)


class _Process:
    """A running examwatch process and its SQLite database, read-only from the test."""

    db: Path
    proc: subprocess.Popen[bytes] | None = None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        self.proc = None

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


class GatewayProc(_Process):
    def __init__(
        self,
        workdir: Path,
        broker_port: int,
        agents: list[str],
        extra: str = "",
        token: str = "t0ken",
        broker: str = "",  # more [broker] keys (a replica's client_id and share_group)
        name: str = "gateway",
    ) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.api_port, self.metrics_port = free_port(), free_port()
        keys = "\n".join(f'"{a}" = "{key_hex(a)}"' for a in agents)
        self.token = token
        self.config = self.dir / "gateway.toml"
        self.config.write_text(
            f'[gateway]\nstate_dir = "{self.dir}"\n[broker]\nport = {broker_port}\n{broker}\n'
            f'[exporter]\nlisten = "127.0.0.1:{self.metrics_port}"\n'
            f'[api]\nlisten = "127.0.0.1:{self.api_port}"\ntoken = "{token}"\n{extra}\n[security.keys]\n{keys}\n'
        )
        self.db = self.dir / "gateway.db"

    def start(self) -> None:
        self.proc = _spawn(["gateway", "run", "--config", str(self.config)], self.dir / "log")
        # both: the API binds when the gateway is built, the exporter only when it runs
        wait_port(self.api_port, 20)
        wait_port(self.metrics_port, 20)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any], token: str | None) -> tuple[int, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", data=json.dumps(body).encode(), method="POST"
        )
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def log(self) -> str:
        return (self.dir / "log").read_text(errors="replace")


class AgentProc(_Process):
    """The real room agent, watching its own machine every 0.1 s, uplinked to ``port``."""

    def __init__(self, workdir: Path, agent: str, port: int, heartbeat: float = 1.0) -> None:
        site, room = agent.split("/")
        self.agent = agent
        self.dir = workdir / f"agent-{site}-{room}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "agent.toml"
        self.config.write_text(
            f'[agent]\nsite = "{site}"\nroom = "{room}"\nstate_dir = "{self.dir}"\n'
            f'[exporter]\nlisten = "127.0.0.1:0"\n'
            f'[uplink]\nenabled = true\nport = {port}\nsigning_key = "{key_hex(agent)}"\nheartbeat = {heartbeat}\n'
            f'[[devices]]\nname = "pi"\nkind = "host"\nprotocol = "host"\ninterval = 0.1\n'
        )
        self.db = self.dir / "agent.db"

    def start(self) -> None:
        self.proc = _spawn(["agent", "run", "--config", str(self.config)], self.dir / "log")

    def outbox(self) -> int:
        return self.query("SELECT COUNT(*) FROM outbox")[0][0] if self.db.exists() else -1


class Link:
    """A room's network link to the county: a socat TCP relay that can be cut and restored."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target = target_port
        self.proc: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        exe = shutil.which("socat") or "/usr/bin/socat"
        self.proc = subprocess.Popen(
            [exe, f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork", f"TCP:127.0.0.1:{self.target}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port)

    def cut(self) -> None:
        """Kill the relay and every connection it forwards (its children share its process group)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    stop = cut


def until_subscribed(gw: GatewayProc, client: Any) -> None:
    """Wait until the gateway hears the broker: a message published before its first subscription is lost to it.

    ``client`` (a connected paho client) publishes a probe on a topic outside the contract until the
    gateway has counted one (as ``bad_topic``, room "").
    """
    from tests.support import until

    def heard() -> bool:
        client.publish("examwatch/v1/probe/probe/probe", b"", qos=1).wait_for_publish(5)
        return 'examwatch_gateway_rejected_total{reason="bad_topic",room="",site=""} 0.0' not in gw.metrics()

    until(heard, what="the gateway subscribed")
