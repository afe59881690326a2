"""Hikvision ISAPI storage: the parser on recorded answers, the collector against the digest-auth simulator."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from examwatch.collectors.base import DeviceError, Health
from examwatch.collectors.isapi import MIB, IsapiCollector, Options, parse_storage, readings_from
from examwatch.edge.config import Device
from examwatch.simulators.isapi import HIKVISION, STD_CGI, STORAGE_PATH, IsapiSimulator, Misbehaviour, SimDisk
from tests.support import Recorder, RulesRecorder, run_for, running, wait_until

DATA = Path(__file__).parent / "data" / "isapi"


def expected_disks(path: Path) -> list[tuple[str, str, float | None, float | None]]:
    """What a sample holds, read with plain ElementTree (namespace stripped), to compare against the parser."""
    root = ET.fromstring(path.read_bytes())
    out = []
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag in ("hdd", "nas"):
            f = {c.tag.rsplit("}", 1)[-1]: (c.text or "").strip() for c in el}
            out.append(
                (
                    ("disk" if tag == "hdd" else "nas") + f["id"],
                    f["status"],
                    float(f["capacity"]) * MIB if f.get("capacity") else None,
                    float(f["freeSpace"]) * MIB if f.get("freeSpace") else None,
                )
            )
    return out


@pytest.mark.parametrize("sample", ["nvr-hikvision-ns.xml", "nvr-stdcgi-ns.xml", "camera-sd-no-ns.xml"])
def test_parse_recorded_answers_in_every_namespace(sample: str) -> None:
    disks = parse_storage((DATA / sample).read_bytes())
    assert [(d.part, d.status, d.capacity_bytes, d.free_bytes) for d in disks] == expected_disks(DATA / sample)
    assert disks


def test_readings_from_recorded_nvr() -> None:
    now = time.time()

    def readings(sample: str) -> dict[tuple[str, str], float]:
        disks = parse_storage((DATA / sample).read_bytes())
        return {(r.device, r.metric): r.value for r in readings_from("nvr1", disks, now)}

    got = readings("nvr-stdcgi-ns.xml")
    assert got[("nvr1/disk1", "storage_ok")] == 1.0
    assert got[("nvr1/disk1", "storage_used_ratio")] == 1.0 and got[("nvr1/disk1", "storage_free_bytes")] == 0.0
    assert got[("nvr1/disk1", "storage_total_bytes")] == 953869 * MIB
    assert got[("nvr1/disk2", "storage_ok")] == 0.0  # notexist
    assert ("nvr1/disk2", "storage_used_ratio") not in got  # capacity 0: no sizes, not "full"
    assert got[("nvr1/nas9", "storage_used_ratio")] == pytest.approx(0.5)
    assert got[("nvr1/nas10", "storage_ok")] == 0.0  # offline
    hik = readings("nvr-hikvision-ns.xml")
    assert hik[("nvr1/disk2", "storage_ok")] == 0.0  # error


@pytest.mark.parametrize(
    ("sample", "reason"), [("truncated.xml", "invalid_xml"), ("response-status.xml", "unexpected_xml")]
)
def test_parse_rejects_what_is_not_storage(sample: str, reason: str) -> None:
    with pytest.raises(DeviceError) as err:
        parse_storage((DATA / sample).read_bytes())
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "body", [b"", b"\x00\xff<<", b"<html><body>login</body></html>", b"<storage><hddList><hdd><id>1"]
)
def test_parse_garbage_raises_device_error(body: bytes) -> None:
    with pytest.raises(DeviceError):
        parse_storage(body)


LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE storage [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><storage><hddList><hdd><id>1</id><status>&c;</status></hdd>'
    b"</hddList></storage>"
)
XXE = (
    b'<?xml version="1.0"?><!DOCTYPE storage [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b"<storage><hddList><hdd><id>&x;</id><status>ok</status></hdd></hddList></storage>"
)


@pytest.mark.parametrize(
    "body", [LAUGHS, XXE, b'<?xml version="1.0" encoding="m"?><storage/>'], ids=["entities", "external", "encoding"]
)
def test_document_types_and_unknown_encodings_are_refused(body: bytes) -> None:
    # Found by bench/fuzz.py: an unknown encoding in the XML declaration raised LookupError. A DTD is
    # refused outright: no camera needs one, and entities are how XML bombs and file reads work.
    with pytest.raises(DeviceError) as err:
        parse_storage(body)
    assert err.value.reason == "invalid_xml"


def test_a_body_larger_than_any_storage_document_is_refused_before_parsing() -> None:
    with pytest.raises(DeviceError) as err:
        parse_storage(b"<storage>" + b" " * (2 * 1024 * 1024) + b"</storage>")
    assert err.value.reason == "too_large"


def test_sizes_that_are_not_sizes_and_ids_that_are_not_names_are_left_out() -> None:
    # Found by bench/fuzz.py: capacity 1e999 gave infinite bytes and a used ratio of -inf; a negative
    # free space gave negative bytes; any text in <id> became part of the device name.
    def hdd(id_: str, cap: str, free: str) -> str:
        return f"<hdd><id>{id_}</id><status>ok</status><capacity>{cap}</capacity><freeSpace>{free}</freeSpace></hdd>"

    body = (
        "<storage><hddList>"
        + hdd("1", "1e999", "10")
        + hdd("x" * 300, "100", "-1")
        + hdd("a/../b", "nan", "1")
        + hdd("7", "100", "25")
        + "</hddList></storage>"
    ).encode()
    got = {(r.device, r.metric): r.value for r in readings_from("nvr1", parse_storage(body), 0.0)}
    assert got == {
        ("nvr1/disk1", "storage_ok"): 1.0,  # no sizes: capacity is infinite
        ("nvr1/disk2", "storage_ok"): 1.0,  # the 300-character id: named by position
        ("nvr1/disk2", "storage_total_bytes"): 100 * MIB,  # no free space: it was negative
        ("nvr1/disk3", "storage_ok"): 1.0,  # "a/../b" is not a name; NaN capacity: no sizes
        ("nvr1/disk7", "storage_ok"): 1.0,
        ("nvr1/disk7", "storage_total_bytes"): 100 * MIB,
        ("nvr1/disk7", "storage_free_bytes"): 25 * MIB,
        ("nvr1/disk7", "storage_used_ratio"): 0.75,
    }


# --- against the simulator ------------------------------------------------------------------------------------


@pytest.fixture(params=[HIKVISION, STD_CGI, None], ids=["hikvision", "std-cgi", "no-ns"])
def nvr(request: pytest.FixtureRequest) -> Iterator[IsapiSimulator]:
    with IsapiSimulator(namespace=request.param) as sim:
        yield sim


def device(sim: IsapiSimulator, name: str = "nvr1", password: str = "sim-pass", **kw: object) -> Device:
    fields = {"interval": 0.3, "timeout": 1.0, "retries": 0} | kw
    return Device(
        name=name, kind="nvr", protocol="isapi", address=sim.address, options=Options(password=password), **fields
    )  # type: ignore[arg-type]


def poll(c: IsapiCollector, times: int = 1) -> None:
    async def go() -> None:
        for _ in range(times):
            for d in c.devices:
                await c.poll_once(d)
        await c.close()

    asyncio.run(go())


def test_poll_reads_disks_through_digest_auth(nvr: IsapiSimulator) -> None:
    nvr.disks.append(SimDisk(7, capacity_mib=146560, free_mib=73280, kind="nas"))
    acc, health = Recorder(), Health()
    poll(IsapiCollector([device(nvr)], acc, health), times=2)
    assert acc.latest("nvr1", "device_online") == 1.0
    d1 = nvr.disk(1)
    assert acc.latest("nvr1/disk1", "storage_total_bytes") == d1.capacity_mib * MIB
    assert acc.latest("nvr1/disk1", "storage_free_bytes") == d1.free_mib * MIB
    assert acc.latest("nvr1/disk2", "storage_ok") == 1.0
    assert acc.latest("nvr1/nas7", "storage_used_ratio") == pytest.approx(0.5)
    assert nvr.unauthorized == 1  # the digest challenge is reused on the second poll


def test_wrong_password_is_http_401(nvr: IsapiSimulator) -> None:
    acc, health = Recorder(), Health()
    poll(IsapiCollector([device(nvr, password="wrong")], acc, health))
    assert health.devices["nvr1"].errors["http_401"] == 1 and acc.latest("nvr1", "device_online") == 0.0


def test_disk_full_and_failed_show_within_one_interval(nvr: IsapiSimulator) -> None:
    acc = Recorder()
    dev = device(nvr)
    c = IsapiCollector([dev], acc, Health())

    async def go() -> None:
        async with running(c):
            await acc.reaches("nvr1/disk1", "storage_ok", 1.0, dev.interval + 1)
            nvr.set_disk(1, "full")
            await acc.reaches("nvr1/disk1", "storage_used_ratio", 1.0, dev.interval + 1)
            nvr.set_disk(2, "error")
            await acc.reaches("nvr1/disk2", "storage_ok", 0.0, dev.interval + 1)
            nvr.set_disk(2, "notexist")
            await acc.reaches("nvr1/disk2", "storage_ok", 0.0, dev.interval + 1)

    asyncio.run(go())


def test_invalid_xml_and_slow_answers_are_device_states(tmp_path: Path) -> None:
    with IsapiSimulator() as broken, IsapiSimulator() as slow, IsapiSimulator() as good:
        broken.misbehave("invalid_xml")
        slow.misbehave("slow")
        slow.slow_seconds = 3.0
        acc, health = Recorder(), Health()
        c = IsapiCollector(
            [device(broken, "nvr-broken"), device(slow, "nvr-slow", timeout=1.0), device(good, "nvr-good")], acc, health
        )

        run_for(c, 2.0)
        assert health.devices["nvr-broken"].errors["invalid_xml"] >= 2 and health.devices["nvr-broken"].online is False
        assert health.devices["nvr-slow"].errors["timeout"] >= 1 and health.devices["nvr-slow"].online is False
        good_polls = sum(
            1 for r in acc.readings if r.device == "nvr-good" and r.metric == "device_online" and r.value == 1
        )
        assert good_polls >= 4  # every 0.3 s, unaffected by the slow one
        broken.misbehave(None)
        poll(IsapiCollector([device(broken, "nvr-broken")], acc, health))
        assert health.devices["nvr-broken"].online is True


def test_unreachable_device(tmp_path: Path) -> None:
    sim = IsapiSimulator()
    address = sim.address
    sim.stop()  # nothing listens there any more
    acc, health = Recorder(), Health()
    dev = Device(
        name="cam1",
        kind="camera",
        protocol="isapi",
        address=address,
        interval=1,
        timeout=1,
        retries=0,
        options=Options(password="x"),
    )
    poll(IsapiCollector([dev], acc, health))
    assert health.devices["cam1"].errors["unreachable"] == 1


def test_password_file_and_secret_stays_out_of_errors(nvr: IsapiSimulator, tmp_path: Path) -> None:
    secret = tmp_path / "nvr.pass"
    secret.write_text("sim-pass\n")
    acc, health = Recorder(), Health()
    dev = Device(
        name="nvr1",
        kind="nvr",
        protocol="isapi",
        address=nvr.address,
        interval=1,
        timeout=1,
        retries=0,
        options=Options(password_file=str(secret)),
    )
    poll(IsapiCollector([dev], acc, health))
    assert acc.latest("nvr1", "device_online") == 1.0
    bad = Device(
        name="nvr2",
        kind="nvr",
        protocol="isapi",
        address=nvr.address,
        interval=1,
        timeout=1,
        retries=0,
        options=Options(password="hunter2-secret"),
    )
    c = IsapiCollector([bad], acc, health)

    async def go() -> DeviceError:
        try:
            await c.poll(bad)
        except DeviceError as err:
            return err
        finally:
            await c.close()
        raise AssertionError("no error")

    err = asyncio.run(go())
    assert err.reason == "http_401" and "hunter2" not in str(err)


def test_config_check_wants_a_password() -> None:
    from examwatch.edge.config import ConfigError, loads

    with pytest.raises(ConfigError) as err:
        loads(
            '[agent]\nsite = "s"\nroom = "r"\n[[devices]]\nname = "nvr1"\nkind = "nvr"\nprotocol = "isapi"\n'
            'address = "192.168.1.64"\n'
        )
    assert "devices[0].password" in str(err.value)


def test_nvr_disk_failure_raises_the_alarm_within_one_interval(nvr: IsapiSimulator) -> None:
    """Simulator -> collector -> the default rule pack: a failed NVR disk is an alarm on nvr1/disk2."""
    from examwatch.edge.config import loads

    cfg = loads(
        '[agent]\nsite = "s1"\nroom = "r1"\n[[devices]]\nname = "nvr1"\nkind = "nvr"\nprotocol = "isapi"\n'
        f'address = "{nvr.address}"\npassword = "sim-pass"\ninterval = 0.3\ntimeout = 1\nretries = 0\n'
    )
    alarms = RulesRecorder(cfg)
    c = IsapiCollector(cfg.devices, alarms, Health())

    async def go() -> None:
        async with running(c):
            await asyncio.sleep(0.5)
            assert alarms.raised == []
            nvr.set_disk(2, "error")
            await wait_until(
                lambda: "nvr_disk_failed" in alarms.raised_on("nvr1/disk2"),
                cfg.devices[0].interval + 1,
                "nvr_disk_failed on nvr1/disk2",
            )

    asyncio.run(go())


def test_a_camera_serving_only_its_disk_list_is_read_by_the_hikvision_hdd_profile() -> None:
    """A camera without the whole Storage document: the default profile finds nothing there (404), the
    non-default one reads its SD card from /ISAPI/ContentMgmt/Storage/hdd (root <hddList>)."""
    with IsapiSimulator(whole=False) as cam:
        cam.disks = [SimDisk(1, capacity_mib=60880, free_mib=15220)]
        acc, health = Recorder(), Health()
        poll(IsapiCollector([device(cam, "cam1", profile="hikvision-hdd"), device(cam, "cam2")], acc, health))
    assert acc.latest("cam1/sd1", "storage_total_bytes") == 60880 * MIB
    assert acc.latest("cam1/sd1", "storage_used_ratio") == pytest.approx(0.75)
    assert acc.latest("cam2", "device_online") == 0.0 and health.devices["cam2"].errors["http_404"] == 1


def test_an_isapi_profile_is_checked_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from examwatch.collectors import profiles

    (tmp_path / "isapi").mkdir()
    (tmp_path / "isapi" / "bad.toml").write_text('root = "<x>"\n[[volumes]]\nitem = "hdd"\npart = "disk"\n')
    monkeypatch.setenv("EXAMWATCH_PROFILES", str(tmp_path))
    profiles.load.cache_clear()
    try:
        cam = Device(
            name="cam",
            kind="camera",
            protocol="isapi",
            address="192.0.2.9",
            profile="bad",
            options=Options(password="x"),
        )
        issues = IsapiCollector.check(cam)
    finally:
        profiles.load.cache_clear()
    assert [k for k, _ in issues] == ["profile"] and "<x>" in issues[0][1]


# --- what the camera's HTTP answer may not do (urllib, issue 13) ----------------------------------------------


@pytest.mark.parametrize("announce", [True, False], ids=["length-announced", "until-closed"])
def test_a_body_larger_than_any_storage_document_is_too_large_and_not_read_whole(announce: bool) -> None:
    with IsapiSimulator() as cam:
        cam.misbehave("huge")  # a GiB of a document
        cam.announce = announce
        acc, health = Recorder(), Health()
        poll(IsapiCollector([device(cam, retries=2)], acc, health))
        assert health.devices["nvr1"].errors["too_large"] == 1 and acc.latest("nvr1", "device_online") == 0.0
        assert cam.requests == 2  # the challenge, then the answer: a body too large is not asked for again
        assert cam.stream_ended.wait(10)  # the collector hung up
    assert cam.sent < 64 * MIB  # what the sockets' buffers took, not the GiB


def test_a_redirect_is_an_http_error_and_not_followed() -> None:
    with IsapiSimulator() as elsewhere, IsapiSimulator() as cam:
        cam.misbehave("redirect")
        cam.redirect_to = f"http://{elsewhere.address}{STORAGE_PATH}"
        acc, health = Recorder(), Health()
        poll(IsapiCollector([device(cam)], acc, health))
        assert health.devices["nvr1"].errors["http_error"] == 1 and acc.latest("nvr1", "device_online") == 0.0
        assert elsewhere.requests == 0  # the other host never saw a request, nor the credentials


def test_a_wrong_password_is_tried_once_against_a_fresh_challenge(nvr: IsapiSimulator) -> None:
    # urllib's own digest handler answers each new challenge again, up to six times per poll.
    health = Health()
    poll(IsapiCollector([device(nvr, password="wrong", retries=2)], Recorder(), health))
    assert health.devices["nvr1"].errors["http_401"] == 1
    assert nvr.requests == 2 and nvr.unauthorized == 2


@pytest.mark.parametrize("how", ["drip", "drip_headers"])
def test_a_dripping_answer_gives_its_worker_thread_back_at_the_polls_deadline(how: Misbehaviour) -> None:
    """A byte every 0.3 s never trips a read's timeout of 1 s; the poll's deadline must end the request.
    poll() returns only once asyncio.run has joined the worker thread, so a thread left reading hangs it."""
    with IsapiSimulator() as cam:
        cam.misbehave(how)  # 1000 bytes: five minutes
        health = Health()
        poll(IsapiCollector([device(cam, timeout=1.0)], Recorder(), health))
        assert health.devices["nvr1"].errors["timeout"] == 1
        assert cam.stream_ended.wait(10)
    assert cam.sent < 1000


def test_an_address_of_another_scheme_is_refused_and_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "storage.xml"
    secret.write_bytes((DATA / "nvr-hikvision-ns.xml").read_bytes())  # would parse, were it read
    cam = Device(
        name="cam1", kind="camera", protocol="isapi", address=f"file://{tmp_path}", retries=0,
        options=Options(password="x", path="/storage.xml"),
    )  # fmt: skip
    assert [k for k, _ in IsapiCollector.check(cam)] == ["address"]
    acc, health = Recorder(), Health()
    poll(IsapiCollector([cam], acc, health))
    assert health.devices["cam1"].errors["unreachable"] == 1 and acc.latest("cam1", "device_online") == 0.0


@pytest.mark.parametrize("algorithm", ["SHA-256", "SHA-512"])
def test_a_firmware_offering_a_sha2_digest_is_read(algorithm: str) -> None:
    with IsapiSimulator() as cam:
        cam.algorithm = algorithm
        acc = Recorder()
        poll(IsapiCollector([device(cam)], acc, Health()), times=2)
        assert acc.latest("nvr1", "device_online") == 1.0 and acc.latest("nvr1/disk1", "storage_ok") == 1.0
        assert cam.unauthorized == 1


@pytest.mark.parametrize(
    "challenge",
    [
        "Digest realm",
        'Digest realm="r", nonce=',
        'Digest realm=, nonce="n"',
        "Digest",
        'Basic realm="r"',
        'Digest realm="r", nonce="n", algorithm=SHA-512-256',
        'Digest realm="r", nonce="n", qop="auth-int"',
        'Digest nonce="n"',
    ],
)
def test_a_challenge_we_cannot_answer_is_http_401(challenge: str) -> None:
    with IsapiSimulator() as cam:
        cam.challenge_text = challenge
        health = Health()
        poll(IsapiCollector([device(cam, retries=2)], Recorder(), health))
        assert dict(health.devices["nvr1"].errors) == {"http_401": 1}
        assert cam.requests <= 2
