"""ISAPI over https: the TLS context with the CA certificates is made only for a device that is verified
(issue 13: ~2.5 MiB of a Pi Zero's memory), and such a device is still verified."""

from __future__ import annotations

import asyncio
import ssl
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
