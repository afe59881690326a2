"""The gateway's store on both engines: migrations recorded and idempotent, an old SQLite file brought up to
date with its data, several processes on one database storing each message once, the SQL translation."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from examwatch.gateway import pg, schema, store
from examwatch.gateway.ingest import Engine
from tests.support import until
from tests.test_gateway_ingest import EPOCH, KEYS, T0, alarm, alarm_msg, make, readings_msg


def migrations(conn: store.Db) -> list[int]:
    return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_migrations_are_recorded_once_and_applying_them_again_changes_nothing(store_backend):
    conn = store.connect(store_backend)
    assert migrations(conn) == [n for n, _, _ in schema.MIGRATIONS] and store.SCHEMA_VERSION == schema.LATEST
    assert schema.migrate(conn, store.dialect(conn)) == []
    conn.close()
    again = store.connect(store_backend)
    assert migrations(again) == [n for n, _, _ in schema.MIGRATIONS]
    assert store.notes(again, "alarm", "x") == [] and store.dead_letters(again) == []


def test_gateway_processes_starting_together_migrate_once(store_backend):
    errors: list[BaseException] = []

    def start() -> None:
        try:
            store.connect(store_backend).close()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert migrations(store.connect(store_backend)) == [n for n, _, _ in schema.MIGRATIONS]


def _legacy(path, version: int) -> None:
    """A gateway.db as main wrote it before migrations: schema 2 (no notes, no reports) or 3."""
    conn = sqlite3.connect(path)
    for statement in schema.render(schema.MIGRATIONS[0][2], "sqlite"):
        if version >= 3 or not any(f"EXISTS {t} " in statement for t in ("notes", "reports", "notes_item")):
            conn.execute(statement)
    conn.execute("CREATE TABLE notify_state (name TEXT PRIMARY KEY, value BLOB NOT NULL)")  # the notifier's own
    conn.execute("INSERT INTO notify_state VALUES ('cursors', X'7B7D')")
    conn.execute(
        "INSERT INTO incidents (id, site, fault_class, title, level, state, opened_at, members, active) "
        "VALUES ('s1/network/1', 's1', 'network', '网络中断', 2, 'open', 1, '[\"101\",\"102\"]', '[\"101\",\"102\"]')"
    )
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("version", [2, 3])
def test_a_sqlite_gateway_db_of_version_2_or_3_is_brought_up_to_date_with_its_data(tmp_path, version):
    path = tmp_path / "gw.db"
    _legacy(path, version)
    e = make(path)
    e.ingest([readings_msg("s1/101", s, T0 + s) for s in (1, 2)], T0 + 2)
    e.ingest([alarm_msg("s1/101", 3, alarm("s1/101", "raised", T0 + 3, T0 + 3), T0 + 3)], T0 + 3)
    e.conn.close()
    conn = store.connect(path)
    assert migrations(conn) == [n for n, _, _ in schema.MIGRATIONS]
    assert "user_version 0" not in conn.execute("SELECT name FROM schema_migrations WHERE version = 1").fetchone()[0]
    assert conn.execute("SELECT value FROM notify_state").fetchone()[0] == b"{}"  # the notifier's state kept
    [inc] = store.incidents(conn)
    assert (inc["id"], inc["members"]) == ("s1/network/1", ["101", "102"])
    assert [a["rule"] for a in store.alarms(conn)] == ["link_down"]
    assert conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 6
    assert store.add_note(conn, "alarm", "s1/101/link_down/sw1/1", "张老师", "measure", "更换交换机", T0 + 9)
    conn.close()
    again = make(path)  # opened again: nothing more to do, and the ledger as it was
    assert again.agents["s1/101"].epochs[EPOCH].seqs.runs == [[1, 3]]


def test_two_gateways_on_one_database_store_a_message_once(store_backend):
    """A message the broker gives to a second gateway process (the first died before acknowledging, or both
    had it at once) is stored once: the ledger's key decides, not what each process remembers."""
    first, second = make(store_backend), make(store_backend)
    msgs = [readings_msg("s1/101", s, T0 + s) for s in (1, 2, 3)]
    first.ingest(msgs[:2], T0 + 2)
    second.ingest(msgs, T0 + 3)  # it never saw 1 and 2 itself
    assert second.stats.duplicates == 2
    count = first.conn.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM readings").fetchone()
    assert tuple(count) == (9, 3)
    assert first.conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 3
    third = Engine(first.cfg, store.connect(store_backend), KEYS)  # and a process started later knows them all
    assert third.agents["s1/101"].epochs[EPOCH].seqs.runs == [[1, 3]]


def test_the_sql_is_said_in_postgresql_words():
    assert pg.translate("SELECT a FROM t WHERE b = ? AND c LIKE 'x?%' AND d = ?") == (
        "SELECT a FROM t WHERE b = %s AND c LIKE 'x?%%' AND d = %s"
    )
    assert pg.translate("SELECT 'it''s ?' , ? % 2") == "SELECT 'it''s ?' , %s %% 2"
    assert (
        pg.translate("INSERT OR IGNORE INTO t (a) VALUES (?)") == "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING"
    )
    assert pg.translate("BEGIN IMMEDIATE") == "BEGIN"
    ddl = schema.render(schema.MIGRATIONS[0][2], "postgresql")
    events = next(s for s in ddl if "EXISTS alarm_events " in s)
    assert "rowid BIGINT GENERATED ALWAYS AS IDENTITY" in events and "BYTEA" in events and "REAL" not in events
    assert not any("WITHOUT ROWID" in s or "INTEGER" in s for s in ddl)


def test_a_follower_only_stores_and_the_leader_learns_it_from_the_database(store_backend):
    from examwatch.gateway import replica
    from tests.test_gateway_ingest import status_msg

    leader = make(store_backend)
    leader.role = "leader"
    leader.ingest([status_msg("s1/101", "offline", T0, T0)], T0)  # its last will: offline
    follower = make(store_backend)  # started after: it knows the room's offline alarm
    follower.role = "follower"
    follower.ingest([status_msg("s1/102", "online", T0, T0), readings_msg("s1/101", 1, T0 + 5)], T0 + 5)
    follower.tick(T0 + 5, T0 - 100)
    assert follower.conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 3
    assert [a["state"] for a in store.alarms(leader.conn)] == ["raised"]  # the offline alarm: not the follower's
    assert {a["agent"]: a["status"] for a in store.agents(leader.conn)} == {"s1/101": "offline"}  # not the follower's
    since = replica.catch_up(leader, T0 - 1)
    leader.tick(T0 + 6, T0 - 100)
    assert since == T0 + 5 and leader.agents["s1/101"].epochs[EPOCH].seqs.runs == [[1, 1]]
    assert {a["agent"]: a["status"] for a in store.agents(leader.conn)} == {"s1/101": "online"}  # heard again
    assert [a["rule"] for a in store.alarms(leader.conn, state="active")] == []
    assert store.incidents(leader.conn) == []


def test_the_leader_rereads_the_gaps_a_late_commit_filled(store_backend):
    from examwatch.gateway import replica

    leader, follower = make(store_backend), make(store_backend)
    leader.role, follower.role = "leader", "follower"
    leader.ingest([readings_msg("s1/101", 1, T0 + 1), readings_msg("s1/101", 3, T0 + 3)], T0 + 3)
    follower.ingest([readings_msg("s1/101", 2, T0 + 2)], T0 + 2)  # committed long after it was received
    since = replica.catch_up(leader, T0 + 100)
    assert leader.agents["s1/101"].epochs[EPOCH].missing == 1  # past the look-back
    replica.catch_up(leader, since, recheck=True)
    leader.tick(T0 + 101, T0 - 100)
    assert leader.agents["s1/101"].epochs[EPOCH].seqs.runs == [[1, 3]]
    assert store.agents(leader.conn)[0]["missing"] == 0


def test_the_lead_is_one_process_s_and_passes_on_when_its_session_ends(postgres):
    from examwatch.gateway import replica

    where = store.Postgres(postgres.new_database())
    first, second = replica.Leadership(where), replica.Leadership(where)
    try:
        assert first.held() and not second.held() and first.held()
        first.close()  # the process died: its session, and the lock, go when the server has noticed
        until(second.held, timeout=10, what="the lead passed on")
        assert not first.held()
    finally:
        first.close()
        second.close()


def test_one_statement_means_the_same_on_both_engines(store_backend):
    conn = store.connect(store_backend)
    assert tuple(conn.execute("SELECT 7 % 3, 'a%b?'").fetchone()) == (1, "a%b?")
    assert tuple(conn.execute("SELECT 7 % ?, 'a%b?', ?", [3, "x"]).fetchone()) == (1, "a%b?", "x")
    row = conn.execute("SELECT 1 AS one, 'two' AS two").fetchone()
    assert (row["one"], row[1], dict(row)) == (1, "two", {"one": 1, "two": "two"})


def test_a_follower_raises_the_security_alarm_again_after_the_leader_cleared_it(store_backend):
    from examwatch.gateway import replica

    leader, follower = make(store_backend), make(store_backend)
    leader.role, follower.role = "leader", "follower"
    forged = [readings_msg("s1/101", 1, T0, key=b"\x09" * 32)]
    follower.ingest(forged, T0)
    assert [(a["rule"], a["state"]) for a in store.alarms(leader.conn)] == [("security_rejected", "raised")]
    replica.catch_up(leader, T0)
    leader.tick(T0 + 100, T0 - 1000)  # quiet for longer than security.quiet: cleared by the leader
    assert store.alarms(leader.conn, state="active") == []
    follower.tick(T0 + 101, T0 - 1000)
    follower.ingest([readings_msg("s1/101", 2, T0 + 200, key=b"\x09" * 32)], T0 + 200)  # again: a new alarm
    assert [a["rule"] for a in store.alarms(leader.conn, state="active")] == ["security_rejected"]


class Counted:
    """A connection that counts the statements sent through it (each a round trip on PostgreSQL)."""

    def __init__(self, conn: store.Db) -> None:
        self.conn, self.statements = conn, 0
        self.dialect = store.dialect(conn)

    def execute(self, sql, params=()):
        self.statements += 1
        return self.conn.execute(sql, params)


def test_the_open_alarms_are_read_in_a_fixed_number_of_statements(store_backend):
    """The leader of replicas reads them every second: a round trip per open gateway alarm (every room's, when
    10,000 rooms' heartbeats came late) once held its ingest loop for seconds at each tick."""
    from examwatch.gateway.ledger import load_open
    from tests.test_gateway_ingest import status_msg

    gw = make(store_backend)
    gw.ingest([status_msg(agent, "offline", T0, T0) for agent in KEYS], T0)  # each room's offline alarm: ours
    counted = Counted(gw.conn)
    open_alarms, ours, _ = load_open(counted)
    assert counted.statements == 2  # the alarms with their raises, the incidents
    assert sorted(ours) == [(agent, "agent_offline") for agent in sorted(KEYS)]
    assert all(ev.state == "raised" and ev.site == "s1" for ev in ours.values())
    assert ours == gw.gateway_alarms and {ev.id for ev in ours.values()} == set(open_alarms)


def test_an_upsert_of_distinct_keys_takes_a_statement_per_chunk_and_means_the_same(store_backend, monkeypatch):
    """On PostgreSQL the latest values, agents, epochs... go many rows a statement (12,000 statements a batch at
    10,000 rooms were most of a replica's ingest); each row still counts as alone: the newer reading wins."""
    import psycopg

    from examwatch.gateway.ledger import Rows

    sql = next(s for s, _ in Rows().statements([]) if s.startswith("INSERT INTO latest"))
    conn = store.connect(store_backend)
    store.write_batch(conn, [(sql, [("s1/101", "d", f"m{i:02d}", float(i), 100.0, "good") for i in range(50)])])
    sent: list[str] = []
    execute = psycopg.Cursor.execute
    monkeypatch.setattr(psycopg.Cursor, "execute", lambda cur, q, *a, **k: sent.append(q) or execute(cur, q, *a, **k))
    monkeypatch.setattr(pg, "PARAMS_MAX", 6 * 20)  # 20 rows a statement
    rows = [("s1/101", "d", f"m{i:02d}", -1.0, 150.0 if i % 2 else 50.0, "good") for i in range(50)]  # odd: newer
    store.write_batch(conn, [(sql, rows)])
    assert dict(conn.execute("SELECT metric, value FROM latest").fetchall()) == {
        f"m{i:02d}": -1.0 if i % 2 else float(i) for i in range(50)
    }
    twice = [("s1/101", "d", "m00", 7.0, 200.0, "good"), ("s1/101", "d", "m00", 8.0, 300.0, "good")]
    store.write_batch(conn, [(sql, twice)])  # a key twice: a statement each, in order
    assert conn.execute("SELECT value FROM latest WHERE metric = 'm00'").fetchone()[0] == 8.0
    upserts = [q for q in sent if "INSERT INTO latest" in str(q)]
    assert len(upserts) == (3 if store.dialect(conn) == "postgresql" else 0)  # 50 rows by 20; twice: executemany
