"""Camera and NVR storage over Hikvision ISAPI: ``GET /ISAPI/ContentMgmt/Storage`` with digest auth.

The answer lists local disks (``hddList/hdd``: an NVR's hard disks, a camera's SD card) and network
storage (``nasList/nas``), each with ``status``, ``capacity`` and ``freeSpace`` in MiB (a 2 TB disk
reports 1907729). Firmwares put the document in the ``http://www.hikvision.com/ver20/XMLSchema``
namespace, OEM firmwares in ``http://www.std-cgi.com/ver20/XMLSchema``, older ones in none, and the
element case varies (``hdd``/``HDD``), so the parser matches local names without case.

Each disk becomes a part ``<device>/disk<id>`` (NAS: ``<device>/nas<id>``) with storage_ok,
storage_total_bytes, storage_free_bytes and storage_used_ratio. An NVR that overwrites old footage
always looks full; whether "full" is an alarm is the rules' business, not the collector's.

Where models differ (the path, the document's root, its lists, which statuses are healthy) is a profile,
``collectors/profiles/isapi/<name>.toml``; ``hikvision`` (the whole Storage document) is the default.

The GET goes through urllib.request in a worker thread, not httpx (issue 13): the uplink imports urllib,
http.client and email anyway, while httpx with httpcore, h11, anyio and idna cost a Pi Zero ~3 MiB for one
request a minute. A new connection per poll is nothing at that rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import math
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import certifi
import defusedxml.ElementTree
import msgspec

from examwatch.collectors import profiles
from examwatch.collectors.base import DeviceError, PollingCollector, register, retry
from examwatch.kernel.config import Strict
from examwatch.kernel.model import Reading

MIB = 1024 * 1024
MAX_BODY = 1024 * 1024  # a Storage document with 16 disks is ~5 KiB
_PART_ID = re.compile(r"[A-Za-z0-9_.-]{1,16}")  # a disk id becomes part of a device name: keep it a name
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")  # an element or part name in a profile
DEFAULT_PROFILE = "hikvision"


class Volume(Strict):
    """Where one kind of storage sits in the document: ``<list><item>...`` under the root."""

    item: str  # element of one disk, e.g. "hdd"
    part: str  # its part name's prefix, e.g. "disk" -> <device>/disk1
    list: str = ""  # the element holding the items; empty: they sit directly under the root


class Profile(Strict, kw_only=True):
    description: str = ""
    discover: profiles.Discovery | None = None
    path: str = "/ISAPI/ContentMgmt/Storage"
    root: str = "storage"  # the document's root element (local name; case does not matter)
    volumes: list[Volume]
    # Statuses of a healthy disk; everything else (error, unformatted, notexist, smartFailed, mismatch,
    # offline, formating, reparing, ...) needs a technician.
    healthy: list[str] = msgspec.field(default_factory=lambda: ["ok"])
    unit_bytes: float = MIB  # capacity and freeSpace are in this unit

    def __post_init__(self) -> None:
        names = [self.root] + [n for v in self.volumes for n in (v.item, v.part, v.list) if n]
        if bad := [n for n in names if not _NAME.fullmatch(n)]:
            raise ValueError(f"not an element name: {', '.join(bad)}")
        if not self.path.startswith("/") or not self.volumes:
            raise ValueError("path starts with '/', and at least one [[volumes]] is needed")
        if not 1 <= self.unit_bytes <= 1 << 40:
            raise ValueError("unit_bytes: between 1 and 2**40")


class Options(Strict):
    username: str = "admin"
    password: str = ""
    password_file: str = ""  # read at start instead of putting the password in the config
    path: str = ""  # empty: the profile's
    tls_verify: bool = True  # set false for https with the device's self-signed certificate


class Disk(msgspec.Struct, frozen=True):
    part: str  # "disk1", "nas2"
    status: str
    capacity_bytes: float | None
    free_bytes: float | None
    ok: bool  # the status is one of the profile's healthy ones


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def _child(el: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in el if _local(c.tag) == name), None)


def _text(el: ET.Element, name: str) -> str:
    c = _child(el, name)
    return (c.text or "").strip() if c is not None else ""


def _size(el: ET.Element, name: str, unit: float) -> float | None:
    """A size in ``unit`` as bytes; None when absent or not a size (negative, NaN, infinite, not a number)."""
    try:
        value = float(_text(el, name)) * unit
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_storage(body: bytes, profile: Profile | None = None) -> list[Disk]:
    """An ISAPI Storage document -> its disks and NAS volumes, as ``profile`` (default: Hikvision's whole
    Storage document) places them; DeviceError if it is not one.

    A document type declaration is refused outright (no device needs one; entities are how XML bombs
    and external-entity reads work), and so is a body larger than any real Storage document.
    """
    if len(body) > MAX_BODY:
        raise DeviceError("too_large", f"{len(body)} bytes")
    try:
        root = defusedxml.ElementTree.fromstring(body, forbid_dtd=True)
    except (
        ET.ParseError,
        ValueError,
        LookupError,
    ) as err:  # DTDForbidden is a ValueError; LookupError: unknown encoding
        raise DeviceError("invalid_xml", str(err)[:200]) from None
    p = profile or profiles.load("isapi", DEFAULT_PROFILE, Profile)
    if _local(root.tag) != p.root.lower():
        raise DeviceError("unexpected_xml", f"root element <{_local(root.tag)}>, expected <{p.root}>")
    healthy = {s.lower() for s in p.healthy}
    disks = []
    for v in p.volumes:
        lst = _child(root, v.list.lower()) if v.list else root
        for i, item in enumerate(c for c in (lst if lst is not None else []) if _local(c.tag) == v.item.lower()):
            id_ = _text(item, "id")
            status = _text(item, "status") or "unknown"
            disks.append(
                Disk(
                    part=f"{v.part}{id_ if _PART_ID.fullmatch(id_) else i + 1}",
                    status=status,
                    capacity_bytes=_size(item, "capacity", p.unit_bytes),
                    free_bytes=_size(item, "freespace", p.unit_bytes),
                    ok=status.lower() in healthy,
                )
            )
    return disks


def readings_from(device: str, disks: list[Disk], now: float) -> list[Reading]:
    out = []
    for d in disks:
        name = f"{device}/{d.part}"
        out.append(Reading(name, "storage_ok", float(d.ok), now))
        if d.capacity_bytes:  # a missing or unformatted disk reports 0: no sizes rather than a false "full"
            out.append(Reading(name, "storage_total_bytes", d.capacity_bytes, now))
            if d.free_bytes is not None:
                free = min(d.free_bytes, d.capacity_bytes)
                out.append(Reading(name, "storage_free_bytes", free, now))
                out.append(Reading(name, "storage_used_ratio", 1.0 - free / d.capacity_bytes, now))
    return out


def _http_reason(code: int) -> str:
    """A small stable set: 401 is a wrong password, 403/404 a device without storage or ISAPI."""
    if code in (401, 403, 404):
        return f"http_{code}"
    return "http_5xx" if code >= 500 else "http_error"


def base_url(address: str) -> str:
    return address.rstrip("/") if "://" in address else f"http://{address}"


def _verifies(device: Any) -> bool:
    return device.options is None or device.options.tls_verify


@register
class IsapiCollector(PollingCollector):
    protocol = "isapi"
    Options = Options
    profile_schema = Profile
    default_profile = DEFAULT_PROFILE
    needs_address = 'a camera or NVR needs address = "host[:port]" or a URL'
    reasons = {
        "unreachable": "网络不通",
        "invalid_xml": "应答无法解析",
        "unexpected_xml": "应答格式不符",
        "too_large": "应答过大，不像硬盘录像机的存储信息",
        "http_401": "用户名或密码错误",
        "http_403": "无权限或设备无此功能",
        "http_404": "设备无此功能（ISAPI 接口不存在）",
        "http_5xx": "设备内部错误",
        "http_error": "设备返回 HTTP 错误",
    }
    sample = """
[[devices]]                     # example: the room camera's SD card over Hikvision ISAPI (digest auth)
name = "cam1"
kind = "camera"
protocol = "isapi"
address = "192.168.10.64"
username = "admin"
password_file = "/etc/examwatch/cam1.pass"  # or password = "..."; never logged
interval = 60.0
"""

    @classmethod
    def check(cls, device: Any) -> list[tuple[str, str]]:
        issues = super().check(device)
        o = device.options
        if o is not None and not (o.password or o.password_file):
            issues.append(("password", "ISAPI needs password or password_file (digest auth)"))
        if "://" in device.address and not device.address.startswith(("http://", "https://")):
            issues.append(("address", "an ISAPI device is asked over http:// or https://"))
        if o is not None and o.password and o.password_file:
            issues.append(("password_file", "give password or password_file, not both"))
        return issues

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._openers: dict[str, urllib.request.OpenerDirector] = {}
        # One TLS context for every device, made now: loading the CA certificates blocks the event loop for
        # 0.1-0.4 s, which per device and at the first poll would eat the other devices' poll timeouts. Only
        # when a device is asked over verified https: the certificates cost ~2.5 MiB of a Pi Zero's memory.
        verified = any(base_url(d.address).startswith("https:") and _verifies(d) for d in self.devices)
        self._tls = ssl.create_default_context(cafile=certifi.where()) if verified else None

    def _opener(self, device: Any) -> urllib.request.OpenerDirector:
        """One per device, keeping the digest challenge between polls. Built by hand, not build_opener():
        only http(s) (an address of file:// or ftp:// is not read), no redirect followed, no proxy."""
        opener = self._openers.get(device.name)
        if opener is None:
            o: Options = device.options
            password = Path(o.password_file).read_text().strip() if o.password_file else o.password
            url = base_url(device.address)
            passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
            passwords.add_password(None, url, o.username, password)  # sent to this device only
            opener = urllib.request.OpenerDirector()
            handlers: list[urllib.request.BaseHandler] = [
                _HttpHandler(),
                urllib.request.UnknownHandler(),  # any other scheme: URLError, as an unreachable device
                _Digest(passwords),
                urllib.request.HTTPDefaultErrorHandler(),  # any other answer than 2xx, a 3xx too, is HTTPError
                urllib.request.HTTPErrorProcessor(),
            ]
            if url.startswith("https:"):  # plain http: no TLS context at all
                tls = self._tls if o.tls_verify else _unverified()
                assert tls is not None, "made at start for every verified https device"
                handlers.append(_HttpsHandler(tls))
            for handler in handlers:
                opener.add_handler(handler)
            self._openers[device.name] = opener
        return opener

    async def poll(self, device: Any) -> list[Reading]:
        profile: Profile = self.profile(device)
        body = await self._fetch(device, device.options.path or profile.path)
        return readings_from(device.name, parse_storage(body, profile), time.time())

    async def _fetch(self, device: Any, path: str) -> bytes:
        opener, url = self._opener(device), base_url(device.address) + path

        async def attempt() -> bytes:
            exchange = _Exchange()
            try:
                return await asyncio.to_thread(_get, opener, url, device.timeout, exchange)
            finally:  # done, or the poll's deadline passed (a camera dripping its answer): free the thread
                exchange.abandon()

        return await retry(attempt, device.retries + 1, final=_ANSWERS)  # an HTTP answer: not asked again

    async def close(self) -> None:
        self._openers.clear()  # urllib keeps no connection open between requests


# What the device answered: asking again would not change it.
_ANSWERS = ("http_401", "http_403", "http_404", "http_5xx", "http_error", "too_large")


def _get(opener: urllib.request.OpenerDirector, url: str, timeout: float, exchange: _Exchange) -> bytes:
    """GET ``url`` (blocking, in a worker thread): the body, at most MAX_BODY bytes, or DeviceError.
    ``timeout`` bounds each wait for the network; ``exchange`` gets the sockets it opens."""
    _current.exchange = exchange
    try:
        with opener.open(url, timeout=timeout) as resp:
            if (resp.length or 0) > MAX_BODY:  # announced: not a byte of it read
                raise DeviceError("too_large", f"{resp.length} bytes")
            body = resp.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise DeviceError("too_large", f"more than {MAX_BODY} bytes")
            if resp.length:  # the device closed before the length it announced
                raise DeviceError("unreachable", f"closed with {resp.length} bytes to come")
            return body
    except urllib.error.HTTPError as err:  # before URLError, its base class
        err.close()
        raise DeviceError(_http_reason(err.code), f"{err.code} {err.reason}") from None
    except urllib.error.URLError as err:  # connect: refused, no route, TLS, DNS, a scheme other than http(s)
        if isinstance(err.reason, TimeoutError):
            raise DeviceError("timeout", f"no answer within {timeout}s") from None
        raise DeviceError("unreachable", type(err.reason).__name__) from None
    except TimeoutError:  # a read after connecting
        raise DeviceError("timeout", f"no answer within {timeout}s") from None
    except (OSError, http.client.HTTPException) as err:  # reset, closed early, a malformed answer
        raise DeviceError("unreachable", type(err).__name__) from None


def parse_challenge(header: str) -> dict[str, str] | None:
    """A ``WWW-Authenticate`` header from the device -> its digest challenge's fields; None when it is no
    digest challenge (another scheme, a part without "=", an empty value). Never raises (fuzzed as
    ``isapi_challenge``); http.client bounds the header's length before we see it."""
    scheme, _, challenge = header.partition(" ")
    if scheme.lower() != "digest":
        return None
    try:
        return urllib.request.parse_keqv_list([p for p in urllib.request.parse_http_list(challenge) if p])
    except (ValueError, IndexError):
        return None


class _Digest(urllib.request.HTTPDigestAuthHandler):
    """Digest auth as httpx did it: the last challenge answers the next request at once, its nonce
    counted on (one 401 per nonce the device hands out, not one per poll), and a request answered with a
    fresh challenge that still gets 401 is a wrong password: not retried (urllib's own handler tries six
    times). A challenge we cannot answer (a -sess algorithm, auth-int, malformed) is a 401 as well."""

    def __init__(self, passwords: urllib.request.HTTPPasswordMgr) -> None:
        super().__init__(passwords)
        self._challenge: dict[str, str] | None = None

    def get_algorithm_impls(self, algorithm: str) -> tuple[Any, Any]:
        """urllib's MD5 and SHA, and RFC 7616's SHA-256 and SHA-512 (httpx spoke them, newer firmwares
        offer them); a -sess variant urllib cannot compute either way."""
        name = _DIGESTS.get(algorithm.upper())
        if name is None:
            raise ValueError(f"unsupported digest algorithm {algorithm[:20]!r}")

        def h(text: str) -> str:
            return hashlib.new(name, text.encode()).hexdigest()

        return h, lambda secret, data: h(f"{secret}:{data}")

    def _answer(self, req: urllib.request.Request) -> bool:
        try:
            auth = self.get_authorization(req, self._challenge) if self._challenge else None
        except (ValueError, urllib.error.URLError):  # an algorithm or qop urllib does not speak
            return False
        if auth:
            req.add_unredirected_header("Authorization", f"Digest {auth}")
        return bool(auth)

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        if not req.has_header("Authorization"):  # else it is the answer to a fresh challenge, just made
            self._answer(req)
        return req

    https_request = http_request

    def http_error_401(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        challenge = parse_challenge(headers.get("WWW-Authenticate") or "")
        if getattr(req, "examwatch_digest_retried", False) or challenge is None:
            return None  # HTTPError 401
        req.examwatch_digest_retried = True
        self._challenge = challenge
        if not self._answer(req):
            return None
        fp.close()
        return self.parent.open(req, timeout=req.timeout)


_current = threading.local()  # .exchange: the one the worker thread's request belongs to


class _Exchange:
    """The sockets of one request, opened in its worker thread. The poll that gives up on the request at
    its deadline (asyncio cannot stop the thread) shuts them down, which wakes the thread: a camera that
    drips its answer a byte at a time, never waiting out one read's timeout, must not hold worker threads
    (shared with the serial collectors) poll after poll. (A TLS handshake needs no help: Python's ssl
    bounds it by the timeout as a whole.)"""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.abandoned = False
        self._lock = threading.Lock()

    def opened(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if not self.abandoned:
                return
        _shut(sock)  # the poll gave up while it connected

    def abandon(self) -> None:
        with self._lock:
            self.abandoned = True
        for sock in self.sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed already: the request ended
        sock.shutdown(socket.SHUT_RDWR)


class _Watched(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _current.exchange.opened(self.sock)


class _WatchedTls(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _current.exchange.opened(self.sock)


class _HttpHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_Watched, req)


class _HttpsHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self.tls = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedTls, req, context=self.tls)


_DIGESTS = {"MD5": "md5", "SHA": "sha1", "SHA-256": "sha256", "SHA-512": "sha512"}


def _unverified() -> ssl.SSLContext:
    """tls_verify = false: the device's self-signed certificate is accepted, no CA certificates loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
