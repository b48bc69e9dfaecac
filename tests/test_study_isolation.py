"""Two studies on one storage root and one MLflow store (issue 27, part 4): each registers its own
models, tagged with the task's definition; a nightly compares a challenger only with a champion of
its definition and moves only its own study's aliases; nightly state and the nightly lock are per
study. Real local MLflow stores throughout; the end-to-end test runs two real nightlies."""

import json
from datetime import date

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from components.errors import ConfigError
from components.models import ModelConfig
from components.study_lock import StudyLock, StudyLocked, lock_store
from components.tasks import get_task, task_from_definition
from pipelines.cli import main
from pipelines.config import load_pipeline_config
from pipelines.hparams import HParams
from pipelines.nightly import lock_command, promote, run_nightly
from pipelines.results import TaskResult
from pipelines.steps import unfenced
from pipelines.tracking.models import CHAMPION, NetworkSpec, Registration
from pipelines.tracking.registry import DEFINITION_TAG, STUDY_TAG, network_model, version_tags
from pipelines.tracking.runs import Tracker
from tests.study import write_study

L1 = get_task("normal")
L2 = task_from_definition("normal", {"loss": "l2"}, L1)  # what study `b` calls `normal`
MODEL = ModelConfig(width=8, downsample=4)
TEST = {
    "image_id": np.arange(2),
    "rgb": np.zeros((2, 3, 16, 16), np.uint8),  # (N, C, H, W), as the store reads them
    "normal": np.zeros((2, 3, 16, 16), np.float32),
}


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "shared", (tmp_path / "art").as_uri())


def _register(tracker, study: str, task, test_loss: float, tags: dict | None = None) -> TaskResult:
    """A network registered as Stage I registers it, under `study`'s name."""
    spec = NetworkSpec(task, MODEL, 16, 3)
    run = tracker.start_run(f"train/{task.name}")
    model_id = tracker.models.create_logged_model(run, task.name)
    name = network_model(study, task.name)
    registration = Registration(
        name, "m", "d", version_tags=version_tags(study, task) if tags is None else tags
    )
    version = tracker.models.log_task_network(
        run, model_id, spec.build().state_dict(), spec, registration, [Metric("final_test_loss", 0.5, 0, 0)]
    )
    if tracker.models.alias_version(name, CHAMPION) is None:
        tracker.models.set_alias(name, CHAMPION, version)
    return TaskResult(task.name, "k", "unused", test_loss, HParams(1e-3, 1e-4, 32), run, version, name)


def test_two_studies_register_apart_and_a_nightly_moves_only_its_own_champion(tracker):
    a = _register(tracker, "a", L1, 0.5)
    b = _register(tracker, "b", L2, 0.5)
    assert (a.registered, b.registered) == ("a-normal", "b-normal") and a.model_version == b.model_version
    tags_a = tracker.models.version_tags("a-normal", "1")
    tags_b = tracker.models.version_tags("b-normal", "1")
    assert tags_a[STUDY_TAG] == "a" and tags_b[STUDY_TAG] == "b"
    assert tags_a[DEFINITION_TAG] == L1.definition_hash != tags_b[DEFINITION_TAG] == L2.definition_hash

    # Study b's next night: a worse model than its champion stays a challenger, in b only.
    challenger = _register(tracker, "b", L2, 1e9)
    [p] = promote(tracker, "b", {"normal": challenger}, ["normal"], TEST, {"normal": L2})
    assert not p.promoted and p.champion_version == "1" and p.champion_loss is not None
    assert p.champion_definition == ""  # same definition: scored with its loss
    assert tracker.models.alias_version("b-normal", CHAMPION) == "1"
    assert tracker.models.alias_version("a-normal", CHAMPION) == "1"
    assert sorted(m.name for m in tracker.client.search_registered_models()) == ["a-normal", "b-normal"]


def test_a_champion_of_another_definition_is_not_scored_with_our_loss_and_is_replaced(tracker):
    _register(tracker, "a", L1, 0.5)  # the study's champion, when `normal` was l1
    redefined = _register(tracker, "a", L2, 1e9)  # far worse, but of another definition
    assert tracker.models.alias_version("a-normal", CHAMPION) == "1"
    [p] = promote(tracker, "a", {"normal": redefined}, ["normal"], TEST, {"normal": L2})
    assert p.promoted and p.champion_loss is None and p.champion_definition == L1.definition_hash
    assert tracker.models.alias_version("a-normal", CHAMPION) == redefined.model_version

    # A champion registered before the tag: its stored task says what it is.
    _register(tracker, "old", L1, 0.5, tags={"task": "normal"})
    new = _register(tracker, "old", L2, 1e9)
    [p] = promote(tracker, "old", {"normal": new}, ["normal"], TEST, {"normal": L2})
    assert p.promoted and p.champion_loss is None and p.champion_definition == L1.definition_hash


def test_a_nightly_of_another_study_on_the_root_is_waited_for_not_taken_for_ours(tmp_path):
    root = tmp_path / "runs"
    a = load_pipeline_config(str(write_study(tmp_path / "a.yaml", root, name="a")), [])
    b = load_pipeline_config(str(write_study(tmp_path / "b.yaml", root, name="b")), [])
    holder = StudyLock(lock_store(a.root), lock_command("a"))
    with holder.held():
        assert run_nightly(a, date(2026, 11, 20)) is None  # a second nightly of `a`: nothing to add
        with pytest.raises(StudyLocked, match=r"nightly \(a\)"):  # `b`'s is refused, not skipped
            run_nightly(b, date(2026, 11, 20))


def test_a_study_name_that_cannot_name_a_model_or_a_folder_is_refused(tmp_path):
    for bad in ("a/b", "x:y", "..", "", "n@champion"):
        with pytest.raises(ConfigError, match=r"^name: "):
            load_pipeline_config(str(write_study(tmp_path / "s.yaml", tmp_path / "runs", name=bad)), [])


def _nightly(config, day, capsys) -> dict:
    assert main(["nightly", "-c", str(config), "--date", day]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _promotions(client, root, study) -> list[dict]:
    """The promotions of `study`'s newest nightly, from its `nightly_summary.json` artifact."""
    exp = client.get_experiment_by_name(study)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name.startswith("nightly")]
    latest = max(runs, key=lambda r: r.info.start_time)
    out = root.parent / f"dl-{study}"
    out.mkdir(exist_ok=True)
    path = client.download_artifacts(latest.info.run_id, "nightly_summary.json", str(out))
    return json.loads(open(path).read())["promotions"]


@pytest.mark.slow  # three nightlies of every stage: 3 to 5 minutes on two cores (CI runs it)
def test_two_studies_sharing_a_root_and_a_store_keep_their_models_champions_and_nightly_state(
    tmp_path, capsys, ray_session
):
    root = tmp_path / "runs"
    small = {"tasks": ["normal", "reshading"], "transfer": {"orders": [], "beams": [], "replicates": 1}}
    a = write_study(tmp_path / "a.yaml", root, name="study-a", **small)
    b = write_study(
        tmp_path / "b.yaml", root, name="study-b", task_definitions={"normal": {"loss": "l2"}}, **small
    )
    first_a = _nightly(a, "2026-11-20", capsys)
    first_b = _nightly(b, "2026-11-20", capsys)
    assert "normal" in first_a["promoted"] and "normal" in first_b["promoted"]
    # Each compares with its own last taxonomy: on a first night there is none, though `a`'s exists
    assert first_a["taxonomy_changed"] is None and first_b["taxonomy_changed"] is None

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    va = client.get_model_version_by_alias("study-a-normal", CHAMPION)
    vb = client.get_model_version_by_alias("study-b-normal", CHAMPION)
    assert va.tags[DEFINITION_TAG] == L1.definition_hash and vb.tags[DEFINITION_TAG] == L2.definition_hash
    assert (va.tags[STUDY_TAG], vb.tags[STUDY_TAG]) == ("study-a", "study-b")
    assert not any(m.name == "taskatlas-normal" for m in client.search_registered_models())
    for study in ("study-a", "study-b"):
        assert (root / "nightly" / study / "last_taxonomy.json").is_file()
    assert not (root / "nightly" / "last_taxonomy.json").exists()

    # b's next night: new data, a new b-normal; a's champion and state are untouched.
    a_state = (root / "nightly" / "study-a" / "last_taxonomy.json").read_text()
    second_b = _nightly(b, "2026-11-21", capsys)
    assert "normal" in second_b["retrained"] and second_b["taxonomy_changed"] is not None
    [p] = [p for p in _promotions(client, root, "study-b") if p["task"] == "normal"]
    assert p["champion_version"] == "1" and p["champion_definition"] == ""  # scored: its own l2 champion
    assert client.get_model_version_by_alias("study-a-normal", CHAMPION).version == va.version
    assert len(client.search_model_versions("name='study-a-normal'")) == 1
    assert (root / "nightly" / "study-a" / "last_taxonomy.json").read_text() == a_state


def test_a_network_another_study_trained_is_registered_under_ours_once(tmp_path, tracker, tiny_dataset):
    """Steps are keyed by content, so study `b` reuses the network `a` trained alike: `b` gets a
    version of its own `b-normal` from the same logged model (regression: `b-normal` was never
    registered, so `predict --model b-normal` failed), once, and `a`'s registry is untouched."""
    from components.data.shards import ShardStore
    from pipelines.stage1.record import NetworkRecord

    a = _register(tracker, "a", L1, 0.5)
    cfg = load_pipeline_config(str(write_study(tmp_path / "b.yaml", tmp_path / "runs", name="b")), [])
    record = NetworkRecord(cfg, ShardStore(tiny_dataset), tracker, "", unfenced)
    adopted = record.adopt(L1, a)
    assert (adopted.registered, adopted.model_version) == ("b-normal", "1")
    assert tracker.models.alias_version("b-normal", CHAMPION) == "1"
    tags = tracker.models.version_tags("b-normal", "1")
    assert (
        tags[STUDY_TAG] == "b" and tags[DEFINITION_TAG] == L1.definition_hash and tags["config_hash"] == "k"
    )
    assert tracker.models.version_model_id("b-normal", "1") == tracker.models.version_model_id(
        "a-normal", "1"
    )
    assert record.adopt(L1, a) == adopted  # a rerun finds it: no second version
    assert len(tracker.client.search_model_versions("name = 'b-normal'")) == 1
    assert len(tracker.client.search_model_versions("name = 'a-normal'")) == 1
    assert record.adopt(L1, adopted) is adopted  # already ours
