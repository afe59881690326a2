"""``examwatch report``: a form from the gateway's database to a file, or a file checked against the kept ones.

The database is read through a read-only connection; it is opened for writing only to keep the report
(with its hash) before the file is written, so every file the command leaves behind verifies.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path

from examwatch.gateway import store
from examwatch.gateway.config import Config
from examwatch.gateway.records import DAY_FORMS, FORMATS, RecordError, forms, keep, render, verify

FILE_MAX = 200 * 1024 * 1024  # bytes of a file to verify: a report is far smaller


def main(cfg: Config, args: argparse.Namespace) -> int:
    db = Path(cfg.gateway.state_dir) / "gateway.db"
    if not db.is_file():
        return _fail(f"{db}: 没有网关数据库（gateway.state_dir 是否正确？）")
    if os.geteuid() == 0 and db.stat().st_uid != 0:  # root's new WAL files would lock the gateway's user out
        return _fail(f"{db}: 请以网关的用户运行（sudo -u <网关用户> examwatch report ...），不要用 root")
    if args.verify:
        return _verify(db, Path(args.verify), cfg.schedule.timezone)
    if not args.form or not args.out:
        return _fail("需要 --form 和 --out（.pdf 或 .docx）")
    out = Path(args.out)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        return _fail(f"{out}: 文件名应以 .pdf 或 .docx 结尾")
    if args.day and args.form not in DAY_FORMS:
        return _fail(f"表 {args.form} 针对一个事件或报警：请用 --incident 给出编号，而不是 --day")
    if args.incident and args.form in DAY_FORMS:
        return _fail(f"表 {args.form} 针对一个考试日：请用 --day YYYY-MM-DD，而不是 --incident")
    who = args.who or _login()
    now = time.time()
    try:
        conn = store.connect(db, readonly=True)
        try:
            _, _, data, scope = render(
                conn,
                form=args.form,
                incident=args.incident,
                day=args.day,
                fmt=fmt,
                who=who,
                tz=cfg.schedule.timezone,
                rules=cfg.correlation_rules(),
                county=cfg.gateway.county,
                now=now,
            )
        finally:
            conn.close()
        conn = store.connect(db)
        try:
            number = keep(conn, form=args.form, scope=scope, fmt=fmt, who=who, data=data, now=now)
        finally:
            conn.close()
        _write(out, data)
    except RecordError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"{err.filename or out}: {err.strerror}")
    print(f"{out}: 报告 #{number}（{args.form}，{scope}），{len(data)} 字节，已存档可核验")
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (a container)
        return f"uid {os.getuid()}"


def _write(out: Path, data: bytes) -> None:
    """Owner-only, like the database it comes from: incident records are confidential (DOMAIN.md)."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _verify(db: Path, path: Path, tz: str) -> int:
    try:
        with path.open("rb") as f:
            data = f.read(FILE_MAX + 1)
    except OSError as err:
        return _fail(f"{path}: {err.strerror}")
    conn = store.connect(db, readonly=True)
    try:
        row = verify(conn, data) if len(data) <= FILE_MAX else None
    finally:
        conn.close()
    if row is None:
        print(f"{path}: 未通过核验：网关没有发出过与此文件一致的报告（文件被修改过，或不是本网关生成的）")
        return 1
    made = forms.Clock(tz)(row["created"])
    print(
        f"{path}: 核验通过：报告 #{row['id']}（{row['form']}，{row['scope']}），{made} 由 {row['who']} 生成，内容未改动"
    )
    return 0


def _fail(text: str) -> int:
    print(text, file=sys.stderr)
    return 2
