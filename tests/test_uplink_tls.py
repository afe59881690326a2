"""The uplink to a county broker set up like deploy/mosquitto: TLS, passwords or client certificates, per-room roles."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import msgspec
import pytest

from examwatch.edge.config import UplinkSettings
from examwatch.edge.siteplan import dynamic_security
from examwatch.edge.store import OutboxReader, Store
from examwatch.edge.uplink import Uplink
from examwatch.kernel.model import Reading
from examwatch.simulators.broker import dynsec_plugin, free_port, wait_port

pytestmark = pytest.mark.integration

KEY = "5a" * 32


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki():
    d = Path(tempfile.mkdtemp(prefix="examwatch-pki-"))
    d.chmod(0o755)  # mosquitto runs as its own user and must read these
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=county-ca",
        cwd=d,
    )
    for name, cn, ext in (
        ("broker", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("agent", "s1-101", None),
    ):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={cn}",
            cwd=d,
        )
        extra = ["-extfile", f"{name}.ext"] if ext else []
        if ext:
            (d / f"{name}.ext").write_text(ext + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            *extra,
            cwd=d,
        )
    for f in d.iterdir():
        f.chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class TlsBroker:
    def __init__(self, pki: Path, *, certificates: bool) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="examwatch-broker-"))
        self.dir.chmod(0o755)
        # The rooms' users and roles as `examwatch site plan` writes them (deploy/mosquitto/examwatch.conf); with
        # certificates, the CN is the user name and its password is never asked.
        users = {"s1-101": "room-pass", "s1-102": "other-pass", "examwatch-gateway": "gw-pass"}
        (self.dir / "dynsec.json").write_text(dynamic_security(["s1/101", "s1/102"], users, 1, ""))
        for f in self.dir.iterdir():
            f.chmod(0o644)
        (self.dir / "mosquitto.conf").write_text(
            f"per_listener_settings false\nlistener {self.port} 127.0.0.1\n"
            f"cafile {pki}/ca.crt\ncertfile {pki}/broker.crt\nkeyfile {pki}/broker.key\n"
            f"require_certificate {str(certificates).lower()}\nuse_identity_as_username {str(certificates).lower()}\n"
            f"allow_anonymous false\nplugin {dynsec_plugin()}\nplugin_opt_config_file {self.dir}/dynsec.json\n"
            f"user {getpass.getuser()}\nlog_dest none\n"
        )
        self.proc = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_uplink(tmp_path: Path, agent: str, cfg: UplinkSettings, rows: int = 20) -> tuple[Uplink, Store]:
    store = Store(tmp_path / "a.db")
    for i in range(rows):
        store.write(
            [], outbox=[("readings", msgspec.json.encode([Reading("ups1", "ups_charge_percent", i, 1000.0 + i)]))]
        )
    acks: list[int] = []
    up = Uplink(cfg, agent_id=agent, db_path=str(tmp_path / "a.db"), on_acked=acks.extend)
    up.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(acks) < rows and not up.health().refused:
        time.sleep(0.05)
    store.ack(acks)
    return up, store


@pytest.mark.parametrize("certificates", [False, True], ids=["password", "client-certificate"])
def test_tls_delivery_with_password_or_certificate(pki, tmp_path, certificates):
    broker = TlsBroker(pki, certificates=certificates)
    try:
        auth = (
            {"cert_file": str(pki / "agent.crt"), "key_file": str(pki / "agent.key")}
            if certificates
            else {"username": "s1-101", "password": "room-pass"}
        )
        cfg = UplinkSettings(
            enabled=True, port=broker.port, tls=True, ca_file=str(pki / "ca.crt"), signing_key=KEY, **auth
        )
        up, _ = run_uplink(tmp_path, "s1/101", cfg)
        h = up.health()
        up.stop()
        assert h.connected and h.acked == 20 and h.refused == 0
        assert OutboxReader(tmp_path / "a.db").count() == 0
    finally:
        broker.stop()


def test_acl_refuses_another_rooms_topic_and_rows_stay(pki, tmp_path):
    broker = TlsBroker(pki, certificates=False)
    try:
        cfg = UplinkSettings(
            enabled=True,
            port=broker.port,
            tls=True,
            ca_file=str(pki / "ca.crt"),
            signing_key=KEY,
            username="s1-101",
            password="room-pass",
        )
        up, _ = run_uplink(tmp_path, "s1/102", cfg, rows=3)  # 101's credentials, 102's topics
        h = up.health()
        up.stop()
        assert h.refused > 0 and h.acked == 0 and "refused" in h.last_error
        assert OutboxReader(tmp_path / "a.db").count() == 3  # nothing deleted: nothing was accepted
    finally:
        broker.stop()


def test_wrong_password_is_reported_and_nothing_is_lost(pki, tmp_path):
    broker = TlsBroker(pki, certificates=False)
    try:
        cfg = UplinkSettings(
            enabled=True,
            port=broker.port,
            tls=True,
            ca_file=str(pki / "ca.crt"),
            signing_key=KEY,
            username="s1-101",
            password="wrong",
        )
        store = Store(tmp_path / "a.db")
        store.write([], outbox=[("readings", b"[]")])
        up = Uplink(cfg, agent_id="s1/101", db_path=str(tmp_path / "a.db"), on_acked=print)
        up.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not up.health().last_error:
            time.sleep(0.05)
        h = up.health()
        up.stop()
        assert not h.connected and "connect refused" in h.last_error and "wrong" not in h.last_error
        assert OutboxReader(tmp_path / "a.db").count() == 1
    finally:
        broker.stop()
