"""A NUT server for tests and the demo: Debian's real upsd with the dummy-ups driver, in a temp folder.

dummy-ups serves the variables of a ``.dev`` file and re-reads it when its mtime changes (checked each
poll interval, 1 s here), so ``set_state`` rewrites the file and the next ``LIST VAR`` shows the new
state. Config, state and sockets live under ``workdir``: nothing touches /etc/nut, nothing is left
behind after ``stop()``.

    with NutSimulator(tmp_path) as nut:           # ups "ups1" at nut.address ("ups1@127.0.0.1:<port>")
        nut.set_state("on_battery")
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

NUT_LIB = Path("/lib/nut")  # Debian's drivers and the real upsd (/usr/sbin/upsd is a wrapper reading /etc)

# A small line-interactive UPS as usbhid-ups reports it (variable set modelled on NUT DDL dumps).
BASE: dict[str, str] = {
    "battery.charge": "100",
    "battery.charge.low": "10",
    "battery.runtime": "2580",
    "battery.voltage": "13.6",
    "device.mfr": "American Power Conversion",
    "device.model": "Back-UPS 650",
    "device.type": "ups",
    "input.frequency": "50.0",
    "input.voltage": "228.0",
    "input.voltage.nominal": "230",
    "output.voltage": "230.0",
    "ups.load": "18",
    "ups.status": "OL",
}

NO_MAINS = {"input.voltage": "0.0", "input.frequency": "0.0"}
STATES: dict[str, dict[str, str]] = {
    "online": {},
    "on_battery": {"ups.status": "OB DISCHRG", **NO_MAINS, "battery.charge": "83", "battery.runtime": "1260"},
    "low_battery": {"ups.status": "OB DISCHRG LB", **NO_MAINS, "battery.charge": "9", "battery.runtime": "95"},
    "shutdown": {"ups.status": "OB LB FSD", **NO_MAINS, "battery.charge": "5", "battery.runtime": "40"},
    "bypass": {"ups.status": "OL BYPASS"},
    "boost": {"ups.status": "OL BOOST", "input.voltage": "187.0"},
    "self_test": {"ups.status": "OL CAL"},
    "replace_battery": {"ups.status": "OL RB"},
    "overload": {"ups.status": "OL OVER", "ups.load": "112"},
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NutSimulator:
    def __init__(self, workdir: Path, ups: str = "ups1", username: str = "", password: str = "") -> None:
        self.workdir = Path(workdir) / "nut"
        self.ups = ups
        self.username, self.password = username, password
        self.port = _free_port()
        self.state_name = "online"
        self.variables: dict[str, str] = dict(BASE)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._mtime = 0

    @property
    def address(self) -> str:
        return f"{self.ups}@127.0.0.1:{self.port}"

    @property
    def dev_file(self) -> Path:
        return self.workdir / f"{self.ups}.dev"

    def set_state(self, state: str, **variables: str) -> None:
        """Switch to a named state (``on_battery``, ``low_battery``, ...) plus any variable overrides
        (keyword names use ``_`` for ``.``: ``battery_charge="40"``)."""
        if state not in STATES:
            raise ValueError(f"no state {state!r}; known: {', '.join(STATES)}")
        self.state_name = state
        self.variables = BASE | STATES[state] | {k.replace("_", "."): v for k, v in variables.items()}
        self._write()

    def set_raw(self, text: str) -> None:
        """Serve this exact .dev text (for malformed values)."""
        self._write(text)

    def _write(self, text: str | None = None) -> None:
        tmp = self.dev_file.with_suffix(".tmp")
        if text is None:
            text = "".join(
                f"{k}: {v}\n" for k, v in sorted(self.variables.items(), key=lambda kv: kv[0] != "ups.status")
            )
        # dummy-ups 2.8.0 drops the file's last line: end with a comment it may drop.
        tmp.write_text(text + "# end\n")
        # dummy-ups compares whole-second mtimes: always move forward.
        self._mtime = max(int(time.time()), self._mtime + 1)
        os.utime(tmp, (self._mtime, self._mtime))
        os.replace(tmp, self.dev_file)

    def start(self, timeout: float = 15.0) -> None:
        state = self.workdir / "state"
        state.mkdir(parents=True, exist_ok=True)
        (self.workdir / "nut.conf").write_text("MODE=standalone\n")
        (self.workdir / "ups.conf").write_text(
            f"[{self.ups}]\n  driver = dummy-ups\n  port = {self.dev_file.name}\n  pollinterval = 1\n  desc = "
            '"examwatch simulator"\n'
        )
        (self.workdir / "upsd.conf").write_text(f"LISTEN 127.0.0.1 {self.port}\n")
        users = self.workdir / "upsd.users"
        users.write_text(
            f"[{self.username}]\n  password = {self.password}\n  upsmon secondary\n" if self.username else ""
        )
        users.chmod(0o600)
        self._write()
        env = dict(os.environ, NUT_CONFPATH=str(self.workdir), NUT_STATEPATH=str(state), NUT_ALTPIDPATH=str(state))
        user = ["-u", "root"] if os.geteuid() == 0 else []
        log = open(self.workdir / "nut.log", "ab")  # noqa: SIM115 - inherited by the children
        try:
            self._procs.append(
                subprocess.Popen(
                    [str(NUT_LIB / "dummy-ups"), "-a", self.ups, "-F", *user], env=env, stdout=log, stderr=log
                )
            )
            self._wait(lambda: any(state.glob(f"dummy-ups-{self.ups}*")), timeout, "dummy-ups socket")
            self._procs.append(subprocess.Popen([str(NUT_LIB / "upsd"), "-F", *user], env=env, stdout=log, stderr=log))
            self._wait(self._answers, timeout, "upsd")
        except BaseException:
            self.stop()
            raise
        finally:
            log.close()

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(f"GET VAR {self.ups} ups.status\n".encode())
                answer = s.recv(200)
                return answer.startswith(b"VAR ") and b'"WAIT"' not in answer  # WAIT: driver not read yet
        except OSError:
            return False

    def _wait(self, ready: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self._procs):
                break
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.05)
        log = (self.workdir / "nut.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{what} not ready within {timeout}s:\n{log}")

    def stop(self) -> None:
        for p in reversed(self._procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._procs.clear()
        shutil.rmtree(self.workdir / "state", ignore_errors=True)

    def __enter__(self) -> NutSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["BASE", "STATES", "NutSimulator"]
