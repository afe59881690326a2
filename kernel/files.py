"""Owner-only files for both daemons: state directories 0700, databases (with their -wal and -shm) 0600
whoever starts the process and whatever its umask, looser modes tightened with a warning; a secret (signing
key, the county's key roster, the API token) readable by group or others is refused, as ssh refuses such a key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

log = structlog.get_logger("examwatch.files")

DIR_MODE = 0o700
FILE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm")  # SQLite's companions of a database in WAL mode
SECRET_MAX = 1 << 20  # bytes: a key roster of thousands of rooms fits; anything bigger is not ours


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
            raise ValueError(
                f"permissions {mode:04o} for '{path}' are too open: it must be readable by its "
                f"owner only (chmod 600 '{path}')"
            )
        data = f.read(SECRET_MAX + 1)
    if len(data) > SECRET_MAX:
        raise ValueError(f"'{path}' is larger than {SECRET_MAX} bytes: not a key file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"'{path}' is not UTF-8 text") from None


__all__ = ["DIR_MODE", "FILE_MODE", "SECRET_MAX", "SIDE_FILES", "private_db", "private_dir", "read_secret"]
