"""Every third-party module the project imports is declared in pyproject.toml, and none of its
private modules is imported outside pipelines/compat.py. Read from the source (AST), no network:
a package that only comes with Ray or MLflow today can leave with their next release, and a
private module can change in any release.

Runtime code (pipelines/, components/) must be covered by `dependencies`; tests, tools and
benchmarks by `dependencies` or the `dev` extra. An import made only where the package is
installed (inside `try: ... except ImportError`, or in a function that first checks
`importlib.util.find_spec("name")`) is optional and need not be declared."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pipelines", "components", "tools", "benchmarks", "tests")
RUNTIME = ("pipelines", "components")
OWN = {"components", "pipelines", "tests", "benchmarks", "tools"}
COMPAT = "pipelines/compat.py"  # the one file allowed to import a private module


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root, posix
    line: int
    module: str  # dotted, as written (`from a.b import c` -> "a.b")
    names: tuple[str, ...]  # what a `from` import takes ("" for a plain import)
    optional: bool  # made only where the package is installed

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if handler.type is None or any(
            isinstance(t, ast.Name) and t.id in {"ImportError", "ModuleNotFoundError"} for t in types
        ):
            return True
    return False


def _checks_find_spec(scope: ast.AST, top: str) -> bool:
    return any(
        isinstance(n, ast.Call)
        and (getattr(n.func, "attr", None) or getattr(n.func, "id", None)) == "find_spec"
        and n.args
        and isinstance(n.args[0], ast.Constant)
        and n.args[0].value == top
        for n in ast.walk(scope)
    )


def _local(top: str, file: Path) -> bool:
    """A sibling module (tests import `test_transfer`, `study`: pytest puts tests/ on sys.path)."""
    return (file.parent / f"{top}.py").is_file() or (file.parent / top / "__init__.py").is_file()


def third_party_imports(root: Path, folders=FOLDERS) -> list[Import]:
    """The imports of a module outside the standard library and the project, in `folders` of
    `root`."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    pairs = [(alias.name, ()) for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    pairs = [(node.module, tuple(alias.name for alias in node.names))]
                else:
                    continue
                for module, names in pairs:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in OWN or _local(top, path):
                        continue
                    found.append(
                        Import(
                            path.relative_to(root).as_posix(),
                            node.lineno,
                            module,
                            names,
                            _optional(node, top, parents),
                        )
                    )
    return found


def _optional(node: ast.AST, top: str, parents: dict) -> bool:
    child, up = node, parents.get(node)
    while up is not None:
        if isinstance(up, ast.Try) and child in up.body and _catches_import_error(up):
            return True
        if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)) and _checks_find_spec(up, top):
            return True
        child, up = up, parents.get(up)
    return False


def private_imports(imports: list[Import]) -> list[str]:
    """`file:line module` for each import of a private module or name, outside COMPAT."""
    bad = []
    for imp in imports:
        if imp.file == COMPAT:
            continue
        parts = imp.module.split(".")[1:]
        hits = [p for p in parts if _private(p)] + [n for n in imp.names if _private(n)]
        if hits:
            what = imp.module + (f" import {', '.join(imp.names)}" if imp.names else "")
            bad.append(f"{imp.where}: {what} (private: {', '.join(hits)})")
    return bad


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    """The distribution of a PEP 508 requirement: extras, versions and markers stripped."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"pyproject.toml: cannot read the requirement {requirement!r}"
    return _canonical(match.group(1))


def declared(pyproject: Path) -> tuple[set[str], set[str]]:
    """(runtime, dev): the canonical distribution names of `dependencies` and of the `dev` extra."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    runtime = {_requirement_name(r) for r in project.get("dependencies", [])}
    dev = {_requirement_name(r) for r in project.get("optional-dependencies", {}).get("dev", [])}
    return runtime, dev


def undeclared(imports: list[Import], runtime: set[str], dev: set[str], distributions=None) -> list[str]:
    """`module (file:line, ...): why` for each imported third-party module that pyproject.toml
    does not declare where the importing files need it."""
    distributions = importlib.metadata.packages_distributions() if distributions is None else distributions
    problems: dict[tuple[str, str], list[str]] = {}
    for imp in imports:
        if imp.optional:
            continue
        is_runtime = imp.file.split("/")[0] in RUNTIME
        allowed = runtime if is_runtime else runtime | dev
        dists = {_canonical(d) for d in distributions.get(imp.top, [])}
        if not dists:
            why = "not installed here, so its distribution is unknown: install and declare it"
        elif dists & allowed:
            continue
        elif dists & dev:
            why = f"{'/'.join(sorted(dists))} is only in the dev extra; runtime code needs it in dependencies"
        else:
            where = "dependencies" if is_runtime else "the dev extra (or dependencies)"
            why = f"distribution {'/'.join(sorted(dists))} is not declared in {where}"
        problems.setdefault((imp.top, why), []).append(imp.where)
    return [f"{top} ({', '.join(files)}): {why}" for (top, why), files in sorted(problems.items())]


# ---------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return third_party_imports(ROOT)


def test_the_walk_sees_the_projects_third_party_imports(imports):
    tops = {imp.top for imp in imports}
    assert {"ray", "mlflow", "torch", "requests"} <= tops
    assert not tops & OWN and "test_transfer" not in tops  # own and sibling modules are not third-party


def test_no_private_module_of_a_third_party_package_is_imported(imports):
    bad = private_imports(imports)
    assert not bad, (
        f"private third-party imports (move them into {COMPAT}, or use a public API):\n  " + "\n  ".join(bad)
    )


def test_every_imported_third_party_module_is_declared(imports):
    runtime, dev = declared(ROOT / "pyproject.toml")
    missing = undeclared(imports, runtime, dev)
    assert not missing, "imported but not declared in pyproject.toml:\n  " + "\n  ".join(missing)


# ---------------------------------------------------------------- the checks catch what they should


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_private_imports_are_named_by_file_and_line(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pipelines/submit.py": "import os\nfrom ray._private.thirdparty.pathspec import PathSpec\n",
            "pipelines/track.py": "from mlflow.utils import _x\nimport mlflow.tracking._tracking_service\n",
            "pipelines/compat.py": "from mlflow.tracking._tracking_service import utils\n",
            "pipelines/fine.py": "from ray.job_submission import JobStatus\nfrom pipelines.x import _own\n",
            "pipelines/x.py": "from torch import __version__\n",
        },
    )
    assert private_imports(third_party_imports(root)) == [
        "pipelines/submit.py:2: ray._private.thirdparty.pathspec import PathSpec (private: _private)",
        "pipelines/track.py:1: mlflow.utils import _x (private: _x)",
        "pipelines/track.py:2: mlflow.tracking._tracking_service (private: _tracking_service)",
    ]


def test_undeclared_modules_are_named_with_their_files(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pipelines/submit.py": "import requests\nimport yaml\n",
            "components/a.py": "import pandas\n",
            "tests/test_a.py": "import pandas\nimport jsonschema\nfrom sibling import x\n",
            "tests/sibling.py": "",
            "tools/t.py": "try:\n    import fancy\nexcept ImportError:\n    fancy = None\n",
            "benchmarks/b.py": (
                "import importlib.util\n"
                "def f():\n"
                "    if importlib.util.find_spec('gauge') is None:\n"
                "        return\n"
                "    import gauge\n"
                "import nowhere\n"
            ),
        },
    )
    distributions = {
        "requests": ["requests"],
        "yaml": ["PyYAML"],
        "pandas": ["pandas"],
        "jsonschema": ["jsonschema"],
    }
    assert undeclared(third_party_imports(root), {"pyyaml"}, {"pandas"}, distributions) == [
        "jsonschema (tests/test_a.py:2): distribution jsonschema is not declared in the dev extra (or dependencies)",
        "nowhere (benchmarks/b.py:6): not installed here, so its distribution is unknown: install and declare it",
        "pandas (components/a.py:1): pandas is only in the dev extra; runtime code needs it in dependencies",
        "requests (pipelines/submit.py:1): distribution requests is not declared in dependencies",
    ]


def test_requirements_are_read_without_extras_versions_or_markers(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "p"\ndependencies = ["ray[default,train]>=2.60,<2.61", "PyYAML>=6", '
        '"Pillow ; python_version>\'3\'", "ruamel.yaml"]\n'
        '[project.optional-dependencies]\ndev = ["moto[server]>=5", "pytest_timeout==2.3"]\n'
    )
    assert declared(tmp_path / "pyproject.toml") == (
        {"ray", "pyyaml", "pillow", "ruamel-yaml"},
        {"moto", "pytest-timeout"},
    )
