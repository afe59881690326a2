"""The daemons' own files: owner-only modes, one agent per state directory, corrupt files set aside.

Whoever starts the process and whatever its umask, a state directory is 0700 and a database (with its -wal
and -shm) 0600; looser modes found at start are tightened, with a warning. A secret (signing key, the
county's key roster, the API token) readable by group or others is refused, as ssh refuses such a key.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path

import structlog

log = structlog.get_logger("examwatch.files")

DIR_MODE = 0o700
FILE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm")  # SQLite's companions of a database in WAL mode
SECRET_MAX = 1 << 20  # bytes: a key roster of thousands of rooms fits; anything bigger is not ours
LOCK_NAME = "agent.lock"


class StateDirBusy(RuntimeError):
    """Another agent holds the state directory."""


def _tighten(path: Path, mode: int) -> None:
    """Give ``path`` exactly ``mode`` when group or others have any access; say so."""
    try:
        was = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if was & 0o077:
        try:
            path.chmod(mode)
        except PermissionError as err:  # not ours: run on, the log says what to fix
            log.warning("mode_too_open", path=str(path), mode=f"{was:04o}", error=str(err))
            return
        log.warning("mode_tightened", path=str(path), was=f"{was:04o}", now=f"{mode:04o}")


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and its parents) 0700 whatever the umask, or tighten it if it exists."""
    p = Path(path)
    try:
        p.mkdir(parents=True)
    except FileExistsError:
        _tighten(p, DIR_MODE)
    else:
        p.chmod(DIR_MODE)
    return p


def private_db(path: str | Path) -> None:
    """Before SQLite opens ``path``: its directory 0700, the file created 0600 if missing (SQLite gives its
    -wal and -shm the database's mode), and existing files tightened to 0600."""
    p = Path(path)
    private_dir(p.parent)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.fchmod(fd, FILE_MODE)  # the umask only ever removed bits; this also restores the owner's
        os.close(fd)
    for f in (p, *(Path(f"{p}{s}") for s in SIDE_FILES)):
        if not f.is_dir():  # a directory there is SQLite's error to report, not a mode to fix
            _tighten(f, FILE_MODE)


def read_secret(path: str | Path) -> str:
    """The text of a secret file; ValueError when group or others may read it, or it is not a small file."""
    # O_NONBLOCK: a FIFO given as the key file must not hang the start; it is refused below
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
        st = os.fstat(f.fileno())
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"'{path}' is not a regular file")
        if mode & 0o077:
            raise ValueError(f"permissions {mode:04o} for '{path}' are too open: it must be readable by its "
                             f"owner only (chmod 600 '{path}')")
        data = f.read(SECRET_MAX + 1)
    if len(data) > SECRET_MAX:
        raise ValueError(f"'{path}' is larger than {SECRET_MAX} bytes: not a key file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"'{path}' is not UTF-8 text") from None


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
            raise StateDirBusy(f"state dir {state_dir} is in use by another agent (PID {holder or 'unknown'}); "
                               "give each agent its own state_dir") from None
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


__all__ = ["StateDirBusy", "StateLock", "private_db", "private_dir", "read_secret", "set_aside"]
