"""The house's layering, read from the code's own imports (every import, also those inside functions).

Arrows only run down: the command line on top; edge (the room agent) and gateway beside each other, never
importing each other; collectors and rules below them; the kernel at the bottom, importing none of them.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernel", "rules", "collectors", "channels", "edge", "gateway", "simulators")
FOLDERS = {"cli": ROOT / "examwatch", **{p: ROOT / p for p in PACKAGES}}
MAX_LINES = 450

# What each package may import of the others (the cli may import anything).
ALLOWED = {
    "kernel": set(),
    "rules": {"kernel"},
    "collectors": {"kernel"},
    "channels": {"kernel"},  # the incident channels: the gateway's notifier and an agent's fallback send through them
    "edge": {"kernel", "rules", "collectors", "channels"},
    "gateway": {"kernel", "rules", "channels"},
    "simulators": {"kernel", "collectors", "channels", "edge", "gateway", "rules"},  # the demo runs a whole site
    "cli": set(PACKAGES),
}
# Third-party libraries the bottom layers may use: the vocabulary's structs are msgspec structs, and the
# kernel's file helpers log (structlog) when they tighten a mode. The rules never log.
THIRD_PARTY = {"kernel": {"msgspec", "structlog"}, "rules": {"msgspec"}}


def imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield from (f"{node.module}.{a.name}" for a in node.names)


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "examwatch" or len(parts) == 1 or parts[1] == "__version__":
        return None  # the namespace's own __init__ holds only the version
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1] if parts[1] in PACKAGES else None


def edges() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files that import it."""
    out: dict[str, dict[str, set[str]]] = {p: {} for p in FOLDERS}
    for pkg, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            for module in imports(path):
                target = package_of(module)
                if target is not None and target != pkg:
                    out[pkg].setdefault(target, set()).add(str(path.relative_to(ROOT)))
    return out


def test_each_package_imports_only_what_lies_below_it() -> None:
    wrong = {
        f"{pkg} -> {target}: {sorted(files)}"
        for pkg, targets in edges().items()
        for target, files in targets.items()
        if target not in ALLOWED[pkg]
    }
    assert not wrong, "\n".join(sorted(wrong))


def test_no_package_cycles() -> None:
    graph = {pkg: set(targets) for pkg, targets in edges().items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    assert not [p for p in graph if reaches(p, p, set())]


@pytest.mark.parametrize("pkg", ["kernel", "rules"])
def test_the_bottom_layers_use_only_the_standard_library_and_their_few_libraries(pkg: str) -> None:
    third_party = set()
    for path in FOLDERS[pkg].rglob("*.py"):
        for module in imports(path):
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in {"examwatch", "__future__"}:
                third_party.add(top)
    assert third_party <= THIRD_PARTY[pkg]


def test_no_source_file_over_the_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for folder in [*FOLDERS.values(), ROOT / "bench"]
        for p in folder.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long


def test_every_package_folder_is_installed() -> None:
    """pyproject lists the packages explicitly (one namespace over several folders): a new sub-package left out
    works from the source tree and is missing from an installed gateway."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((name, *parts)))
    assert found == set(setuptools["packages"])
