"""A pair of linked pseudo-terminals from socat: the device simulator serves one end, the agent opens the other.

``socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B`` behaves like a null-modem cable between two serial
ports. ``stop()`` pulls the cable (both links vanish, readers get an I/O error) and ``start()`` plugs
it back under the same names, which is how tests make a USB-serial adapter disappear and come back.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path


class PtyPair:
    def __init__(self, workdir: Path, name: str = "tty") -> None:
        self.device = workdir / f"{name}-device"  # the simulator's end
        self.agent = workdir / f"{name}-agent"  # the end the collector (or NUT) opens
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> None:
        exe = shutil.which("socat") or "/usr/bin/socat"
        self.proc = subprocess.Popen(
            [exe, f"pty,raw,echo=0,link={self.device}", f"pty,raw,echo=0,link={self.agent}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not (self.device.exists() and self.agent.exists()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("socat did not create the pty pair")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None
        for link in (self.device, self.agent):
            link.unlink(missing_ok=True)

    def __enter__(self) -> PtyPair:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
