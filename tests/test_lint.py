"""ruff (lint and format) and mypy over the tree, as configured in pyproject.toml: part of the test command."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_ruff_check() -> None:
    done = run("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr


def test_ruff_format_is_clean() -> None:
    done = run("ruff", "format", "--check", "--no-cache", ".")
    assert done.returncode == 0, "run `ruff format .`\n" + done.stdout[-5000:] + done.stderr


def link_tree(into: Path) -> dict[str, str]:
    """The installed namespace as mypy must see it: examwatch/<sub> -> the top-level folder pyproject maps it to.

    mypy cannot follow the editable install's import hook, so it reads this tree of links instead.
    Returns the link prefixes and the folders they stand for, to report paths as they are in the repository.
    """
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-dir"
    ]
    top = into / "examwatch"
    top.mkdir(parents=True)
    for py in (ROOT / package_dir["examwatch"]).glob("*.py"):
        (top / py.name).symlink_to(py)
    names = {}
    for package, folder in package_dir.items():
        sub = package.removeprefix("examwatch.")
        if package != "examwatch":
            (top / sub).symlink_to(ROOT / folder, target_is_directory=True)
            names[f"examwatch/{sub}/"] = f"{folder}/"
    return names


def test_mypy(tmp_path: Path) -> None:
    names = link_tree(tmp_path / "tree")
    done = run(
        "mypy",
        "-p",
        "examwatch",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "cache"),
        cwd=tmp_path / "tree",
    )
    report = done.stdout + done.stderr
    for link, folder in names.items():
        report = report.replace(link, folder)
    assert done.returncode == 0, report[-5000:]
    assert "Success" in done.stdout  # it checked something: a tree it could not read fails differently
