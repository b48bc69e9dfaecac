"""What each stage hands the next: plain, torch-free and Ray-free dataclasses, so the feature
cache, the fan-out, nightly and the CLI can read a stage's result without loading the stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa

from components.storage import Location, location
from pipelines.hparams import HParams

# In Stage II's step folder: candidate name (`a+b->t`) -> its MLflow run id; target -> its
# `transfer/<target>` run id
READOUT_RUNS = "readout_runs.json"
TARGET_RUNS = "target_runs.json"


@dataclass(frozen=True)
class TaskResult:
    """A trained task network (Stage I): its step key, weights and registered version. With
    `train.replicates` N > 1, a task's result is its replicate 0 (the registered one), carrying
    replicates 1..N-1 as `replicas` (not registered: `model_version` and `registered` empty)."""

    task: str
    key: str
    model_path: str
    test_loss: float
    hparams: HParams
    run_id: str
    model_version: str
    # The registered model `model_version` is a version of: the study's that trained it. Networks
    # are steps keyed by content, so another study on the same root may reuse this one ('': a
    # network recorded before the field, of the study's own `<study>-<task>`).
    registered: str = ""
    replicate: int = 0  # which of the task's networks (`train.replicates`)
    replicas: tuple[TaskResult, ...] = ()  # replicate 0's: the task's networks 1..N-1, in order

    def network(self, replicate: int) -> TaskResult:
        """The task's network replicate `replicate` (0: this one)."""
        return self if replicate == 0 else self.replicas[replicate - 1]

    @classmethod
    def from_marker(cls, info: dict) -> TaskResult:
        """A network's result as its step marker (`marker`) recorded it."""
        return cls(**{**info, "hparams": HParams.from_json(info["hparams"])})

    def marker(self) -> dict:
        """What the network's step marker records: one network, not its replicas, and its
        replicate only where it is not 0 (replicate 0's marker is a study's without replicates)."""
        out = {k: v for k, v in asdict(self).items() if k != "replicas"}
        if not self.replicate:
            del out["replicate"]
        return out


@dataclass(frozen=True)
class Stage2Result:
    key: str
    out_dir: str  # the step folder's URI
    losses_dir: str  # its per-target loss tables, `<target>.parquet`
    summary_path: str
    run_id: str
    counts: dict[str, int]  # readouts per order / baseline in the final table
    failed: tuple[str, ...] = ()  # readout names that failed after their retries
    ran: int = 0  # readouts trained by this run (the rest were stored)

    @property
    def losses(self) -> Location:
        return location(self.losses_dir)

    def summary(self) -> pa.Table:
        """One row per readout replicate: target, sources, order, replicate, kind, mean/val loss, seconds."""
        return location(self.summary_path).read_parquet()

    def all_losses(self) -> pa.Table:
        """Every target's losses in one table: for small studies, the CLI and tests (Stage III
        reads one target at a time)."""
        return pa.concat_tables([f.read_parquet() for f in sorted(self.losses.files(), key=str)])

    @property
    def readout_runs(self) -> dict[str, str]:
        """Candidate name (`a+b->t`) -> its MLflow run id (Stage III adds its pooled scores there)."""
        path = location(self.out_dir) / READOUT_RUNS
        return path.read_json() if path.exists() else {}

    @property
    def target_runs(self) -> dict[str, str]:
        """Target -> its `transfer/<target>` run id (Stage III lists its candidates there)."""
        path = location(self.out_dir) / TARGET_RUNS
        return path.read_json() if path.exists() else {}
