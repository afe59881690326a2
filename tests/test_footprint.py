"""The agent process imports only what it runs (issue 13: a whole room in 40 MiB on a Pi Zero 2 W).

Figures are in bench/footprint.py; here only what must not come back: modules that cost megabytes and
that nothing in the agent uses.
"""

from __future__ import annotations

import subprocess
import sys

# sqlite_utils (click, pluggy, dateutil; numpy whenever installed) for a BEGIN and a COMMIT; pysmi,
# pysnmp's optional MIB compiler, with requests, urllib3 and jinja2: numeric OIDs need no MIB compiled.
NOT_IN_THE_AGENT = {
    "sqlite_utils",
    "httpx",
    "click",
    "pluggy",
    "dateutil",
    "numpy",
    "pysmi",
    "requests",
    "urllib3",
    "jinja2",
}

AGENT_WITH_SNMP = """
import asyncio, sys
import examwatch.edge.runtime, examwatch.edge.store, examwatch.edge.uplink
from examwatch.collectors.snmp import SnmpCollector, SnmpOptions
from examwatch.edge.config import Device
from examwatch.collectors.base import Health

class Acc:
    def add(self, reading): pass
    def add_all(self, readings): pass

async def main():
    v3 = Device(name="ups", kind="ups", protocol="snmp", address="127.0.0.1", profile="ups-mib",
                options=SnmpOptions(version="3", user="u"))
    SnmpCollector([v3], Acc(), Health())  # builds pysnmp's engine, as the agent does at start for v3

asyncio.run(main())
print(" ".join(sorted(m.split(".")[0] for m in sys.modules if sys.modules[m] is not None)))
"""


def test_agent_with_snmpv3_imports_no_heavy_module_it_does_not_use() -> None:
    out = subprocess.run([sys.executable, "-c", AGENT_WITH_SNMP], capture_output=True, text=True, check=True)
    imported = set(out.stdout.split())
    assert "pysnmp" in imported  # the probe did build the engine
    assert imported & NOT_IN_THE_AGENT == set()


AGENT_WITH_A_CAMERA = """
import asyncio, sys
import examwatch.edge.runtime, examwatch.edge.store, examwatch.edge.uplink
from examwatch.collectors.isapi import IsapiCollector, Options
from examwatch.edge.config import Device
from examwatch.collectors.base import Health

class Acc:
    def add(self, reading): pass
    def add_all(self, readings): pass

async def main():
    cam = Device(name="cam1", kind="camera", protocol="isapi", address="127.0.0.1:9", retries=0, timeout=1.0,
                 options=Options(password="x"))
    health = Health()
    collector = IsapiCollector([cam], Acc(), health)
    await collector.poll_once(cam)  # nothing listens on port 9: the whole request path ran, to its error
    await collector.close()
    print(*health.devices["cam1"].errors)

asyncio.run(main())
print(" ".join(sorted(m.split(".")[0] for m in sys.modules if sys.modules[m] is not None)))
"""


def test_a_room_with_a_camera_imports_no_http_client_library() -> None:
    """ISAPI runs on urllib.request, which the uplink (paho-mqtt) imports anyway: httpx with httpcore, h11,
    anyio, idna cost the agent ~3 MiB for one GET a minute."""
    out = subprocess.run([sys.executable, "-c", AGENT_WITH_A_CAMERA], capture_output=True, text=True, check=True)
    *_, errors, modules = out.stdout.splitlines()  # after the collector's log line
    imported = set(modules.split())
    assert errors == "unreachable"  # the probe did ask the camera, through the whole request path
    assert imported & (NOT_IN_THE_AGENT | {"httpcore", "h11", "anyio", "idna", "sniffio"}) == set()
