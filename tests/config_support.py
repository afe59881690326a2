"""For the config tests: TOML written from Python values, and hypothesis strategies for hostile files."""

from __future__ import annotations

import json
import math
import tomllib
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

from hypothesis import strategies as st


def toml_string(v: str) -> str:
    """A TOML basic string: JSON's escapes suit it, but astral characters must stay raw (JSON would write
    surrogate pairs, which TOML refuses) and DEL must be escaped."""
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any) -> str:
    """One TOML value, tables inline (so any nesting is one line of a valid document)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) if not math.isfinite(v) else repr(v)
    if isinstance(v, (int, datetime, date, time)):
        return v.isoformat() if not isinstance(v, int) else str(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_doc(table: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in table.items())


# Values a TOML file can hold, the awkward ones first: NaN, inf, huge and negative numbers, offsets.
leaves = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 0.0, -0.0, 1e308, 2**63 - 1, -(2**63), 65536, "", "#", "+"]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=40),
    st.booleans(),
    st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=8))])),
    st.dates(),
    st.times(),
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _paths(v: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path] if path else []
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*path, i))
    return out


@st.composite
def mutated(draw: Any, text: str) -> str:
    """A valid file with a few values (or tables) replaced by anything TOML can say, or keys added."""
    doc = tomllib.loads(text)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(doc)))
        parent = doc
        try:
            for p in path[:-1]:
                parent = parent[p]
            parent[path[-1]]
        except (KeyError, IndexError, TypeError):  # an earlier change replaced this part
            continue
        if draw(st.booleans()) and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(values)
        else:
            parent[path[-1]] = draw(values)
    return toml_doc(doc)
