"""SNMP devices for tests and the demo: real snmpsim serving recordings of real devices, with faults.

The recordings come from the snmpsim-data package (a Phoenixtec UPS with UPS-MIB, an Eaton 9PX with
only XUPS-MIB, a Maipu access switch, a Hikvision NVR, a Samsung camera with HOST-RESOURCES storage).
Each simulated device is one community (v2c) or context name (v3) whose .snmprec file this module
writes: the recording, plus the overrides of the device's current state (``on_battery``,
``low_charge``, ``link_down``, ``disk_full``, ``disk_failed``...).

``set_state`` rewrites the file of a running device. snmpsim re-indexes a data file when its mtime
changes, but compares whole seconds, so every rewrite moves the mtime one second past the last one
instead of trusting the clock; ``set_state`` returns once snmpsim answers from the new file (its
re-indexing then delays no agent's request).

    with SnmpSimulator(tmp_path) as sim:          # one device per model, community = model name
        sim.set_state("ups", "on_battery")
"""

from __future__ import annotations

import bz2
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Records = dict[str, tuple[str, str]]  # OID -> (snmprec tag, value), in the recording's (sorted) order
Variant = Callable[[Records], Records]  # recording -> the records to override

V3_USER = "examwatch"  # the simulator's SNMPv3 user (SHA + AES); test credentials only
V3_AUTH_KEY = "examwatch-auth"
V3_PRIV_KEY = "examwatch-priv"


def recordings_dir() -> Path:
    import snmpsim_data

    return Path(snmpsim_data.__file__).parent / "data"


def read_snmprec(path: Path) -> Records:
    """Read a .snmprec or .snmprec.bz2 file: ``oid|tag|value`` per line."""
    raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
    records: Records = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.strip() and not line.startswith("#"):
            oid, tag, value = line.split("|", 2)
            records[oid] = (tag, value)
    return records


def value_of(records: Records, oid: str) -> int | float | str:
    """A record's value as the agent sends it: numbers for numeric tags, text (hex decoded) otherwise."""
    tag, value = records[oid]
    if tag.endswith("x"):
        raw = bytes.fromhex(value)
        return ".".join(map(str, raw)) if tag.startswith("64") else raw.decode("utf-8", errors="replace")
    if tag in ("2", "65", "66", "67", "70"):  # Integer32, Counter32, Gauge32, TimeTicks, Counter64
        return int(value)
    return value


def column(records: Records, base: str) -> dict[str, str]:
    """The values of one table column: row index -> value text."""
    prefix = base + "."
    return {oid[len(prefix) :]: v for oid, (_, v) in records.items() if oid.startswith(prefix)}


# --- fault variants, made from the recordings ---------------------------------------------------------

UPS_MIB = "1.3.6.1.2.1.33.1"
XUPS = "1.3.6.1.4.1.534.1"
IF_ADMIN, IF_OPER = "1.3.6.1.2.1.2.2.1.7", "1.3.6.1.2.1.2.2.1.8"
HIK_DISK = "1.3.6.1.4.1.50001.1.241.1"
HR_STORAGE = "1.3.6.1.2.1.25.2.3.1"
HR_FIXED_DISK = "1.3.6.1.2.1.25.2.1.4"


def _int(value: int) -> tuple[str, str]:
    return ("2", str(value))


def _ups_mib_on_battery(r: Records) -> Records:
    return _ups_mib_healthy(r) | {
        f"{UPS_MIB}.2.3.0": _int(30),  # upsEstimatedMinutesRemaining: a charged battery, mains just lost
        f"{UPS_MIB}.4.1.0": _int(5),  # upsOutputSource battery
        f"{UPS_MIB}.2.2.0": _int(60),  # upsSecondsOnBattery
        f"{UPS_MIB}.3.3.1.3.1": _int(0),  # upsInputVoltage
        f"{UPS_MIB}.6.1.0": ("66", "1"),  # upsAlarmsPresent: upsAlarmOnBattery
    }


def _ups_mib_low_charge(r: Records) -> Records:
    return _ups_mib_on_battery(r) | {
        f"{UPS_MIB}.2.1.0": _int(3),  # upsBatteryStatus batteryLow
        f"{UPS_MIB}.2.3.0": _int(3),  # upsEstimatedMinutesRemaining
        f"{UPS_MIB}.2.4.0": _int(15),  # upsEstimatedChargeRemaining
        f"{UPS_MIB}.6.1.0": ("66", "2"),  # + upsAlarmLowBattery
    }


def _ups_mib_healthy(r: Records) -> Records:
    # The recording (a UPS on mains) reports 0 minutes of runtime left, which a watchful rule pack rightly
    # calls a level-2 alarm; the demo's quiet state is a charged UPS with a believable runtime.
    return {
        f"{UPS_MIB}.2.1.0": _int(2),  # upsBatteryStatus batteryNormal
        f"{UPS_MIB}.2.3.0": _int(45),  # upsEstimatedMinutesRemaining
        f"{UPS_MIB}.2.4.0": _int(100),  # upsEstimatedChargeRemaining
    }


def _xups_on_battery(r: Records) -> Records:
    return {
        f"{XUPS}.4.5.0": _int(5),  # xupsOutputSource battery
        f"{XUPS}.2.5.0": _int(2),  # xupsBatteryAbmStatus discharging
        f"{XUPS}.3.4.1.2.1": _int(0),  # xupsInputVoltage
        f"{XUPS}.7.1.0": ("66", "1"),  # xupsAlarms
    }


def _xups_low_charge(r: Records) -> Records:
    return _xups_on_battery(r) | {
        f"{XUPS}.2.4.0": _int(15),  # xupsBatCapacity
        f"{XUPS}.2.1.0": _int(180),  # xupsBatTimeRemaining
        f"{XUPS}.7.1.0": ("66", "2"),
    }


def first_port_up(r: Records) -> str:
    """The ifIndex of the first port that is up (admin and oper) in the recording."""
    admin = column(r, IF_ADMIN)
    return next(i for i, v in column(r, IF_OPER).items() if v == "1" and admin.get(i) == "1")


def _link_down(r: Records) -> Records:
    return {f"{IF_OPER}.{first_port_up(r)}": _int(2)}  # ifOperStatus down: the cable is pulled


def _nvr_disk_full(r: Records) -> Records:
    return {f"{HIK_DISK}.4.{i}": _int(0) for i in column(r, f"{HIK_DISK}.4")}  # hikDiskFreeSpace


def _nvr_disk_failed(r: Records) -> Records:
    return {f"{HIK_DISK}.3.{i}": _int(2) for i in column(r, f"{HIK_DISK}.3")}  # hikDiskStatus abnormal


def _nvr_healthy(r: Records) -> Records:
    # The recorded NVR has 100 MiB left of 3 TB (it overwrites when full); the demo's quiet state.
    return {f"{HIK_DISK}.4.{i}": _int(int(c) // 2) for i, c in column(r, f"{HIK_DISK}.5").items()}


def _hr_disk_full(r: Records) -> Records:
    sizes = column(r, f"{HR_STORAGE}.5")
    fixed = [i for i, t in column(r, f"{HR_STORAGE}.2").items() if t == HR_FIXED_DISK]
    return {f"{HR_STORAGE}.6.{i}": _int(int(sizes[i])) for i in fixed}  # hrStorageUsed = hrStorageSize


def _nonsense(r: Records) -> Records:
    """An agent answering every OID with text that is no number and no OID: what a broken card may do."""
    return {oid: ("4", "nonsense") for oid in r}


@dataclass(frozen=True)
class Model:
    recording: str  # path under snmpsim-data's data folder, without the .snmprec[.bz2] suffix
    profile: str  # the examwatch profile that reads it
    variants: dict[str, Variant]


MODELS: dict[str, Model] = {
    "ups": Model(
        "UPS/phoenixtec-power",
        "ups-mib",
        {
            "healthy": _ups_mib_healthy,
            "on_battery": _ups_mib_on_battery,
            "low_charge": _ups_mib_low_charge,
            "nonsense": _nonsense,
        },
    ),
    "ups-xups": Model(
        "UPS/eaton-9px-partial", "eaton-xups", {"on_battery": _xups_on_battery, "low_charge": _xups_low_charge}
    ),
    "switch": Model("network/switch/maipu-sm4200-16gef8ge-ac", "if-mib", {"link_down": _link_down}),
    "nvr": Model(
        "camera/hikvision-network-video-recorder",
        "hikvision-nvr",
        {"healthy": _nvr_healthy, "disk_full": _nvr_disk_full, "disk_failed": _nvr_disk_failed},
    ),
    "camera": Model("camera/samsung-ipolis", "host-resources-storage", {"disk_full": _hr_disk_full}),
    # Models the collectors were not written against (for discovery): a Huawei UPS card whose sysObjectID is
    # Net-SNMP's but that speaks UPS-MIB; a Hikvision camera recording without a system group.
    "ups-huawei": Model("UPS/huawei-gse200m", "ups-mib", {}),
    "camera-hikvision": Model("camera/hikvision", "hikvision-camera", {}),
}


ROOM_MODELS = ("ups", "ups-xups", "switch", "nvr", "camera")  # one of each kind a room has: the default devices


def recording_path(model: str) -> Path:
    base = recordings_dir() / MODELS[model].recording
    for suffix in (".snmprec", ".snmprec.bz2"):
        if (p := base.with_name(base.name + suffix)).is_file():
            return p
    raise FileNotFoundError(f"no recording {base}.snmprec[.bz2]")


# --- the running simulator ------------------------------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ber(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 128 else bytes([0x81, n]) if n < 256 else bytes([0x82, n >> 8, n & 0xFF])
    return bytes([tag]) + length + body


def _probe_packet(community: str) -> bytes:
    """A v2c GET of sysUpTime.0: enough to know the agent answers, without an SNMP library."""
    oid = bytes([43, 6, 1, 2, 1, 1, 3, 0])  # 1.3.6.1.2.1.1.3.0
    varbind = _ber(0x30, _ber(0x06, oid) + b"\x05\x00")
    pdu = _ber(0xA0, _ber(0x02, b"\x01") + _ber(0x02, b"\x00") + _ber(0x02, b"\x00") + _ber(0x30, varbind))
    return _ber(0x30, _ber(0x02, b"\x01") + _ber(0x04, community.encode()) + pdu)


def _readable_by_nobody(path: Path) -> bool:
    """Whether every folder above ``path`` lets others in: snmpsim, once it has dropped to nobody,
    still imports modules lazily (dbm), so the Python it runs on must be readable by that user."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.resolve().parents)


class SnmpSimulator:
    """snmpsim on 127.0.0.1:<free port>; ``devices`` maps community (or v3 context) -> model name (default:
    ``ROOM_MODELS``, each under its own name)."""

    def __init__(self, workdir: Path, devices: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "snmp-data"
        self.cache_dir = self.workdir / "snmp-cache"
        self.devices = dict(devices or {m: m for m in ROOM_MODELS})
        self.port = _free_udp_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._recorded: dict[str, Records] = {}
        self._states: dict[str, str] = {}
        self._mtimes: dict[str, int] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def recording(self, community: str) -> Records:
        """The device's recording as snmpsim-data ships it."""
        model = self.devices[community]
        if model not in self._recorded:
            self._recorded[model] = read_snmprec(recording_path(model))
        return self._recorded[model]

    def records(self, community: str) -> Records:
        """What the device serves now: the recording with its state's overrides."""
        state = self._states.get(community, "recorded")
        base = self.recording(community)
        if state == "recorded":
            return base
        return base | MODELS[self.devices[community]].variants[state](base)

    def state(self, community: str) -> str:
        return self._states.get(community, "recorded")

    def set_state(self, community: str, state: str) -> None:
        """Switch a device to ``recorded`` or one of its model's variants; a running agent sees it at
        its next request. Returns once snmpsim answers from the new file: re-indexing a large recording
        takes it about a second on a busy machine, which a poll with a 1 s timeout must not pay."""
        variants = MODELS[self.devices[community]].variants
        if state != "recorded" and state not in variants:
            raise ValueError(f"{community}: no state {state!r}; known: recorded, {', '.join(variants)}")
        self._states[community] = state
        self._write(community)
        if self.proc is not None:
            self._wait_ready(20.0, community)

    def _write(self, community: str) -> None:
        path = self.data_dir / f"{community}.snmprec"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{oid}|{tag}|{value}\n" for oid, (tag, value) in self.records(community).items()))
        tmp.chmod(0o644)
        # snmpsim notices a change by whole-second mtime: always move it forward by at least a second.
        mtime = max(int(time.time()), self._mtimes.get(community, 0) + 1)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
        self._mtimes[community] = mtime

    def start(self, timeout: float = 20.0) -> None:
        import snmpsim

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for community in self.devices:
            self._write(community)
        args = [
            sys.executable, "-c", "from snmpsim.commands.responder import main; main()",
            f"--data-dir={self.data_dir}", f"--cache-dir={self.cache_dir}",
            f"--agent-udpv4-endpoint=127.0.0.1:{self.port}",
            f"--v3-user={V3_USER}", "--v3-auth-proto=SHA", f"--v3-auth-key={V3_AUTH_KEY}",
            "--v3-priv-proto=AES", f"--v3-priv-key={V3_PRIV_KEY}",
            "--log-level=error",
        ]  # fmt: skip
        env = dict(os.environ)
        if os.geteuid() == 0:
            if all(_readable_by_nobody(p) for p in (Path(snmpsim.__file__), Path(os.__file__), self.data_dir)):
                self.data_dir.chmod(0o755)
                os.chown(self.cache_dir, 65534, 65534)
                args += ["--process-user=nobody", "--process-group=nogroup"]
            else:
                env["SNMPSIM_ALLOW_ROOT"] = "true"  # root's own Python is out of nobody's reach
        self.log = open(self.workdir / "snmpsim.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float, community: str = "") -> None:
        packet = _probe_packet(community or next(iter(self.devices)))
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    break
                s.sendto(packet, ("127.0.0.1", self.port))
                try:
                    s.recv(4096)
                    return
                except OSError:
                    continue
        log = (self.workdir / "snmpsim.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"snmpsim did not answer on {self.address} within {timeout}s:\n{log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> SnmpSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["MODELS", "SnmpSimulator", "column", "first_port_up", "read_snmprec", "recording_path", "value_of"]
