"""Seeds drawn from other seeds: one convention for every replicate's seed, so that replicate 0
keeps the seed a study without replicates had and the others come from independent streams."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def derived_seed(entropy: Sequence[int]) -> int:
    """A 31-bit seed drawn from `entropy` (NumPy's SeedSequence): the same entropy, the same seed
    on every host; different entropy, statistically independent seeds."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0] & 0x7FFFFFFF)


def replicate_seed(seed: int, replicate: int, stream: str) -> int:
    """Replicate `replicate`'s seed: `seed` itself for replicate 0, else one drawn from (seed,
    replicate) in the named `stream` (each kind of replicate has its own: a task network's and the
    `random` encoder's never coincide)."""
    if replicate == 0:
        return seed
    return derived_seed([seed, replicate, zlib.crc32(stream.encode())])
