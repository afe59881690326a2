"""Gateway HTTP cost: one /api/v1 read through the real server (FastAPI on uvicorn, our h11 protocol).

Starts the gateway's ApiServer in this process on an empty database and times sequential GETs of
/api/v1/alarms?state=active, with a new connection each (as curl or a script) and kept alive (as the desk's page).

    python bench/gateway_http.py [--requests 500]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examwatch.gateway import api, store

PATH = "/api/v1/alarms?state=active"


def timed(get: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        get()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500)
    n = ap.parse_args().requests
    with tempfile.TemporaryDirectory() as d:
        db = f"{d}/gateway.db"
        store.connect(db).close()
        server = api.ApiServer("127.0.0.1:0", db, "token")
        server.start()
        port = server.server_address[1]

        def fresh() -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", PATH)
            c.getresponse().read()
            c.close()

        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def alive() -> None:
            kept.request("GET", PATH)
            kept.getresponse().read()

        timed(fresh, 50)  # warm up
        for name, get in (("new connection each", fresh), ("kept alive", alive)):
            xs = timed(get, n)
            print(
                f"{name:20s} median {statistics.median(xs) * 1000:6.2f} ms   "
                f"p95 {xs[int(len(xs) * 0.95)] * 1000:6.2f} ms   ({n} requests)"
            )
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
