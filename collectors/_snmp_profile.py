"""SNMP profiles, pure: compiling one (OIDs checked, expressions whitelisted) and evaluating it over a
device's answer. The polling is in ``snmp.py``.

A profile (``collectors/profiles/snmp/<name>.toml``) names the OIDs to read and gives each canonical
metric as a small arithmetic expression over them, e.g. ``ups_runtime_seconds = "minutes * 60"`` or
``power_on_battery = "source == 5"``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from examwatch.collectors import profiles
from examwatch.kernel.catalog import METRICS
from examwatch.kernel.config import Strict
from examwatch.kernel.model import Reading

# --- profiles -----------------------------------------------------------------------------------------


class Table(Strict, kw_only=True):
    """A conceptual table: column name -> column OID (without index); one part per row."""

    columns: dict[str, str]
    metrics: dict[str, str]
    part: str = "{index}"  # part name per row; {index} is the row index, {index[0]} its first sub-id
    where: str = ""  # rows for which this is false are skipped (e.g. only fixed disks)


class Profile(Strict, kw_only=True):
    description: str = ""
    discover: profiles.Discovery | None = None  # how `examwatch discover` recognises the model
    scalars: dict[str, str] = {}  # name -> full OID (with .0 or the row index)
    metrics: dict[str, str] = {}  # metric -> expression over scalar names
    tables: dict[str, Table] = {}


class Expression:
    """A whitelisted Python expression: numbers, strings, names, arithmetic, comparisons, and/or/not,
    ``x if c else y``, tuples for ``in``, and the functions ``num``, ``min``, ``max``, ``abs``."""

    FUNCTIONS: dict[str, Callable[..., Any]] = {}
    _ALLOWED = (
        ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.Name,
        ast.Load, ast.Constant, ast.Tuple, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod,
        ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
        ast.In, ast.NotIn,
    )  # fmt: skip

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as err:
            raise ValueError(f"not an expression: {text!r} ({err.msg})") from None
        names = set()
        for node in ast.walk(tree):
            if not isinstance(node, self._ALLOWED):
                raise ValueError(f"{type(node).__name__} not allowed in {text!r}")
            if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in self.FUNCTIONS):
                raise ValueError(f"only {', '.join(self.FUNCTIONS)} may be called in {text!r}")
            if isinstance(node, ast.Name):
                names.add(node.id)
        self.names = names - self.FUNCTIONS.keys()
        tree = ast.fix_missing_locations(_StrictCompare().visit(tree))
        self._code = compile(tree, f"<{text}>", "eval")

    def __call__(self, values: dict[str, Any]) -> Any:
        env = {"__builtins__": {}, "__compare__": _compare, **self.FUNCTIONS}
        return eval(self._code, env, values)  # noqa: S307 - AST whitelisted


class _StrictCompare(ast.NodeTransformer):
    """Comparisons go through ``_compare``: in Python ``"nonsense" == 5`` is simply False, which would make
    a device answering text where a number belongs read as "not on battery" instead of unreadable."""

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        ops = ast.Tuple([ast.Constant(type(op).__name__) for op in node.ops], ast.Load())
        return ast.Call(
            ast.Name("__compare__", ast.Load()), [node.left, ops, ast.Tuple(node.comparators, ast.Load())], []
        )


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "Eq": lambda a, b: a == b, "NotEq": lambda a, b: a != b, "Lt": lambda a, b: a < b, "LtE": lambda a, b: a <= b,
    "Gt": lambda a, b: a > b, "GtE": lambda a, b: a >= b, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
}  # fmt: skip


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _compare(left: Any, ops: tuple[str, ...], rights: tuple[Any, ...]) -> bool:
    """A comparison chain, refusing (TypeError) text compared with a number: the value is unusable."""
    for op, right in zip(ops, rights, strict=True):
        others = right if op in ("In", "NotIn") and isinstance(right, tuple) else (right,)
        if any(_numeric(left) != _numeric(o) and isinstance(left, str) != isinstance(o, str) for o in others):
            raise TypeError(f"compares {left!r} with {right!r}")
        if not _OPS[op](left, right):
            return False
        left = right
    return True


def _num(value: Any) -> float:
    """The first number in a value: device strings like ``"52 PERCENT"`` or ``"0.0 GB"``."""
    if isinstance(value, (int, float)):
        return value
    m = re.search(r"-?\d+(?:\.\d+)?", str(value))
    if m is None:
        raise ValueError(f"no number in {value!r}")
    return float(m.group())


Expression.FUNCTIONS = {"num": _num, "min": min, "max": max, "abs": abs}


@dataclass(frozen=True)
class CompiledTable:
    name: str
    columns: dict[str, tuple[int, ...]]
    metrics: dict[str, Expression]
    part: str
    where: Expression | None


@dataclass(frozen=True)
class CompiledProfile:
    """A validated profile, ready to poll: which OIDs to ask and how to turn them into readings."""

    name: str
    scalars: dict[str, tuple[int, ...]]
    metrics: dict[str, Expression]
    tables: list[CompiledTable]
    discover: profiles.Discovery | None = None


def _oid(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\.?\d+(\.\d+)+", text):
        raise ValueError(f"not a numeric OID: {text!r}")
    return tuple(int(p) for p in text.strip(".").split("."))


def compile_profile(name: str, profile: Profile) -> CompiledProfile:
    """Check a profile completely (OIDs, metric names, expressions, names they use); raise
    ``ProfileError`` listing every problem, so a technician's typo is caught at load, not at 08:30."""
    problems: list[str] = []

    def expressions(where: str, metrics: dict[str, str], known: Iterable[str]) -> dict[str, Expression]:
        out = {}
        for metric, text in metrics.items():
            if metric not in METRICS:
                problems.append(f"{where}: {metric!r} is not a catalog metric")
                continue
            try:
                expr = out[metric] = Expression(text)
            except ValueError as err:
                problems.append(f"{where}.{metric}: {err}")
                continue
            if unknown := expr.names - set(known):
                problems.append(f"{where}.{metric}: unknown name(s) {', '.join(sorted(unknown))}")
        return out

    def oids(where: str, table: dict[str, str]) -> dict[str, tuple[int, ...]]:
        out = {}
        for key, text in table.items():
            try:
                out[key] = _oid(text)
            except ValueError as err:
                problems.append(f"{where}.{key}: {err}")
        return out

    scalars = oids("scalars", profile.scalars)
    metrics = expressions("metrics", profile.metrics, profile.scalars)
    tables = []
    for tname, t in profile.tables.items():
        where = None
        if t.where:
            try:
                where = Expression(t.where)
                if unknown := where.names - t.columns.keys():
                    problems.append(f"tables.{tname}.where: unknown name(s) {', '.join(sorted(unknown))}")
            except ValueError as err:
                problems.append(f"tables.{tname}.where: {err}")
        tables.append(
            CompiledTable(
                tname,
                oids(f"tables.{tname}.columns", t.columns),
                expressions(f"tables.{tname}.metrics", t.metrics, t.columns),
                t.part,
                where,
            )
        )
    if not metrics and not any(t.metrics for t in tables):
        problems.append("maps no metric at all")
    for prefix in profile.discover.sys_object_id if profile.discover else []:
        try:
            _oid(prefix.rstrip("."))
        except ValueError as err:
            problems.append(f"discover.sys_object_id: {err}")
    if problems:
        raise profiles.ProfileError(f"profile snmp/{name}: " + "; ".join(problems))
    return CompiledProfile(name, scalars, metrics, tables, profile.discover)


_compiled: dict[str, CompiledProfile] = {}


def profile_named(name: str) -> CompiledProfile:
    if name not in _compiled:
        _compiled[name] = compile_profile(name, profiles.load("snmp", name, Profile))
    return _compiled[name]


# --- parsing (pure) -----------------------------------------------------------------------------------


class _Index(tuple[int, ...]):
    """A row index: ``{index}`` formats as ``1.0``, ``{index[0]}`` as ``1``."""

    def __str__(self) -> str:
        return ".".join(map(str, self))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


@dataclass
class Parsed:
    readings: list[Reading]
    missing: list[str]  # metrics the device did not answer (noSuchObject) or answered with an unusable value
    answered: int  # values the device did answer


def _evaluate(expr: Expression, values: dict[str, Any]) -> float | None:
    try:
        v = expr(values)
    except (NameError, ZeroDivisionError, TypeError, ValueError):
        return None
    if isinstance(v, bool | int | float):
        return float(v)
    return None


def parse_snmp(
    profile: CompiledProfile,
    device: str,
    values: dict[tuple[int, ...], Any],
    ts: float,
    parts: Iterable[str] = (),
) -> Parsed:
    """Map OID -> value (ints, floats, str; None for noSuchObject/noSuchInstance) onto Readings.

    Scalars become readings of ``device``; each table row becomes readings of ``device/<part>``. A metric
    whose inputs are missing or unusable is left out and listed in ``missing``. ``parts``, when given,
    keeps only those parts (the switch ports that are cabled).
    """
    readings: list[Reading] = []
    missing: list[str] = []
    answered = 0
    scalar_values = {}
    for name, oid in profile.scalars.items():
        v = values.get(oid)
        if v is not None:
            scalar_values[name] = v
            answered += 1
    for metric, expr in profile.metrics.items():
        value = _evaluate(expr, scalar_values)
        if value is None:
            missing.append(metric)
        else:
            readings.append(Reading(device, metric, value, ts))
    wanted = set(parts)
    for table in profile.tables:
        for index, row in _rows(table, values).items():
            answered += len(row)
            if table.where is not None and not _evaluate(table.where, row):
                continue
            part = table.part.format(index=index)
            if wanted and part not in wanted:
                continue
            for metric, expr in table.metrics.items():
                value = _evaluate(expr, row)
                if value is None:
                    missing.append(f"{part}/{metric}")
                else:
                    readings.append(Reading(f"{device}/{part}", metric, value, ts))
    return Parsed(readings, missing, answered)


def _rows(table: CompiledTable, values: dict[tuple[int, ...], Any]) -> dict[_Index, dict[str, Any]]:
    rows: dict[_Index, dict[str, Any]] = {}
    for name, base in table.columns.items():
        n = len(base)
        for oid, v in values.items():
            if v is not None and len(oid) > n and oid[:n] == base:
                rows.setdefault(_Index(oid[n:]), {})[name] = v
    return dict(sorted(rows.items()))
