"""`examwatch site plan`: a 3-site, 60-room roster -> configs that pass `config check`, the broker's
dynamic-security users and roles that a real mosquitto loads and enforces, a keys file the gateway accepts;
re-run no-op; rotation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from examwatch.edge import siteplan
from examwatch.edge.config import load
from examwatch.gateway.config import load as load_gateway
from examwatch.simulators.broker import COUNTY_CONF, Mosquitto, county_conf
from tests.test_county_broker import REFUSED, Client

HEADER = "site,room,kind,site_name,room_name,pi_host,devices\n"


def roster() -> str:
    rows = []
    for s in range(1, 4):
        for r in range(1, 20):
            devices = f"ups=megatec:/dev/serial/by-id/usb-ups-{r}@pack-voltage camera=isapi:10.{s}.{r}.64"
            rows.append(f"xx-{s},{r:03d},exam_room,第{s}中学,{r}考场,pi-{s}-{r},{devices}\n")
        rows.append(
            f"xx-{s},secrecy,secrecy_room,第{s}中学,保密室,pi-{s}-s,door=mqtt:zigbee2mqtt/door ups=snmp:10.{s}.0.20\n"
        )
    return HEADER + "".join(rows)


SCHEDULE = """[schedule]
timezone = "Asia/Shanghai"
[[schedule.sessions]]
start = 2027-06-07T09:00:00
end = 2027-06-07T11:30:00
"""


def run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    roster_file, schedule = out.parent / "roster.csv", out.parent / "schedule.toml"
    roster_file.write_text(roster(), encoding="utf-8")
    schedule.write_text(SCHEDULE, encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "examwatch",
        "site",
        "plan",
        str(roster_file),
        "--out",
        str(out),
        "--schedule",
        str(schedule),
    ]
    return subprocess.run([*cmd, "--broker", "county.example", *extra], capture_output=True, text=True, timeout=120)


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_sixty_rooms_valid_configs_kept_keys_and_one_rotation(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    first = run(out)
    assert first.returncode == 0, first.stderr
    configs = sorted(out.glob("rooms/*/*/agent.toml"))
    assert len(configs) == 60 and "60 个" in first.stdout
    for path in configs:
        cfg = load(str(path))  # what `config check` runs
        assert cfg.uplink.enabled and cfg.uplink.username == f"{cfg.agent.site}-{cfg.agent.room}" and cfg.uplink.tls
        assert len(cfg.schedule.sessions) == 1
    checked = subprocess.run(
        [sys.executable, "-m", "examwatch", "config", "check", str(configs[0])], capture_output=True
    )
    assert checked.returncode == 0, checked.stderr
    secrets = [*out.glob("rooms/*/*/agent.key"), *out.glob("rooms/*/*/agent.toml"), *out.glob("county/*")]
    assert secrets and all(p.stat().st_mode & 0o777 == 0o600 for p in secrets)
    keys = (out / "county/agent-keys").read_text().splitlines()
    assert len(keys) == 60 and len({line.split()[1] for line in keys}) == 60
    assert keys[0] == f"xx-1/001 {(out / 'rooms/xx-1/001/agent.key').read_text().strip()}"

    before = snapshot(out)
    again = run(out)
    assert again.returncode == 0 and "没有文件需要改动" in again.stdout
    assert snapshot(out) == before  # a second run changes nothing: keys, passwords, hashes kept

    rotated = run(out, "--rotate", "xx-2/007")
    assert rotated.returncode == 0, rotated.stderr
    after = snapshot(out)
    assert {k for k in after if after[k] != before[k]} == {"rooms/xx-2/007/agent.key", "county/agent-keys"}
    changed = set((out / "county/agent-keys").read_text().splitlines()) - set(keys)
    assert [line.split()[0] for line in changed] == ["xx-2/007"]


def dynsec(out: Path) -> dict:
    return json.loads((out / "county/dynamic-security.json").read_text())


def test_each_room_may_publish_its_own_topics_only_and_the_gateway_accepts_the_keys_file(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    assert run(out).returncode == 0
    made = dynsec(out)
    assert made["defaultACLAccess"] == {
        "publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": True
    }  # fmt: skip
    roles = {r["rolename"]: r["acls"] for r in made["roles"]}
    clients = {c["username"]: c for c in made["clients"]}
    assert len(clients) == 61 and len(roles) == 61  # the rooms and the gateway
    assert clients["xx-2-005"]["roles"] == [{"rolename": "room/xx-2/005"}]
    assert roles["room/xx-2/005"] == [
        {"acltype": "publishClientSend", "topic": "examwatch/v1/xx-2/005/#", "allow": True}
    ]
    group = (out / "county/share-group").read_text().strip()
    assert len(group) == 24 and clients["examwatch-gateway"]["roles"] == [{"rolename": "gateway"}]
    assert [(a["acltype"], a["topic"]) for a in roles["gateway"]] == [
        ("subscribePattern", "examwatch/v1/#"),
        ("subscribePattern", f"$share/{group}/examwatch/v1/#"),
        ("publishClientReceive", "examwatch/v1/#"),
    ]
    gw = tmp_path / "gateway.toml"
    gw.write_text(
        f'[gateway]\nstate_dir = "{tmp_path / "gw"}"\n[broker]\nshare_group = "{group}"\n'
        f'[security]\nkeys_file = "{out / "county/agent-keys"}"\n'
    )
    checked = subprocess.run(
        [sys.executable, "-m", "examwatch", "gateway", "config", "check", str(gw)], capture_output=True
    )
    assert checked.returncode == 0, checked.stderr
    keys = load_gateway(str(gw)).agent_keys()
    assert len(keys) == 60 and keys["xx-3/secrecy"].hex() == (out / "rooms/xx-3/secrecy/agent.key").read_text().strip()


def test_replicas_get_the_gateways_role_their_own_passwords_and_the_share_group_given(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    assert run(out, "--replicas", "3", "--share-group", "county-a").returncode == 0
    passwords = [
        (out / f"county/{name}.password").read_text().strip() for name in ("gateway", "gateway-2", "gateway-3")
    ]
    assert len(set(passwords)) == 3
    clients = dynsec(out)["clients"]
    assert [(c["username"], c["roles"]) for c in clients[-3:]] == [
        (user, [{"rolename": "gateway"}])
        for user in ("examwatch-gateway", "examwatch-gateway-2", "examwatch-gateway-3")
    ]
    assert all(siteplan.credentials_match(c, p) for c, p in zip(clients[-3:], passwords, strict=True))
    assert (out / "county/share-group").read_text() == "county-a\n"
    again = run(out, "--replicas", "3")  # the group kept from the last run
    assert again.returncode == 0 and "没有文件需要改动" in again.stdout, again.stdout
    with pytest.raises(
        siteplan.PlanError, match="examwatch/gateway-2 would log in as examwatch-gateway-2, like gateway"
    ):
        siteplan.parse_roster(HEADER + "examwatch,gateway-2,exam_room,a,b,,\n", replicas=2)
    assert len(siteplan.parse_roster(HEADER + "examwatch,gateway-2,exam_room,a,b,,\n")) == 1
    assert run(tmp_path / "bad", "--replicas", "65").returncode == 2
    for bad in ("a/b", "a+", "#", "x" * 65):
        refused = run(tmp_path / "bad", "--share-group", bad)
        assert refused.returncode == 2 and "--share-group" in refused.stderr and not (tmp_path / "bad").exists()


def test_a_new_password_changes_that_users_entry_only(tmp_path: Path) -> None:
    roster, out = HEADER + "s1,101,exam_room,,,,\ns1,102,exam_room,,,,\n", tmp_path / "plan"
    siteplan.plan(roster, out, ("county", 8883, True))
    before = {c["username"]: c for c in dynsec(out)["clients"]}
    (out / "rooms/s1/102/mqtt.password").unlink()
    changed = siteplan.plan(roster, out, ("county", 8883, True)).changed
    assert sorted(p.relative_to(out).as_posix() for p in changed) == [
        "county/dynamic-security.json", "rooms/s1/102/agent.toml", "rooms/s1/102/mqtt.password"
    ]  # fmt: skip
    after = {c["username"]: c for c in dynsec(out)["clients"]}
    assert [u for u in after if after[u] != before[u]] == ["s1-102"]
    assert siteplan.credentials_match(after["s1-102"], (out / "rooms/s1/102/mqtt.password").read_text().strip())
    (out / "county/dynamic-security.json").write_text("[" * 100_000)  # unreadable: every hash made again
    siteplan.plan(roster, out, ("county", 8883, True))
    assert all(c["salt"] != before[c["username"]]["salt"] for c in dynsec(out)["clients"])


def test_a_real_mosquitto_loads_the_plan_and_lets_a_room_write_only_its_own_topics(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    assert run(out).returncode == 0
    broker = Mosquitto(tmp_path / "county")
    broker.workdir.chmod(0o755)
    conf = county_conf(COUNTY_CONF.read_text(), broker.port, broker.workdir, out / "county/dynamic-security.json")
    broker.conf.write_text(conf)
    broker.start()
    password = lambda room: (out / "rooms" / room / "mqtt.password").read_text().strip()  # noqa: E731
    gateway_password = (out / "county/gateway.password").read_text().strip()
    shared = f"$share/{(out / 'county/share-group').read_text().strip()}/examwatch/v1/+/+/alarms"
    try:
        gw = Client(broker.port, "examwatch-gateway", "examwatch-gateway", True, password=gateway_password)
        assert gw.subscribe(shared).value == 1
        room = Client(broker.port, "xx-2-005", "xx-2-005", True, password=password("xx-2/005"))
        assert not room.connect_rc.is_failure
        assert room.subscribe(shared).value == REFUSED
        assert not room.publish("examwatch/v1/xx-2/005/alarms", b"mine").is_failure
        for topic in ("examwatch/v1/xx-2/006/alarms", "examwatch/v1/xx-1/005/status"):
            assert room.publish(topic, b"forged").is_failure
        assert gw.heard("examwatch/v1/nobody/x/y") == ["examwatch/v1/xx-2/005/alarms"]
        wrong = Client(broker.port, "xx-2-005", "x", True, password=password("xx-2/006"))
        assert wrong.connect_rc.is_failure
        for c in (gw, room, wrong):
            c.close()
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("a,1,exam_room,,,,\na,1,exam_room,,,,\n", "line 3: room a/1 listed twice"),
        ("a-b,c,exam_room,,,,\na,b-c,exam_room,,,,\n", "line 3: a/b-c would log in as a-b-c, like a-b/c"),
        ("a,1,office,,,,\n", "line 2: kind 'office'"),
        ("a/b,1,exam_room,,,,\n", "line 2: site 'a/b'"),
        ("a,1,exam_room,,,,ups=megatec\n", "line 2: device 'ups=megatec'"),
        ('a,1,exam_room,,,"pi\n[uplink]",\n', "line 3: pi_host 'pi\\n[uplink]'"),
        ("a,1,exam_room,,,,ups=megatec:/dev/x@no-such-model\n", "line 2 (a/1): devices[0].profile"),
    ],
)
def test_a_bad_roster_writes_nothing_and_names_the_line(tmp_path: Path, rows: str, expected: str) -> None:
    with pytest.raises(siteplan.PlanError, match="roster") as err:
        siteplan.plan(HEADER + rows, tmp_path / "out", ("county", 8883, True))
    assert expected in str(err.value)
    assert not (tmp_path / "out").exists()


def test_password_hashes_are_mosquittos_pbkdf2_sha512() -> None:
    made = siteplan.hash_password("secret", b"0123456789ab")
    assert made["salt"] == "MDEyMzQ1Njc4OWFi" and made["iterations"] == 101 and len(made["password"]) == 88
    assert siteplan.credentials_match(made, "secret") and not siteplan.credentials_match(made, "secreT")
    for broken in ({**made, "iterations": 0}, {**made, "iterations": "101"}, {**made, "salt": "%%"}, {}):
        assert not siteplan.credentials_match(broken, "secret")
