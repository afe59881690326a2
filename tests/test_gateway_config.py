"""The gateway's config: the sample is valid; every value that cannot work is an error with its key path
and line, reported all at once by ``examwatch gateway config check`` and by a refused ``gateway run``.
Arbitrary text is tried on both configs in test_config.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings

from examwatch.edge.config import ConfigError
from examwatch.gateway.config import builtin_correlation, loads, sample_text
from tests.config_support import mutated

KEY = "ab" * 32
BASE = f'[security.keys]\n"s1/101" = "{KEY}"\n'
RULE = '[[correlation]]\nclass = "power"\ntitle = "考点多个考场市电中断"\nrules = ["ups_on_battery", "agent_offline"]\n'
USER = '[[api.users]]\nname = "值班员"\nrole = "{}"\npassword_hash = "{}"\n'
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
SESSION = '[[schedule.sessions]]\nname = "数学"\nstart = {}\nend = {}\n'


def gateway_text(extra: str = "") -> str:
    return BASE + extra + "\n"  # a bare key line in ``extra`` joins the roster


GATEWAY_CASES = [
    ("retention nan", "[gateway]\nretention_days = nan", ("gateway", "retention_days")),
    ("retention negative", "[gateway]\nretention_days = -1.0", ("gateway", "retention_days")),
    ("alarm retention inf", "[gateway]\nalarm_retention_days = inf", ("gateway", "alarm_retention_days")),
    ("batch_max 0", "[gateway]\nbatch_max = 0", ("gateway", "batch_max")),
    ("broker port 70000", "[broker]\nport = 70000", ("broker", "port")),
    ("broker port -1", "[broker]\nport = -1", ("broker", "port")),
    ("receive_maximum 0", "[broker]\nreceive_maximum = 0", ("broker", "receive_maximum")),
    ("receive_maximum 65536", "[broker]\nreceive_maximum = 65536", ("broker", "receive_maximum")),
    ("session expiry negative", "[broker]\nsession_expiry = -1", ("broker", "session_expiry")),
    ("session expiry past MQTT's", "[broker]\nsession_expiry = 4294967296", ("broker", "session_expiry")),
    ("broker host with a space", '[broker]\nhost = "county broker"', ("broker", "host")),
    ("api listen garbage", '[api]\nlisten = "garbage"', ("api", "listen")),
    ("exporter port 70000", '[exporter]\nlisten = "127.0.0.1:70000"', ("exporter", "listen")),
    (
        "api and exporter on one port",
        '[exporter]\nlisten = "127.0.0.1:8080"\n[api]\nlisten = "0.0.0.0:8080"',
        ("api", "listen"),
    ),
    ("quiet negative", "[security]\nquiet = -600.0", ("security", "quiet")),
    ("heartbeat timeout nan", "[liveness]\nheartbeat_timeout = nan", ("liveness", "heartbeat_timeout")),
    ("heartbeat timeout negative", "[liveness]\nheartbeat_timeout = -90.0", ("liveness", "heartbeat_timeout")),
    ("skew inf", "[liveness]\nskew_max = inf", ("liveness", "skew_max")),
    ("min_rooms 0", RULE + "min_rooms = 0", ("correlation", 0, "min_rooms")),
    ("window nan", RULE + "window = nan", ("correlation", 0, "window")),
    ("site share nan", RULE + "site_share = nan", ("correlation", 0, "site_share")),
    ("site share over 1", RULE + "site_share = 1.5", ("correlation", 0, "site_share")),
    ("a rule id typo", RULE.replace("ups_on_battery", "ups_on_batery"), ("correlation", 0, "rules")),
    ("no rules", RULE.replace('["ups_on_battery", "agent_offline"]', "[]"), ("correlation", 0, "rules")),
    ("one class twice", RULE + RULE, ("correlation", 1, "class")),
    (
        "session with a UTC offset",
        SESSION.format("2024-06-07T09:00:00+08:00", "2024-06-07T11:30:00"),
        ("schedule", "sessions", 0, "start"),
    ),
    (
        "session ends before it starts",
        SESSION.format("2024-06-07T09:00:00", "2024-06-07T08:00:00"),
        ("schedule", "sessions", 0, "end"),
    ),
    ("bad time zone", '[schedule]\ntimezone = "Beijing"', ("schedule", "timezone")),
    ("a key that is not hex", '"s1/102" = "not-a-key"', ("security", "keys", "s1/102")),
    ("keys file missing", '[security]\nkeys_file = "/nonexistent/agent-keys"', ("security", "keys_file")),
    ("keys file that never ends", '[security]\nkeys_file = "/dev/zero"', ("security", "keys_file")),
    ("deeply nested", "x = " + "[" * 5000 + "]" * 5000, ()),
    ("desk user with no such role", USER.format("boss", HASH), ("api", "users", 0, "role")),
    ("desk password not hashed", USER.format("duty", "hunter2"), ("api", "users", 0, "password_hash")),
    ("desk user twice", USER.format("duty", HASH) + USER.format("viewer", HASH), ("api", "users", 1, "name")),
    ("an unknown mode", '[gateway]\nmode = "province"', ("gateway", "mode")),
    # a province's aggregate gateway only looks: the counties notify and take acknowledgements
    ("aggregate with a token", '[gateway]\nmode = "aggregate"\n[api]\ntoken = "t"', ("api", "token")),
    (
        "aggregate with a channel",
        '[gateway]\nmode = "aggregate"\n[[channels]]\nname = "hook"\ntype = "webhook"\nurl = "http://127.0.0.1:1/x"',
        ("channels",),
    ),
    ("store backend unknown", '[store]\nbackend = "mysql"', ("store", "backend")),
    ("postgresql with neither dsn nor host", '[store]\nbackend = "postgresql"', ("store", "dsn")),
    (
        "postgresql with dsn and host",
        '[store]\nbackend = "postgresql"\ndsn = "dbname=x"\nhost = "db1"',
        ("store", "dsn"),
    ),
    ("a password in the dsn", '[store]\nbackend = "postgresql"\ndsn = "host=db1 password=secret"', ("store", "dsn")),
    ("a malformed dsn", '[store]\nbackend = "postgresql"\ndsn = "host=\'db1"', ("store", "dsn")),
    ("postgresql host with a space", '[store]\nbackend = "postgresql"\nhost = "db 1"', ("store", "host")),
    ("postgresql port 0", '[store]\nbackend = "postgresql"\nhost = "db1"\nport = 0', ("store", "port")),
    (
        "password file missing",
        '[store]\nbackend = "postgresql"\nhost = "db1"\npassword_file = "/nonexistent/pw"',
        ("store", "password_file"),
    ),
    ("a dsn for sqlite", '[store]\ndsn = "host=db1"', ("store", "dsn")),
    ("share group with a slash", '[broker]\nshare_group = "a/b"', ("broker", "share_group")),
    ("a share group with a wildcard", '[broker]\nshare_group = "county+"', ("broker", "share_group")),
]


@pytest.mark.parametrize("extra,path", [c[1:] for c in GATEWAY_CASES], ids=[c[0] for c in GATEWAY_CASES])
def test_gateway_values_that_cannot_work_are_errors_with_their_key_path(extra, path):
    loads(gateway_text())  # the base is valid: each case adds one fault
    with pytest.raises(ConfigError) as exc:
        loads(gateway_text(extra))
    assert [i.path for i in exc.value.issues] == [path], exc.value


def test_the_sample_and_the_builtin_correlation_rules_are_valid():
    cfg = loads(sample_text())
    assert cfg.broker.receive_maximum == 2000
    loads(gateway_text(RULE + SESSION.format("2024-06-07T09:00:00", "2024-06-07T11:30:00")))
    assert {r.fault_class for r in builtin_correlation()} >= {"network", "power"}


def test_semantic_errors_are_reported_all_at_once_with_lines():
    text = (
        '[exporter]\nlisten = "127.0.0.1:8080"\n[api]\nlisten = "127.0.0.1:8080"\n[schedule]\ntimezone = "Mars"\n'
        + RULE.replace("ups_on_battery", "ups_on_batery")
        + BASE
    )
    with pytest.raises(ConfigError) as exc:
        loads(text)
    found = {i.path: i.line for i in exc.value.issues}
    assert found == {("api", "listen"): 4, ("schedule", "timezone"): 6, ("correlation", 0, "rules"): 10}


def test_type_errors_and_semantic_errors_are_reported_together():
    text = gateway_text(
        '[gateway]\nbatch_max = 0\n[api]\nlisten = "garbage"\n[schedule]\ntimezone = "Mars"\n'
        + RULE
        + "window = nan\n"
        + RULE.replace("power", "noise").replace("ups_on_battery", "nosie_high")
    )
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert {i.path for i in exc.value.issues} == {
        ("gateway", "batch_max"),
        ("api", "listen"),
        ("schedule", "timezone"),
        ("correlation", 0, "window"),
        ("correlation", 1, "rules"),
    }


def keys_file_issues(tmp_path, text: str) -> list[tuple[tuple[str, ...], str]]:
    keys = tmp_path / "agent-keys"
    keys.write_text(text, encoding="utf-8")
    keys.chmod(0o600)
    with pytest.raises(ConfigError) as exc:
        loads(f'[security]\nkeys_file = "{keys}"\n')
    return [(i.path, i.message) for i in exc.value.issues]


def test_a_bad_keys_file_line_is_reported(tmp_path):
    [(path, message)] = keys_file_issues(tmp_path, f"s1/101 {KEY}\ns1/102 zz\n")
    assert path == ("security", "keys_file") and "line 2" in message


def test_a_room_given_twice_in_a_keys_file_is_refused(tmp_path):
    """Two counties' rosters put together for a province: one room id in both would lose one of the rooms."""
    text = f"s1/101 {KEY}\ns1/102 {KEY}\n# the next county\ns1/101 {'cd' * 32}\n"
    assert keys_file_issues(tmp_path, text) == [
        (("security", "keys_file"), "keys file line 4: s1/101 already given at line 1")
    ]


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "examwatch", *args], input=stdin, capture_output=True, timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_gateway_config_check_cli(tmp_path):
    good = tmp_path / "gateway.toml"
    good.write_text(sample_text(), encoding="utf-8")
    assert _cli("gateway", "config", "check", str(good)).returncode == 0
    assert _cli("gateway", "config", "check", "-", stdin=sample_text().encode()).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[gateway]\nbatch_max = 0\n[broker]\nreceive_maximum = 0\n[api]\nlisten = "127.0.0.1:9109"\n', encoding="utf-8"
    )
    checked = _cli("gateway", "config", "check", str(bad))
    assert checked.returncode == 2
    assert "gateway.batch_max (line 2)" in checked.stderr and "broker.receive_maximum (line 4)" in checked.stderr
    assert "Traceback" not in checked.stderr
    # the same file, run: refused with the same report, before anything starts
    ran = _cli("gateway", "run", "--config", str(bad))
    assert ran.returncode == 2 and ran.stderr == checked.stderr


def test_gateway_config_check_cli_semantic_errors_and_missing_file(tmp_path):
    bad = tmp_path / "ports.toml"
    bad.write_text('[exporter]\nlisten = "127.0.0.1:8080"\n', encoding="utf-8")  # the API's default port
    checked = _cli("gateway", "config", "check", str(bad))
    assert checked.returncode == 2 and "api.listen" in checked.stderr and "8080" in checked.stderr
    gone = _cli("gateway", "config", "check", str(tmp_path / "nope.toml"))
    assert gone.returncode == 2 and "cannot read" in gone.stderr


@pytest.mark.parametrize("which", [("config", "check"), ("gateway", "config", "check"), ("gateway", "run", "--config")])
def test_a_gbk_file_is_refused_with_its_line_not_a_traceback(tmp_path, which):
    path = tmp_path / "gbk.toml"
    path.write_bytes('[agent]\nsite = "s1"\nroom = "r1"\nroom_name = "第一考场"\n'.encode("gbk"))
    out = _cli(*which, str(path))
    assert out.returncode == 2, out
    assert "(line 4)" in out.stderr and "save the file as UTF-8" in out.stderr and "Traceback" not in out.stderr


def test_agent_config_check_cli_reads_stdin_bytes_strictly():
    out = _cli("config", "check", "-", stdin='[agent]\nsite = "s1"\nroom = "考场"\n'.encode("gbk"))
    assert out.returncode == 2 and "(line 3)" in out.stderr
    out = _cli("config", "check", "-", stdin='\ufeff[agent]\nsite = "s1"\nroom = "r1"\n'.encode())
    assert out.returncode == 0, out.stderr


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(gateway_text(RULE + SESSION.format("2024-06-07T09:00:00", "2024-06-07T11:30:00"))))
def test_any_toml_shaped_file_gives_a_gateway_config_or_a_config_error(text):
    try:
        loads(text)
    except ConfigError as err:
        assert err.issues


def test_the_store_password_is_never_in_an_error_or_the_conninfo(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret-word\n")
    pw.chmod(0o644)
    with pytest.raises(ConfigError) as exc:
        loads(gateway_text(f'[store]\nbackend = "postgresql"\nhost = "db1"\npassword_file = "{pw}"'))
    assert [i.path for i in exc.value.issues] == [("store", "password_file")] and "s3cret" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        loads(gateway_text('[store]\nbackend = "postgresql"\ndsn = "host=db1 password=s3cret-word"'))
    assert "s3cret" not in str(exc.value)
    pw.chmod(0o600)
    cfg = loads(gateway_text(f'[store]\nbackend = "postgresql"\nhost = "db1"\npassword_file = "{pw}"'))
    where = cfg.store_where()
    assert "s3cret" not in where.conninfo and where.password() == "s3cret-word"
    assert "db1" in where.conninfo and "5432" in where.conninfo
