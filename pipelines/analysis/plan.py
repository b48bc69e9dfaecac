"""Stages III and IV planned: where their outputs live (step folders keyed by what they read), which
test images they score, and the taxonomy's options. Pure reads of the config and the stored losses."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.config import config_hash, to_dict
from components.errors import TaskatlasError
from components.storage import Location
from components.taxonomy import TaxonomyOptions
from components.transfer_table import TransferTable
from pipelines.config import PipelineConfig
from pipelines.sections import AnalysisConfig
from pipelines.steps import DONE, FILES, Step, code_digest, sha256_of

# The modules whose code computes each step's outputs: part of its key (`code_digest`), so that a
# study rerun with new math recomputes its answer instead of reading the old one back.
AFFINITY_CODE = (
    "components.affinity_io",
    "components.loss_cube",
    "components.win_rates",
    "components.resampling",
    "components.ahp",
    "components.affinity",
)
TAXONOMY_CODE = (
    "components.transfer_table",
    "components.taxonomy",
    "components.bootstrap",
    "components.verdict",
    "components.answer",
)
SAMPLES = "affinity_samples.npy"  # (resamples, rows of affinity.parquet): a rerun's affinities, drawn


AVAILABLE = "beam_available.npy"  # (resamples, rows) bool: the row's sources were in that resample's beam


PRUNED = "pruned.json"  # beside affinity.parquet when Stage II was pruned: what was never a candidate


def affinity_step(cfg: PipelineConfig, transfer_key: str, losses: Location) -> Step:
    """Keyed by Stage II's key, the analysis settings, and what it reads: the SHA-256 of each
    per-target loss table in `losses` (`loss_digests`). A readout done again with other losses
    (its features were damaged, a GPU's nondeterminism) keeps every key of the plan but changes
    its target's table: the affinity, and the taxonomy keyed by it, are done again."""
    code = code_digest(*AFFINITY_CODE)
    parts = ("affinity", code, transfer_key, analysis_key(cfg.analysis), {"inputs": loss_digests(losses)})
    return Step(cfg.root, "affinity", config_hash(*parts))


def loss_digests(losses: Location) -> dict[str, str]:
    """Target -> SHA-256 of its loss table `<target>.parquet` in `losses`, Stage II's folder of
    them: as Stage II's marker recorded them (a rerun checks them against the files before it
    reuses the step), so no table is read here. A folder outside a finished Stage II step (tables
    given on the command line, a test's) is hashed, once per file version and process."""
    marker, prefix = losses.parent / DONE, f"{losses.name}/"
    recorded = marker.read_json().get(FILES, {}) if marker.exists() else {}
    found = {
        name.removeprefix(prefix).removesuffix(".parquet"): digest
        for name, (_, digest) in recorded.items()
        if name.startswith(prefix) and name.endswith(".parquet")
    }
    if found or not losses.exists():
        return dict(sorted(found.items()))
    tables = (f for f in losses.files() if f.name.endswith(".parquet"))
    return {f.name.removesuffix(".parquet"): sha256_of(f) for f in sorted(tables, key=lambda f: f.name)}


def analysis_key(analysis: AnalysisConfig) -> dict:
    """What of `analysis` keys Stage III: `test_subset` only when set (below 1), so a study that
    scores every test image keeps the key it had before the field existed; `subset_seed` only
    when set."""
    fields = to_dict(analysis)
    if analysis.test_subset == 1.0:
        del fields["test_subset"]
    if analysis.subset_seed is None:  # likewise
        del fields["subset_seed"]
    return fields


def in_test_subset(image_ids: Sequence[str], seed: int, fraction: float) -> np.ndarray:
    """(len(image_ids),) bool: the test images `analysis.test_subset` keeps. Image I is kept when
    the first 8 bytes of sha256("<seed>:<I>"), read as a fraction of 2**64, are below `fraction`:
    the image's own draw, the same whichever target's table it is read from and in any process, a
    share `fraction` of the images on average, and an independent draw for another seed. 1.0 keeps
    every image."""
    if fraction >= 1.0:
        return np.ones(len(image_ids), dtype=bool)
    limit = fraction * 2.0**64
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") < limit
            for i in image_ids
        ],
        dtype=bool,
    )


def keep_test_subset(
    table: pa.Table, seed: int, fraction: float, what: str, seed_key: str = "analysis.seed"
) -> pa.Table:
    """The rows of a loss table (`what`: which, for the error) whose `image_id` is in the test
    subset (`in_test_subset`); the table itself at 1.0. `seed_key`: the setting `seed` came from."""
    if fraction >= 1.0:
        return table
    ids = pc.cast(table["image_id"], pa.string())  # dictionary-encoded as read
    unique = pc.unique(ids).to_pylist()
    kept = [i for i, keep in zip(unique, in_test_subset(unique, seed, fraction), strict=True) if keep]
    if not kept:
        raise TaskatlasError(
            f"analysis.test_subset={fraction} with {seed_key}={seed} keeps none of the "
            f"{len(unique)} test images of {what}; raise analysis.test_subset"
        )
    return table.filter(pc.is_in(ids, value_set=pa.array(kept, pa.string())))


def taxonomy_step(cfg: PipelineConfig, affinity_key: str) -> Step:
    return Step(cfg.root, "taxonomy", config_hash(cfg.taxonomy, affinity_key, code_digest(*TAXONOMY_CODE)))


def taxonomy_options(cfg: PipelineConfig, budget: int | None = None) -> TaxonomyOptions:
    t = cfg.taxonomy
    source_only = {name for name in cfg.tasks if cfg.task(name).source_only} | set(t.source_only)
    return TaxonomyOptions(
        budget=budget if budget is not None else t.budget,
        max_order=t.max_order,
        exclude=frozenset(t.exclude),
        source_only=frozenset(source_only - set(t.exclude)),
        importance=dict(t.importance),
        cost=dict(t.cost),
        transform=t.transform,
    )


def within_table(options: TaxonomyOptions, table: TransferTable) -> TaxonomyOptions:
    """Options naming only tasks the table has: a pruned study can lose a source altogether (pruned
    from every target), and a task with no transfer in the table can be neither root nor source."""
    known = set(table.tasks)
    return replace(
        options,
        exclude=options.exclude & known,
        source_only=options.source_only & known,
        importance={k: v for k, v in options.importance.items() if k in known},
        cost={k: v for k, v in options.cost.items() if k in known},
    )
