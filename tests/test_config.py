"""Config: the sample is valid; every error is reported at once with its key path and line."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examwatch.cli import main
from examwatch.edge.config import ConfigError, decode, load, loads, parse_listen, sample_text
from tests.config_support import mutated

BROKEN = """
[agent]
room = "r1"
kind = "exam_room"
colour = "blue"

[[devices]]
name = "door"
kind = "door"
protocol = "mqtt"
topic = "z/door"
interval = "ten"
"""


def test_sample_is_valid_and_complete():
    cfg = loads(sample_text())
    assert cfg.agent.kind == "secrecy_room"
    assert {d.protocol for d in cfg.devices} >= {"mqtt", "host"}
    assert cfg.rules["noise_high"].for_ == 30.0


def test_every_error_at_once_with_paths_and_lines():
    with pytest.raises(ConfigError) as exc:
        loads(BROKEN)
    by_path = {str(i).split(" ")[0].rstrip(":"): i for i in exc.value.issues}
    assert set(by_path) == {"agent.colour", "agent.site", "devices[0].interval"}
    assert by_path["agent.colour"].line == 5
    assert by_path["devices[0].interval"].line == 12
    assert "missing" in by_path["agent.site"].message


def test_protocol_options_are_checked_too():
    text = sample_text().replace("availability = true", "availabilty = true")
    door = next(i for i, d in enumerate(loads(sample_text()).devices) if d.name == "secrecy-door")
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert [i.path for i in exc.value.issues] == [("devices", door, "availabilty")]


def test_a_typo_in_a_rule_id_is_an_error_not_a_silent_no_op():
    with pytest.raises(ConfigError) as exc:
        loads(sample_text().replace("[rules.noise_high]", "[rules.noise_hihg]"))
    assert exc.value.issues[0].path == ("rules", "noise_hihg")


def test_bad_toml_names_the_line():
    with pytest.raises(ConfigError) as exc:
        loads("[agent]\nsite = \n")
    assert exc.value.issues[0].line == 2


def test_cli_check_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(sample_text(), encoding="utf-8")
    assert main(["config", "check", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(BROKEN, encoding="utf-8")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    for path in ("agent.colour", "agent.site", "devices[0].interval"):
        assert path in err


def test_cli_check_reads_stdin_and_prints_the_sample():
    sample = subprocess.run([sys.executable, "-m", "examwatch", "config", "sample"], capture_output=True, check=True)
    checked = subprocess.run(
        [sys.executable, "-m", "examwatch", "config", "check", "-"], input=sample.stdout, capture_output=True
    )
    assert checked.returncode == 0, checked.stderr


def test_protocol_checks_catch_unknown_profiles_and_bad_addresses():
    text = (
        sample_text()
        + """
[[devices]]
name = "ups-x1"
kind = "ups"
protocol = "snmp"
address = "127.0.0.1"
profile = "ups-mbi"

[[devices]]
name = "ups-x2"
kind = "ups"
protocol = "nut"
address = "127.0.0.1"
"""
    )
    sample = loads(sample_text()).devices
    n, noise = len(sample), next(i for i, d in enumerate(sample) if d.profile == "zigbee2mqtt_noise")
    text = text.replace('profile = "zigbee2mqtt_noise"', 'profile = "zigbee2mqtt_nosie"')
    with pytest.raises(ConfigError) as exc:
        loads(text)
    paths = {i.path[1:]: i.message for i in exc.value.issues}
    assert set(paths) == {(noise, "profile"), (n, "profile"), (n + 1, "address")}
    assert "ups-mib" in paths[(n, "profile")]  # it names the profiles that exist
    assert "zigbee2mqtt_noise" in paths[(noise, "profile")]


def test_an_override_that_would_make_a_rule_flap_is_an_error():
    text = sample_text().replace("clear = 65.0", "clear = 75.0")  # clear above a '>' threshold of 70
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert exc.value.issues[0].path == ("rules", "noise_high")
    assert "clear" in exc.value.issues[0].message


def test_an_enabled_uplink_needs_a_valid_signing_key():
    text = sample_text().replace('signing_key_file = "/etc/examwatch/agent.key"', 'signing_key_file = ""')
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert [i.path for i in exc.value.issues] == [("uplink", "signing_key_file")]
    with pytest.raises(ConfigError) as exc:
        loads(text.replace('signing_key = ""', 'signing_key = "not-hex-secret"'))
    assert [i.path for i in exc.value.issues] == [("uplink", "signing_key")]
    assert "not-hex-secret" not in str(exc.value)


def test_readiness_check_is_wired_and_refuses_an_invalid_config(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(BROKEN, encoding="utf-8")
    assert main(["check", "--config", str(bad), "--wait", "0"]) == 2
    assert "agent.colour" in capsys.readouterr().out + capsys.readouterr().err


# --- the trust boundary: every value that passes the checks works (finding 12) --------------------------

BASE = """
[agent]
site = "s1"
room = "r1"
{top}
[[devices]]
name = "door"
kind = "door"
protocol = "mqtt"
topic = "z2m/door"
{device}
{more}
"""

SECOND = '[[devices]]\nname = "door-2"\nkind = "door"\nprotocol = "mqtt"\n'
LINK = '[[devices]]\nname = "wan"\nkind = "link"\nprotocol = "links"\naddress = "default-gateway"\n'
FIELD = 'fields = [{{path = "noise", metric = "noise_db", scale = {}}}]'


def agent_text(top: str = "", device: str = "", more: str = "") -> str:
    return BASE.format(top=top, device=device, more=more)


# (name, file, the key path of the one error it must give)
AGENT_CASES = [
    ("rule for nan silences it", agent_text(more="[rules.noise_high]\nfor = nan"), ("rules", "noise_high", "for")),
    ("rule for negative", agent_text(more="[rules.noise_high]\nfor = -1.0"), ("rules", "noise_high", "for")),
    (
        "rule threshold inf",
        agent_text(more="[rules.noise_high]\nthreshold = inf"),
        ("rules", "noise_high", "threshold"),
    ),
    ("rule clear nan", agent_text(more="[rules.noise_high]\nclear = nan"), ("rules", "noise_high", "clear")),
    ("device interval nan", agent_text(device="interval = nan"), ("devices", 0, "interval")),
    ("device interval -inf", agent_text(device="interval = -inf"), ("devices", 0, "interval")),
    ("device interval zero", agent_text(device="interval = 0.0"), ("devices", 0, "interval")),
    ("device timeout zero", agent_text(device="timeout = 0"), ("devices", 0, "timeout")),
    ("device retries negative", agent_text(device="retries = -1"), ("devices", 0, "retries")),
    ("batch_max 0 never sends", agent_text(top="[uplink]\nbatch_max = 0"), ("uplink", "batch_max")),
    ("batch interval nan", agent_text(top="[uplink]\nbatch_interval = nan"), ("uplink", "batch_interval")),
    ("heartbeat negative", agent_text(top="[uplink]\nheartbeat = -5.0"), ("uplink", "heartbeat")),
    ("heartbeat nan", agent_text(top="[uplink]\nheartbeat = nan"), ("uplink", "heartbeat")),
    ("session expiry negative", agent_text(top="[uplink]\nsession_expiry = -1"), ("uplink", "session_expiry")),
    ("outbox budget nan", agent_text(top="[uplink]\noutbox_budget_mb = nan"), ("uplink", "outbox_budget_mb")),
    ("retention negative", agent_text(top="[store]\nretention_hours = -1.0"), ("store", "retention_hours")),
    ("retention nan", agent_text(top="[store]\nretention_hours = nan"), ("store", "retention_hours")),
    ("port 70000", agent_text(top="[mqtt]\nport = 70000"), ("mqtt", "port")),
    ("port -1", agent_text(top="[uplink]\nport = -1"), ("uplink", "port")),
    ("empty broker host", agent_text(top='[mqtt]\nhost = ""'), ("mqtt", "host")),
    ("broker host with a port", agent_text(top='[uplink]\nhost = "county.example:1883"'), ("uplink", "host")),
    ("listen garbage", agent_text(top='[exporter]\nlisten = "garbage"'), ("exporter", "listen")),
    ("listen port 70000", agent_text(top='[exporter]\nlisten = "127.0.0.1:70000"'), ("exporter", "listen")),
    ("listen bad v6", agent_text(top='[exporter]\nlisten = "[zz::1]:9108"'), ("exporter", "listen")),
    ("listen bad v4", agent_text(top='[exporter]\nlisten = "127.0.0.300:9108"'), ("exporter", "listen")),
    ("two devices on one topic", agent_text(more=SECOND + 'topic = "z2m/door"'), ("devices", 1, "topic")),
    (
        "a topic on another's availability",
        agent_text(more=SECOND + 'topic = "z2m/door/availability"'),
        ("devices", 1, "topic"),
    ),
    (
        "wildcard #",
        agent_text(device='topic = "z2m107/#"').replace('topic = "z2m/door"\n', ""),
        ("devices", 0, "topic"),
    ),
    ("wildcard +", agent_text(device='topic = "z2m/+"').replace('topic = "z2m/door"\n', ""), ("devices", 0, "topic")),
    (
        "empty level",
        agent_text(device='topic = "z2m//door"').replace('topic = "z2m/door"\n', ""),
        ("devices", 0, "topic"),
    ),
    (
        "trailing slash",
        agent_text(device='topic = "z2m/door/"').replace('topic = "z2m/door"\n', ""),
        ("devices", 0, "topic"),
    ),
    (
        "topic too long",
        agent_text(device=f'topic = "z/{"a" * 300}"').replace('topic = "z2m/door"\n', ""),
        ("devices", 0, "topic"),
    ),
    ("field scale nan", agent_text(device=FIELD.format("nan")), ("devices", 0, "fields", 0, "scale")),
    (
        "field of an unknown metric",
        agent_text(device='fields = [{path = "x", metric = "nosie_db"}]'),
        ("devices", 0, "fields", 0),
    ),
    ("link port 0", agent_text(more=LINK + "port = 0"), ("devices", 1, "port")),
    ("link probes 0", agent_text(more=LINK + "probes = 0"), ("devices", 1, "probes")),
    ("link probe interval nan", agent_text(more=LINK + "probe_interval = nan"), ("devices", 1, "probe_interval")),
    ("a profile name that is a path", agent_text(device='profile = "../../../../etc/x"'), ("devices", 0, "profile")),
    (
        "session with a UTC offset",
        agent_text(more="[[schedule.sessions]]\nstart = 2024-06-07T09:00:00+08:00\nend = 2024-06-07T11:30:00"),
        ("schedule", "sessions", 0, "start"),
    ),
    (
        "secrecy window in UTC",
        agent_text(more="[[schedule.secrecy_windows]]\nstart = 2024-06-07T07:00:00\nend = 2024-06-07T08:00:00Z"),
        ("schedule", "secrecy_windows", 0, "end"),
    ),
    (
        "session as a bare date",
        agent_text(more="[[schedule.sessions]]\nstart = 2024-06-07\nend = 2024-06-08T00:00:00"),
        ("schedule", "sessions", 0, "start"),
    ),
    (
        "session as a bare time",
        agent_text(more="[[schedule.sessions]]\nstart = 09:00:00\nend = 2024-06-08T00:00:00"),
        ("schedule", "sessions", 0, "start"),
    ),
    (
        "session in year 1",
        agent_text(more="[[schedule.sessions]]\nstart = 0001-01-01T00:00:00\nend = 2024-06-08T00:00:00"),
        ("schedule", "sessions", 0, "start"),
    ),
    ("bad time zone", agent_text(more='[schedule]\ntimezone = "Asia/Beijing"'), ("schedule", "timezone")),
    ("time zone as a path", agent_text(more='[schedule]\ntimezone = "/etc/passwd"'), ("schedule", "timezone")),
    ("empty time zone", agent_text(more='[schedule]\ntimezone = ""'), ("schedule", "timezone")),
    ("before_days nan", agent_text(more="[schedule]\nbefore_days = nan"), ("schedule", "before_days")),
    ("deeply nested", agent_text(more="x = " + "[" * 5000 + "]" * 5000), ()),
    ("nested inline tables", agent_text(more="x = " + "{a = " * 2000 + "1" + "}" * 2000), ()),
    ("larger than a megabyte", agent_text(more="# " + "x" * (1 << 20)), ()),
]


@pytest.mark.parametrize("text,path", [c[1:] for c in AGENT_CASES], ids=[c[0] for c in AGENT_CASES])
def test_agent_values_that_cannot_work_are_errors_with_their_key_path(text, path):
    loads(agent_text())  # the base is valid: each case adds one fault
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert [i.path for i in exc.value.issues] == [path], exc.value


def test_the_ranges_edges_are_accepted_and_work():
    cfg = loads(
        agent_text(
            top='[uplink]\nbatch_max = 1\nheartbeat = 0.1\n[exporter]\nlisten = "[::1]:65535"',
            more=SECOND + 'topic = "z2m/door-2"\n[rules.noise_high]\nfor = 0',
        )
    )
    assert cfg.uplink.batch_max == 1 and cfg.rules["noise_high"].for_ == 0
    assert parse_listen(cfg.exporter.listen) == ("::1", 65535)
    assert parse_listen(":9108") == ("127.0.0.1", 9108)  # never every interface by accident
    assert parse_listen("localhost:1") == ("localhost", 1)


def test_a_session_error_names_its_line_and_says_local_time():
    text = agent_text(more="[[schedule.sessions]]\nstart = 2024-06-07T09:00:00+08:00\nend = 2024-06-07T11:30:00")
    with pytest.raises(ConfigError) as exc:
        loads(text)
    issue = exc.value.issues[0]
    assert text.splitlines()[issue.line - 1].startswith("start =")
    assert "local time" in issue.message


def test_a_gbk_file_names_the_line_and_says_save_as_utf8(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_bytes(
        agent_text(top='[exporter]\nlisten = "127.0.0.1:9108"').encode() + "[agent]\n# 考场\n".encode("gbk")
    )
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    issue = exc.value.issues[0]
    assert "UTF-8" in issue.message
    assert issue.line == path.read_bytes().count(b"\n")  # the comment line, the last one


def test_a_byte_order_mark_is_accepted():
    assert loads("\ufeff" + sample_text()).agent.site == "xx-school-1"
    assert decode(b"\xef\xbb\xbf[agent]\n") == "\ufeff[agent]\n"  # and stripped by loads, as above


def test_reports_follow_the_file_order_and_stop_at_a_bound():
    text = '[agent]\nsite = "s"\nroom = "r"\n' + "".join(f"k{i} = {i}\n" for i in range(200))
    with pytest.raises(ConfigError) as exc:
        loads(text)
    issues = exc.value.issues
    assert [i.path for i in issues[:3]] == [("agent", "k0"), ("agent", "k1"), ("agent", "k2")]
    assert len(issues) == 51 and "150 more" in issues[-1].message


@pytest.mark.parametrize("which", ["agent", "gateway"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300) | st.sampled_from(["[agent]\nsite = nan", "a = [[[[[", "\x00", "[[devices]]\n" * 3]))
def test_any_text_gives_a_config_or_a_config_error(which, text):
    from examwatch.gateway import config as gateway_config

    with contextlib.suppress(ConfigError):
        (loads if which == "agent" else gateway_config.loads)(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(sample_text()))
def test_any_toml_shaped_file_gives_a_config_or_a_config_error(text):
    try:
        loads(text)
    except ConfigError as err:
        assert err.issues and all(isinstance(i.message, str) for i in err.issues)


def test_the_smallest_batch_max_still_sends_every_reading(tmp_path):
    from examwatch.edge.store import OutboxReader, Store
    from examwatch.kernel.model import Reading

    cfg = loads(agent_text(top="[uplink]\nbatch_max = 1"))
    store = Store(tmp_path / "agent.db")
    store.write(
        [Reading("door", "door_open", float(i), 1000.0 + i) for i in range(3)], [], flush_readings=cfg.uplink.batch_max
    )  # as the runtime does on a flush
    reader = OutboxReader(tmp_path / "agent.db")
    assert reader.count() == 3  # batch_max = 0 (now refused) queued none, ever
    reader.close()
    store.close()


def test_type_errors_and_semantic_errors_are_reported_together():
    text = agent_text(
        top='[exporter]\nlisten = "garbage"\n[uplink]\nbatch_max = 0',
        device="interval = nan\n",
        more=SECOND + 'topic = "z2m/door"\n[rules.noise_hihg]\nfor = 1.0',
    )
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert {i.path for i in exc.value.issues} == {
        ("exporter", "listen"),
        ("uplink", "batch_max"),
        ("devices", 0, "interval"),
        ("devices", 1, "topic"),
        ("rules", "noise_hihg"),
    }
    assert all(i.line for i in exc.value.issues)


@pytest.mark.parametrize(
    "old,new,path",
    [
        ('site = "s1"', f'site = "{"s" * 65}"', ("agent", "site")),
        ('room = "r1"', 'room = ""', ("agent", "room")),
        ('name = "door"', f'name = "{"d" * 65}"', ("devices", 0, "name")),
    ],
)
def test_names_are_short_topic_levels(old, new, path):
    with pytest.raises(ConfigError) as exc:
        loads(agent_text().replace(old, new))
    assert [i.path for i in exc.value.issues] == [path]
