"""The repository is self-contained: nothing in it reads, or tells a reader to open, a `shared`
folder beside the checkout (a clone does not have one). Its data live under `tests/data/`.

Scans the project's own text files (README.md, docs/*.md, the code, tests, benchmarks, tools,
configs and cluster manifests) line by line for a relative path into a sibling `shared` folder
(`..` then `shared`) and for a pathlib construction reaching one (a `parent`, `parents[n]` or
`..` part followed by a `shared` part). The word itself is fine: "shared by", a variable or field
named `shared`, `shared_sources`, `gcc -shared`. This file is left out of the scan: its examples
below are the very lines it looks for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("pipelines", "components", "tests", "benchmarks", "tools", "configs", "cluster", "examples")
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".service", ".timer"}
NAMES = {"Makefile", "Dockerfile"}
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".venv"}

_SHARED = r"""["']shared(?:["'/\\]|$)"""  # a path part `shared`, quoted: "shared", 'shared/data/...'
# .parent, .parents[2], "..", Path(".."), os.pardir
_UP = r"""(?:\bparents?\b(?:\[\s*-?\d+\s*\])?|["']\.\.["']\s*\)?|\bpardir\b)"""
SIBLING_SHARED = re.compile(
    "|".join(
        [
            r"(?<![\w.])\.\.[/\\]+shared\b",  # `..` then the part, in prose, commands or strings
            _UP + r"\s*[/,]\s*" + _SHARED,  # ROOT.parent / then the part, parents[2] / it, "..", it
            _UP + r"\s*\.\s*joinpath\(\s*" + _SHARED,  # ROOT.parent.joinpath(then the part, ...)
        ]
    )
)


def offending_lines(text: str) -> list[int]:
    """The 1-based numbers of the lines of `text` that reach a sibling `shared` folder."""
    return [n for n, line in enumerate(text.splitlines(), 1) if SIBLING_SHARED.search(line)]


def scanned_files(root: Path) -> list[Path]:
    """README.md, docs/*.md, the top-level Makefile and pyproject.toml, and every text file under
    the project's own folders (caches and virtual environments left out)."""
    files = [root / name for name in SCANNED_FILES if (root / name).is_file()]
    files += sorted((root / "docs").glob("*.md"))
    for folder in SCANNED_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if SKIPPED_DIRS.intersection(path.relative_to(root).parts) or not path.is_file():
                continue
            if path.suffix in SUFFIXES or path.name in NAMES:
                files.append(path)
    return files


def references_outside(root: Path) -> list[str]:
    """`file:line: text` for each line, in the files `scanned_files` lists, that reaches a sibling
    `shared` folder (this test's own file left out)."""
    problems = []
    for path in scanned_files(root):
        if path.resolve() == Path(__file__).resolve():
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for n in offending_lines("\n".join(lines)):
            problems.append(f"{path.relative_to(root)}:{n}: {lines[n - 1].strip()}")
    return problems


def test_nothing_reaches_a_shared_folder_beside_the_checkout():
    problems = references_outside(ROOT)
    assert not problems, "outside the repository (a clone has no sibling folder):\n" + "\n".join(problems)


def test_the_scan_covers_the_project():
    names = {p.relative_to(ROOT).as_posix() for p in scanned_files(ROOT)}
    assert {"README.md", "docs/design.md", "pipelines/cli.py", "benchmarks/taxonomy_solver.py"} <= names
    assert "tests/data/taskonomy/README.md" in names


def sibling(text: str) -> str:
    """The examples name the sibling folder `<S>`, so that this file holds no such path itself."""
    return text.replace("<S>", "sha" + "red")


@pytest.mark.parametrize(
    "line",
    [  # lines the repository used to have
        'TASKONOMY_16K = ROOT.parent / "<S>" / "data" / "taskonomy" / "affinities_16k.csv"',
        'TASKONOMY_16K = Path(__file__).resolve().parents[2] / "<S>" / "data" / "taskonomy" / "affinities_16k.csv"',
        'DEFAULT_AFFINITIES = ROOT.parent / "<S>" / "data" / "taskonomy" / "affinities_16k.csv"',
        "taskatlas solve --affinities ../<S>/data/taskonomy/affinities_16k.csv --budget 8 --max-order 4 --json",
        "algorithms are in `../<S>/design.md`. Given a finished study, it also tells where a new task",
        # and other ways to write them
        "data = here.parent.parent / '<S>/data'",
        'Path(__file__).parents[ 1 ]/"<S>"',
        'os.path.join(ROOT, "..", "<S>", "data")',
        'Path("..") / "<S>" / "design.md"',
        'os.path.join(os.pardir, "<S>")',
        'ROOT.parent.joinpath("<S>", "data")',
        "see ..\\<S>\\design.md",
        'cp ../<S>/data/taskonomy/*.csv tests/data/taskonomy/  # "../<S>" in a shell line',
    ],
)
def test_a_sibling_shared_path_is_caught(line):
    assert offending_lines(f"first line\n{sibling(line)}\n") == [2]


@pytest.mark.parametrize(
    "line",
    [
        "a tracking store shared by the nodes of a cluster; no shared volume is needed:",
        "shared = report.get('shared', [])  # a pruning.json written before shared sources: none",
        '"shared": list(plan.shared),',
        'members, common = _case("normal", seeds=(5, 6, 5), features="shared")',
        "everywhere = shared_sources(plan, estimates, shared)",
        'cmd = ["gcc", "-shared", "-fPIC", "-O1"]',
        "return prune_plan(plan, scores, p.top_k, p.audit_fraction, seed, p.shared)",
        'TASKONOMY_16K = ROOT / "tests" / "data" / "taskonomy" / "affinities_16k.csv"',
        "docs/shared-notes.md and ./shared/x stay inside the repository",
        'cache = ROOT / "<S>"  # a folder of the repository itself',
    ],
)
def test_ordinary_uses_of_the_word_pass(line):
    assert offending_lines(sibling(line)) == []


def test_a_failure_names_file_and_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("# Notes\n\nshared by all\n")
    (tmp_path / "benchmarks").mkdir()
    bench = tmp_path / "benchmarks" / "bench.py"
    bench.write_text(
        sibling('from pathlib import Path\n\nDATA = Path(__file__).parents[2] / "<S>" / "x.csv"\n')
    )
    (tmp_path / "README.md").write_text(sibling("Design: `../<S>/design.md`.\n"))
    assert references_outside(tmp_path) == [
        sibling("README.md:1: Design: `../<S>/design.md`."),
        sibling('benchmarks/bench.py:3: DATA = Path(__file__).parents[2] / "<S>" / "x.csv"'),
    ]
