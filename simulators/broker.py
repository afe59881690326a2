"""A real mosquitto on a free loopback port, for the tests, the benchmarks and the demo."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from examwatch.edge.siteplan import dynamic_security


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class Mosquitto:
    """``stop()``/``start()`` simulate an outage; persistence keeps sessions and queued messages across it."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # Started as root, mosquitto drops to its own user, which cannot write into a private work
            # directory, and then silently persists nothing: stay whoever started it.
            f"user {getpass.getuser()}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"  # a killed broker keeps its sessions too
            # 0 = unbounded: the default 1000 silently drops QoS 1 messages for an offline subscriber
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "log_dest none\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


REPO = Path(__file__).resolve().parent.parent
COUNTY_CONF = REPO / "deploy" / "mosquitto" / "examwatch.conf"
SHARE_GROUP = "county-5f0c9a41d2e7b388"  # the test county's replicas' group


class CountyBroker(Mosquitto):
    """The county broker exactly as deploy/mosquitto/examwatch.conf sets it up, on loopback without TLS.

    The TLS listener is left out (its certificates are the site's); every other line is the example's, with
    the dynamic-security file made by `examwatch site plan`'s own function: a client per entry of ``users``
    (user name: password), a room's role for each of ``rooms`` (agent ids), the gateway's role for the
    gateway and its ``replicas``' users, the replicas' share group ``share_group``.
    """

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        rooms: list[str],
        port: int | None = None,
        replicas: int = 1,
        share_group: str = SHARE_GROUP,
    ) -> None:
        super().__init__(workdir, port)
        self.workdir.chmod(0o755)
        dynsec = self.workdir / "dynamic-security.json"
        dynsec.write_text(dynamic_security(rooms, users, replicas, share_group))
        self.conf.write_text(county_conf(COUNTY_CONF.read_text(), self.port, self.workdir, dynsec))

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


def dynsec_plugin() -> str:
    """This machine's dynamic-security plugin (the example names Debian's amd64 path)."""
    found = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    return str(found[0]) if found else "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def county_conf(example: str, port: int, workdir: Path, dynsec: Path) -> str:
    """The example config on ``port``: without the TLS listener's lines, files moved into ``workdir``."""
    replaced = {
        "plugin": dynsec_plugin(),
        "plugin_opt_config_file": dynsec,
        "persistence_location": f"{workdir}/",
    }
    out, tls_listener = [], False
    for original in example.splitlines():
        line, words = original, original.split()
        if words[:1] == ["listener"]:
            tls_listener = len(words) == 2  # "listener 8883": every interface, TLS
            line = "" if tls_listener else f"listener {port} 127.0.0.1"
        elif tls_listener and words and not words[0].startswith("#"):
            continue
        elif words and words[0] in replaced:
            line = f"{words[0]} {replaced[words[0]]}"
        out.append(line)
    out += [f"user {getpass.getuser()}", f"log_dest file {workdir}/mosquitto.log", "log_type all"]
    return "\n".join(out) + "\n"
