"""Stage II as plain parts: the plan, the feature sources and the readout (no Ray, no MLflow)."""

from components.tasks import view_input
from components.transfer.features import (
    FeatureKind,
    FeatureSource,
    build_feature_module,
    encode_batch,
    feature_channels,
    random_encoder,
    trained_encoder,
)
from components.transfer.plan import (
    BASELINES,
    Readout,
    ReadoutKind,
    TransferPlan,
    baseline,
    describe_plan,
    estimate_seconds,
    plan_transfers,
    prune_plan,
    rank_sources,
    shared_sources,
    top_k_for_budget,
)
from components.transfer.readout import (
    ReadoutNetwork,
    ReadoutResult,
    ReadoutSettings,
    build_readout,
    label_tensor,
    train_readout,
)

__all__ = [
    "BASELINES",
    "FeatureKind",
    "FeatureSource",
    "Readout",
    "ReadoutKind",
    "ReadoutNetwork",
    "ReadoutResult",
    "ReadoutSettings",
    "TransferPlan",
    "baseline",
    "build_feature_module",
    "build_readout",
    "describe_plan",
    "encode_batch",
    "estimate_seconds",
    "feature_channels",
    "label_tensor",
    "plan_transfers",
    "prune_plan",
    "random_encoder",
    "rank_sources",
    "shared_sources",
    "top_k_for_budget",
    "train_readout",
    "trained_encoder",
    "view_input",
]
