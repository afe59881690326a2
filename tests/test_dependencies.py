"""Every third-party module the code imports is declared in pyproject.toml, in the extra that installs it.

A dependency that only this machine happens to have passes every test here and fails on a Raspberry Pi
(finding 14: SNMPv3 privacy needs ``cryptography``, which pysnmp imports only when asked to encrypt).
tests/run.sh installs into a fresh virtual environment for the same reason; this test names the culprit.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"examwatch", "bench", "tests"}  # the project itself: one namespace, plus the scripts and tests beside it
# Which groups of pyproject.toml may provide an import, by the folder that imports it: the agent and the
# gateway the main dependencies, the gateway its own extra too (its web side and records: the rooms' Pis
# install none of it) and the postgresql extra for that store; the simulators also the demo extra; bench/
# and tests/ everything.
GROUPS = {
    "edge": ("main",),
    "collectors": ("main",),
    "rules": ("main",),
    "gateway": ("main", "gateway", "postgresql"),  # psycopg only when [store] backend = "postgresql"
    "kernel": ("main",),
    "examwatch": ("main",),
    "simulators": ("main", "demo", "postgresql"),
    "bench": ("main", "demo", "test", "postgresql"),
    "tests": ("main", "demo", "test", "postgresql"),
}
# Imported by a dependency only when a feature is used, so no import of ours shows them: (group, why).
NEEDED_LAZILY = {"cryptography": ("main", "pysnmp imports it only for SNMPv3 privacy (AES, DES)")}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """Group ("main" or an extra) -> distribution names, with extras of examwatch itself expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    raw = {"main": project["dependencies"], **project["optional-dependencies"]}

    def names(group: str) -> set[str]:
        out: set[str] = set()
        for req in raw[group]:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", req)
            assert m, f"cannot read requirement {req!r}"
            if normalise(m.group(1)) == "examwatch":
                for extra in (m.group(2) or "").split(","):
                    out |= names(extra.strip())
            else:
                out.add(normalise(m.group(1)))
        return out

    return {group: names(group) for group in raw}


def imports() -> dict[str, dict[str, str]]:
    """Folder -> third-party top-level module -> the first file importing it."""
    out: dict[str, dict[str, str]] = {}
    for folder in GROUPS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in LOCAL and top not in sys.stdlib_module_names:
                        out.setdefault(folder, {}).setdefault(top, str(path.relative_to(ROOT)))
    return out


def test_every_imported_module_is_declared_in_the_right_group() -> None:
    groups = declared()
    providers = importlib.metadata.packages_distributions()
    problems = []
    for folder, modules in imports().items():
        allowed = set().union(*(groups[g] for g in GROUPS[folder]))
        for module, where in sorted(modules.items()):
            dists = {normalise(d) for d in providers.get(module, [])}
            if not dists:
                problems.append(f"{where} imports {module}, which no installed distribution provides: declare it")
            elif not dists & allowed:
                problems.append(
                    f"{where} imports {module} ({', '.join(sorted(dists))}), not in {' or '.join(GROUPS[folder])}"
                )
    assert not problems, "\n".join(problems)


def test_what_dependencies_import_lazily_is_declared_and_works() -> None:
    groups = declared()
    for dist, (group, why) in NEEDED_LAZILY.items():
        assert dist in groups[group], f"{dist} must be in {group}: {why}"
    import pysnmp.hlapi.v3arch.asyncio  # noqa: F401 - what the collector imports; the priv modules alone import in a cycle
    from pysnmp.proto.secmod.rfc3826.priv import aes

    assert not aes.PysnmpCryptoError, (
        "pysnmp cannot encrypt: SNMPv3 privacy would fail with 'Ciphering services not available'"
    )


def test_the_scan_sees_imports_and_groups() -> None:
    """The scan itself: it finds our known imports where they are, and reads the extras."""
    found = imports()
    assert found["collectors"]["serial"] == "collectors/megatec.py"
    assert "snmpsim" in found["simulators"] and "snmpsim" not in found.get("collectors", {})
    groups = declared()
    assert "pytest" in groups["test"] and "snmpsim" in groups["test"] and "pytest" not in groups["main"]
