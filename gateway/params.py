"""What clients send the gateway's HTTP side, checked before anything is done with it: query parameters
(``parse_query``, one table per endpoint, also describing them for OpenAPI), the acknowledgement bodies,
and a request's head (``check_head``: a body we take has a bounded Content-Length). Pure."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Annotated, NamedTuple
from urllib.parse import parse_qs

import msgspec

from examwatch.gateway import acklink

MAX_BODY = 64 * 1024
MAX_QUERY = 2048  # characters of a query string
MAX_HEAD = 16 * 1024  # bytes of a request line and headers (h11 refuses more)
LIMIT_MAX = 1000  # rows per answer

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a site or room id
AGENT = re.compile(r"[A-Za-z0-9_-]{1,64}/[A-Za-z0-9_-]{1,64}")  # a room's agent: <site>/<room>
REPORT_FORMS = ("l1", "first", "followup", "final", "county", "school", "day")  # gateway/records (issue 10)
ALARM_STATES = ("active", "raised", "updated", "cleared")
INCIDENT_STATES = ("open", "closed")


class BadRequest(ValueError):
    """A request we refuse; ``status`` is the HTTP status, the message is the JSON error shown to the client."""

    status = 400


class NotFound(BadRequest):
    status = 404


class LengthRequired(BadRequest):
    status = 411


class TooLarge(BadRequest):
    status = 413


class Unauthorized(BadRequest):
    status = 401


class Forbidden(BadRequest):
    status = 403


class ReadOnly(Forbidden):
    """A province's aggregate gateway: the counties acknowledge, add notes and close."""


class Param(NamedTuple):
    """A query parameter's check (raises BadRequest) and its JSON schema (for OpenAPI)."""

    check: Callable[[str], object]
    schema: dict[str, object]


def _choice(values: tuple[str, ...]) -> Param:
    def check(v: str) -> str:
        if v not in values:
            raise BadRequest(f"must be one of {', '.join(values)}")
        return v

    return Param(check, {"type": "string", "enum": list(values)})


def _check_name(v: str) -> str:
    if not NAME.fullmatch(v):
        raise BadRequest("must be 1 to 64 letters, digits, '_' or '-'")
    return v


def _int(lo: int, hi: int) -> Param:
    def check(v: str) -> int:
        if not re.fullmatch(r"[0-9]{1,10}", v) or not lo <= int(v) <= hi:
            raise BadRequest(f"must be an integer from {lo} to {hi}")
        return int(v)

    return Param(check, {"type": "integer", "minimum": lo, "maximum": hi})


def _check_id(v: str) -> str:
    if not 1 <= len(v) <= 256 or not v.isprintable():
        raise BadRequest("must be 1 to 256 printable characters")
    return v


def _check_sig(v: str) -> str:
    if not re.fullmatch(f"[0-9a-f]{{{acklink.SIG_CHARS}}}", v):
        raise BadRequest(f"must be {acklink.SIG_CHARS} hex digits")
    return v


def _text(limit: int) -> Param:
    def check(v: str) -> str:
        v = v.strip()
        if len(v) > limit or not all(c.isprintable() or c in "\r\n" for c in v):
            raise BadRequest(f"at most {limit} printable characters")
        return v

    return Param(check, {"type": "string", "maxLength": limit})


def _check_agent(v: str) -> str:
    if not AGENT.fullmatch(v):
        raise BadRequest("must be <site>/<room>")
    return v


def _check_day(v: str) -> str:
    try:
        time.strptime(v, "%Y-%m-%d")
    except ValueError:
        raise BadRequest("must be a date YYYY-MM-DD") from None
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", v):
        raise BadRequest("must be a date YYYY-MM-DD")
    return v


_day = Param(_check_day, {"type": "string", "format": "date"})
_name = Param(_check_name, {"type": "string", "pattern": NAME.pattern})
_id = Param(_check_id, {"type": "string", "minLength": 1, "maxLength": 256})
_sig = Param(_check_sig, {"type": "string", "pattern": f"^[0-9a-f]{{{acklink.SIG_CHARS}}}$"})

# Per endpoint: parameter -> Param, and the defaults of those not given.
ENDPOINTS: dict[str, tuple[dict[str, Param], dict[str, object]]] = {
    "/api/v1/alarms": (
        {
            "state": _choice(ALARM_STATES),
            "level": _int(1, 3),
            "site": _name,
            "room": _name,
            "limit": _int(1, LIMIT_MAX),
        },
        {"state": "", "level": None, "site": "", "room": "", "limit": 500},
    ),
    "/api/v1/alarms/timeline": ({"id": _id}, {}),
    "/api/v1/incidents": (
        {"state": _choice(INCIDENT_STATES), "level": _int(1, 3), "site": _name, "limit": _int(1, LIMIT_MAX)},
        {"state": "", "level": None, "site": "", "limit": 200},
    ),
    "/api/v1/notifications": ({"id": _id, "limit": _int(1, LIMIT_MAX)}, {"limit": 500}),
    "/api/v1/agents": ({}, {}),
}
_LINK = {"kind": _choice(acklink.KINDS), "id": _id, "exp": _int(0, 2**32), "sig": _sig}
ENDPOINTS["/api/v1/ack/link"] = (_LINK, {})
ENDPOINTS["POST /api/v1/ack/link"] = ({**_LINK, "who": _text(64), "note": _text(1000)}, {"note": ""})
# The desk's reads (gateway/desk/)
_agent = Param(_check_agent, {"type": "string", "pattern": AGENT.pattern})
ENDPOINTS["/desk/api/room"] = ({"agent": _agent}, {})
ENDPOINTS["/desk/api/alarm"] = ({"id": _id}, {})
ENDPOINTS["/desk/api/incident"] = ({"id": _id}, {})
ENDPOINTS["/desk/reports"] = (
    {"incident": _id, "day": _day, "form": _choice(REPORT_FORMS), "format": _choice(("pdf", "docx"))},
    {"incident": "", "day": "", "format": "pdf"},
)
REQUIRED = {
    "/desk/api/room": ("agent",),
    "/desk/api/alarm": ("id",),
    "/desk/api/incident": ("id",),
    "/desk/reports": ("form",),
    "/api/v1/alarms/timeline": ("id",),
    "/api/v1/notifications": ("id",),
    "/api/v1/ack/link": tuple(_LINK),
    "POST /api/v1/ack/link": (*_LINK, "who"),
}


def parse_query(path: str, query: str, max_len: int = MAX_QUERY) -> dict[str, object]:
    """The validated parameters of a GET or a form, with defaults; ``BadRequest`` (or ``NotFound``) otherwise. Pure."""
    if path not in ENDPOINTS:
        raise NotFound("no such endpoint")
    if len(query) > max_len:
        raise BadRequest(f"query longer than {max_len} characters")
    try:
        fields = parse_qs(query, keep_blank_values=True, strict_parsing=True, max_num_fields=10, errors="strict")
    except ValueError as err:  # also UnicodeDecodeError
        raise BadRequest(f"malformed query: {str(err)[:80]}") from None
    params, defaults = ENDPOINTS[path]
    out = dict(defaults)
    for key, values in fields.items():
        if key not in params:
            raise BadRequest(f"unknown parameter {key[:40]!r}; this endpoint takes: {', '.join(params) or 'none'}")
        if len(values) > 1:
            raise BadRequest(f"parameter {key} given more than once")
        try:
            out[key] = params[key].check(values[0])
        except BadRequest as err:
            raise BadRequest(f"{key}: {err}") from None
    for key in REQUIRED.get(path, ()):
        if key not in out:
            raise BadRequest(f"{key} is required")
    return out


def openapi_parameters(path: str) -> list[dict[str, object]]:
    """The OpenAPI description of an endpoint's query parameters, from the same table ``parse_query`` checks."""
    params, _ = ENDPOINTS[path]
    required = REQUIRED.get(path, ())
    return [{"name": k, "in": "query", "required": k in required, "schema": p.schema} for k, p in params.items()]


class Ack(msgspec.Struct, forbid_unknown_fields=True):
    who: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    alarm: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    incident: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    note: Annotated[str, msgspec.Meta(max_length=1000)] = ""


def parse_ack(body: bytes) -> tuple[str, str, str, str]:
    """(kind, id, who, note) of an acknowledgement body; ``BadRequest`` otherwise. Pure."""
    try:
        ack = msgspec.json.decode(body, type=Ack)
    except msgspec.DecodeError as err:  # ValidationError too: wrong type, unknown field, too long
        raise BadRequest(f"body: {str(err)[:120]}") from None
    kinds = [k for k in ("alarm", "incident") if getattr(ack, k) is not None]
    if len(kinds) != 1 or not ack.who.strip():
        raise BadRequest("give exactly one of alarm or incident, and who")
    return kinds[0], getattr(ack, kinds[0]), ack.who.strip(), ack.note


def parse_ack_form(body: bytes) -> dict[str, object]:
    """The fields of the signed link's form (checked, signature not yet); ``BadRequest`` otherwise. Pure."""
    try:
        q = parse_query("POST /api/v1/ack/link", body.decode(), MAX_BODY)
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8") from None
    if not q["who"]:
        raise BadRequest("who: required")
    return q


def content_length(value: str | None, chunked: bool) -> int:
    """The body's length from its header: required, digits only, at most MAX_BODY. Pure."""
    if value is None or chunked:
        raise LengthRequired("Content-Length required")
    value = value.strip()
    if not re.fullmatch(r"[0-9]+", value):
        raise BadRequest("Content-Length must be a non-negative integer")
    if len(value) > 9 or int(value) > MAX_BODY:
        raise TooLarge(f"body larger than {MAX_BODY} bytes")
    return int(value)


def check_head(head: bytes) -> None:
    """Check a request's line and headers (up to the blank line) for a body we take: a POST needs a
    Content-Length within MAX_BODY and no chunks; any other request may have none or a bounded one.
    Malformed heads are left to h11. ``BadRequest`` otherwise. Pure."""
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0]
    length: str | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = value if length is None else f"{length},{value}"
        elif name == "transfer-encoding":
            chunked = chunked or "chunked" in value.lower()
    if method == "POST" or length is not None or chunked:
        content_length(length, chunked)


def body_reason(err: BadRequest) -> str:
    return {411: "length_required", 413: "too_large"}.get(err.status, "bad_body")
