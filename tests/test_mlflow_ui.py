"""What MLflow's UI shows must be true (issue 26): read back through the REST endpoints the UI
itself calls (`logged-models/search`, `runs/search`, `registered-models/search`) from a real
`mlflow server` on 127.0.0.1.

The default suite records one network, one search and a few readouts with the real record code
(`NetworkRecord`, `ReadoutRunLog`), without Ray, against one server for the module; the slow test
runs a whole tiny study (Tune included) against a server and checks the same things, and the
stage runs' durations, end to end.

    .venv/bin/python -m pytest tests/test_mlflow_ui.py            # ~25 s
    .venv/bin/python -m pytest tests/test_mlflow_ui.py -m slow    # the whole study: minutes
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from types import SimpleNamespace

import mlflow.artifacts
import pandas as pd
import pytest
import requests
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from components.answer import StudyAnswer
from components.data.shards import ShardStore
from components.models import build_network
from components.tasks import channels_for
from components.transfer import Readout
from components.transfer.readout_files import ReadoutOutcome
from pipelines.analysis.report import answer_markdown
from pipelines.cli import main
from pipelines.commands.run import print_run
from pipelines.config import load_pipeline_config
from pipelines.hparams import HParams
from pipelines.invocation import dataset_ref, invocation, open_tracker
from pipelines.stage1.plan import Stage1Plan
from pipelines.stage1.record import NetworkRecord, record_search
from pipelines.stage1.search import TrialProgress
from pipelines.stage2.readout_runs import ReadoutRunLog
from pipelines.steps import unfenced
from pipelines.tracking.entities import NOTE
from pipelines.tracking.logger import SYSTEM_METRICS_INTERVAL_S, RunLogger
from pipelines.tracking.store import run_url
from tests.services import start_mlflow_server
from tests.study import write_study

EPOCHS = 3
LOSSES = {"train_loss": (0.9, 0.7, 0.5), "test_loss": (0.8, 0.6, 0.4)}  # per epoch: the last is the model's
QUEUED_S = 1.0  # how long the recorded network waits for a worker before its first batch


# ---------------------------------------------------------------- what the UI reads


class UI:
    """The REST calls MLflow's UI makes, against one tracking server."""

    def __init__(self, url: str):
        self.url = url

    def _post(self, endpoint: str, body: dict) -> dict:
        reply = requests.post(f"{self.url}/api/2.0/mlflow/{endpoint}", json=body, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def _get(self, endpoint: str, **params) -> dict:
        reply = requests.get(f"{self.url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def experiment_id(self, name: str) -> str:
        return self._get("experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]

    def runs(self, experiment_id: str) -> list[dict]:
        out, token = [], None
        while True:
            body = {"experiment_ids": [experiment_id], "max_results": 1000}
            page = self._post("runs/search", body | ({"page_token": token} if token else {}))
            out += page.get("runs", [])
            if not (token := page.get("next_page_token")):
                return out

    def logged_models(self, experiment_id: str) -> list[dict]:
        return self._post("logged-models/search", {"experiment_ids": [experiment_id]}).get("models", [])

    def registered_models(self) -> list[dict]:
        return self._get("registered-models/search", max_results=100).get("registered_models", [])

    def model_version(self, name: str, version: str) -> dict:
        return self._get("model-versions/get", name=name, version=version)["model_version"]


def kv(entries: list[dict] | None) -> dict[str, str]:
    return {e["key"]: e["value"] for e in entries or []}


def name_of(run: dict) -> str:
    return run["info"]["run_name"]


def metric(run: dict, key: str) -> float:
    """The run's value of `key` (its latest, as the run table shows it)."""
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}[key]


def seconds(run: dict) -> float:
    return (int(run["info"]["end_time"]) - int(run["info"]["start_time"])) / 1000


def check_one_name_per_setting(params: dict[str, str], where: str) -> None:
    """No setting under two names with different values (`hparams.lr` against `train.lr`)."""
    by_leaf = defaultdict(dict)
    for key, value in params.items():
        by_leaf[key.rsplit(".", 1)[-1]][key] = value
    for leaf, named in by_leaf.items():
        assert len(set(named.values())) == 1, f"{where}: {leaf} is {named}"


def check_models_are_final_and_linked(
    ui: UI, experiment_id: str, last: dict[str, dict[str, float]], epochs: int
) -> None:
    """Each logged model: one value per metric key, the last epoch's (`last`: model name -> key ->
    value), an output of its run, registered from `models:/<id>` as a version that names the run
    and the model, and the registered model described."""
    runs = {r["info"]["run_id"]: r for r in ui.runs(experiment_id)}
    models = {m["info"]["name"]: m for m in ui.logged_models(experiment_id)}
    assert set(last) <= set(models)
    registered = {m["name"]: m for m in ui.registered_models()}
    for name, want in last.items():
        model = models[name]
        info, metrics = model["info"], model["data"].get("metrics", [])
        keys = [m["key"] for m in metrics]
        assert len(keys) == len(set(keys)), f"{name}: {keys}"  # one value per key
        got = {m["key"]: m["value"] for m in metrics}
        assert got == pytest.approx(want | {"final_test_loss": got.get("final_test_loss")}), name
        assert "final_test_loss" in got
        assert {int(m["step"]) for m in metrics} == {epochs - 1}  # the last epoch's step
        run = runs[info["source_run_id"]]
        outputs = [o["model_id"] for o in run.get("outputs", {}).get("model_outputs", [])]
        assert outputs == [info["model_id"]], name  # the run lists its logged model
        versions = json.loads(kv(info.get("tags"))["mlflow.modelVersions"])  # the model: registered
        # described on its own page, as its version is (the page showed no description)
        described = kv(info.get("tags")).get("mlflow.note.content", "")
        assert "mean test loss" in described, name
        tags = kv(info.get("tags"))  # what the UI's logged-model page does not show, said in words
        assert f"`{tags['definition']}`" in described and f"`{tags['config_hash']}`" in described, name
        [(registered_name, version)] = [(v["name"], str(v["version"])) for v in versions]
        mv = ui.model_version(registered_name, version)
        # The version points at the logged model by its source (a SQL registry keeps no model id)
        assert mv["source"] == f"models:/{info['model_id']}" and mv["run_id"] == run["info"]["run_id"]
        described = registered[registered_name]
        assert described.get("description") and kv(described.get("tags"))["task"] == name
        assert "champion" in {a["alias"] for a in described.get("aliases", [])}


# ---------------------------------------------------------------- one record of each kind, one server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-ui")
    with start_mlflow_server(folder, f"sqlite:///{folder / 'm.db'}", folder / "art") as running:
        yield running


@pytest.fixture(scope="module")
def recorded(server, tiny_dataset, tmp_path_factory):
    """A network recorded as Stage I records it (its epochs logged as rank 0 logs them), a search
    of three trials and three readouts, all on one server."""
    tmp = tmp_path_factory.mktemp("recorded")
    config = write_study(
        tmp / "tiny.yaml",
        tmp / "runs",
        tracking_uri=server.url,
        data={"path": str(tiny_dataset)},
        train={"epochs": EPOCHS, "num_workers": 1, "lr": 0.003, "batch_size": 8},
    )
    cfg = load_pipeline_config(str(config), [])
    store = ShardStore(tiny_dataset)
    tracker = open_tracker(cfg)
    parent = tracker.start_run("run tiny")
    record = NetworkRecord(cfg, store, tracker, parent, unfenced)

    task = cfg.task("normal")
    hparams = Stage1Plan(cfg, store).default_hparams()
    network = record.open(task, hparams, Stage1Plan(cfg, store).train_step(task, hparams))
    time.sleep(QUEUED_S)  # waiting for a worker
    first_batch = time.time()
    logger = RunLogger.start(tracker.tracking_uri, network.new_run)  # as rank 0 does, at its first batch
    with logger.system_metrics():
        for epoch in range(EPOCHS):
            logger.log_metrics({k: v[epoch] for k, v in LOSSES.items()}, step=epoch)
    weights, model = io.BytesIO(), build_network(task, cfg.model, cfg.data.size, channels_for(task, store))
    torch.save(model.state_dict(), weights)
    network.weights.write_bytes(weights.getvalue())
    time.sleep(0.5)  # the driver's turn to score and register it: not the network's work
    trained = record.finish(network, model, test_loss=0.5)

    now = time.time()
    spans = [(now - 3.0, now - 1.5), (now - 2.5, now - 0.5), (now - 2.0, now - 1.0)]  # the trials' work
    results = [
        SimpleNamespace(
            metrics={"trial_id": f"t{i}", "epoch": 2, "val_loss": 0.5 + i},
            config={"lr": 10.0**-i, "weight_decay": 0.0, "batch_size": 8},
            metrics_dataframe=pd.DataFrame(
                {"epoch": [1, 2], "val_loss": [0.9 + i, 0.5 + i], "train_loss": [1.0, 0.6]}
            ),
            error=None,
        )
        for i in range(3)
    ]
    search_span = (now - 3.2, now)
    record_search(
        tracker,
        parent,
        cfg.tune,
        task,
        results,
        spans,
        results[0],
        0.5,
        search_span,
        HParams.from_json(results[0].config),
    )

    with ReadoutRunLog(tracker, parent, "stage", dataset=dataset_ref(cfg, store)) as log:
        for i, sources in enumerate((("depth",), ("edge_texture",), ("depth", "edge_texture"))):
            readout = Readout("normal", sources)
            outcome = ReadoutOutcome(readout, 0.5, 1.0, (0.9,), 0.4, started=now - 2, finished=now - 1)
            log.add(outcome, f"k{i}", f"c{i}")
    tracker.end_run(parent)
    return SimpleNamespace(
        cfg=cfg,
        tracker=tracker,
        parent=parent,
        trained=trained,
        first_batch=first_batch,
        spans=spans,
        search_span=search_span,
        digest=store.data_version,
    )


@pytest.fixture(scope="module")
def ui(server) -> UI:
    return UI(server.url)


@pytest.mark.timeout(240)
def test_a_logged_model_has_the_final_epochs_metrics_once_and_links_to_its_run_and_version(recorded, ui):
    # Regression: every epoch's metrics were the model's too, and the UI showed the first epoch's;
    # versions were registered from a file path, the run listed no logged model, the model said
    # "Not registered".
    last = {"normal": {k: v[-1] for k, v in LOSSES.items()}}
    check_models_are_final_and_linked(ui, recorded.tracker.experiment_id, last, EPOCHS)
    # regression: the Models tab showed every metric under "No dataset"
    [model] = [m for m in ui.logged_models(recorded.tracker.experiment_id) if m["info"]["name"] == "normal"]
    assert {m.get("dataset_digest") for m in model["data"]["metrics"]} == {recorded.digest}
    registered = {m["name"]: m for m in ui.registered_models()}["tiny-normal"]  # <study>-<task>
    task = recorded.cfg.task("normal")
    tags = {"task": "normal", "study": "tiny", "kind": task.kind.value, "loss": task.loss.value}
    assert kv(registered["tags"]) == tags


@pytest.mark.timeout(240)
def test_a_train_run_names_each_setting_once_and_shows_its_dataset_and_a_signature(recorded, ui, tmp_path):
    runs = {name_of(r): r for r in ui.runs(recorded.tracker.experiment_id)}
    train = runs["train/normal"]
    params = kv(train["data"].get("params"))
    check_one_name_per_setting(params, "train/normal")  # regression: hparams.lr=… beside train.lr=…
    assert params["train.lr"] == "0.003" and params["train.batch_size"] == "8"
    assert params["train.hparams_from"] == "config"
    inputs = train.get("inputs", {}).get("dataset_inputs", [])
    assert [d["dataset"]["digest"] for d in inputs] == [recorded.digest]
    assert kv(inputs[0]["tags"])["mlflow.data.context"] == "train"
    tags = kv(train["data"].get("tags"))
    assert tags["mlflow.parentRunId"] == recorded.parent
    system = {m["key"]: m["value"] for m in train["data"]["metrics"] if m["key"].startswith("system/")}
    assert system, "no system metrics on the train run"  # psutil is a dependency: MLflow measures with it
    # regression: a run shorter than one interval read psutil's first (always 0.0) CPU sample
    assert system["system/cpu_utilization_percentage"] > 0
    # regression (issue 40): one or two samples for a fit of 6 s; now one a second, less the ends
    samples = recorded.tracker.client.get_metric_history(
        train["info"]["run_id"], "system/cpu_utilization_percentage"
    )
    seconds = (int(train["info"]["end_time"]) - int(train["info"]["start_time"])) / 1000
    assert len(samples) >= max(1, int(seconds / SYSTEM_METRICS_INTERVAL_S) - 2), (len(samples), seconds)
    model = recorded.tracker.client.get_logged_model(
        recorded.tracker.client.get_run(recorded.trained.run_id).outputs.model_outputs[0].model_id
    )
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location}/MLmodel",
        tracking_uri=recorded.tracker.tracking_uri,
        dst_path=str(tmp_path),
    )
    signature = Model.load(local).signature  # the UI shows it with the model's files
    assert signature.inputs.inputs[0].shape == (-1, 3, 32, 32)


@pytest.mark.timeout(240)
def test_a_train_run_spans_its_epochs_not_its_wait_for_a_worker_or_its_registration(recorded, ui):
    # Regression (issue 40): every train/* run started when the driver queued its network and
    # ended once the driver had scored and registered it: 1.2-1.4 min for 6-9 s of epochs.
    train = {name_of(r): r for r in ui.runs(recorded.tracker.experiment_id)}["train/normal"]
    client = MlflowClient(recorded.tracker.tracking_uri)
    run_id = recorded.trained.run_id
    reports = [m.timestamp / 1000 for k in LOSSES for m in client.get_metric_history(run_id, k)]
    start, end = int(train["info"]["start_time"]) / 1000, int(train["info"]["end_time"]) / 1000
    assert recorded.first_batch - 0.001 <= start <= min(reports)  # from its first batch ...
    assert end == max(reports)  # ... to its last report
    queued = {m["key"]: m["value"] for m in train["data"]["metrics"]}["queue_seconds"]  # the wait apart
    assert queued == pytest.approx(QUEUED_S, abs=0.5)


@pytest.mark.timeout(240)
def test_tune_runs_span_the_work_and_hold_the_space_and_the_best_trial(recorded, ui):
    # Regression: the search's runs were created after it ended, each lasting ~40 ms.
    runs = {name_of(r): r for r in ui.runs(recorded.tracker.experiment_id)}
    search = runs["tune/normal"]
    start, end = recorded.search_span
    assert int(search["info"]["start_time"]) == int(start * 1000)
    assert seconds(search) >= end - start - 0.01
    params = kv(search["data"]["params"])
    assert params["best.lr"] == "1.0" and "tune.num_samples" in params  # the best trial, the space
    assert kv(search["data"]["tags"])["best_trial"] == "t0"
    trials = {name_of(r): r for r in ui.runs(recorded.tracker.companion("trials"))}
    assert not {n for n in runs if n.startswith("tune/normal/")}  # trials are in the trials experiment
    for i, (s, e) in enumerate(recorded.spans):
        trial = trials[f"tune/normal/t{i}"]
        assert seconds(trial) == pytest.approx(e - s, abs=0.01)
        assert kv(trial["data"]["tags"])["mlflow.parentRunId"] == search["info"]["run_id"]


@pytest.mark.timeout(240)
def test_readout_runs_are_tagged_in_their_names_order_and_show_their_dataset(recorded, ui):
    """A run per candidate in the readouts experiment, under its target's run in the study's."""
    assert not [
        r for r in ui.runs(recorded.tracker.experiment_id) if "candidate_key" in kv(r["data"]["tags"])
    ]
    readouts = ui.runs(recorded.tracker.companion("readouts"))
    assert len(readouts) == 3
    [target] = [r for r in ui.runs(recorded.tracker.experiment_id) if name_of(r) == "transfer/normal"]
    assert kv(target["data"]["tags"])["mlflow.parentRunId"] == recorded.parent
    for run in readouts:
        tags = kv(run["data"]["tags"])
        assert tags["readout"] == name_of(run)  # regression: `depth--normal` beside `normal <- depth`
        [dataset] = run["inputs"]["dataset_inputs"]
        assert kv(dataset["tags"])["mlflow.data.context"] == "transfer"
        assert tags["mlflow.parentRunId"] == target["info"]["run_id"]


def test_the_parent_run_claims_no_setting_that_no_network_used(tiny_dataset, tmp_path):
    # Regression (issue 40): the parent logged train.lr=0.001, batch_size=32, weight_decay=1e-4
    # though every network trained with its search's values (on its train/<task> run), and
    # tune.gpus_per_trial=1.0 and transfer.gpus_per_readout=0.25 on a CPU-only run.
    def parent_params(root: str, **sections) -> dict[str, str]:
        data = {"path": str(tiny_dataset)}
        study = write_study(tmp_path / f"{root}.yaml", tmp_path / root, data=data, **sections)
        with invocation(load_pipeline_config(str(study), []), "train", unfenced) as inv:
            pass
        return MlflowClient(inv.tracker.tracking_uri).get_run(inv.run_id).data.params

    searched = parent_params("searched", tune={"enabled": True}, train={"lr": 0.003})
    for key in HParams.names():
        assert searched[f"train.{key}"] == "tuned per task (tune/<task>)"
    assert searched["train.use_gpu"] == searched["transfer.use_gpu"] == "False"  # no GPU here
    assert searched["tune.gpus_per_trial"] == searched["transfer.gpus_per_readout"] == "0"
    assert json.loads(searched["tune.batch_sizes"]) == [16, 32, 64]  # the space searched stays
    configured = parent_params("configured", tune={"enabled": False}, train={"lr": 0.003})
    assert configured["train.lr"] == "0.003"  # what every network trained with


@pytest.mark.timeout(240)
def test_the_experiment_description_names_runs_and_steps_as_they_are(recorded, ui):
    # Regression (issue 40): it named runs `train <task>` (they are train/<task>) and said steps
    # are 0-based epochs, while search trials log epochs 1 and 2.
    client = MlflowClient(recorded.tracker.tracking_uri)
    note = " ".join(client.get_experiment(recorded.tracker.experiment_id).tags[NOTE].split())
    runs = {name_of(r): r["info"]["run_id"] for r in ui.runs(recorded.tracker.experiment_id)}
    runs |= {name_of(r): r["info"]["run_id"] for r in ui.runs(recorded.tracker.companion("trials"))}
    for named, run in (("train/<task>", "train/normal"), ("tune/<task>", "tune/normal")):
        assert f"`{named}`" in note and run in runs
    assert "`tune/<task>/<trial>`" in note and "tune/normal/t0" in runs
    assert "train <task>" not in note and "tune <task>" not in note

    def first_step(run: str, key: str) -> int:
        return min(m.step for m in client.get_metric_history(runs[run], key))

    assert first_step("train/normal", "train_loss") == 0 and first_step("tune/normal/t0", "val_loss") == 1
    said = " ".join(note.split())  # as the UI renders it: line breaks are spaces
    assert (
        "counted from 0 on `train/<task>` runs and readouts' `train_loss/r<k>`, from 1 on search trials"
        in said
    )


def test_trial_progress_times_each_trial_from_its_start_to_its_end():
    progress = TrialProgress(lambda n: None)
    trial = SimpleNamespace(trial_id="a")
    progress.on_trial_start(0, [], trial)
    time.sleep(0.05)
    progress.on_trial_complete(0, [], trial)
    start, end = progress.span(SimpleNamespace(metrics={"trial_id": "a"}))
    assert 0.05 <= end - start < 1
    restored = SimpleNamespace(metrics={"trial_id": "b", "timestamp": 100, "time_total_s": 7.5})
    assert progress.span(restored) == (92.5, 100.0)  # a trial finished before a restore


# normal a root, depth <- normal: the smallest answer a description is written for
ONE_EDGE = StudyAnswer.from_json(
    {"roots": ["normal"], "transfers": {"depth": ["normal"]}, "budget": 1, "max_order": 1, "objective": 1.0}
)


def test_the_description_names_only_the_files_on_its_run():
    import pyarrow as pa

    taxonomy = ONE_EDGE
    table = pa.table(
        {"target": ["depth"], "sources": [["normal"]], "affinity": [1.0], "order": [1], "kind": ["transfer"]}
    )
    note = answer_markdown(taxonomy, table, ("7", "r1"), ("taxonomy.json", "taxonomy.png", "affinity.csv"))
    # the UI's artifact viewer (getRunPageRoute with an artifact path), not get-artifact's download
    assert "[taxonomy](#/experiments/7/runs/r1/artifacts/taxonomy.png)" in note
    assert "get-artifact" not in note and "affinity_heatmap" not in note
    named = {w.strip("`.,") for w in note.split() if w.startswith("`") and "." in w}
    assert named == {"taxonomy.json", "taxonomy.png", "affinity.csv"}


def test_the_cli_ends_with_the_runs_url_on_a_server_and_its_id_otherwise(capsys):
    print_run("http://mlflow.internal:5000/", "3", "abc123")
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"MLflow run:   {run_url('http://mlflow.internal:5000', '3', 'abc123')}"
    assert last.endswith("/#/experiments/3/runs/abc123?workflowType=machine_learning")
    print_run("sqlite:////tmp/x/mlflow.db", "3", "abc123")
    assert capsys.readouterr().out.splitlines()[-1] == "MLflow run:   abc123"


# ---------------------------------------------------------------- a whole tiny study against a server


TUNE = {"enabled": True, "num_samples": 2, "max_epochs": 1, "grace_period": 1, "max_train_images": 40}


@pytest.mark.slow  # a whole tiny study with its search: minutes on two cores
@pytest.mark.timeout(900)
def test_a_studys_runs_models_and_registry_read_true_in_the_ui(server, ui, tmp_path, ray_session, capsys):
    config = write_study(
        tmp_path / "tiny.yaml", tmp_path / "runs", name="ui-study", tracking_uri=server.url, tune=TUNE
    )
    assert main(["run", "-c", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    experiment_id = ui.experiment_id("ui-study")
    runs = ui.runs(experiment_id)
    [parent] = [r for r in runs if name_of(r).startswith("run ui-study")]
    assert out[-1] == f"MLflow run:   {run_url(server.url, experiment_id, parent['info']['run_id'])}"
    by_name = {name_of(r): r for r in runs}
    # The study's own page lists its stage runs, newest first, with no trial or readout among
    # them (issue 40: its first page of 100 showed readouts, `train/*` three pages on).
    newest = {
        "experiment_ids": [experiment_id],
        "max_results": 100,
        "order_by": ["attributes.start_time DESC"],
    }
    assert {name_of(r) for r in ui._post("runs/search", newest)["runs"]} == set(by_name)
    assert not [n for n in by_name if n.count("/") > 1 or " <- " in n]  # no trial, no readout
    by_name |= {name_of(r): r for r in ui.runs(ui.experiment_id("ui-study/trials"))}

    # Logged models: the last epoch's metrics (one epoch here), linked both ways.
    client = MlflowClient(server.url)
    last = {}
    for task in ("normal", "reshading", "edge_texture"):
        run_id = by_name[f"train/{task}"]["info"]["run_id"]
        last[task] = {k: client.get_metric_history(run_id, k)[-1].value for k in ("train_loss", "test_loss")}
        check_one_name_per_setting(kv(by_name[f"train/{task}"]["data"]["params"]), f"train/{task}")
        assert by_name[f"train/{task}"]["inputs"]["dataset_inputs"]
    check_models_are_final_and_linked(ui, experiment_id, last, 1)

    # The best trial is the one that ended lowest, in the tune run, done.json and the train run;
    # each train run spans its own epochs (issue 40), its wait apart.
    for task in ("normal", "reshading", "edge_texture"):
        trials = {n.rsplit("/", 1)[1]: r for n, r in by_name.items() if n.startswith(f"tune/{task}/")}
        finals = {t: metric(r, "val_loss") for t, r in trials.items()}
        best = min(finals, key=finals.get)
        search = by_name[f"tune/{task}"]
        assert kv(search["data"]["tags"])["best_trial"] == best
        assert metric(search, "best_val_loss") == finals[best]
        [done] = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "tune" / task).glob("*/done.json")]
        assert done["best_trial"] == best
        train = by_name[f"train/{task}"]
        lr = kv(train["data"]["params"])["train.lr"]
        assert lr == kv(trials[best]["data"]["params"])["lr"] == str(done["hparams"]["lr"])
        history = client.get_metric_history(train["info"]["run_id"], "train_loss")
        reports = [m.timestamp / 1000 for m in history]
        start, end = int(train["info"]["start_time"]) / 1000, int(train["info"]["end_time"]) / 1000
        print(f"train/{task}: {seconds(train):.1f} s, first report after {min(reports) - start:.1f} s")
        assert start <= min(reports) <= start + 5 and end == max(reports)  # one short epoch here
        assert metric(train, "queue_seconds") >= 0

    # Durations: each tune trial's run at least its own measured time; the analysis runs span
    # the work that wrote their files.
    trials = {}
    for result in (tmp_path / "runs" / "ray").glob("tune-*/*/result.json"):
        last_line = json.loads(result.read_text().splitlines()[-1])
        trials[last_line["trial_id"]] = last_line["time_total_s"]
    assert len(trials) == 6
    for name, run in by_name.items():
        if name.startswith("tune/") and name.count("/") == 2:
            assert seconds(run) >= trials[name.rsplit("/", 1)[1]] - 0.01, name
    for stage in ("transfer", "affinity", "taxonomy"):  # regression: affinity 14 ms, taxonomy 30 ms
        run = by_name[stage]
        work = {m["key"]: m["value"] for m in run["data"]["metrics"]}["wall_seconds"]
        assert seconds(run) >= work - 0.01, stage

    # Counts, tags and the description of the parent.
    transfer = by_name["transfer"]
    targets = {
        r["info"]["run_id"]
        for r in runs
        if kv(r["data"]["tags"]).get("mlflow.parentRunId") == transfer["info"]["run_id"]
    }
    assert {name_of(r) for r in runs if r["info"]["run_id"] in targets} == {
        f"transfer/{t}" for t in ("normal", "reshading", "edge_texture")
    }
    readouts = ui.runs(ui.experiment_id("ui-study/readouts"))
    assert {kv(r["data"]["tags"])["mlflow.parentRunId"] for r in readouts} == targets
    parent_metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert parent_metrics["readouts_trained"] == metric(transfer, "readouts_trained") > 0  # one name
    params = kv(parent["data"]["params"])  # no value that no network or readout used
    assert {params[f"train.{k}"] for k in HParams.names()} == {"tuned per task (tune/<task>)"}
    assert params["tune.gpus_per_trial"] == params["transfer.gpus_per_readout"] == "0"  # CPU only
    assert parent_metrics["readouts"] == sum(metric(r, "replicates") for r in readouts) == 57
    for run in readouts:  # every readout metric says whether it is pooled or one replicate's
        assert kv(run["data"]["tags"])["readout"] == name_of(run)
        metrics = {m["key"] for m in run["data"].get("metrics", [])}
        assert all(m.startswith("pooled_") or "/r" in m or m == "replicates" for m in metrics), metrics
        if "pooled_affinity" in metrics:
            assert {"pooled_affinity_lo", "pooled_affinity_hi"} <= metrics
    taxonomy = json.loads(next((tmp_path / "runs" / "taxonomy").glob("*/taxonomy.json")).read_text())
    tags = kv(parent["data"]["tags"])
    assert tags["taxonomy.roots"] == ",".join(taxonomy["roots"])
    artifacts = {
        a["path"]
        for a in requests.get(
            f"{server.url}/api/2.0/mlflow/artifacts/list",
            params={"run_id": parent["info"]["run_id"]},
            timeout=30,
        ).json()["files"]
    }
    named = {w.strip("`.,;") for w in tags["mlflow.note.content"].split() if w.startswith("`") and "." in w}
    assert named and named <= artifacts, named - artifacts
    assert tags["mlflow.user"] and all(
        kv(r["data"]["tags"]).get("mlflow.source.name") for r in runs
    )  # "Created by" and "Source" on every run


def test_the_description_says_what_a_roots_affinity_is_and_names_source_only_tasks():
    """Regression: roots showed their `self` affinity without saying so, and a source-only task
    (colorization) was silently missing from the tables."""
    import pyarrow as pa

    taxonomy = ONE_EDGE
    table = pa.table(
        {
            "target": ["depth", "depth", "normal", "normal"],
            "sources": [["normal"], ["colorization"], ["self"], ["colorization"]],
            "affinity": [0.6, 0.1, 0.8, 0.2],
        }
    )
    note = answer_markdown(taxonomy, table, ("7", "r1"))
    assert "For a root, the affinity is that of its own fully supervised network (`self`)." in note
    assert "Sources only, never targets, so not in the tables: colorization." in note
    assert "draws of what a rerun would measure" not in note  # no bootstrap: no shares said


def test_a_fit_of_a_few_seconds_gets_several_system_metric_samples(tmp_path):
    """Regression (issue 40): sampled every 5 s, a quickstart fit of 6-9 s showed one or two
    system-metric points. A 4-second block at the default interval: at least 3 (one a second,
    less a second for the monitor to start)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("metrics")).info.run_id
    logger = RunLogger(uri, run)
    with logger.system_metrics():
        time.sleep(4)
    samples = client.get_metric_history(run, "system/cpu_utilization_percentage")
    assert len(samples) >= 3, len(samples)
