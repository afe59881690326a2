"""The daemons' own files: owner-only modes, secrets refused when others may read them, the state-dir lock,
and a corrupt agent database set aside for a fresh one (never for a merely busy or unreadable one)."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest
import structlog

from examwatch.edge import statedir
from examwatch.edge.runtime import Agent
from examwatch.edge.store import Store, is_corruption, open_checked
from examwatch.kernel import files
from examwatch.kernel.model import Reading
from tests.corrupt_db import CORRUPTIONS, garbage_wal, mode, sound_db
from tests.support import config

LIMITS = {"retention_s": 3600.0, "outbox_budget_bytes": 1 << 20}


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_database_is_set_aside_and_a_fresh_one_started(tmp_path, corrupt):
    db = tmp_path / "agent.db"
    sound_db(db)
    corrupt(db)
    before = time.time()
    opened = open_checked(db, **LIMITS)
    assert opened.problem and opened.set_aside is not None and opened.open_alarms == []
    assert opened.set_aside.name.startswith("agent.db.corrupt-2")
    stamp = opened.set_aside.name.removeprefix("agent.db.corrupt-")
    assert abs(time.mktime(time.strptime(stamp + "UTC", "%Y%m%dT%H%M%S%Z")) - time.mktime(time.gmtime(before))) < 5
    assert opened.set_aside.exists()
    if corrupt is garbage_wal:  # the bad WAL went with its database, never to meet the fresh one
        assert Path(f"{opened.set_aside}-wal").read_bytes()[:1] == b"\x5a"
    opened.store.write([Reading("host", "store_ok", 1.0, 200.0)])
    assert opened.store.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 1
    assert opened.store.db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert mode(db) == 0o600


def test_a_sound_database_is_kept_with_its_open_alarms(tmp_path):
    alarm = sound_db(tmp_path / "agent.db")
    opened = open_checked(tmp_path / "agent.db", **LIMITS)
    assert opened.set_aside is None and opened.problem == ""
    assert opened.open_alarms == [alarm]
    assert list(tmp_path.glob("*.corrupt-*")) == []


def test_a_wal_a_power_cut_left_unwritten_is_not_corruption(tmp_path):
    db = tmp_path / "agent.db"
    alarm = sound_db(db)
    Path(f"{db}-wal").write_bytes(bytes(4096))
    opened = open_checked(db, **LIMITS)
    assert opened.set_aside is None and opened.open_alarms == [alarm]


def test_an_unreadable_stored_alarm_counts_as_corruption(tmp_path):
    db = tmp_path / "agent.db"
    sound_db(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alarms SET event = x'ff00'")
    opened = open_checked(db, **LIMITS)
    assert opened.set_aside is not None and "stored alarm unreadable" in opened.problem


def test_only_a_damaged_file_is_corruption(tmp_path):
    (tmp_path / "junk").write_bytes(b"not a database at all" * 100)
    with pytest.raises(sqlite3.DatabaseError) as notadb:
        sqlite3.connect(tmp_path / "junk").execute("SELECT 1 FROM sqlite_master")
    with pytest.raises(sqlite3.OperationalError) as missing:
        sqlite3.connect(":memory:").execute("SELECT * FROM nowhere")
    assert is_corruption(notadb.value) and not is_corruption(missing.value)


def test_a_busy_database_is_not_set_aside(tmp_path, monkeypatch):
    db = tmp_path / "agent.db"
    sound_db(db)
    monkeypatch.setattr("examwatch.edge.store.BUSY_TIMEOUT", 0.1)  # the agent waits 30 s for a lock
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            open_checked(db, **LIMITS)
    finally:
        holder.close()
    assert list(tmp_path.glob("*.corrupt-*")) == []


def test_set_aside_twice_in_one_second_keeps_both(tmp_path):
    db = tmp_path / "agent.db"
    names = []
    for _ in range(2):
        db.write_bytes(b"x")
        Path(f"{db}-wal").write_bytes(b"w")
        names.append(statedir.set_aside(db, now=1_800_000_000.0))
    assert [n.name for n in names] == ["agent.db.corrupt-20270115T080000", "agent.db.corrupt-20270115T080000-1"]
    assert all(n.exists() and Path(f"{n}-wal").exists() for n in names)
    assert not db.exists() and not Path(f"{db}-wal").exists()


def test_a_write_that_meets_corruption_is_counted_and_alarmed_through_store_ok(tmp_path):
    db = tmp_path / "agent.db"
    sound_db(db)
    conn = sqlite3.connect(db)
    pages = [n for (n,) in conn.execute("SELECT pageno FROM dbstat WHERE name = 'readings_ts'")]
    conn.close()
    with open(db, "r+b") as f:
        for n in pages:  # every page of the index each insert updates
            f.seek((n - 1) * 4096)
            f.write(b"\xff" * 4096)
    cfg = config({})
    agent = Agent(msgspec.structs.replace(cfg, agent=msgspec.structs.replace(cfg.agent, state_dir=str(tmp_path))))
    store = Store(db)  # opened without the start-up check: the card failed while the agent ran
    agent._unstored.append(([Reading("host", "cpu_temperature_celsius", 50.0, 300.0)], [], {}))
    agent._store_backlog(store, False)
    assert agent.health.dropped[("store", "corrupt")] == 1
    assert agent.store_ok is False and len(agent._unstored) == 1  # kept in memory, the alarm on its way
    assert Reading(agent.host_device, "store_ok", 0.0, pytest.approx(time.time(), abs=5)) == agent.intake.q.popleft()


# --- modes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o000, 0o077])
def test_new_state_files_are_owner_only_whatever_the_umask(tmp_path, mask):
    state = tmp_path / "new" / "state"
    with umask(mask):
        opened = open_checked(state / "agent.db", **LIMITS)
        opened.store.write([Reading("host", "store_ok", 1.0, 1.0)])
        lock = statedir.StateLock(state)
    assert mode(state) == 0o700
    assert {f.name: mode(f) for f in state.iterdir()} == {
        "agent.db": 0o600,
        "agent.db-wal": 0o600,
        "agent.db-shm": 0o600,
        "agent.lock": 0o600,
    }
    lock.release()
    opened.store.close()


def test_loose_modes_found_at_start_are_tightened_and_logged(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    sound_db(state / "agent.db")
    Path(f"{state}/agent.db-wal").write_bytes(b"")
    for p, m in ((state, 0o755), (state / "agent.db", 0o644), (state / "agent.db-wal", 0o664)):
        p.chmod(m)
    with structlog.testing.capture_logs() as logs:
        files.private_db(state / "agent.db")
    assert (mode(state), mode(state / "agent.db"), mode(state / "agent.db-wal")) == (0o700, 0o600, 0o600)
    assert sorted((e["path"], e["was"]) for e in logs if e["event"] == "mode_tightened") == [
        (str(state), "0755"),
        (str(state / "agent.db"), "0644"),
        (str(state / "agent.db-wal"), "0664"),
    ]
    with structlog.testing.capture_logs() as logs:
        files.private_db(state / "agent.db")
    assert logs == []  # once tight, nothing more to say


def test_the_gateway_database_is_owner_only(tmp_path):
    from examwatch.gateway import store

    with umask(0o022):
        store.connect(tmp_path / "gw" / "gateway.db").close()
    assert mode(tmp_path / "gw") == 0o700 and mode(tmp_path / "gw" / "gateway.db") == 0o600


# --- secrets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_others_may_read_is_refused(tmp_path, m):
    key = tmp_path / "agent.key"
    key.write_text("ab" * 32)
    key.chmod(m)
    with pytest.raises(ValueError, match=f"permissions {m:04o} for '{key}' are too open"):
        files.read_secret(key)


@pytest.mark.parametrize("m", [0o600, 0o400])
def test_an_owner_only_secret_is_read(tmp_path, m):
    key = tmp_path / "agent.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(m)
    assert files.read_secret(key) == "ab" * 32 + "\n"


def test_a_huge_secret_file_is_refused_unread(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(files.SECRET_MAX + 1)
    big.chmod(0o600)
    with pytest.raises(ValueError, match="larger than"):
        files.read_secret(big)


def test_a_fifo_as_secret_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "agent.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ValueError, match="not a regular file"):
        files.read_secret(fifo)


def test_the_gateway_refuses_a_keys_file_or_token_file_others_may_read(tmp_path):
    from examwatch.edge.config import ConfigError
    from examwatch.gateway import config as gwconfig

    keys, token = tmp_path / "agent-keys", tmp_path / "api-token"
    keys.write_text(f"s1/r1 {'ab' * 32}\n")
    token.write_text("t0ken\n")
    keys.chmod(0o644)
    token.chmod(0o644)
    text = f'[api]\ntoken_file = "{token}"\n[security]\nkeys_file = "{keys}"\n'
    with pytest.raises(ConfigError) as err:
        gwconfig.loads(text)
    assert [(i.path, "too open" in i.message) for i in err.value.issues] == [(("security", "keys_file"), True)]
    keys.chmod(0o600)
    cfg = gwconfig.loads(text)
    assert cfg.agent_keys() == {"s1/r1": bytes.fromhex("ab" * 32)}
    with pytest.raises(ValueError, match=f"permissions 0644 for '{token}' are too open"):
        cfg.api_token()
    token.chmod(0o600)
    assert cfg.api_token() == "t0ken"


# --- one agent per state directory -----------------------------------------------------------------------------


def test_a_second_lock_on_a_state_dir_names_the_holder(tmp_path):
    first = statedir.StateLock(tmp_path)
    with pytest.raises(
        statedir.StateDirBusy,
        match=f"state dir {tmp_path} is in use by another agent "
        rf"\(PID {os.getpid()}\)",
    ):
        statedir.StateLock(tmp_path)
    first.release()
    statedir.StateLock(tmp_path).release()  # free again once the holder lets go
