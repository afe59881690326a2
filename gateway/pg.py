"""The PostgreSQL backend of the gateway's store: psycopg 3 connections from a pool, spoken to like SQLite's.

The store's SQL is written once, with ``?`` placeholders and SQLite's words where the two differ; ``Conn``
translates it (``%s`` placeholders, ``INSERT OR IGNORE`` -> ``ON CONFLICT DO NOTHING``, ``BEGIN IMMEDIATE`` ->
``BEGIN``) and returns rows that are read by name and by position like ``sqlite3.Row``. Connections run in
autocommit mode; the store's ``BEGIN`` / ``COMMIT`` make its transactions, as on SQLite.

A connection the server dropped (PostgreSQL restarted) fails the statement in hand with
``psycopg.OperationalError``; the next statement outside a transaction takes a fresh connection from the
pool, so a caller that retries its whole transaction carries on by itself.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

POOL_TIMEOUT = 30.0  # s a thread waits for a connection (the server down, or every connection busy)


class Row(tuple[Any, ...]):
    """A result row read by position or by column name (``dict(row)`` works), like ``sqlite3.Row``."""

    columns: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:
        return tuple.__getitem__(self, self.columns[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self.columns)


@lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"columns": {n: i for i, n in enumerate(names)}})


def _rows(cursor: Any) -> Any:
    if cursor.description is None:
        return tuple
    cls = _row_class(tuple(c.name for c in cursor.description))
    return cls


_STRING_OR_MARK = re.compile(r"'(?:[^']|'')*'|\?|%")


@lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite's spelling of a statement in PostgreSQL's (a "?" in a string literal stays a question mark)."""
    if sql == "BEGIN IMMEDIATE":
        return "BEGIN"
    if sql.startswith("INSERT OR IGNORE INTO"):
        sql = "INSERT INTO" + sql[len("INSERT OR IGNORE INTO") :] + " ON CONFLICT DO NOTHING"

    def mark(m: re.Match[str]) -> str:  # psycopg reads "%" even inside a literal: "%%" there too
        return {"?": "%s", "%": "%%"}.get(m.group(0)) or m.group(0).replace("%", "%%")

    return _STRING_OR_MARK.sub(mark, sql)


_INSERT = re.compile(r"INSERT INTO (\w+) \(([\w, ]+)\) VALUES \([?,]+\)")


@lru_cache(maxsize=256)
def _plain_insert(sql: str) -> str:
    """``COPY t (cols) FROM STDIN`` for an INSERT that only adds rows (no conflict clause), else ''."""
    m = _INSERT.fullmatch(sql.strip())
    return f"COPY {m.group(1)} ({m.group(2)}) FROM STDIN" if m else ""


_UPSERT = re.compile(r"INSERT INTO (\w+ \([\w, ]+\)) VALUES \([?,]+\) (ON CONFLICT \(([\w, ]+)\) DO UPDATE .*)", re.S)
_COLUMNS = re.compile(r"\(([\w, ]+)\)")
PARAMS_MAX = 30_000  # bound values per statement (PostgreSQL's protocol takes 65,535)


@lru_cache(maxsize=256)
def _upsert(sql: str) -> tuple[str, str, tuple[int, ...]] | None:
    """An ``INSERT ... VALUES (?,..) ON CONFLICT (key) DO UPDATE ...``: its head, its tail and the key's places in
    a row; None for any other statement."""
    m = _UPSERT.fullmatch(sql.strip())
    if m is None:
        return None
    target = _COLUMNS.search(m.group(1))
    assert target is not None
    columns = [c.strip() for c in target.group(1).split(",")]
    key = tuple(columns.index(k.strip()) for k in m.group(3).split(","))
    return f"INSERT INTO {m.group(1)} VALUES ", translate(m.group(2)), key


class Conn:
    """One PostgreSQL connection of the pool, with the part of ``sqlite3.Connection`` the store uses."""

    dialect = "postgresql"

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool
        self.total_changes = 0  # rows changed by INSERT/UPDATE/DELETE so far (as sqlite3's)
        self._c: psycopg.Connection[Any] | None = None
        self._c = self._take()

    def _take(self) -> psycopg.Connection[Any]:
        c = self.pool.getconn(timeout=POOL_TIMEOUT)
        c.row_factory = _rows
        return c

    def _conn(self, sql: str) -> psycopg.Connection[Any]:
        c = self._c
        broken = c is None or c.closed or c.info.transaction_status == TransactionStatus.UNKNOWN
        if broken and sql in ("ROLLBACK", "COMMIT"):
            raise psycopg.OperationalError("the connection was lost in the transaction")
        if broken:  # lost (server restarted): a fresh one, only between transactions
            if c is not None:
                self.pool.putconn(c)
            self._c = None
            c = self._c = self._take()
        assert c is not None
        return c

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        cur = self._conn(sql).execute(translate(sql), list(params))  # always bound: "%%" means "%"
        if cur.rowcount > 0 and cur.description is None:
            self.total_changes += cur.rowcount
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        cur = self._conn(sql).cursor()
        copy = _plain_insert(sql)
        if copy:  # rows that only add: COPY, several times faster than a statement per row
            with cur.copy(copy) as out:
                for row in rows:
                    out.write_row(row)
            self.total_changes += len(rows)
            return
        upsert = _upsert(sql)
        if upsert is not None and len({tuple(r[i] for i in upsert[2]) for r in rows}) == len(rows):
            # Each key once (a statement may update a row only once): many rows a statement, in the rows' order,
            # instead of a statement each (12,000 a batch at 10,000 rooms: the most of a replica's ingest).
            head, tail, _ = upsert
            width = len(rows[0])
            step = max(1, PARAMS_MAX // width)
            one = "(" + ",".join(["%s"] * width) + ")"
            for i in range(0, len(rows), step):
                part = rows[i : i + step]
                cur.execute(f"{head}{','.join([one] * len(part))} {tail}", [v for r in part for v in r], prepare=False)
                self.total_changes += max(cur.rowcount, 0)
            return
        cur.executemany(translate(sql), rows)
        self.total_changes += max(cur.rowcount, 0)

    def close(self) -> None:
        if self._c is not None:
            self.pool.putconn(self._c)
            self._c = None


_pools: dict[str, ConnectionPool[Any]] = {}
_pools_lock = threading.Lock()


def pool(conninfo: str, password: str = "", max_size: int = 20) -> ConnectionPool[Any]:
    """The process's pool for this database (one for every thread: ingest, API, exporter, notifier)."""
    with _pools_lock:
        p = _pools.get(conninfo)
        if p is None:
            kwargs: dict[str, Any] = {"autocommit": True}
            if password:
                kwargs["password"] = password  # never part of the conninfo: that may be logged by libpq errors
            p = _pools[conninfo] = ConnectionPool(
                conninfo,
                kwargs=kwargs,
                min_size=1,
                max_size=max_size,
                open=True,
                check=ConnectionPool.check_connection,
                name="examwatch-gateway",
            )
        return p


def connect(conninfo: str, password: str = "", max_size: int = 20) -> Conn:
    return Conn(pool(conninfo, password, max_size))


def direct(conninfo: str, password: str = "") -> psycopg.Connection[Any]:
    """A connection of its own, outside the pool (the leader's lock lives as long as its session)."""
    return psycopg.connect(conninfo, autocommit=True, password=password or None)


def close_pools() -> None:
    with _pools_lock:
        for p in _pools.values():
            p.close()
        _pools.clear()
