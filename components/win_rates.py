"""Win rates of one target's candidates, counted from per-image ranks for many weight vectors at once.

The hot loop of Stage III and its bootstrap: exact integer sums, vectorised over candidates and resamples."""

from __future__ import annotations

import numpy as np

_CHUNK_ELEMENTS = 1 << 22  # per-image comparison outcomes summed at once
_INTEGER_COLUMNS = 8  # up to this many weight vectors, outcomes are summed in integers, not by BLAS
_EXACT_FLOAT32 = 1 << 24  # integer sums up to this are exact in float32


def win_rates(losses: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, m) finite losses of one target's candidates, (k, m) integer image weights -> (k, n, n) W.

    W[b, i, j] = sum_I w_bI (1[l_i(I) < l_j(I)] + 0.5 1[tie]) / sum_I w_bI, W[b, i, i] = 0.5 (and
    0.5 everywhere for a weight vector that gives the target's images no weight at all). Each
    image's outcome for the pair i < j is sign(rank_j - rank_i) in {-1, 0, 1} (ranks among the
    candidates), and one matrix product per candidate sums them for every weight vector
    (`_signed_sums`). The sums are integers, so float32 is exact below 2**24 and
    W[j, i] = 1 - W[i, j] exactly.
    """
    weights = np.asarray(weights)
    total = weights.sum(axis=1, dtype=np.float64)[:, None]  # (k, 1)
    signed = _signed_sums(_ranks(losses, np.float32), weights.T)  # (pairs, k)
    return _wins(len(losses), total, signed.T)


def _signed_sums(ranks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, m) ranks, (m, k) integer weights -> (pairs, k) float64: sum_I w_I sign(rank_j(I) -
    rank_i(I)) for each pair i < j, in np.triu_indices order, exact.

    Each candidate is compared with the later ones (two comparisons, no gather), into an int8
    buffer of outcomes of several candidates. A few weight vectors (a resample's, or a group's)
    are summed in int32 by einsum: no BLAS call, whose threads would spin between small products on
    a busy machine. Many (a point estimate with all its resamples) take one float32 matrix product
    per buffer (exact below 2**24; float64 above), few and large.
    """
    n, m = ranks.shape
    n_pairs, k = n * (n - 1) // 2, weights.shape[1]
    out = np.zeros((n_pairs, k))
    integer = k <= _INTEGER_COLUMNS and np.abs(weights).sum(axis=0).max(initial=0) < 2**31
    if integer:
        columns = np.ascontiguousarray(weights.T, dtype=np.int32)  # (k, m)

        def add(outcomes: np.ndarray, lo: int, first: int) -> None:
            w = columns[:, lo : lo + outcomes.shape[1]]
            out[first : first + len(outcomes)] += np.einsum("ij,kj->ik", outcomes.astype(np.int32), w)

    else:
        total = weights.sum(axis=0, dtype=np.float64).max(initial=0)
        floats = weights.astype(np.float32 if total <= _EXACT_FLOAT32 else np.float64)

        def add(outcomes: np.ndarray, lo: int, first: int) -> None:
            w = floats[lo : lo + outcomes.shape[1]]
            out[first : first + len(outcomes)] += outcomes.astype(w.dtype) @ w

    held = _CHUNK_ELEMENTS // 4 if integer else _CHUNK_ELEMENTS  # integers: in cache
    width = min(m, max(1, held // max(1, n - 1)))  # images at a time
    buffer = np.empty((max(n - 1, min(n_pairs, held // width)), width), np.int8)
    for lo in range(0, m, width):
        block = ranks[:, lo : lo + width]
        done = filled = 0  # pairs summed into `out`; outcome rows waiting in `buffer`
        for a in range(n - 1):
            if filled + n - a - 1 > len(buffer):
                add(buffer[:filled, : block.shape[1]], lo, done)
                done, filled = done + filled, 0
            later, rows = block[a + 1 :], buffer[filled : filled + n - a - 1, : block.shape[1]]
            np.subtract((later > block[a]).view(np.int8), (later < block[a]).view(np.int8), out=rows)
            filled += n - a - 1
        add(buffer[:filled, : block.shape[1]], lo, done)
    return out


def _wins(n: int, total: np.ndarray, signed: np.ndarray) -> np.ndarray:
    """(k, 1) total weights, (k, pairs) weighted sign sums -> (k, n, n) win rates (0.5 where a
    weight vector gives no image any weight)."""
    i, j = np.triu_indices(n, 1)
    wins_ij = (total + signed) / 2  # weighted wins of i over j, ties half (float64, exact)
    wins = np.full((len(total), n, n), 0.5)
    counted = np.flatnonzero(total[:, 0] > 0)
    wins[counted[:, None], i, j] = wins_ij[counted] / total[counted]
    wins[counted[:, None], j, i] = (total[counted] - wins_ij[counted]) / total[counted]
    return wins


def _ranks(losses: np.ndarray, dtype: type) -> np.ndarray:
    """(n, m) losses -> (n, m) rank of each candidate among the candidates on the same image, ties
    equal: small integers, so differences in float32 keep every comparison of the float64 losses."""
    by_image = np.ascontiguousarray(losses.T)  # (m, n): one image's candidates are contiguous
    order = np.argsort(by_image, axis=1)
    ordered = np.take_along_axis(by_image, order, axis=1)
    dense = np.zeros(by_image.shape, dtype)
    np.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1, dtype=dtype, out=dense[:, 1:])
    ranks = np.empty_like(dense)
    np.put_along_axis(ranks, order, dense, axis=1)
    return np.ascontiguousarray(ranks.T)
