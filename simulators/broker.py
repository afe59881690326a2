"""A real mosquitto on a free loopback port, for the tests, the benchmarks and the demo."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path


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


class CountyBroker(Mosquitto):
    """The county broker exactly as deploy/mosquitto/examwatch.conf sets it up, on loopback without TLS.

    The TLS listener is left out (its certificates are the site's); every other line is the example's,
    with the password file made by mosquitto_passwd from ``users`` and the ACL by make-acl.sh from ``rooms``
    (and ``replicas``: the gateway replicas' users, make-acl.sh --replicas).
    """

    def __init__(
        self, workdir: Path, users: dict[str, str], rooms: list[str], port: int | None = None, replicas: int = 1
    ) -> None:
        super().__init__(workdir, port)
        self.workdir.chmod(0o755)
        keys, passwd, acl = self.workdir / "agent-keys", self.workdir / "passwd", self.workdir / "acl"
        keys.write_text("".join(f"{room} {'ab' * 32}\n" for room in rooms))
        passwd.touch()
        for user, password in users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
        made = subprocess.run(
            ["sh", str(REPO / "deploy/mosquitto/make-acl.sh"), "--replicas", str(replicas), str(keys)],
            check=True,
            capture_output=True,
            text=True,
        )
        acl.write_text(made.stdout)
        self.conf.write_text(county_conf(COUNTY_CONF.read_text(), self.port, self.workdir, passwd, acl))

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


def county_conf(example: str, port: int, workdir: Path, passwd: Path, acl: Path) -> str:
    """The example config on ``port``: without the TLS listener's lines, files moved into ``workdir``."""
    replaced = {"password_file": passwd, "acl_file": acl, "persistence_location": f"{workdir}/"}
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
