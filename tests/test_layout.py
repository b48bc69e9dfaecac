"""The house rules, checked on the code itself: components never import pipelines, the baselines
are named in one module, the environment is read in one module and no test switch in any, and a
stage's result can be read without loading torch or Ray."""

from __future__ import annotations

import ast
import inspect
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


# Where Ray and MLflow may be imported in pipelines/ (the rooms of each stage package, design.md):
# Ray in the run side of a stage (its `run`, and what its run puts on Ray: the search, the trial
# and worker functions, the fan-out, the feature encoding) and the cluster's runtime and jobs;
# MLflow in `tracking/` and each stage's `record`.
RAY_ROOMS = {
    "pipelines/ray_runtime.py",
    "pipelines/compat.py",  # the private functions of both, pinned to their versions
    "pipelines/submit.py",
    "pipelines/stage1/run.py",
    "pipelines/stage1/search.py",
    "pipelines/stage1/trial.py",
    "pipelines/stage1/worker.py",
    "pipelines/stage1/loopback.py",
    "pipelines/stage1/train_state.py",
    "pipelines/stage1/ray_data.py",
    "pipelines/stage2/run.py",
    "pipelines/stage2/fanout.py",
    "pipelines/stage2/features.py",
    "pipelines/stage2/pruning.py",
    "pipelines/position/run.py",
}
MLFLOW_ROOMS = {
    "pipelines/compat.py",
    "pipelines/stage1/record.py",
    "pipelines/stage1/restore.py",
    "pipelines/position/record.py",
}


def test_ray_and_mlflow_are_imported_only_in_their_rooms():
    for path in sources("pipelines"):
        name = str(path.relative_to(ROOT))
        roots = {m.split(".")[0] for m in imported_modules(path)}
        assert "ray" not in roots or name in RAY_ROOMS, f"{name} imports Ray: its stage's run side only"
        mlflow_ok = name in MLFLOW_ROOMS or name.startswith("pipelines/tracking/")
        assert "mlflow" not in roots or mlflow_ok, f"{name} imports MLflow: tracking/ and record modules only"


def test_each_stage_package_has_its_plan_and_its_plan_is_pure():
    """A stage's plan is reads of the config, the data version and the step markers: no Ray, no
    MLflow, no torch (`--dry-run`, `nightly` and `position` ask it without starting anything)."""
    for stage in ("stage1", "stage2", "analysis"):
        plan = ROOT / "pipelines" / stage / "plan.py"
        bad = {m for m in imported_modules(plan) if m.split(".")[0] in ("ray", "mlflow", "torch")}
        bad |= {m for m in imported_modules(plan) if m.startswith("pipelines.tracking")}
        assert not bad, f"pipelines/{stage}/plan.py imports {sorted(bad)}"


def test_modules_and_classes_stay_small():
    """A module does one job in under 400 lines, a class in under 200 (issue 37's measure)."""
    for path in [*sources("components"), *sources("pipelines")]:
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                assert size <= 200, f"{path.relative_to(ROOT)}: class {node.name} is {size} lines"


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


def test_every_step_a_command_writes_is_fenced_by_its_study_lock():
    """The held lock is passed, not kept in a module: each stage is handed the lock's check
    (`Invocation.fence`) and hands it to `Step.finish`, whose `fence` has no default. Only steps
    written under no lock (tests, benchmarks) say `unfenced`; no pipeline module does."""
    for path in sources("pipelines"):
        if path.name != "steps.py":
            assert "unfenced" not in path.read_text(), f"{path.relative_to(ROOT)} writes a step unfenced"
    from pipelines.steps import Step

    assert inspect.signature(Step.finish).parameters["fence"].default is inspect.Parameter.empty
