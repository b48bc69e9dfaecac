"""The house rules, checked on the code itself: components never import pipelines, the baselines
are named in one module, the environment is read in one module and no test switch in any, and a
stage's result can be read without loading torch or Ray."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_NAMES = {"self", "pixels", "random", "scratch"}


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_components_never_import_pipelines_ray_or_mlflow():
    for path in sources("components"):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("pipelines", "ray", "mlflow")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_baselines_are_named_in_the_vocabulary_alone():
    for path in [*sources("components"), *sources("pipelines")]:
        if path.name == "vocabulary.py":
            continue
        literals = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and node.value in BASELINE_NAMES
        }
        assert not literals, f"{path.relative_to(ROOT)} spells {sorted(literals)}: use components.vocabulary"


def test_the_environment_is_read_in_settings_alone():
    for path in [*sources("components"), *sources("pipelines")]:
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            reads = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "getenv")
                and ast.unparse(node.func.value) in ("os.environ", "os")
            ) or (
                isinstance(node, ast.Subscript)
                and ast.unparse(node.value) == "os.environ"
                and isinstance(node.ctx, ast.Load)
            )
            assert not reads, f"{path.relative_to(ROOT)}:{node.lineno} reads the environment: use settings"


def test_faults_are_injected_through_constructors_not_the_environment():
    """Tests hand a stage its faults (`Stage1.fail_at_epoch`, `Stage2.fail_readouts`); production
    code reads no test switch."""
    for path in [*sources("components"), *sources("pipelines")]:
        assert "TASKATLAS_TEST" not in path.read_text(), f"{path.relative_to(ROOT)} reads a test switch"


def test_results_and_the_vocabulary_load_neither_torch_nor_ray():
    probe = (
        "import json, sys; import pipelines.results, components.vocabulary; "
        "print(json.dumps(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
