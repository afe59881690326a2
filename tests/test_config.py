"""Config: the sample is valid; every error is reported at once with its key path and line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from examwatch.cli import main
from examwatch.edge.config import ConfigError, loads, sample_text

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
    checked = subprocess.run([sys.executable, "-m", "examwatch", "config", "check", "-"], input=sample.stdout,
                             capture_output=True)
    assert checked.returncode == 0, checked.stderr


def test_protocol_checks_catch_unknown_profiles_and_bad_addresses():
    text = sample_text() + """
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
