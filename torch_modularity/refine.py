"""Greedy refinement of a partition by node moves with the exact n-cut gain.

n-cut = k - sum_c W_cc / vol_c, where W_cc is twice the edge weight inside cluster c.
Moving node i from cluster a to b changes only W_aa, W_bb, vol_a and vol_b, by amounts that
depend on e_i (its edge weight to each cluster) and its degree d_i. Nodes of one layer have
no edges between them (and in a bipartite graph neither do nodes of one colour class), so a
whole batch of such nodes can move at once: their e_i do not change, and the new cluster
totals are exact sums. A batch is accepted only if the exact new n-cut is lower; otherwise it
is halved (keeping the best single gains). The result is never worse than the start and
always keeps every cluster non-empty.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["refine_partition"]


def one_hot(labels: np.ndarray, k: int, dtype=np.float64) -> np.ndarray:
    """(n, k) cluster indicator matrix; rows of label -1 are all zero."""
    h = np.zeros((labels.shape[0], k), dtype=dtype)
    keep = labels >= 0
    h[np.nonzero(keep)[0], labels[keep]] = 1
    return h


def _ncut_from_totals(w_in: np.ndarray, vol: np.ndarray, eps: float) -> float:
    return float(np.sum(np.maximum(vol - w_in, 0.0) / (vol + eps)))


def refine_partition(
    sizes: Sequence[int],
    blocks: Sequence[Tuple[int, int, np.ndarray]],
    groups: Sequence[Sequence[int]],
    labels: np.ndarray,
    k: int,
    degrees: np.ndarray,
    max_passes: int = 10,
    inner_passes: int = 2,
    eps: float = 1e-8,
) -> Tuple[np.ndarray, float]:
    """Lower the n-cut of ``labels`` by batched greedy node moves.

    Args:
        sizes: nodes per layer; blocks: ``(src, dst, |W|)`` edge blocks.
        groups: lists of layers whose nodes share no edges (colour classes, or single layers).
        labels: starting labels (every cluster non-empty), one per node.
        k: number of clusters.
        degrees: weighted degree of every node.

    Returns:
        ``(labels, ncut)`` with ``ncut`` no higher than the start's.
    """
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    labels = np.asarray(labels, dtype=np.int64).copy()
    deg = np.asarray(degrees, dtype=np.float64)
    if deg.shape != (n,):
        raise ValueError(f"degrees must have one entry per node ({n})")
    dtype = blocks[0][2].dtype if blocks else np.float64

    def indicator(lab):
        return one_hot(lab, k, dtype)

    def edge_to_clusters(layer_ids: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """Node ids of the given layers and their (n, k) edge weight to each cluster."""
        ids = np.concatenate([np.arange(offsets[l], offsets[l + 1]) for l in layer_ids])
        pos = {l: 0 for l in layer_ids}
        running = 0
        for l in layer_ids:
            pos[l] = running
            running += sizes[l]
        e = np.zeros((running, k))  # float64: gains are small differences
        for src, dst, w in blocks:
            if dst in pos:
                e[pos[dst]:pos[dst] + sizes[dst]] += w @ indicator(labels[offsets[src]:offsets[src + 1]])
            if src in pos:
                e[pos[src]:pos[src] + sizes[src]] += w.T @ indicator(labels[offsets[dst]:offsets[dst + 1]])
        return ids, e

    # Cluster totals: W_cc (twice the inner weight) and volumes.
    vol = np.bincount(labels, weights=deg, minlength=k)
    w_in = np.zeros(k)
    for src, dst, w in blocks:
        ls, ld = labels[offsets[src]:offsets[src + 1]], labels[offsets[dst]:offsets[dst + 1]]
        per = (w @ indicator(ls)).astype(np.float64)
        w_in += 2 * np.bincount(ld, weights=per[np.arange(len(ld)), ld], minlength=k)
    counts = np.bincount(labels, minlength=k)
    current = _ncut_from_totals(w_in, vol, eps)

    groups = [list(g) for g in groups if len(g)]
    for _ in range(max_passes):
        improved = False
        for group in groups:
            # Moves inside a group do not change the group's edge weights to clusters, so
            # e is computed once per group visit and only the cluster totals are updated.
            ids, e = edge_to_clusters(group)
            d = deg[ids]
            rows = np.arange(len(ids))
            for _ in range(inner_passes):
                a = labels[ids]
                e_a = e[rows, a]
                # Change of n-cut when node i alone moves from a to b (rows: nodes).
                vol_a_new = vol[a] - d
                keep_a = w_in[a] / (vol[a] + eps)
                new_a = np.where(vol_a_new > 0, (w_in[a] - 2 * e_a) / (vol_a_new + eps), 0.0)
                gain_b = (w_in[None, :] + 2 * e) / (vol[None, :] + d[:, None] + eps) - (w_in / (vol + eps))[None, :]
                delta = (keep_a - new_a)[:, None] - gain_b  # negative = lower n-cut
                delta[rows, a] = np.inf
                best_b = np.argmin(delta, axis=1)
                best = delta[rows, best_b]
                cand = np.nonzero(best < -1e-12)[0]
                if cand.size == 0:
                    break
                cand = cand[np.argsort(best[cand])]
                size, accepted = cand.size, False
                while size > 0:
                    batch = cand[:size]
                    out_count = np.bincount(a[batch], minlength=k)
                    in_count = np.bincount(best_b[batch], minlength=k)
                    if np.any(counts - out_count + in_count <= 0):
                        batch = _keep_nonempty(batch, a, best_b, counts, k)  # never empty a cluster
                        if batch.size == 0:
                            break
                    src_c, dst_c = a[batch], best_b[batch]
                    new_w = w_in - 2 * np.bincount(src_c, weights=e[batch, src_c], minlength=k) \
                        + 2 * np.bincount(dst_c, weights=e[batch, dst_c], minlength=k)
                    new_vol = vol - np.bincount(src_c, weights=d[batch], minlength=k) \
                        + np.bincount(dst_c, weights=d[batch], minlength=k)
                    value = _ncut_from_totals(new_w, new_vol, eps)
                    if value < current - 1e-12:
                        labels[ids[batch]] = dst_c
                        counts = counts - np.bincount(src_c, minlength=k) + np.bincount(dst_c, minlength=k)
                        w_in, vol, current = new_w, new_vol, value
                        improved = accepted = True
                        break
                    size = batch.size // 2
                if not accepted:
                    break
        if not improved:
            break
    return labels, current


def _keep_nonempty(batch: np.ndarray, a: np.ndarray, b: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """Moves of ``batch`` (in order of gain) that keep every cluster non-empty."""
    left = counts.astype(np.int64).copy()
    keep: List[int] = []
    for i in batch:
        if left[a[i]] > 1:
            left[a[i]] -= 1
            left[b[i]] += 1
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)
