"""Cheap transferability estimates: how well might source s serve target t, before training it?

Two estimators, each scoring a (source, target) pair by a loss on the transfer split's
validation part (`validation_split`, the rows that rank beams), lower is better:
- `probe`: closed-form ridge regression on the cached features. Each feature location's 3x3
  neighbourhood (C x 9 values, standardised) predicts the d x d patch of the target it covers
  (the target pixel-unshuffled to the representation's grid, one-hot for class maps): a linear
  stand-in for the readout's two 3x3 convs and decoder. Vector targets are predicted from the
  features average-pooled to at most 4x4. The ridge penalty is picked from a small grid on the
  validation part; the score is the target's own per-image loss of that prediction (for class
  maps and BCE the clipped predictions are read as probabilities). One eigendecomposition per
  pair, no training: seconds for a whole study.
- `short`: the real readout trained for `short_epochs` epochs; its validation loss.

Neither is trusted blindly: Stage II trains a random audit sample of the sources an estimate
would prune and reports the estimator's rank correlation with the trained losses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F

from components.models import ModelConfig
from components.tasks import Loss, Task, TaskKind
from components.training import nanmean, pick_device
from components.transfer.feature_files import source_features
from components.transfer.jobs import labels_for
from components.transfer.plan import Readout, TransferPlan
from components.transfer.readout import ReadoutSettings, label_tensor, train_readout, validation_split

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge penalties, relative to the mean eigenvalue
_PROB_CLIP = 1e-3  # predictions read as probabilities are clipped to [clip, 1 - clip]
_VECTOR_GRID = 4  # vector targets: features average-pooled to at most this many cells a side


class EstimatorKind(str, Enum):
    PROBE = "probe"  # closed-form ridge on cached features
    SHORT = "short"  # the readout itself, trained for a few epochs


@dataclass(frozen=True)
class Estimate:
    target: str
    source: str
    score: float  # estimated validation loss: lower is better
    seconds: float


def estimate_transfer(
    *,
    kind: EstimatorKind,
    task: Task,
    features: np.ndarray,
    labels: np.ndarray,
    settings: ReadoutSettings,
    model: ModelConfig,
    image_size: int,
    channels: int | None = None,
    short_epochs: int = 1,
    device: torch.device | None = None,
) -> float:
    """Estimated validation loss of a readout from `features` (N, C, h, w) of the transfer split
    to `labels` (N, ...) as stored; the validation rows are the readouts' own."""
    fit, val = validation_split(len(features), settings.val_fraction, settings.split_seed)
    if kind is EstimatorKind.PROBE:
        return probe_loss(task, features[fit], labels[fit], features[val], labels[val], channels)
    result = train_readout(
        task=task,
        model=model,
        image_size=image_size,
        transfer_x=features,
        transfer_y=labels,
        test_x=features[:0],
        test_y=labels[:0],
        test_ids=np.zeros(0, str),
        settings=replace(settings, epochs=short_epochs),
        device=device or torch.device("cpu"),
        channels=channels,
    )
    return result.val_loss


@dataclass(frozen=True)
class EstimateJob:
    """Every estimate into one target, in one picklable value (one Ray task per target)."""

    target: Task
    feature_dirs: tuple[tuple[str, str], ...]  # (source, its cache folder in the target's view)
    data_root: str
    kind: EstimatorKind
    settings: ReadoutSettings
    model: ModelConfig
    image_size: int
    channels: int
    short_epochs: int = 1
    use_gpu: bool = False
    threads: int = 1


def run_estimates(job: EstimateJob) -> list[Estimate]:
    """Estimate each source into the job's target from the cached transfer-split features."""
    torch.set_num_threads(job.threads)
    out = []
    for source, folder in job.feature_dirs:
        start = time.perf_counter()
        features, ids = source_features([folder], "transfer")
        score = estimate_transfer(
            kind=job.kind,
            task=job.target,
            features=features,
            labels=labels_for(job.data_root, "transfer", job.target.column, ids),
            settings=job.settings,
            model=job.model,
            image_size=job.image_size,
            channels=job.channels,
            short_epochs=job.short_epochs,
            device=pick_device(job.use_gpu),
        )
        out.append(Estimate(job.target.name, source, float(score), time.perf_counter() - start))
    return out


@torch.no_grad()
def probe_loss(
    task: Task,
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    channels: int | None = None,
) -> float:
    """Mean per-image validation loss (the task's own loss) of the best ridge probe in ALPHAS."""
    device = torch.device("cpu")
    c = channels or task.channels
    xf, xv = _design(task, fit_x), _design(task, val_x)  # (n, D)
    yf, mask_f = _encode(task, fit_y, c, fit_x.shape[-1], device)  # (n, K), (n, K)
    mean_x, std_x = xf.mean(0), xf.std(0).clamp(min=1e-6)
    xf, xv = (xf - mean_x) / std_x, (xv - mean_x) / std_x
    col_mean = (yf * mask_f).sum(0) / mask_f.sum(0).clamp(min=1)
    yf = torch.where(mask_f, yf, col_mean) - col_mean  # unlabelled entries: the column's mean
    gram = xf.T @ xf
    s, v = torch.linalg.eigh(gram)
    proj = v.T @ (xf.T @ yf)  # (D, K)
    scale = float(s.clamp(min=0).mean()) or 1.0
    y_val = label_tensor(val_y, task, device)
    best = float("inf")
    for alpha in ALPHAS:
        w = v @ (proj / (s.clamp(min=0) + alpha * scale)[:, None])
        pred = _decode(task, xv @ w + col_mean, len(val_x), c, val_x.shape[-1])
        best = min(best, nanmean(task.per_image_loss(pred, y_val).numpy()))
    return best


def _design(task: Task, x: np.ndarray) -> torch.Tensor:
    """Features -> probe inputs: (N h w, C 9) neighbourhoods (pixel task) or (N, C g g) pooled."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float()  # (N, C, h, w)
    if task.kind is TaskKind.VECTOR:
        g = min(_VECTOR_GRID, t.shape[-1])
        return F.adaptive_avg_pool2d(t, g).flatten(1)
    n, c, h, w = t.shape
    return F.unfold(t, 3, padding=1).transpose(1, 2).reshape(n * h * w, c * 9)


def _encode(
    task: Task, y: np.ndarray, channels: int, side: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels -> probe outputs per row of `_design` and which of them are labelled."""
    y = label_tensor(y, task, device)
    if task.loss is Loss.CROSS_ENTROPY:  # (N, S, S) classes -> (N, K, S, S) one-hot
        valid = (y >= 0) & (y < channels)
        onehot = F.one_hot(y.clamp(0, channels - 1), channels).movedim(-1, 1).float()
        y, valid = onehot, valid[:, None].expand_as(onehot)
    else:
        valid = ~torch.isnan(y)
    y = torch.where(valid, y, torch.zeros_like(y))
    if task.kind is TaskKind.VECTOR:
        return y.flatten(1), valid.flatten(1)
    d = y.shape[-1] // side
    rows = lambda t: F.pixel_unshuffle(t, d).permute(0, 2, 3, 1).flatten(0, 2)  # noqa: E731
    return rows(y), rows(valid.float()).bool()


def _decode(task: Task, rows: torch.Tensor, n: int, channels: int, side: int) -> torch.Tensor:
    """Probe outputs -> a prediction the task's loss takes (logits for BCE and cross-entropy)."""
    if task.kind is TaskKind.PIXEL:
        out = rows.reshape(n, side, side, -1).permute(0, 3, 1, 2)
        pred = F.pixel_shuffle(out, round((out.shape[1] / channels) ** 0.5))
    else:
        pred = rows
    if task.loss is Loss.CROSS_ENTROPY:
        p = pred.clamp(_PROB_CLIP, 1.0)
        return (p / p.sum(1, keepdim=True)).log()
    if task.loss is Loss.BCE:
        return torch.logit(pred.clamp(_PROB_CLIP, 1 - _PROB_CLIP))
    return pred


def pruning_report(
    plan: TransferPlan, estimates: Mapping[tuple[str, str], Estimate], losses: Mapping[Readout, float]
) -> dict:
    """What a pruned Stage II reports: per target the pruned and audited sources, every estimate,
    the estimate's Spearman correlation with the trained first-order losses (`losses`, readout ->
    mean test loss) over the sources trained (its top K and audit sample; mean over targets), and
    `audit_misses`: audited readouts that beat the worst of their target's top K once trained,
    i.e. transfers the estimate alone would have wrongly pruned."""
    by_target: dict[str, float | None] = {}
    misses = []
    audited = set(plan.audited)
    for target in plan.targets:
        trained = [
            r for r in plan.first_order_of(target) if r in losses and (target, r.sources[0]) in estimates
        ]
        rho = spearman(
            np.array([estimates[target, r.sources[0]].score for r in trained]),
            np.array([losses[r] for r in trained]),
        )
        by_target[target] = None if math.isnan(rho) else rho
        top = [losses[r] for r in trained if r not in audited]
        misses += [r.name for r in trained if r in audited and top and losses[r] < max(top)]
    rhos = [v for v in by_target.values() if v is not None]
    group = lambda readouts: {t: [r.sources[0] for r in readouts if r.target == t] for t in plan.targets}  # noqa: E731
    return {
        "top_k": plan.top_k,
        "shared": list(plan.shared),
        "pruned": group(plan.pruned),
        "audited": group(plan.audited),
        "spearman": float(np.mean(rhos)) if rhos else None,
        "spearman_by_target": by_target,
        "audit_misses": misses,
        "estimate_seconds": float(sum(e.seconds for e in estimates.values())),
        "estimates": {t: {s: e.score for (tt, s), e in estimates.items() if tt == t} for t in plan.targets},
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score vectors (average ranks for ties); NaN below 3 items."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):  # ties share their mean rank
        tie = x == value
        ranks[tie] = ranks[tie].mean()
    return ranks
