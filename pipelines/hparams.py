"""The hyperparameters a network trains with: one typed value from the search (or the config)
to the trainer, the step key and the MLflow runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class HParams:
    """What a network trains with that the search may choose per task (`train.lr`,
    `train.weight_decay`, `train.batch_size`: the defaults where no search ran). `batch_size` is
    the effective batch, split over the workers."""

    lr: float
    weight_decay: float
    batch_size: int

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings the search chooses: the keys of its space and of a marker's `hparams`."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_json(cls, data: dict) -> HParams:
        return cls(**{k: data[k] for k in cls.names()})

    def to_json(self) -> dict:
        return asdict(self)
