"""The strict-TOML config base, shared by the agent's and the gateway's configs: one base struct that
refuses unknown keys, the ranges used beside the fields, listen addresses, and the checker.

Checking a TOML file against msgspec structs: every error at once, each with its key path and line.

msgspec structs are the schema. msgspec stops at the first error, and a technician fixing a file on an
exam morning wants all of them, so ``_walk`` checks the parsed TOML against the same structs field by
field, collecting every unknown key, wrong type, value out of range and missing field with its key path
(and line), and only then converts. The agent's and the gateway's configs both go through ``validated``;
reading is one path for ``config check`` and ``run`` alike: bounded, strictly UTF-8.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_args, get_origin

import msgspec

MAX_BYTES = 1 << 20  # a config file is a few KB; a megabyte is not one (and would be slow to check)
MAX_NESTING = 32  # brackets deep; tomllib recurses per level and a hostile file must not exhaust the stack
MAX_ISSUES = 50  # reported per file: a technician fixes the first ones, and locating each costs a scan

DAY = 86400.0


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    """Every config table: an unknown key is an error (a typo must never silently disable a setting)."""


# Ranges, declared once and used beside the fields. A bound also refuses NaN and infinity.
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Interval = Annotated[float, msgspec.Meta(ge=0.01, le=DAY)]  # s between polls or sends: never a busy loop
Timeout = Annotated[float, msgspec.Meta(ge=0.01, le=600)]  # s to wait for one answer
# s the MQTT broker keeps a session while the client is away: a minute at least (a restart), at most
# MQTT v5's 0xFFFFFFFF (never expires)
SessionExpiry = Annotated[int, msgspec.Meta(ge=60, le=0xFFFFFFFF)]
# Any value a metric can take (bytes of a disk included): finite, so NaN and inf are refused.
Finite = Annotated[float, msgspec.Meta(ge=-1e15, le=1e15)]

S = TypeVar("S", bound=msgspec.Struct)
Path = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigIssue:
    path: tuple[str | int, ...]
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = ".".join(f"[{p}]" if isinstance(p, int) else p for p in self.path).replace(".[", "[") or "(file)"
        return f"{where}{f' (line {self.line})' if self.line else ''}: {self.message}"


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(map(str, issues)))
        self.issues = issues

    def report(self, path: str) -> str:
        """What ``config check`` and a refused start print: the file, then every issue on its own line."""
        return f"{path}: {len(self.issues)} error(s):\n" + "".join(f"  {issue}\n" for issue in self.issues)


def read(path: str) -> str:
    """A config file's text (``-``: stdin), for checking and running alike: bounded, strictly UTF-8.
    ``ConfigError`` if it is not a config file's text, ``OSError`` if it cannot be read."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_BYTES + 1)
    else:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    return decode(data)


def decode(data: bytes) -> str:
    if len(data) > MAX_BYTES:
        raise ConfigError([ConfigIssue((), f"larger than {MAX_BYTES >> 10} KB: not a config file")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:  # Windows editors save GBK by default
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            [
                ConfigIssue(
                    (), "not UTF-8 text (GBK from a Windows editor?): save the file as UTF-8 (另存为 UTF-8 编码)", line
                )
            ]
        ) from None


def validated(
    text: str, schema: type[S], build: Callable[[dict[str, Any]], S], semantic_issues: Callable[[S], list[ConfigIssue]]
) -> S:
    """The agent's and the gateway's checker: ``schema``'s issues and, on the parts that are sound, the
    semantic ones (``semantic_issues`` of the built config) together, so one check shows every error."""
    text = text.removeprefix("\ufeff")
    raw, issues = _checked(text, schema)
    sound = _without(raw, [i.path for i in issues])
    cfg = None
    if sound is not None:
        try:
            cfg = build(sound)
        except msgspec.ValidationError as err:  # a struct's own check that _walk did not reach
            issues = issues or [ConfigIssue((), str(err))]
    if cfg is not None:
        bad = {i.path for i in issues}  # a removed value's default must not be blamed as well
        issues += [i for i in semantic_issues(cfg) if i.path not in bad]
    if issues or cfg is None:
        raise error_at(text, issues)
    return cfg


def parse(text: str, schema: type[msgspec.Struct]) -> dict[str, Any]:
    """Parse TOML and check it against ``schema``; every issue at once, with key path and line.

    Returns the raw table; ``msgspec.convert(raw, schema)`` then cannot fail. Other TOML files
    (the gateway's correlation rules) use this too. Only ``ConfigError`` escapes, whatever the text.
    """
    raw, issues = _checked(text, schema)
    if issues:
        raise error_at(text, issues)
    return raw


def _checked(text: str, schema: type[msgspec.Struct]) -> tuple[dict[str, Any], list[ConfigIssue]]:
    """The TOML table and its issues against ``schema``; ``ConfigError`` if it is not a TOML file at all."""
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Windows Notepad writes one
    if len(text) > MAX_BYTES:
        raise ConfigError([ConfigIssue((), f"larger than {MAX_BYTES >> 10} KB: not a config file")])
    if _nesting(text) > MAX_NESTING:
        raise ConfigError([ConfigIssue((), f"brackets nested more than {MAX_NESTING} deep: not a config file")])
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"line (\d+)", str(err))
        raise ConfigError([ConfigIssue((), f"not valid TOML: {err}", int(m.group(1)) if m else None)]) from None
    except (RecursionError, ValueError, TypeError, OverflowError) as err:  # tomllib's own slips on odd input
        raise ConfigError([ConfigIssue((), f"not valid TOML: {type(err).__name__}: {err}")]) from None
    issues: list[ConfigIssue] = []
    _walk(raw, schema, (), issues)
    return raw, issues


def _without(raw: dict[str, Any], paths: list[Path]) -> dict[str, Any] | None:
    """``raw`` without the values at ``paths`` (their defaults apply), or None where that cannot be done:
    an array item (removing it would renumber the rest) or the whole file."""
    sound = copy.deepcopy(raw)
    for path in paths:
        if not path or not isinstance(path[-1], str):
            return None
        table: Any = sound
        for p in path[:-1]:
            try:
                table = table[p]
            except (KeyError, IndexError, TypeError):
                return None
        if isinstance(table, dict):
            table.pop(path[-1], None)
    return sound


def error_at(text: str, issues: list[ConfigIssue]) -> ConfigError:
    """The error for ``issues``, each with the line of its key path in ``text`` (the first MAX_ISSUES)."""
    shown = [ConfigIssue(i.path, i.message, i.line or _line_of(text, i.path)) for i in issues[:MAX_ISSUES]]
    if len(issues) > MAX_ISSUES:
        shown.append(ConfigIssue((), f"and {len(issues) - MAX_ISSUES} more errors"))
    return ConfigError(shown)


def fields_of(tp: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(tp) if f.encode_name != "options"}


def _walk(value: Any, tp: Any, path: Path, issues: list[ConfigIssue]) -> None:
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if not isinstance(value, dict):
            issues.append(ConfigIssue(path, f"expected a table, got {type(value).__name__}"))
            return
        before = len(issues)
        fields = fields_of(tp)
        extension = getattr(tp, "extension_type", None)
        extra = {k: v for k, v in value.items() if k not in fields}
        for k in [k for k in value if k in fields]:  # in the file's order, so reports are too
            _walk(value[k], fields[k].type, (*path, k), issues)
        for k, f in fields.items():
            if f.required and k not in value:
                issues.append(ConfigIssue((*path, k), "missing required key"))
        if extension is not None and "protocol" in value:
            ext = extension(value)
            if isinstance(ext, str):
                issues.append(ConfigIssue((*path, "protocol"), ext))
                return
            _walk(extra, ext, path, issues)
        else:
            for k in extra:
                issues.append(ConfigIssue((*path, k), f"unknown key; expected one of: {', '.join(fields)}"))
            if len(issues) == before and hasattr(tp, "__post_init__"):  # its own checks, once its fields are sound
                _leaf(value, tp, path, issues)
    elif origin is list:
        if not isinstance(value, list):
            issues.append(ConfigIssue(path, f"expected an array, got {type(value).__name__}"))
            return
        for i, item in enumerate(value):
            _walk(item, get_args(tp)[0], (*path, i), issues)
    elif origin is dict and get_args(tp)[1] is not Any:
        if not isinstance(value, dict):
            issues.append(ConfigIssue(path, f"expected a table, got {type(value).__name__}"))
            return
        for k, item in value.items():
            _walk(item, get_args(tp)[1], (*path, k), issues)
    else:
        _leaf(value, tp, path, issues)


def _leaf(value: Any, tp: Any, path: Path, issues: list[ConfigIssue]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        issues.append(ConfigIssue(path, f"{value} is not a number we can use: give a finite value"))
        return
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as err:
        message = str(err).split(" - at ")[0]
        if "no timezone component" in message:
            message += ": write the site's local time without an offset, e.g. 2024-06-07T09:00:00"
        issues.append(ConfigIssue(path, message))


def _nesting(text: str) -> int:
    """How deep brackets nest, counted without parsing (brackets in strings count too: a bound, not TOML)."""
    depth = deepest = 0
    for c in re.findall(r"[][{}]", text):
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(0, depth - 1)
    return deepest


def _line_of(text: str, path: Path) -> int | None:
    """Best-effort line of a key path in the TOML text (tomllib keeps no positions)."""
    lines = text.splitlines()
    start = 0
    table: list[str] = []
    keys = [p for p in path]
    # Walk down table headers: [a], [a.b], [[a]] (the n-th one for an index).
    while keys:
        head = keys[0]
        if len(keys) > 1 and isinstance(keys[1], int):
            hdr = re.compile(rf"^\s*\[\[\s*{re.escape('.'.join([*table, str(head)]))}\s*\]\]")
            hits = [i for i, ln in enumerate(lines) if i >= start and hdr.match(ln)]
            if keys[1] >= len(hits):
                return None
            start = hits[keys[1]] + 1
            table, keys = [*table, str(head)], keys[2:]
            continue
        hdr = re.compile(rf"^\s*\[\s*{re.escape('.'.join([*table, str(head)]))}\s*\]")
        hit = next((i for i, ln in enumerate(lines) if i >= start and hdr.match(ln)), None)
        if len(keys) > 1:  # [a.b] or [[a.b]] may stand without an [a] header
            start, table, keys = (start if hit is None else hit + 1), [*table, str(head)], keys[1:]
            continue
        if hit is not None:
            return hit + 1
        kv = re.compile(rf"^\s*{re.escape(str(head))}\s*=")
        for i in range(start, len(lines)):
            if re.match(r"^\s*\[", lines[i]) and i > start:
                break
            if kv.match(lines[i]):
                return i + 1
        return None
    return None


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6 address]:port`` -> (host, port); an empty host is 127.0.0.1 (never all
    interfaces by accident), port 0 a free port the system picks (tests). ``ValueError`` says what is wrong."""
    m = re.fullmatch(r"(?:\[([^\]]*)\]|([^:\[\]]*)):(\d{1,5})", listen)
    if m is None:
        raise ValueError('expected host:port, e.g. "127.0.0.1:9108" or "[::1]:9108"')
    v6, host, port = m.group(1), m.group(2), int(m.group(3))
    if v6 is not None:
        try:
            ipaddress.IPv6Address(v6)
        except ValueError:
            raise ValueError(f"{v6[:64]!r} is not an IPv6 address") from None
    elif host:
        check_host(host)
    if port > 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    return v6 or host or "127.0.0.1", port


def check_host(host: str) -> None:
    """``ValueError`` unless ``host`` is a host name or an IP address (v6 without brackets)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if re.fullmatch(r"[\d.]+", host):
        raise ValueError(f"{host!r} is not an IPv4 address")
    if not re.fullmatch(
        r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
        host,
    ):
        raise ValueError(f"{host[:64]!r} is not a host name or address")


__all__ = [
    "DAY",
    "MAX_BYTES",
    "ConfigError",
    "ConfigIssue",
    "Finite",
    "Interval",
    "Port",
    "SessionExpiry",
    "Strict",
    "Timeout",
    "check_host",
    "decode",
    "error_at",
    "fields_of",
    "parse",
    "parse_listen",
    "read",
    "validated",
]
