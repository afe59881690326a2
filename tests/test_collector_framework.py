"""The collector framework with the host collector: readings, device state, flips logged once."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import psutil
import pytest
import structlog

from examwatch.collectors.base import DeviceError, Health
from examwatch.collectors.host import HostCollector, HostOptions, parse_host
from examwatch.edge.config import Device
from examwatch.kernel.model import Reading
from tests.support import Recorder


def test_parse_host_maps_psutil_answers():
    disk = SimpleNamespace(free=25, total=100, used=75)
    memory = SimpleNamespace(available=300, total=1000)
    temps = {"cpu_thermal": [SimpleNamespace(current=61.5)]}
    nics = {"lo": SimpleNamespace(isup=True), "eth0": SimpleNamespace(isup=True), "wlan0": SimpleNamespace(isup=False)}
    got = {
        (r.device, r.metric): r.value
        for r in parse_host("pi", 1.0, temps=temps, disk=disk, memory=memory, nics=nics, watch=[])
    }
    assert got == {
        ("pi", "storage_free_bytes"): 25.0,
        ("pi", "storage_total_bytes"): 100.0,
        ("pi", "storage_used_ratio"): 0.75,
        ("pi", "memory_available_bytes"): 300.0,
        ("pi", "memory_used_ratio"): 0.7,
        ("pi", "cpu_temperature_celsius"): 61.5,
        ("pi/eth0", "link_up"): 1.0,
        ("pi/wlan0", "link_up"): 0.0,
    }
    # a watched interface that does not exist is down, not forgotten
    only = parse_host("pi", 1.0, temps={}, disk=disk, memory=memory, nics=nics, watch=["eth1"])
    assert [(r.device, r.value) for r in only if r.metric == "link_up"] == [("pi/eth1", 0.0)]


def test_a_failing_device_is_a_state_logged_once_when_it_flips(tmp_path):
    gone = tmp_path / "gone"
    device = Device(name="host", kind="host", protocol="host", address=str(gone), interval=0.05, options=HostOptions())
    sink, health = Recorder(), Health()
    collector = HostCollector([device], sink, health)

    async def polls(n: int) -> None:
        for _ in range(n):
            await collector.poll_once(device)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(polls(3))  # the state directory's disk is not there: three failures
        gone.mkdir()
        asyncio.run(polls(2))  # and back
    online = [r.value for r in sink.readings if r.metric == "device_online"]
    assert online == [0.0, 0.0, 0.0, 1.0, 1.0]
    h = health.devices["host"]
    assert h.online is True and h.polls == 5 and h.errors == {"error": 3}
    assert [e["event"] for e in logs] == ["device_offline", "device_recovered"]
    free = [r.value for r in sink.readings if r.metric == "storage_free_bytes"]
    assert free and abs(free[-1] - psutil.disk_usage(str(gone)).free) < 1e9


def test_a_slow_device_does_not_delay_another(tmp_path):
    """Each device polls on its own task: a device that hangs costs its own timeout, nobody else's."""
    from examwatch.collectors.base import PollingCollector

    class Slow(PollingCollector):
        protocol = "test-slow"

        async def poll(self, device):
            if device.name == "stuck":
                await asyncio.sleep(3600)
            return [Reading(device.name, "noise_db", 40.0, 0.0)]

    devices = [
        Device(name=n, kind="noise", protocol="test-slow", interval=0.05, timeout=0.2, retries=0)
        for n in ("stuck", "fine")
    ]
    sink, health = Recorder(), Health()

    async def run_for(seconds: float) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(Slow(devices, sink, health).run(stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(run_for(1.0))
    fine = [r for r in sink.readings if r.device == "fine" and r.metric == "noise_db"]
    assert len(fine) >= 8  # ~20 polls at 0.05 s; the stuck one's 1.2 s timeouts did not hold it up
    assert health.devices["stuck"].errors["timeout"] >= 1 and health.devices["stuck"].online is False


def test_retry_asks_again_until_an_answer_or_a_final_reason():
    from examwatch.collectors.base import retry

    def attempts(*outcomes):
        calls = []

        async def attempt():
            calls.append(1)
            outcome = outcomes[len(calls) - 1]
            if isinstance(outcome, DeviceError):
                raise outcome
            return outcome

        return attempt, calls

    attempt, calls = attempts(DeviceError("timeout"), 42)
    assert asyncio.run(retry(attempt, 2)) == 42 and len(calls) == 2
    attempt, calls = attempts(DeviceError("timeout"), DeviceError("crc"), 42)
    with pytest.raises(DeviceError) as exc:
        asyncio.run(retry(attempt, 2))
    assert exc.value.reason == "crc" and len(calls) == 2  # the last error is the one reported
    attempt, calls = attempts(DeviceError("auth"), 42)
    with pytest.raises(DeviceError) as exc:
        asyncio.run(retry(attempt, 3, final=("auth",)))
    assert exc.value.reason == "auth" and len(calls) == 1  # asking again would not change the answer


def test_backoff_doubles_up_to_its_cap_and_resets_on_success():
    from examwatch.collectors.base import Backoff

    b = Backoff(1.0, 4.0)
    assert b.waiting() == 0.0
    delays = []
    for _ in range(4):
        b.failed()
        delays.append(b.delay)
    assert delays == [1.0, 2.0, 4.0, 4.0] and 3.0 < b.waiting() <= 4.0
    b.succeeded()
    assert b.waiting() == 0.0 and (b.failed(), b.delay)[1] == 1.0


def test_every_reason_a_collector_raises_has_its_words():
    """The readiness check tells the technician why in Chinese: every constant DeviceError reason in a
    protocol's module is in its ``reasons`` (or the common ones)."""
    import ast
    import inspect

    from examwatch import collectors
    from examwatch.collectors.base import COMMON_REASONS

    for protocol in collectors.available():
        cls = collectors.get(protocol)
        tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))
        raised = {
            node.args[0].value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and getattr(node.func, "id", "") == "DeviceError"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        }
        missing = raised - cls.reasons.keys() - COMMON_REASONS.keys()
        assert not missing, f"{protocol}: no words for {sorted(missing)}"
        assert cls.sample.strip().startswith("[[devices]]"), protocol
