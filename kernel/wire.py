"""What travels between a room agent and the county: a signed envelope around one outbox row.

An envelope carries the agent id (``site/room``), the agent's sequence number, the time it was signed
(agent clock), the kind (``readings``, ``alarms`` or ``status``) and the body exactly as the outbox
stored it. The HMAC-SHA256 signature covers all of these with the agent's own key, so a message cannot
be moved to another room, renumbered, re-dated or altered without the key. Status messages are outside
the sequence (``seq`` 0).

Pure functions only: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from examwatch.kernel.files import read_secret

VERSION = 1
KINDS = ("readings", "alarms", "status")
TOPIC_ROOT = "examwatch/v1"


class Envelope(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    v: int = VERSION
    agent: str  # "site/room"
    seq: int  # the outbox sequence number; 0 for status
    ts: float  # unix seconds when signed, from the agent's clock
    kind: str
    body: msgspec.Raw  # the outbox body as stored: JSON list[Reading], AlarmEvent or a status object
    sig: str = ""  # hex HMAC-SHA256 over signed_bytes(); empty when unsigned


class WireError(Exception):
    """A payload that is not an envelope at all (garbage, wrong version, unknown kind)."""


class Status(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of a status message: ``online`` at connect and on every heartbeat, ``offline`` as last will."""

    state: str  # "online" | "offline"
    reason: str = ""  # for offline: "lost" (last will) or "shutdown"
    pending: int | None = None  # outbox rows waiting at the agent
    phase: str | None = None  # the exam phase the agent is in, when it knows
    kinds: dict[str, str] | None = None  # device name -> kind (recorder, ups, ...): the county labels readings with it


def topic(agent: str, kind: str) -> str:
    return f"{TOPIC_ROOT}/{agent}/{kind}"


def parse_topic(t: str) -> tuple[str, str] | None:
    """``examwatch/v1/<site>/<room>/<kind>`` -> (``site/room``, kind), or None for any other topic."""
    parts = t.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT or parts[4] not in KINDS or not parts[2] or not parts[3]:
        return None
    return f"{parts[2]}/{parts[3]}", parts[4]


def signed_bytes(agent: str, seq: int, ts: float, kind: str, body: bytes) -> bytes:
    head = f"examwatch/v{VERSION}\n{agent}\n{seq}\n{ts!r}\n{kind}\n".encode()
    return head + bytes(body)


def sign(key: bytes, agent: str, seq: int, ts: float, kind: str, body: bytes) -> str:
    return hmac.new(key, signed_bytes(agent, seq, ts, kind, body), hashlib.sha256).hexdigest()


def encode(key: bytes, agent: str, seq: int, ts: float, kind: str, body: bytes) -> bytes:
    """The signed message for one outbox row (or status body)."""
    env = Envelope(agent=agent, seq=seq, ts=ts, kind=kind, body=msgspec.Raw(body), sig=sign(key, agent, seq, ts, kind, body))
    return msgspec.json.encode(env)


_decoder = msgspec.json.Decoder(Envelope)


def decode(payload: bytes) -> Envelope:
    """Parse an envelope without checking its signature (see ``verify``); raise ``WireError``."""
    try:
        env = _decoder.decode(payload)
    except msgspec.DecodeError as err:
        raise WireError(f"not an envelope: {err}") from None
    if env.v != VERSION:
        raise WireError(f"unsupported envelope version {env.v}")
    if env.kind not in KINDS:
        raise WireError(f"unknown kind {env.kind!r}")
    return env


def verify(key: bytes, env: Envelope) -> bool:
    """True if the envelope was signed with ``key``. Constant-time comparison."""
    if not env.sig:
        return False
    expected = sign(key, env.agent, env.seq, env.ts, env.kind, bytes(env.body))
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


__all__ = ["Envelope", "Status", "WireError", "decode", "encode", "load_key", "parse_key", "parse_topic", "sign", "topic", "verify"]
