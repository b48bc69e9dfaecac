"""Tasks as data: definitions in YAML, validated at load, and part of exactly the keys they affect."""

import pytest

from components.errors import ConfigError
from components.tasks import TASKS, InputTransform, Loss, define_tasks, task_from_definition
from components.transfer import Readout, ReadoutKind, baseline
from pipelines.cli import main
from pipelines.config import load_pipeline_config
from pipelines.hparams import HParams
from pipelines.results import TaskResult
from pipelines.stage1.plan import Stage1Plan
from pipelines.stage2.plan import Stage2Plan

EDGES = {"column": "edge_occlusion", "kind": "pixel", "loss": "l1", "channels": 1}


def test_the_builtin_catalog_is_the_yaml_form():
    assert TASKS["denoising"].input is InputTransform.NOISE and TASKS["colorization"].source_only
    assert TASKS["segment_semantic"].definition() == {
        "column": "segment_semantic",
        "kind": "pixel",
        "loss": "cross_entropy",
        "channels": 6,
        "input": "none",
        "source_only": False,
    }
    for name, task in TASKS.items():  # definition() round-trips
        assert task_from_definition(name, task.definition()) == task


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ({**EDGES, "loss": "huber"}, r"^task_definitions.mine.loss: 'huber' is not one of l1, l2"),
        ({**EDGES, "colour": 1}, r"^task_definitions.mine.colour: unknown field"),
        ({k: v for k, v in EDGES.items() if k != "kind"}, r"^task_definitions.mine.kind: required"),
        ({**EDGES, "channels": 0}, r"^task_definitions.mine.channels: expected a positive integer"),
        ({**EDGES, "loss": "cross_entropy"}, r"^task_definitions.mine.loss: cross_entropy needs"),
        ({**EDGES, "source_only": "yes"}, r"^task_definitions.mine.source_only: expected true or false"),
        ({**EDGES, "column": "nope"}, r"^task_definitions.mine.column: the dataset has no column 'nope'"),
        ("l1", r"^task_definitions.mine: a task definition is a mapping"),
        ({**EDGES, "column": "/tmp/x"}, r"^task_definitions.mine.column: '/tmp/x' is not a column name"),
        ({**EDGES, "column": "../x"}, r"^task_definitions.mine.column: '../x' is not a column name"),
        ({**EDGES, "column": ".."}, r"^task_definitions.mine.column: '..' is not a column name"),
        ({**EDGES, "column": "a/b"}, r"^task_definitions.mine.column: 'a/b' is not a column name"),
    ],
)
def test_a_bad_definition_fails_at_load_naming_task_and_field(definition, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(None, ["tasks=[normal,mine]", f"task_definitions={{mine: {definition!r}}}"])


def test_a_bad_definition_is_one_line_from_the_cli(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"storage_root: {tmp_path}\ntasks: [mine]\ntask_definitions: {{mine: {{column: rgb}}}}\n"
    )
    assert main(["run", "-c", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task_definitions.mine.kind: required" in err


def test_an_override_changes_only_the_fields_it_names():
    catalog = define_tasks({"normal": {"loss": "l2"}, "mine": EDGES}, TASKS)
    assert catalog["normal"].loss is Loss.L2 and catalog["normal"].column == "normal"
    assert catalog["mine"].column == "edge_occlusion" and catalog["reshading"] == TASKS["reshading"]


def test_a_definition_changes_the_keys_of_what_depends_on_it_and_nothing_else(tmp_path, tiny_dataset):
    from components.data.shards import ShardStore

    store = ShardStore(tiny_dataset)
    base = [f"storage_root={tmp_path}", "tasks=[normal,reshading]", "data.size=32", "model.downsample=4"]
    before = load_pipeline_config(None, base)
    after = load_pipeline_config(None, [*base, "task_definitions={normal: {loss: l2}}"])
    hparams = Stage1Plan(before, store).default_hparams()

    def where(cfg, task: str):
        stage1 = Stage1Plan(cfg, store)
        return stage1.train_step(cfg.task(task), hparams), stage1.search_step(cfg.task(task))

    assert where(before, "normal")[0] != where(after, "normal")[0]
    assert where(before, "normal")[1] != where(after, "normal")[1]
    assert where(before, "reshading") == where(after, "reshading")

    # Readouts: those into normal change; those out of it change only once its network does.
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    results = {
        t: TaskResult(t, f"k-{t}", str(model), 0.0, HParams(1e-3, 1e-4, 32), "", "1")
        for t in ("normal", "reshading")
    }
    old, new = (Stage2Plan(cfg, store).readout_keys(results) for cfg in (before, after))
    readouts = [
        Readout("normal", ("reshading",)),
        baseline("normal", ReadoutKind.PIXELS),
        Readout("reshading", ("normal",)),
        Readout("reshading", ("normal", "reshading")),
        baseline("reshading", ReadoutKind.SELF),
    ]
    changed = [r.name for r in readouts if old.key(r) != new.key(r)]
    assert changed == ["reshading->normal", "pixels->normal"]
