"""A real PostgreSQL (Debian's package) in a temporary directory on a free loopback port, for the tests and
the benchmarks: initdb, start, stop, restart, a fresh database per test.

initdb refuses to run as root: as root the server runs as the ``postgres`` user the Debian package
creates (``runuser``), in a directory it owns. fsync is off: a test's data need not survive a power cut
(the disks are shared). synchronous_commit stays on: a commit the server confirmed survives the server
being killed (``restart``), as the gateway's acknowledgements to the broker rely on.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from examwatch.simulators.broker import free_port


def pg_bin() -> Path | None:
    """The newest installed server's bin directory (e.g. /usr/lib/postgresql/15/bin), if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def unavailable() -> str:
    """Why a server cannot be started here ('' if it can)."""
    if pg_bin() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user for initdb"
        if shutil.which("runuser") is None:
            return "running as root without runuser"
    return ""


class Postgres:
    """One server; ``restart()`` keeps the data (a restart in the middle of a stream)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="examwatch-pg-"))
        self.data = self.dir / "data"
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._databases = 0

    def _run(self, *args: str) -> None:
        bin_dir = pg_bin()
        assert bin_dir is not None, unavailable()
        cmd = [str(bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.dir)

    def init(self) -> None:
        if os.geteuid() == 0:
            os.chown(self.dir, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Every connection is cut (what a server restart or failover does to the gateways)."""
        self.stop("immediate")
        self.start()

    def conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def new_database(self) -> str:
        """A fresh, empty database; its conninfo."""
        import psycopg

        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}"
        with psycopg.connect(self.conninfo(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.conninfo(name)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
