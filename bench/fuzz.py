"""Fuzz every parser at the trust boundary: nothing but the parser's own error type may escape.

Each target names the function it exercises, a hypothesis strategy for its input (structured
generators that know the format's shape, byte-level mutation of real samples, and raw noise), how to
call it, the exception types it documents, and an invariant on what it returns (readings are finite
numbers, ...). Anything else that escapes, or a broken invariant, is a failure: it is counted once per
(exception type, place), shrunk to a small reproducer and written to ``--out``.

    python3 bench/fuzz.py --all --n 100000          # every target
    python3 bench/fuzz.py --target megatec_q1 --n 100000
    python3 bench/fuzz.py --target nut --replay .fuzz-failures/nut-1.bin   # rerun one reproducer
Exit status 1 when anything escaped. A target whose function does not exist (yet) is ``missing``;
tests/test_fuzz.py runs the same targets with fewer inputs on every CI run."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, Phase, given, seed, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

from bench.fuzz_discovery import call_list_ups, call_zigbee, nut_list_ups, zigbee_bridge  # noqa: E402
from bench.fuzz_http import desk_body, digest_challenge, http_head  # noqa: E402
from bench.fuzz_inputs import (  # noqa: E402
    Invariant,
    api_query,
    envelope,
    isapi_xml,
    megatec_f,
    megatec_i,
    megatec_q1,
    modbus_reply,
    mqtt_payload,
    mutate,
    nut_lines,
    toml_config,
)
from bench.fuzz_snmp import call_snmp, snmp_response  # noqa: E402

MAX_CORPUS_INPUT = 64 * 1024  # deep-nesting inputs are tried as drawn; mutating copies of them only costs time


def _obj(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _finite(values: Any, what: str = "value") -> None:
    for v in values:
        if not isinstance(v, float) or not math.isfinite(v):
            raise Invariant(f"{what} {v!r} is not a finite float")


def _readings(result: Any) -> list[Any]:
    # parse_payload returns readings, or (readings, rejected reasons) since issue 7.
    readings = result[0] if isinstance(result, tuple) else result
    _finite((r.value for r in readings), "reading")
    return readings


# --- calls: (function, input) -> result; each checks its invariant ----------------------------------------


def _call_wire(decode: Callable, data: bytes) -> Any:
    return decode(data)


def _call_mqtt(parse_payload: Callable, data: bytes) -> None:
    from examwatch.collectors.mqtt import Profile
    from examwatch.collectors.profiles import load

    for name in ("zigbee2mqtt_contact", "zigbee2mqtt_noise", "recorder_json"):
        fields = load("mqtt", name, Profile).fields
        try:
            _readings(parse_payload(fields, "dev", data, 0.0))
        except _obj("examwatch.collectors.mqtt:PayloadError"):
            pass


def _call_q1(parse_q1: Callable, data: bytes) -> None:
    from examwatch.collectors import megatec
    from examwatch.collectors.profiles import load

    status = parse_q1(data)
    for name in ("generic", "cell-voltage", "pack-voltage"):
        profile = load("megatec", name, megatec.Profile)
        for rating in (None, megatec.Rating(230.0, 4.0, 12.0, 50.0), megatec.Rating(230.0, 4.0, 0.0, 50.0)):
            _readings(megatec.readings_from("ups", status, profile, rating, 0.0))


def _call_f(parse_f: Callable, data: bytes) -> None:
    from examwatch.collectors import megatec

    rating = parse_f(data)
    _finite(msgspec.structs.astuple(rating), "rating")
    for reports in ("cell", "pack"):
        charge = megatec.estimate_charge(13.6, megatec.Battery(reports=reports), rating)
        if charge is not None:
            _finite([charge], "charge")


def _call_i(parse_i: Callable, data: bytes) -> None:
    identity = parse_i(data)
    if not isinstance(identity, str) or len(identity) > len(data):
        raise Invariant(f"identity {identity!r}")


def _call_modbus(decode: Callable, data: bytes) -> None:
    """The collector's path for one answer: pymodbus frames it, a frame it drops is classified, our decode."""
    from pymodbus import ModbusException
    from pymodbus.framer import FramerRTU
    from pymodbus.pdu import DecodePDU

    from examwatch.collectors.base import DeviceError
    from examwatch.collectors.modbus_noise import Profile, classify_silence

    try:
        _, pdu = FramerRTU(DecodePDU(False)).handleFrame(data, 1, 0)
    except ModbusException:
        pdu = None
    if pdu is None:
        err = classify_silence(data)
        if not isinstance(err, DeviceError):
            raise Invariant(f"classify_silence returned {err!r}")
        raise err
    if pdu.isError():
        return
    registers = list(getattr(pdu, "registers", []))
    for p in (Profile(), Profile(datatype="float32", function=4), Profile(datatype="int32", word_order="little")):
        with contextlib.suppress(DeviceError):  # the next profile may take this many registers
            _finite([decode(registers, p)], "noise_db")


def _call_nut(parse_list_var: Callable, text: str) -> None:
    from examwatch.collectors.nut import parse_nut

    readings, _bad = parse_nut(parse_list_var(text.split("\n"), "ups1"), "ups", 0.0)
    _readings(readings)


def _call_isapi(parse_storage: Callable, data: bytes) -> None:
    import re

    from examwatch.collectors.isapi import readings_from

    for r in _readings(readings_from("cam", parse_storage(data), 0.0)):
        if not re.fullmatch(r"cam/(disk|nas)[A-Za-z0-9_.-]{1,32}", r.device):
            raise Invariant(f"part name {r.device[:80]!r}")
        if r.metric == "storage_used_ratio" and not 0.0 <= r.value <= 1.0:
            raise Invariant(f"storage_used_ratio {r.value}")
        if r.metric.endswith("_bytes") and r.value < 0:
            raise Invariant(f"{r.metric} {r.value}")


def _call_loads(loads: Callable, text: str) -> Any:
    return loads(text)


def _call_note(parse_body: Callable, data: bytes) -> Any:
    from examwatch.gateway.desk import Note

    return parse_body(data, Note)


def _call_api(parse_query: Callable, text: str) -> Any:
    path, _, query = text.partition("?")
    return parse_query(path, query)


@dataclass
class Target:
    function: str  # "module:attr", resolved at run time: a target may exist before its function does
    inputs: Callable[[], Any]  # -> hypothesis strategy of bytes or str
    call: Callable[[Callable, Any], Any]
    allowed: tuple[str, ...]  # the documented error types, "module:Name"
    text: bool = False  # inputs are str (else bytes)


TARGETS: dict[str, Target] = {
    "wire": Target("examwatch.kernel.wire:decode", envelope, _call_wire, ("examwatch.kernel.wire:WireError",)),
    "mqtt_payload": Target(
        "examwatch.collectors.mqtt:parse_payload", mqtt_payload, _call_mqtt, ("examwatch.collectors.mqtt:PayloadError",)
    ),
    "megatec_q1": Target(
        "examwatch.collectors.megatec:parse_q1", megatec_q1, _call_q1, ("examwatch.collectors.base:DeviceError",)
    ),
    "megatec_f": Target(
        "examwatch.collectors.megatec:parse_f", megatec_f, _call_f, ("examwatch.collectors.base:DeviceError",)
    ),
    "megatec_i": Target(
        "examwatch.collectors.megatec:parse_i", megatec_i, _call_i, ("examwatch.collectors.base:DeviceError",)
    ),
    "modbus_noise": Target(
        "examwatch.collectors.modbus_noise:decode",
        modbus_reply,
        _call_modbus,
        ("examwatch.collectors.base:DeviceError",),
    ),
    "nut": Target(
        "examwatch.collectors.nut:parse_list_var", nut_lines, _call_nut, ("examwatch.collectors.nut:NutError",), True
    ),
    "snmp_v2c": Target(
        "examwatch.collectors._snmp_v2c:decode_response",
        snmp_response,
        call_snmp,
        ("examwatch.collectors._snmp_v2c:Garbage",),
    ),
    "isapi": Target(
        "examwatch.collectors.isapi:parse_storage", isapi_xml, _call_isapi, ("examwatch.collectors.base:DeviceError",)
    ),
    "isapi_challenge": Target("examwatch.collectors.isapi:parse_challenge", digest_challenge, _call_loads, (), True),
    "zigbee_bridge": Target(
        "examwatch.edge.discover.mqtt:parse_bridge_devices",
        zigbee_bridge,
        call_zigbee,
        ("examwatch.edge.discover.mqtt:BridgeError",),
    ),
    "nut_list_ups": Target("examwatch.edge.discover.nut:parse_list_ups", nut_list_ups, call_list_ups, (), True),
    "edge_config": Target(
        "examwatch.edge.config:loads",
        lambda: toml_config("edge"),
        _call_loads,
        ("examwatch.kernel.config:ConfigError",),
        True,
    ),
    "gateway_config": Target(
        "examwatch.gateway.config:loads",
        lambda: toml_config("gateway"),
        _call_loads,
        ("examwatch.kernel.config:ConfigError",),
        True,
    ),
    "api_query": Target(
        "examwatch.gateway.params:parse_query", api_query, _call_api, ("examwatch.gateway.params:BadRequest",), True
    ),
    "http_head": Target(
        "examwatch.gateway.params:check_head", http_head, _call_loads, ("examwatch.gateway.params:BadRequest",)
    ),
    "desk_body": Target(
        "examwatch.gateway.desk:parse_body", desk_body, _call_note, ("examwatch.gateway.params:BadRequest",)
    ),
}


# --- running ----------------------------------------------------------------------------------------------


@dataclass
class Failure:
    kind: str  # exception type (or Invariant)
    where: str  # innermost frame in the project's code, then the innermost frame
    message: str
    example: Any  # the smallest input seen that fails this way
    count: int = 0


@dataclass
class Result:
    name: str
    missing: str = ""  # why the target's function cannot be found
    inputs: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the machine may be shared: CPU time says what the parser costs
    failures: dict[tuple[str, str], Failure] = field(default_factory=dict)


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)[1:]  # [0] is the harness's own call
    ours = [f for f in frames if f.filename.startswith(str(ROOT)) and "/bench/" not in f.filename]
    pick = ours[-1:] + frames[-1:]
    return " < ".join(dict.fromkeys(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in pick)) or "?"


def attempt(target: Target, fn: Callable, allowed: tuple[type[BaseException], ...], data: Any) -> Failure | None:
    """Run one input; the failure it causes, if any."""
    try:
        target.call(fn, data)
    except allowed:
        return None
    except Exception as err:  # finding these is the point; RecursionError and MemoryError included
        kind = type(err).__name__
        return Failure(kind, _where(err), str(err)[:200], data)
    return None


def shrink(
    target: Target, fn: Callable, allowed: tuple, failure: Failure, budget: int = 2000, seconds: float = 3.0
) -> Any:
    """Delta debugging: drop ever smaller chunks while the input still fails the same way (within a budget)."""
    best = failure.example
    deadline = time.monotonic() + seconds
    key = (failure.kind, failure.where)
    chunk = max(1, len(best) // 2)
    while chunk >= 1 and budget > 0:
        i, progressed = 0, False
        while i < len(best) and budget > 0 and time.monotonic() < deadline:
            candidate = best[:i] + best[i + chunk :]
            budget -= 1
            f = attempt(target, fn, allowed, candidate)
            if f is not None and (f.kind, f.where) == key:
                best, progressed = candidate, True
            else:
                i += chunk
        if time.monotonic() >= deadline:
            break
        if not progressed:
            chunk //= 2
    return best


def resolve(target: Target) -> tuple[Callable, tuple[type[BaseException], ...]]:
    return _obj(target.function), tuple(_obj(ref) for ref in target.allowed)


def run(name: str, n: int, seed_value: int = 0) -> Result:
    """Feed ``n`` generated inputs to one target; failures keyed by (type, place), each with its smallest input."""
    target, result = TARGETS[name], Result(name)
    try:
        fn, allowed = resolve(target)
    except (ImportError, AttributeError) as err:
        result.missing = f"{type(err).__name__}: {err}"
        return result
    strategy = target.inputs()

    def one(data: Any) -> None:
        result.inputs += 1
        f = attempt(target, fn, allowed, data)
        if f is not None:
            known = result.failures.setdefault((f.kind, f.where), f)
            known.count += 1
            if len(f.example) < len(known.example):
                known.example = f.example

    # Hypothesis draws the structured inputs (its generation costs ~1 ms each); they become the corpus
    # that a plain seeded mutator then varies for the rest, at the speed of the parser itself.
    corpus: list[bytes] = []
    drawn = min(n, max(250, n // 50))

    def remember(data: Any) -> None:
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        if len(raw) <= MAX_CORPUS_INPUT:
            corpus.append(raw)
        one(data)

    start, cpu_start = time.perf_counter(), time.process_time()
    test = settings(
        max_examples=drawn,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )(given(strategy)(remember))
    seed(seed_value)(test)()
    rng = random.Random(seed_value)
    for _ in range(n - result.inputs):
        data = mutate(rng, rng.choice(corpus), corpus)
        one(data.decode("utf-8", "replace") if target.text else data)
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    for f in result.failures.values():
        f.example = shrink(target, fn, allowed, f)
    return result


def write_reproducers(result: Result, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{result.name}-*.*"):
        old.unlink()  # an earlier run's: they would pass for this one's
    paths = []
    for i, f in enumerate(result.failures.values(), 1):
        path = out / f"{result.name}-{i}.bin"
        path.write_bytes(f.example if isinstance(f.example, bytes) else f.example.encode("utf-8", "surrogatepass"))
        path.with_suffix(".txt").write_text(f"{f.kind} at {f.where}\n{f.message}\n{f.count} inputs failed this way\n")
        paths.append(path)
    return paths


def replay(name: str, path: Path) -> int:
    target = TARGETS[name]
    fn, _ = resolve(target)
    data = path.read_bytes()
    if target.text:
        data = data.decode("utf-8", "surrogatepass")
    target.call(fn, data)  # let it raise, with its traceback
    print("no failure")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--n", type=int, default=100_000, help="inputs per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / ".fuzz-failures", help="where reproducers go")
    ap.add_argument("--replay", type=Path, help="run one reproducer file against --target")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.target[0], args.replay)
    names = sorted(TARGETS) if args.all or not args.target else args.target
    escaped = False
    print(f"{'target':<16}{'inputs':>9}{'seconds':>9}{'cpu s':>8}{'inputs/s':>10}{'per cpu s':>10}  failures")
    for name in names:
        r = run(name, args.n, args.seed)
        if r.missing:
            print(f"{name:<16}{'-':>9}{'-':>9}{'-':>8}{'-':>10}{'-':>10}  missing ({r.missing})", flush=True)
            continue
        rate, cpu_rate = r.inputs / max(r.seconds, 1e-9), r.inputs / max(r.cpu_seconds, 1e-9)
        print(
            f"{name:<16}{r.inputs:>9}{r.seconds:>9.1f}{r.cpu_seconds:>8.1f}{rate:>10.0f}{cpu_rate:>10.0f}  "
            f"{len(r.failures)}",
            flush=True,
        )
        for path, f in zip(write_reproducers(r, args.out), r.failures.values(), strict=True):
            escaped = True
            print(f"    {f.kind} at {f.where} ({f.count}x): {f.message[:100]}\n      reproducer: {path}")
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
