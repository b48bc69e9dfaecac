"""Nothing damaged is reused: a step's marker records its files' sizes and checksums and a rerun
checks them; a readout file carries a digest of its losses; a damaged feature block is named."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from components.storage import location
from components.transfer import FeatureKind, FeatureSource, Readout, TransferPlan
from components.transfer.feature_files import FEATURES_DONE, joined_blocks
from components.transfer.readout_files import READOUT_META, ReadoutOutcome, stored_outcome, write_readout
from pipelines.config import load_pipeline_config
from pipelines.stage2.features import FeatureCache
from pipelines.steps import FILES, Step, unfenced


def finished_step(tmp_path) -> Step:
    step = Step(location(tmp_path), "stage1/normal", "k1")
    (step.location / "model.pt").write_bytes(b"weights" * 100)
    (step.location / "losses" / "normal.parquet").write_bytes(b"table")
    step.finish({"task": "normal"}, fence=unfenced)
    return step


def test_a_finished_step_records_its_files_and_is_reused_while_they_hold(tmp_path):
    step = finished_step(tmp_path)
    assert set(step.marker.read_json()[FILES]) == {"model.pt", "losses/normal.parquet"}
    assert step.complete and step.info() == {"task": "normal"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_a_damaged_file_makes_its_step_run_again_said_in_one_line(tmp_path, capsys, damage):
    step = finished_step(tmp_path)
    weights = step.location / "model.pt"
    if damage == "truncate":
        weights.write_bytes(b"weig")
    elif damage == "flip":
        weights.write_bytes(b"WEIGHTS" * 100)  # same size, other bytes
    else:
        weights.unlink()
    assert not step.complete
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(weights) in line and "stage1/normal is done again" in line
    assert not step.marker.exists() and not weights.exists()  # nothing left to reuse by mistake


def test_a_truncated_marker_is_an_unfinished_step_not_a_traceback(tmp_path, capsys):
    step = finished_step(tmp_path)
    step.marker.write_text('{"task": "nor')
    assert not step.complete
    assert "done.json cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text", ["", "   ", "null", "[]", '"done"', '{"files": 3}', '{"files": {"model.pt": 7}}', "\x00" * 16]
)
def test_an_empty_or_invalid_marker_is_named_removed_and_its_step_done_again(tmp_path, capsys, text):
    """Read, not just found: a marker that is empty or not a step's record was taken as done, and
    the first reader failed on every rerun."""
    step = finished_step(tmp_path)
    step.marker.write_text(text)
    assert not step.complete
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"{step.marker} cannot be read" in line and "stage1/normal is done again" in line
    assert not step.marker.exists()


def test_an_empty_or_invalid_feature_marker_is_named_removed_and_encoded_again(tmp_path, capsys):
    """A feature folder's `done.json` was only found: an empty one was taken as complete, and
    every readout on it failed with a JSONDecodeError, on every rerun."""
    cfg = load_pipeline_config(overrides=[f"storage_root={tmp_path}", "tasks=[autoencoding,normal]"])
    sources = {t: FeatureSource(t, FeatureKind.ENCODER, f"key-{t}") for t in ("autoencoding", "normal")}
    plan = TransferPlan(("normal",), ("autoencoding",), (), (), (), ())
    cache = _RecordingCache(cfg, SimpleNamespace(data_version="v1"), use_gpu=False)
    [folder] = [cache.folder(sources["autoencoding"], v) for v in {cfg.task("normal").input}]
    for text in ["", "{", "[]", '{"rows": 3}', '{"attempt": 3}']:
        (folder / FEATURES_DONE).write_text(text)
        assert cache.ensure(sources, plan) == {("autoencoding", folder.name): folder.uri}
        assert cache.encoded == [[(sources["autoencoding"], cfg.task("normal").input)]], text
        [line] = capsys.readouterr().err.strip().splitlines()
        assert f"{folder / FEATURES_DONE} cannot be read" in line and "encoded again" in line
        assert not (folder / FEATURES_DONE).exists()
        cache.encoded.clear()
    (folder / FEATURES_DONE).write_json({"attempt": "a1"})  # a good one is reused, quietly
    cache.ensure(sources, plan)
    assert cache.encoded == [] and capsys.readouterr().err == ""


@dataclass
class _RecordingCache(FeatureCache):
    """The feature cache with its Ray pass replaced by a record of what it would encode."""

    encoded: list = field(default_factory=list)

    def encode(self, pairs):
        self.encoded.append(pairs)


def test_a_marker_from_before_checksums_is_taken_as_it_is(tmp_path):
    step = Step(location(tmp_path), "affinity", "k2")
    (step.location / "affinity.parquet").write_bytes(b"x")
    step.marker.write_json({"key": "k2"})
    assert step.complete and step.info() == {"key": "k2"}


def stored_readout(tmp_path):
    r = Readout("normal", ("reshading",))
    path = location(tmp_path / "readouts" / "normal" / "reshading.k.parquet")
    outcome = ReadoutOutcome(r, 0.5, 1.0, (0.9, 0.7), 0.6)
    write_readout(path, outcome, np.array(["a", "b", "c"]), np.array([0.1, 0.5, 0.9], np.float32))
    return r, path


def test_a_stored_readout_is_reused_while_its_losses_match_their_digest(tmp_path):
    r, path = stored_readout(tmp_path)
    assert stored_outcome(path, r).mean_loss == 0.5


def test_a_readout_whose_losses_changed_or_that_was_cut_short_is_trained_again(tmp_path, capsys):
    r, path = stored_readout(tmp_path)
    table = path.read_parquet()
    changed = table.set_column(3, "loss", pa.array([0.1, 0.5, 0.0], pa.float32()))
    path.write_parquet(changed.replace_schema_metadata({READOUT_META: table.schema.metadata[READOUT_META]}))
    assert stored_outcome(path, r) is None and not path.exists()
    assert "is damaged" in capsys.readouterr().err

    r, path = stored_readout(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert stored_outcome(path, r) is None and not path.exists()
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(path) in line and "trained again" in line


def test_a_damaged_feature_block_is_named_and_its_folder_encoded_again(tmp_path):
    view = location(tmp_path / "features" / "enc" / "v1" / "none")
    blocks = view / "a1" / "test"
    for i in range(2):
        (blocks / f"{i}.npz").write_bytes(b"")
    (blocks / "0.npz").write_bytes(b"PK\x03\x04 truncated")
    (view / FEATURES_DONE).write_json({"attempt": "a1"})
    with pytest.raises(
        RuntimeError, match=r"feature block .*0\.npz is damaged .*encoded again on the next run"
    ):
        joined_blocks(blocks)
    assert not (view / FEATURES_DONE).exists()
