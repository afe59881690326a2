"""A Hikvision-style ISAPI HTTP server: ``/ISAPI/ContentMgmt/Storage`` behind digest auth (MD5, qop=auth),
and ``/ISAPI/ContentMgmt/Storage/hdd`` (the disk list alone, root ``<hddList>``) unless ``whole=False``
makes it a camera that serves only the latter.

Disks can be set ok / full / failed while it runs, the document can be served in either namespace seen
in the wild (or none), and ``misbehave(...)`` breaks the answers on demand: ``invalid_xml`` (the document
cut in half), ``slow`` (after ``slow_seconds``), ``huge`` (``huge_bytes`` of a document, its length
announced or, ``announce = False``, not), ``drip`` (the body a byte every ``drip_seconds``),
``drip_headers`` (a header line that way), ``redirect`` (302 to ``redirect_to``). ``sent`` counts the
bytes of huge and dripping answers that went out.

    python -m examwatch.simulators.isapi 8080        # serve on 127.0.0.1:8080, user admin, password sim-pass
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

HIKVISION = "http://www.hikvision.com/ver20/XMLSchema"
STD_CGI = "http://www.std-cgi.com/ver20/XMLSchema"
STORAGE_PATH = "/ISAPI/ContentMgmt/Storage"
Misbehaviour = Literal["invalid_xml", "slow", "huge", "drip", "drip_headers", "redirect"] | None
CHUNK = 64 * 1024


@dataclass
class SimDisk:
    id: int
    capacity_mib: int = 1907729  # a 2 TB disk
    free_mib: int = 900000
    status: str = "ok"
    kind: Literal["hdd", "nas"] = "hdd"


def _digest(algorithm: str, text: str) -> str:
    return hashlib.new(algorithm.replace("-", "").lower(), text.encode()).hexdigest()  # MD5, SHA-256


class IsapiSimulator:
    realm = "DS-SIMULATED-NVR"

    def __init__(
        self,
        username: str = "admin",
        password: str = "sim-pass",
        namespace: str | None = HIKVISION,
        port: int = 0,
        whole: bool = True,
    ) -> None:
        self.username, self.password, self.namespace = username, password, namespace
        self.whole = whole  # serves the whole Storage document (else only its hdd list)
        self.disks = [SimDisk(1), SimDisk(2)]
        self.misbehaviour: Misbehaviour = None
        self.slow_seconds = 5.0
        self.huge_bytes = 1 << 30
        self.announce = True  # a huge answer says its Content-Length (else it ends when the server closes)
        self.drip_seconds = 0.3
        self.redirect_to = ""
        self.challenge_text: str | None = None
        self.algorithm = "MD5"  # of the digest; newer firmwares offer SHA-256
        self.sent = 0  # body bytes of huge and dripping answers that went out
        self.stream_ended = threading.Event()
        self.requests = 0
        self.unauthorized = 0
        self._nonces: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- state -----------------------------------------------------------------------------------------

    def disk(self, id: int, kind: str = "hdd") -> SimDisk:
        return next(d for d in self.disks if d.id == id and d.kind == kind)

    def set_disk(self, id: int, state: Literal["ok", "full", "error", "notexist", "unformatted"]) -> None:
        with self._lock:
            d = self.disk(id)
            if state == "full":
                d.status, d.free_mib = "ok", 0
            elif state == "ok":
                d.status, d.free_mib = "ok", d.capacity_mib // 2
            else:
                d.status = state

    def misbehave(self, how: Misbehaviour) -> None:
        self.misbehaviour = how

    def _version(self) -> str:
        return ' version="2.0"' + (f' xmlns="{self.namespace}"' if self.namespace else "")

    def hdd_list_xml(self) -> bytes:
        v = self._version()
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<hddList{v}>\n'
            + "\n".join(self._items()["hdd"])
            + "\n</hddList>\n"
        ).encode()

    def storage_xml(self) -> bytes:
        v = self._version()
        items = self._items()
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<storage{v}>\n'
            f"<hddList{v}>\n" + "\n".join(items["hdd"]) + "\n</hddList>\n"
            f"<nasList{v}>\n" + "\n".join(items["nas"]) + "\n</nasList>\n"
            "<workMode>group</workMode>\n</storage>\n"
        ).encode()

    def _items(self) -> dict[str, list[str]]:
        v = self._version()
        with self._lock:
            items: dict[str, list[str]] = {"hdd": [], "nas": []}
            for d in self.disks:
                cap = 0 if d.status == "notexist" else d.capacity_mib
                free = 0 if d.status == "notexist" else d.free_mib
                extra = (
                    f"<hddName>hdd{d.id}</hddName><hddPath></hddPath><hddType>SATA</hddType>"
                    if d.kind == "hdd"
                    else "<ipAddress>192.0.2.50</ipAddress><path>/nvr</path><nasType>NFS</nasType>"
                )
                items[d.kind].append(
                    f"<{d.kind}{v}>\n<id>{d.id}</id>\n{extra}\n<status>{d.status}</status>\n"
                    f"<capacity>{cap}</capacity>\n<freeSpace>{free}</freeSpace>\n<property>RW</property>\n</{d.kind}>"
                )
        return items

    # --- digest auth (RFC 7616, MD5, qop=auth, as Hikvision firmwares do it) ---------------------------

    def challenge(self) -> str:
        if self.challenge_text is not None:  # a firmware's odd (or hostile) WWW-Authenticate
            return self.challenge_text
        nonce = secrets.token_hex(16)
        with self._lock:
            self._nonces.add(nonce)
        return (
            f'Digest realm="{self.realm}", qop="auth", nonce="{nonce}", opaque="{secrets.token_hex(8)}", '
            f"algorithm={self.algorithm}"
        )

    def authorized(self, method: str, header: str | None) -> bool:
        if not header or not header.startswith("Digest "):
            return False
        p = {k: a or b for k, a, b in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]*))', header[7:])}
        with self._lock:
            known = p.get("nonce") in self._nonces
        if not known or p.get("username") != self.username or p.get("realm") != self.realm:
            return False
        h = self.algorithm
        ha1 = _digest(h, f"{self.username}:{self.realm}:{self.password}")
        ha2 = _digest(h, f"{method}:{p.get('uri', '')}")
        expected = _digest(h, f"{ha1}:{p['nonce']}:{p.get('nc', '')}:{p.get('cnonce', '')}:{p.get('qop', '')}:{ha2}")
        return secrets.compare_digest(expected, p.get("response", ""))

    # --- serving ---------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args: object) -> None:  # quiet: tests and the demo read state instead
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self._write(code, body, headers or {})
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
                    self.close_connection = True

            def _write(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/xml; charset=UTF-8")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                sim.requests += 1
                if not sim.authorized("GET", self.headers.get("Authorization")):
                    sim.unauthorized += 1
                    self._send(401, b"<html>401 Unauthorized</html>", {"WWW-Authenticate": sim.challenge()})
                    return
                documents = {STORAGE_PATH + "/hdd": sim.hdd_list_xml}
                if sim.whole:
                    documents[STORAGE_PATH] = sim.storage_xml
                if self.path not in documents:
                    self._send(404, b"")
                    return
                how = sim.misbehaviour
                if how == "redirect":
                    self._send(302, b"", {"Location": sim.redirect_to})
                    return
                if how in ("huge", "drip", "drip_headers"):
                    self._stream(how)
                    return
                if how == "slow":
                    time.sleep(sim.slow_seconds)
                body = documents[self.path]()
                if how == "invalid_xml":
                    body = body[: len(body) // 2]
                self._send(200, body)

            def _stream(self, how: Misbehaviour) -> None:
                """A body too large for any Storage document, or a body or header line one byte at a time:
                written until the client hangs up, counting what went out."""
                size = sim.huge_bytes if how == "huge" else 1000
                if how == "drip_headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Padding: ")
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/xml; charset=UTF-8")
                    if how == "drip" or sim.announce:
                        self.send_header("Content-Length", str(size))
                    else:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                piece = b"<storage>" + b" " * (CHUNK - 9) if how == "huge" else b"a"
                try:
                    for _ in range(0, size, len(piece)):
                        self.wfile.write(piece)
                        self.wfile.flush()
                        sim.sent += len(piece)
                        if how != "huge":
                            time.sleep(sim.drip_seconds)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    sim.stream_ended.set()

        return Handler

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="isapi-sim", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever, so only if it runs
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> IsapiSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    sim = IsapiSimulator(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8080)
    sim.start()
    print(
        f"ISAPI simulator on http://{sim.address}{STORAGE_PATH} (admin / sim-pass); "
        "type '<disk> ok|full|error|notexist' or 'invalid_xml|slow|huge|drip|drip_headers|ok'",
        flush=True,
    )
    for line in sys.stdin:
        words = line.split()
        if len(words) == 2 and words[0].isdigit():
            sim.set_disk(int(words[0]), words[1])  # type: ignore[arg-type]
        elif words == ["ok"]:
            sim.misbehave(None)
        elif len(words) == 1 and words[0] in ("invalid_xml", "slow", "huge", "drip", "drip_headers"):
            sim.misbehave(words[0])  # type: ignore[arg-type]
    sim.stop()


if __name__ == "__main__":
    main()
