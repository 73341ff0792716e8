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

__all__ = ["SHUFFLE_METHODS", "shuffle_weights"]

SHUFFLE_METHODS = ("layer", "layer_nonzero")


def check_shuffle_method(method: str) -> str:
    if method not in SHUFFLE_METHODS:
        raise ValueError(f"unknown shuffle method {method!r}; choose one of {', '.join(SHUFFLE_METHODS)}")
    return method


def shuffle_weights(weights: Sequence[np.ndarray], method: str, rng: np.random.Generator) -> List[np.ndarray]:
    """Shuffle every matrix independently with ``method``; the inputs are not modified.

    Example:
        >>> import numpy as np
        >>> w = np.array([[1.0, 0.0], [2.0, 3.0]])
        >>> out = shuffle_weights([w], "layer_nonzero", np.random.default_rng(0))[0]
        >>> bool(((out != 0) == (w != 0)).all()), sorted(out.ravel().tolist())
        (True, [0.0, 1.0, 2.0, 3.0])

    Args:
        weights: 2-D numpy arrays (one per edge block).
        method: ``"layer"`` or ``"layer_nonzero"``.
        rng: the generator that drives the permutations.

    Returns:
        New arrays of the same shapes.
    """
    check_shuffle_method(method)
    out = []
    for w in weights:
        w = np.asarray(w)
        if method == "layer":
            out.append(rng.permutation(w.ravel()).reshape(w.shape))
        else:
            flat = w.ravel().copy()
            nz = np.flatnonzero(flat)
            flat[nz] = flat[nz][rng.permutation(nz.size)]
            out.append(flat.reshape(w.shape))
    return out
