"""The pipeline config at its edge: each field checked once, when it loads."""

from __future__ import annotations

import pytest

from components.errors import ConfigError
from pipelines.cli import main
from pipelines.config import load_pipeline_config
from pipelines.sections import RUNTIME, Loader, TransferConfig, key_fields


def test_the_storage_root_is_opened_once_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"^storage_root: cannot open 'nosuch://bucket/x'"):
        load_pipeline_config(None, ["storage_root=nosuch://bucket/x"])
    cfg = load_pipeline_config(None, [f"storage_root={tmp_path}"])
    assert cfg.root is cfg.root and cfg.root.local_path == tmp_path


def test_choices_are_enums_named_in_one_line_errors():
    assert load_pipeline_config(None, ["train.loader=ray_data"]).train.loader is Loader.RAY_DATA
    with pytest.raises(ConfigError, match=r"^taxonomy\.transform: 'log' is not one of sqrt, none$"):
        load_pipeline_config(None, ["taxonomy.transform=log"])


def test_fields_marked_runtime_enter_no_key():
    t = TransferConfig()
    science = key_fields(t, RUNTIME)
    assert "stack" not in science and "cpus_per_readout" not in science and "max_retries" not in science
    assert {"epochs", "lr", "width", "seed", "orders", "replicates"} <= set(science)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tasks=[normal,reshading,normal]"], r"^tasks: 'normal' is listed twice$"),
        (["tasks=[colorization]"], r"^tasks: every task \(colorization\) is source-only"),
        (
            [
                "task_definitions={x: {column: normal, kind: pixel, loss: l1, channels: 1}}",
                "tasks=[x,normal]",
            ],
            r"^task_definitions\.x\.channels: 1, but column 'normal' holds float16 of shape \(3, 64, 64\)$",
        ),
        (
            [
                "task_definitions={x: {column: normal, kind: pixel, loss: cross_entropy, channels: 4}}",
                "tasks=[x]",
            ],
            r"^task_definitions\.x\.loss: cross_entropy needs integer class labels, but column 'normal'",
        ),
        (
            ["task_definitions={x: {column: room_layout, kind: pixel, loss: l2, channels: 9}}", "tasks=[x]"],
            r"^task_definitions\.x\.kind: pixel, but column 'room_layout' holds float32 of shape \(9,\)",
        ),
        (
            [
                "task_definitions={x: {column: depth_zbuffer, kind: vector, loss: l2, channels: 1}}",
                "tasks=[x]",
            ],
            r"^task_definitions\.x\.kind: vector, but column 'depth_zbuffer'",
        ),
    ],
)
def test_a_study_that_would_crash_after_training_is_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(None, overrides)


def test_every_built_in_task_fits_its_generated_column():
    from components.tasks import TASKS

    cfg = load_pipeline_config(None, ["data.size=32", "model.downsample=4", f"tasks=[{','.join(TASKS)}]"])
    assert set(cfg.tasks) == set(TASKS) and cfg.data.size == 32


def test_an_empty_config_file_or_bad_yaml_is_one_line_not_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        load_pipeline_config(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [normal\nname: x\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML \(line \d+, column \d+\): ") as err:
        load_pipeline_config(broken)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["{", "[1, 2", "'open", "a: b: c", "@x"])
def test_a_malformed_set_value_is_one_line_naming_it(value, tmp_path, capsys):
    """Was a YAML ParserError traceback, rc 1, from `run` and `submit` alike."""
    with pytest.raises(ConfigError, match=r"^--set train\.epochs: its value is not valid YAML \(") as err:
        load_pipeline_config(None, [f"train.epochs={value}"])
    assert "\n" not in str(err.value)
    for command in (["run", "--dry-run"], ["submit", "--address", "http://127.0.0.1:9", "--dry-run"]):
        assert main([*command, "--set", f"storage_root={tmp_path}", "--set", f"train.epochs={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--set train.epochs: its value" in err, err


@pytest.mark.parametrize("n", [1, 5, 9])
def test_a_bootstrap_too_small_for_a_share_is_refused_at_load(n):
    """A share (p_best, a taxonomy's stability) of 1 to 9 resamples is not one; 0: no bootstrap."""
    with pytest.raises(ConfigError, match=r"^analysis\.bootstrap: "):
        load_pipeline_config(None, [f"analysis.bootstrap={n}"])
    assert load_pipeline_config(None, ["analysis.bootstrap=0"]).analysis.bootstrap == 0
    assert load_pipeline_config(None, ["analysis.bootstrap=10"]).analysis.bootstrap == 10


def test_data_size_defaults_to_the_datasets_own(tiny_dataset):
    cfg = load_pipeline_config(None, [f"data.path={tiny_dataset}", "model.downsample=4", "tasks=[normal]"])
    assert cfg.data.size == 32  # the tiny dataset's images
    assert load_pipeline_config(None, ["tasks=[normal]"]).data.size == 64  # generated scenes' default
    with pytest.raises(ConfigError, match=r"^data\.size: 64, but the images at data\.path .* are 32x32"):
        load_pipeline_config(None, [f"data.path={tiny_dataset}", "data.size=64", "tasks=[normal]"])


def test_network_replicates_are_at_least_one_and_never_more_than_the_readouts_read():
    assert load_pipeline_config(None, []).train.replicates == 1
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match=rf"^train\.replicates must be >= 1, got {bad}$") as err:
            load_pipeline_config(None, [f"train.replicates={bad}"])
        assert "\n" not in str(err.value)
    assert load_pipeline_config(None, ["train.replicates=3", "transfer.replicates=3"]).train.replicates == 3
    # network replicate r mod N is read by readout replicate r: with N > R some would never be read
    with pytest.raises(
        ConfigError, match=r"^train\.replicates: 3 networks per task, but transfer\.replicates is 2"
    ):
        load_pipeline_config(None, ["train.replicates=3", "transfer.replicates=2"])
