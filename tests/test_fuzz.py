"""A short, reproducible run of bench/fuzz.py on every parser at the trust boundary.

The same targets, generators and invariants as ``python3 bench/fuzz.py --all --n 100000``, with a fixed
seed and 2,000 inputs each, so a parser change that lets an exception escape fails CI the same way
every time. A failure message carries the shrunk input: paste it into a unit test next to the fix.
"""

from __future__ import annotations

import pytest

from bench import fuzz

INPUTS = 2_000
SEED = 7


def describe(result: fuzz.Result) -> str:
    return "\n".join(
        f"{f.kind} at {f.where} ({f.count} of {result.inputs} inputs): {f.message}\n    smallest input: "
        f"{f.example[:300]!r}"
        for f in result.failures.values()
    )


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_only_the_documented_error_escapes(name: str) -> None:
    result = fuzz.run(name, INPUTS, SEED)
    if result.missing:
        pytest.fail(f"{fuzz.TARGETS[name].function} is gone: {result.missing}")
    assert result.inputs == INPUTS
    assert not result.failures, describe(result)


def test_the_harness_finds_an_escape_and_shrinks_it() -> None:
    """The harness itself: a parser that overflows on long digit runs is caught, keyed once, and shrunk."""

    def parse(data: bytes) -> float:
        if b"\x00" in data:
            raise ValueError("documented")
        return float(int(data)) if data.isdigit() else 0.0  # OverflowError past ~309 digits

    target = fuzz.Target("builtins:len", lambda: None, lambda _fn, data: parse(data), ())
    found = fuzz.attempt(target, len, (ValueError,), b"1" * 400 + b"\x01")
    assert found is None  # 0.0: not all digits
    found = fuzz.attempt(target, len, (ValueError,), b"7" * 500)
    assert found is not None and found.kind == "OverflowError"
    assert fuzz.shrink(target, len, (ValueError,), found) == b"7" * 309
