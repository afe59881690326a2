"""The agent's state directory: one agent per directory (a lock), a corrupt database set aside.
Owner-only modes and secret files are the kernel's (kernel/files.py), shared with the gateway."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

import structlog

from examwatch.kernel.files import FILE_MODE, SIDE_FILES

log = structlog.get_logger("examwatch.files")

LOCK_NAME = "agent.lock"


class StateDirBusy(RuntimeError):
    """Another agent holds the state directory."""


class StateLock:
    """One agent per state directory: an exclusive flock on ``agent.lock``, held while the process lives
    (the kernel releases it however the process ends, kill -9 included). The file names the holder's PID."""

    def __init__(self, state_dir: str | Path) -> None:
        path = Path(state_dir) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise StateDirBusy(
                f"state dir {state_dir} is in use by another agent (PID {holder or 'unknown'}); "
                "give each agent its own state_dir"
            ) from None
        os.fchmod(fd, FILE_MODE)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)


def set_aside(path: str | Path, now: float | None = None) -> Path:
    """Move a corrupt database and its -wal/-shm to ``<name>.corrupt-<UTC time>`` (kept for the technician);
    return the new name of the database. The companions go first: a new database must never meet an old WAL."""
    p = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    aside, n = p.with_name(f"{p.name}.corrupt-{stamp}"), 1
    while any(Path(f"{aside}{s}").exists() for s in ("", *SIDE_FILES)):  # twice within a second
        aside, n = p.with_name(f"{p.name}.corrupt-{stamp}-{n}"), n + 1
    for s in (*SIDE_FILES, ""):
        if Path(f"{p}{s}").exists():
            os.replace(f"{p}{s}", f"{aside}{s}")
    dir_fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames survive a power cut
    finally:
        os.close(dir_fd)
    return aside


__all__ = ["StateDirBusy", "StateLock", "set_aside"]
