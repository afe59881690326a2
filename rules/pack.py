"""The default rule pack (``pack.toml``, data) and a site's overrides of it.

The pack is validated when it is loaded: a broken pack is a programming error and fails at import, so
it can never reach an exam room half-working.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources

import msgspec

from examwatch.kernel.catalog import METRICS
from examwatch.kernel.config import Strict
from examwatch.kernel.model import DEVICE_KINDS
from examwatch.rules.config import RuleOverride
from examwatch.rules.model import Rule, rule_issues
from examwatch.rules.schedule import PHASES


class _Pack(Strict):
    rules: list[Rule]


def load_pack(text: str) -> list[Rule]:
    """Parse and check a rule pack; raise ``ValueError`` naming every broken rule."""
    rules = msgspec.convert(tomllib.loads(text), _Pack).rules
    problems = [f"{r.id}: {p}" for r in rules for p in rule_issues(r, set(METRICS), DEVICE_KINDS, PHASES)]
    ids = [r.id for r in rules]
    problems += [f"{i}: rule id used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    known = set(ids)
    problems += [f"{r.id}: replaces unknown rule {x!r}" for r in rules for x in r.replaces if x not in known]
    if problems:
        raise ValueError("rule pack: " + "; ".join(problems))
    return rules


DEFAULT_RULES: list[Rule] = load_pack(
    resources.files("examwatch.rules").joinpath("pack.toml").read_text(encoding="utf-8")
)


def apply_override(rule: Rule, o: RuleOverride) -> Rule:
    changes: dict[str, object] = {}
    for name in ("threshold", "clear", "for_", "level"):
        if (value := getattr(o, name)) is not None:
            changes[name] = float(value) if name != "level" else value
    if o.levels is not None:
        changes["levels"] = {**rule.levels, **o.levels}
    return msgspec.structs.replace(rule, **changes)


def effective_rules(overrides: Mapping[str, RuleOverride], pack: list[Rule] = DEFAULT_RULES) -> list[Rule]:
    """The pack with a site's overrides applied and disabled rules left out."""
    out = []
    for rule in pack:
        o = overrides.get(rule.id)
        if o is not None and o.enabled is False:
            continue
        out.append(apply_override(rule, o) if o is not None else rule)
    return out


def override_issues(
    overrides: Mapping[str, RuleOverride], pack: list[Rule] = DEFAULT_RULES
) -> list[tuple[tuple[str, ...], str]]:
    """Problems an override makes in its rule (e.g. ``clear`` on the wrong side of ``threshold``),
    as (key path, message) for the config checker. Unknown ids are the checker's own business."""
    by_id = {r.id: r for r in pack}
    issues: list[tuple[tuple[str, ...], str]] = []
    for rule_id, o in overrides.items():
        if rule_id in by_id:
            rule = apply_override(by_id[rule_id], o)
            issues += [(("rules", rule_id), p) for p in rule_issues(rule, set(METRICS), DEVICE_KINDS, PHASES)]
    return issues


__all__ = ["DEFAULT_RULES", "DEVICE_KINDS", "apply_override", "effective_rules", "load_pack", "override_issues"]
