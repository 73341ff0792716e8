"""Shuffle baselines: the same network with each layer's weights permuted.

Two methods, as in the research code:

- ``"layer"``: permute all entries (zeros included) of each weight block independently.
  Keeps each layer's multiset of values; moves the sparsity mask of a pruned layer.
- ``"layer_nonzero"``: permute only the non-zero values among the non-zero positions.
  Keeps the multiset and the exact mask: the stricter baseline for pruned networks.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

__all__ = ["SHUFFLE_METHODS", "shuffle_weights"]

SHUFFLE_METHODS = ("layer", "layer_nonzero")


def check_shuffle_method(method: str) -> str:
    if method not in SHUFFLE_METHODS:
        raise ValueError(f"unknown shuffle method {method!r}; choose one of {', '.join(SHUFFLE_METHODS)}")
    return method


def _random_subset(rng: np.random.Generator, size: int, m: int) -> np.ndarray:
    """``m`` distinct integers drawn uniformly from ``range(size)``, sorted, in O(m) memory."""
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    if m >= size:
        return np.arange(size, dtype=np.int64)
    if 2 * m > size:
        drop = _random_subset(rng, size, size - m)
        keep = np.ones(size, dtype=bool)
        keep[drop] = False
        return np.flatnonzero(keep)
    picked = np.unique(rng.integers(0, size, m + m // 2 + 16))
    while picked.size < m:
        picked = np.unique(np.concatenate([picked, rng.integers(0, size, m - picked.size + 16)]))
    if picked.size > m:
        # Draws with replacement, de-duplicated, then a uniform subset: every m-subset is
        # equally likely by exchangeability.
        picked = np.sort(picked[rng.permutation(picked.size)[:m]])
    return picked


def shuffle_weights(weights: Sequence, method: str, rng: np.random.Generator) -> List:
    """Shuffle every matrix independently with ``method``; the inputs are not modified.

    ``"layer"`` is a uniformly random permutation of all entries; it is drawn as "the
    non-zero values, permuted, at a uniformly random set of positions", which has the same
    distribution, costs O(non-zeros) and gives identical results for a dense array and a
    scipy CSR matrix holding the same weights.

    Example:
        >>> import numpy as np
        >>> w = np.array([[1.0, 0.0], [2.0, 3.0]])
        >>> out = shuffle_weights([w], "layer_nonzero", np.random.default_rng(0))[0]
        >>> bool(((out != 0) == (w != 0)).all()), sorted(out.ravel().tolist())
        (True, [0.0, 1.0, 2.0, 3.0])

    Args:
        weights: 2-D numpy arrays or scipy sparse matrices (one per edge block).
        method: ``"layer"`` or ``"layer_nonzero"``.
        rng: the generator that drives the permutations.

    Returns:
        New matrices of the same shapes and types (CSR for sparse inputs).
    """
    check_shuffle_method(method)
    out = []
    for w in weights:
        if sp.issparse(w):
            csr = sp.csr_matrix(w, copy=True)
            csr.sum_duplicates()
            csr.sort_indices()
            csr.eliminate_zeros()
            values = csr.data
        else:
            w = np.asarray(w)
            flat = w.ravel()
            nz = np.flatnonzero(flat)
            values = flat[nz]  # row-major order, the same order as CSR data
        # In-place Fisher-Yates: the same permutation as values[rng.permutation(n)], without
        # the index array and the gather.
        # (values is our own array: a copy of the CSR data or a fancy-indexed gather.)
        rng.shuffle(values)
        if method == "layer_nonzero":
            if sp.issparse(w):
                csr.data = values
                out.append(csr)
            else:
                new = np.zeros_like(flat)
                new[nz] = values
                out.append(new.reshape(w.shape))
            continue
        n_rows, n_cols = w.shape
        pos = _random_subset(rng, n_rows * n_cols, values.size)
        if sp.issparse(w):
            out.append(sp.csr_matrix((values, (pos // n_cols, pos % n_cols)), shape=w.shape))
        else:
            new = np.zeros(n_rows * n_cols, dtype=w.dtype)
            new[pos] = values
            out.append(new.reshape(w.shape))
    return out
