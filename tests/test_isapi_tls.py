"""ISAPI over https: the TLS context with the CA certificates is made only for a device that is verified
(issue 13: ~2.5 MiB of a Pi Zero's memory), and such a device is still verified."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from examwatch.collectors.base import Health
from examwatch.collectors.isapi import IsapiCollector, Options
from examwatch.edge.config import Device
from examwatch.simulators.isapi import IsapiSimulator
from tests.support import Recorder
from tests.test_notify_email import make_cert


@pytest.fixture
def https_nvr(tmp_path: Path) -> Iterator[IsapiSimulator]:
    """The simulated NVR behind TLS with a self-signed certificate, as real ones ship."""
    sim = IsapiSimulator()
    cert, key = make_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sim._server.socket = ctx.wrap_socket(sim._server.socket, server_side=True)
    sim.start()
    yield sim
    sim.stop()


def nvr(address: str, tls_verify: bool) -> Device:
    return Device(
        name="nvr", kind="recorder", protocol="isapi", address=address, interval=1.0, timeout=2.0, retries=0,
        options=Options(username="admin", password="sim-pass", tls_verify=tls_verify),
    )  # fmt: skip


def poll(device: Device) -> tuple[IsapiCollector, Recorder, Health]:
    acc, health = Recorder(), Health()
    collector = IsapiCollector([device], acc, health)

    async def run() -> None:
        await collector.poll_once(device)
        await collector.close()

    asyncio.run(run())
    return collector, acc, health


def test_a_verified_https_device_refuses_a_certificate_no_ca_signed(https_nvr: IsapiSimulator) -> None:
    collector, acc, health = poll(nvr(f"https://{https_nvr.address}", tls_verify=True))
    assert collector._tls is not None
    assert acc.of("nvr") == {"device_online": 0}
    assert health.devices["nvr"].errors["unreachable"] == 1
    assert https_nvr.requests == 0  # no request went out over the untrusted connection


def test_an_unverified_https_device_is_read_and_loads_no_certificates(https_nvr: IsapiSimulator) -> None:
    collector, acc, _ = poll(nvr(f"https://{https_nvr.address}", tls_verify=False))
    assert collector._tls is None
    assert acc.of("nvr")["device_online"] == 1


def test_plain_http_loads_no_certificates() -> None:
    assert IsapiCollector([nvr("127.0.0.1:9", tls_verify=True)], Recorder(), Health())._tls is None


def test_a_server_dripping_its_tls_handshake_is_a_timeout_and_frees_the_worker_thread() -> None:
    """A record header announcing 16 KiB, then a byte every 0.3 s: no single read of the handshake waits
    its 1 s timeout, the handshake as a whole must (Python's ssl bounds it so). poll() returns only once
    asyncio.run has joined the worker thread, so one left in the handshake would hang here for the 80
    minutes the record takes."""
    listener = socket.create_server(("127.0.0.1", 0))
    hung_up = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                conn.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record of 16384 bytes, to come
                for _ in range(1000):
                    time.sleep(0.3)
                    conn.sendall(b"\x00")
            except OSError:
                hung_up.set()

    threading.Thread(target=drip, daemon=True).start()
    try:
        _, acc, health = poll(nvr(f"https://127.0.0.1:{listener.getsockname()[1]}", tls_verify=False))
        assert health.devices["nvr"].errors["timeout"] == 1 and acc.of("nvr") == {"device_online": 0}
        assert hung_up.wait(10)  # the collector closed the connection, not waited out the drip
    finally:
        listener.close()
