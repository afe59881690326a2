"""Prometheus's text exposition format (0.0.4), written directly: the one writer of both exporters.

Byte for byte what prometheus_client's ``generate_latest`` writes (its escapes, its Go-style numbers,
label names in sorted order, ``_total`` on counters), without the library: the agent imports none of it
(it cost a Pi agent about 2 MiB), and the gateway's page of 100k+ series is written without a sample
object per series. Pure functions of strings and floats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import msgspec

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_INF = math.inf


def escape(value: str) -> str:
    """A label value in the text format: backslash, double quote and line feed escaped, nothing else."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def go_float(value: float) -> str:
    """A value as Go (and prometheus_client) spells it: ``+Inf``, ``-Inf``, ``NaN``, exponents from 1e6 up."""
    if value == _INF:
        return "+Inf"
    if value == -_INF:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to exponents sooner than Python (positive values, as the library)
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def number(value: float) -> str:
    """As prometheus_client writes a value (Go's format): ``repr`` but for 1e6 and up, infinities and NaN."""
    return repr(value) if -_INF < value < 1e6 else go_float(value)


def numbers(values: list[float]) -> list[str]:
    """``number`` of every value, in one call for a page's worth: repr's digit search costs more than the rest
    of a reading's line. msgspec writes the same shortest digits that read back as the same float, spelt as
    repr spells them from 1e-4 up to 1e6 (outside it repr switches to exponents, Go from 1e21 or 1e6 up);
    the rest (negatives, NaN, infinities, the very small and the large) go through ``number``."""
    if not values:
        return []
    texts = msgspec.json.encode(values).decode()[1:-1].split(",")
    for i, value in enumerate(values):
        if value and not 1e-4 <= value < 1e6:  # 0.0 and -0.0 are spelt alike
            texts[i] = number(value)
    return texts


def labels(pairs: Mapping[str, str]) -> str:
    """``name="value",...`` in sorted name order, as the library writes a sample's labels."""
    return ",".join(f'{name}="{escape(value)}"' for name, value in sorted(pairs.items()))


def header(name: str, help_text: str, kind: str) -> str:
    help_text = help_text.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def family(name: str, help_text: str, kind: str, samples: Iterable[tuple[str, float]]) -> str:
    """One family: its HELP and TYPE lines, then a line per (rendered labels, value); a counter gains ``_total``."""
    if kind == "counter":
        name += "_total"
    rows = list(samples)
    lines = [
        f"{name}{{{text_labels}}} {text}\n" if text_labels else f"{name} {text}\n"
        for (text_labels, _), text in zip(rows, numbers([float(v) for _, v in rows]), strict=True)
    ]
    return header(name, help_text, kind) + "".join(lines)


__all__ = ["CONTENT_TYPE", "escape", "family", "go_float", "header", "labels", "number", "numbers"]
