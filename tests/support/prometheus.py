"""A real Prometheus on loopback for the tests: started on a config text, queried through its HTTP API."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from examwatch.simulators.broker import free_port


class PrometheusProc:
    def __init__(self, workdir: Path, config: str) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(config, encoding="utf-8")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def check_config(self) -> None:
        check = subprocess.run(["promtool", "check", "config", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

    def start(self) -> None:
        with open(self.dir / "prometheus.log", "wb") as out:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.dir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=out,
            )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.proc = None

    def get(self, path: str, params: dict[str, str]) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:  # a bad query answers 400 with the error in the body
            if err.code == 400:
                return json.loads(err.read())
            return {"status": f"HTTP {err.code}", "data": {"result": []}}  # 503 while starting
        except OSError:  # not listening yet
            return {"status": "down", "data": {"result": []}}

    def query(self, expr: str) -> Any:
        return self.get("/api/v1/query", {"query": expr})

    def result(self, expr: str) -> list[dict[str, Any]]:
        return list(self.query(expr)["data"]["result"])

    def by(self, label: str, expr: str) -> dict[str, float]:
        """An instant vector as {value of ``label``: value}."""
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.result(expr)}
