"""What travels between a room agent and the county: a signed envelope around one outbox row.

An envelope carries the agent id (``site/room``), the outbox epoch (a random number chosen when the
agent's database was created), the agent's sequence number within it, the time it was signed (agent
clock), the kind (``readings``, ``alarms`` or ``status``) and the body exactly as the outbox stored it.
The HMAC-SHA256 signature covers all of these with the agent's own key, so a message cannot be moved to
another room, renumbered, re-dated or altered without the key. Status messages are outside the outbox
sequence (``seq`` 0): they carry their own order in the body (``Status.boot/conn/n``).

Freshness is by (epoch, seq) and the status order, never by ``ts``: the agent's clock is data.

Every payload is hostile until checked: ``decode`` bounds its size and nesting depth with a byte scan
before any JSON parser sees it, and the decoders bound every number, string and count; anything
outside is a ``WireError`` (the envelope) or a ``msgspec.DecodeError`` (a body).

Pure functions only: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Annotated, Literal

import msgspec

from examwatch.kernel.files import read_secret
from examwatch.kernel.model import Count, Name, Time

VERSION = 1
KINDS = ("readings", "alarms", "status")
TOPIC_ROOT = "examwatch/v1"

# Bounds on what the county accepts (the agent's own output stays far inside them).
MAX_PAYLOAD = 256 * 1024  # bytes of one envelope (a readings message of uplink.batch_max=500 is ~40 KB)
MAX_DEPTH = 8  # JSON nesting: envelope > body > reading is 3
SEQ_MAX = 2**62  # sequence numbers, epochs and status counters stay well inside SQLite's signed 64 bits
LAST = SEQ_MAX  # the status counter of a last will (and a shutdown): it outranks its connection's heartbeats

Seq = Annotated[int, msgspec.Meta(ge=0, le=SEQ_MAX)]


class Envelope(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    v: int = VERSION
    agent: Annotated[str, msgspec.Meta(max_length=130)]  # "site/room"
    epoch: Seq = 0  # the agent database's random epoch; 0: an agent older than epochs (refused by the county)
    seq: Seq  # the outbox sequence number within the epoch, from 1; 0 for status
    ts: Time  # unix seconds when signed, from the agent's clock (data, not authority)
    kind: Annotated[str, msgspec.Meta(max_length=16)]
    body: msgspec.Raw  # the outbox body as stored: JSON list[Reading], AlarmEvent or a status object
    sig: Annotated[str, msgspec.Meta(max_length=64)] = ""  # hex HMAC-SHA256 over signed_bytes(); empty when unsigned


class WireError(Exception):
    """A payload that is not an envelope at all (garbage, wrong version, unknown kind)."""


class Status(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of a status message: ``online`` at connect and on every heartbeat, ``offline`` as last will.

    Statuses are ordered by (epoch, boot, conn, n): ``boot`` counts the agent's starts (kept in its
    database), ``conn`` its broker connections since that start, ``n`` its statuses on that connection;
    the last will (and a shutdown) carries ``n = LAST``, so it outranks that connection's heartbeats and
    the next connection's heartbeats outrank it.
    """

    state: Literal["online", "offline"]
    reason: Annotated[str, msgspec.Meta(max_length=16)] = ""  # for offline: "lost" (last will) or "shutdown"
    pending: Count | None = None  # outbox rows waiting at the agent
    phase: Annotated[str, msgspec.Meta(max_length=16)] | None = None  # the exam phase the agent is in, when it knows
    # device name -> kind (recorder, ups, ...): the county labels readings with it
    kinds: Annotated[dict[Name, Annotated[str, msgspec.Meta(max_length=16)]], msgspec.Meta(max_length=1000)] | None = (
        None
    )
    boot: Seq = 0
    conn: Seq = 0
    n: Seq = 0

    def order(self) -> tuple[int, int, int]:
        """Its place within its epoch."""
        return self.boot, self.conn, self.n


def topic(agent: str, kind: str) -> str:
    return f"{TOPIC_ROOT}/{agent}/{kind}"


def parse_topic(t: str) -> tuple[str, str] | None:
    """``examwatch/v1/<site>/<room>/<kind>`` -> (``site/room``, kind), or None for any other topic."""
    parts = t.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT or parts[4] not in KINDS or not parts[2] or not parts[3]:
        return None
    return f"{parts[2]}/{parts[3]}", parts[4]


def signed_bytes(agent: str, epoch: int, seq: int, ts: float, kind: str, body: bytes) -> bytes:
    head = f"examwatch/v{VERSION}\n{agent}\n{epoch}\n{seq}\n{ts!r}\n{kind}\n".encode()
    return head + bytes(body)


def sign(key: bytes, agent: str, epoch: int, seq: int, ts: float, kind: str, body: bytes) -> str:
    return hmac.new(key, signed_bytes(agent, epoch, seq, ts, kind, body), hashlib.sha256).hexdigest()


def encode(key: bytes, agent: str, seq: int, ts: float, kind: str, body: bytes, *, epoch: int) -> bytes:
    """The signed message for one outbox row (or status body) of the outbox ``epoch``."""
    sig = sign(key, agent, epoch, seq, ts, kind, body)
    env = Envelope(agent=agent, epoch=epoch, seq=seq, ts=ts, kind=kind, body=msgspec.Raw(body), sig=sig)
    return msgspec.json.encode(env)


_decoder = msgspec.json.Decoder(Envelope)
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_BRACKET = bytes(set(range(256)) - set(b"[]{}"))
_SQUARE = bytes.maketrans(b"{}", b"[]")  # for depth a brace is a bracket


def depth(payload: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep the JSON in ``payload`` nests, by a byte scan without parsing it; ``limit + 1`` means deeper
    than ``limit`` (or brackets that do not pair up, which no parser would take either; ``[}`` pairs here,
    the parser then refuses it).

    Linear in the size: escapes go first; then every other piece between quotes is outside strings; of
    that, only the brackets are kept (braces as brackets), and each round strips the innermost pairs: one
    ``replace`` pass removes exactly one level, since it does not rescan what it has just joined.
    """
    outside = b"".join(_ESCAPE.sub(b"", payload).split(b'"')[::2])
    brackets = outside.translate(_SQUARE, _NOT_BRACKET)
    for level in range(limit + 1):
        if not brackets:
            return level
        brackets = brackets.replace(b"[]", b"")
    return limit + 1 if brackets else limit


def decode(payload: bytes) -> Envelope:
    """Parse an envelope without checking its signature (see ``verify``); raise ``WireError``.

    Size and depth are checked before parsing (deep nesting makes JSON decoders recurse until they crash).
    """
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"envelope of {len(payload)} bytes, more than {MAX_PAYLOAD}")
    if depth(payload) > MAX_DEPTH:
        raise WireError(f"JSON nested more than {MAX_DEPTH} deep (or unbalanced)")
    try:
        env = _decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError) as err:
        raise WireError(f"not an envelope: {err}") from None
    if env.v != VERSION:
        raise WireError(f"unsupported envelope version {env.v}")
    if env.kind not in KINDS:
        raise WireError(f"unknown kind {env.kind!r}")
    if (env.seq == 0) != (env.kind == "status"):
        raise WireError(f"seq {env.seq} for a {env.kind} message (status is 0, outbox rows from 1)")
    return env


def verify(key: bytes, env: Envelope) -> bool:
    """True if the envelope was signed with ``key``. Constant-time comparison."""
    if not env.sig:
        return False
    expected = sign(key, env.agent, env.epoch, env.seq, env.ts, env.kind, bytes(env.body))
    return hmac.compare_digest(expected, env.sig)


def parse_key(text: str) -> bytes:
    """A signing key given as hex (at least 16 bytes); raise ValueError with a clear message."""
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("signing key must be hex (e.g. from `openssl rand -hex 32`)") from None
    if len(key) < 16:
        raise ValueError(f"signing key too short: {len(key)} bytes, need at least 16")
    return key


def load_key(inline: str, file: str) -> bytes:
    """The key from the config value, or from the file it names (the file is preferred: keep keys out of configs;
    one that group or others may read is refused)."""
    if file:
        return parse_key(read_secret(file))
    if inline:
        return parse_key(inline)
    raise ValueError("no signing key: set uplink.signing_key_file (or signing_key)")


__all__ = [
    "LAST",
    "MAX_DEPTH",
    "MAX_PAYLOAD",
    "SEQ_MAX",
    "Envelope",
    "Status",
    "WireError",
    "decode",
    "depth",
    "encode",
    "load_key",
    "parse_key",
    "parse_topic",
    "sign",
    "topic",
    "verify",
]
