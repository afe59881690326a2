"""Agent databases damaged the ways a worn SD card or a power cut leaves them, for the tests."""

from __future__ import annotations

import os
import random
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

from examwatch.edge.store import Store
from examwatch.kernel.model import AlarmEvent, Reading


def mode(p: Path | str) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def sound_db(path: Path) -> AlarmEvent:
    """An agent database with 10 000 readings and one open alarm; returns the alarm."""
    store = Store(path)
    alarm = AlarmEvent(
        id="s1/r1/door/d1/1",
        site="s1",
        room="r1",
        rule="secrecy_door_open",
        level=2,
        state="raised",
        device="d1",
        at=100.0,
        raised_at=100.0,
        message="保密室门在非开启时段被打开",
    )
    for i in range(20):
        store.write(
            [Reading("ups1", "ups_charge_percent", float(j), 100.0 + i) for j in range(500)], [alarm] if i == 0 else []
        )
    store.close()  # the last connection: the WAL is checkpointed into the file and removed
    return alarm


def zeroed_header(p: Path) -> None:
    with open(p, "r+b") as f:
        f.write(b"\0" * 100)


def truncated(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def garbage_pages(p: Path) -> None:
    """Overwrite the cells of b-tree leaf pages that hold readings rows, keeping the page headers."""
    conn = sqlite3.connect(p)
    pages = [
        n
        for (n,) in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'readings' AND pagetype = 'leaf' AND ncell > 0 ORDER BY pageno"
        )
    ]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    rnd = random.Random(7)
    with open(p, "r+b") as f:
        for n in pages[len(pages) // 2 : len(pages) // 2 + 2]:  # two pages in the middle of the table
            f.seek((n - 1) * size + size // 2)
            f.write(rnd.randbytes(size // 2))


def garbage_wal(p: Path) -> None:
    Path(f"{p}-wal").write_bytes(b"\x5a" + random.Random(8).randbytes(3 * 4120))


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "zeroed_header": zeroed_header,
    "truncated": truncated,
    "garbage_pages": garbage_pages,
    "garbage_wal": garbage_wal,
}
