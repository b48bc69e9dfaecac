"""The Analytic Hierarchy Process: win rates -> R = W / W^T -> affinities, its Perron vector."""

from __future__ import annotations

import numpy as np

WIN_CLIP = (0.001, 0.999)  # keeps W / W^T finite when a source always (or never) wins


def perron_vector(ratios: np.ndarray) -> np.ndarray:
    """(..., n, n) positive matrices -> (..., n) principal eigenvectors, real, positive, sum 1.

    numpy's eig returns complex dtype; the Perron eigenvalue is real, so the real part is exact.
    Zero rows/columns (padding) get weight 0.
    """
    values, vectors = np.linalg.eig(ratios)
    top = np.argmax(values.real, axis=-1)
    vector = np.take_along_axis(vectors, top[..., None, None], axis=-1)[..., 0].real
    vector = vector * np.sign(vector.sum(axis=-1, keepdims=True))
    vector = np.where(np.abs(ratios).sum(axis=-1) > 0, vector, 0.0)
    return vector / vector.sum(axis=-1, keepdims=True)


def ahp_affinity(wins: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(..., n, n) win rates and (..., n) candidate mask -> (..., n) affinities (0 outside the mask)."""
    clipped = np.clip(wins, *WIN_CLIP)
    both = mask[..., :, None] & mask[..., None, :]
    ratios = np.where(both, clipped / np.swapaxes(clipped, -1, -2), 0.0)
    return perron_vector(ratios)
