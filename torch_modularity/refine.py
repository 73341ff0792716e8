"""Greedy refinement of a partition by node moves with the exact n-cut gain.

n-cut = k - sum_c W_cc / vol_c, where W_cc is twice the edge weight inside cluster c.
Moving node i from cluster a to b changes only W_aa, W_bb, vol_a and vol_b, by amounts that
depend on e_i (its edge weight to each cluster) and its degree d_i. Nodes of one layer have
no edges between them (and in a bipartite graph neither do nodes of one colour class), so a
whole batch of such nodes can move at once: their e_i do not change, and the new cluster
totals are exact sums. A batch is accepted only if the exact new n-cut is lower; otherwise it
is halved (keeping the best single gains); all the halvings are scored at once. The result is
never worse than the start and always keeps every cluster non-empty.
"""
from __future__ import annotations

import ctypes
from typing import List, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

from . import _native

__all__ = ["refine_partition", "native_available"]

# A move batch touching more than 1/_GATHER_RATIO of a block's columns updates the edge
# totals with a full product instead of a column gather.
_GATHER_RATIO = 16


def one_hot(labels: np.ndarray, k: int, dtype=np.float64) -> np.ndarray:
    """(n, k) cluster indicator matrix; rows of label -1 are all zero."""
    h = np.zeros((labels.shape[0], k), dtype=dtype)
    keep = labels >= 0
    h[np.nonzero(keep)[0], labels[keep]] = 1
    return h


def native_available() -> bool:
    """Whether the compiled refinement kernel is installed (else the numpy version runs)."""
    return _native.available()


def _refine_native(sizes, offsets, blocks, layer_groups, labels, k, deg, max_passes, inner_passes, eps):
    """:func:`refine_partition` by the C kernel: ``(labels, ncut, start)``, or ``None`` when the
    kernel is missing or the blocks are not all dense float32 / all dense float64."""
    lib = _native.kernels()
    if lib is None or not blocks or any(sp.issparse(w) for _, _, w in blocks):
        return None
    dtype = np.dtype(blocks[0][2].dtype)
    if dtype not in (np.float32, np.float64) or any(w.dtype != dtype for _, _, w in blocks):
        return None
    data = [np.ascontiguousarray(w) for _, _, w in blocks]
    sizes_a = np.asarray(sizes, dtype=np.int64)
    src = np.asarray([b[0] for b in blocks], dtype=np.int64)
    dst = np.asarray([b[1] for b in blocks], dtype=np.int64)
    pointers = (ctypes.c_void_p * len(data))(*[w.ctypes.data for w in data])
    group_ptr = np.concatenate([[0], np.cumsum([len(g) for g in layer_groups])]).astype(np.int64)
    group_layers = np.asarray([l for g in layer_groups for l in g], dtype=np.int64)
    out_labels = np.array(labels, dtype=np.int64)  # a copy: the kernel moves labels in place
    deg = np.ascontiguousarray(deg, dtype=np.float64)
    values = np.zeros(2)
    fn = lib.tm_refine_dense_f32 if dtype == np.float32 else lib.tm_refine_dense_f64
    status = fn(len(sizes_a), sizes_a.ctypes.data, offsets.ctypes.data, len(data), src.ctypes.data, dst.ctypes.data,
                ctypes.cast(pointers, ctypes.c_void_p), len(layer_groups), group_ptr.ctypes.data,
                group_layers.ctypes.data if group_layers.size else None, out_labels.ctypes.data, deg.ctypes.data,
                int(k), int(max_passes), int(inner_passes), float(eps), values.ctypes.data)
    if status != 0:
        raise MemoryError("the refinement kernel could not allocate its work arrays")
    return out_labels, float(values[0]), float(values[1])


def _check_inputs(sizes, blocks, groups, labels, k: int, n: int) -> None:
    """Reject inputs that would index outside the arrays (the C kernel trusts them)."""
    n_layers = len(sizes)
    for src, dst, w in blocks:
        if not (0 <= src < n_layers and 0 <= dst < n_layers):
            raise ValueError(f"block ({src}, {dst}) names a layer outside 0..{n_layers - 1}")
        if tuple(w.shape) != (sizes[dst], sizes[src]):
            raise ValueError(f"block ({src}, {dst}) has shape {tuple(w.shape)}, expected "
                             f"(sizes[{dst}], sizes[{src}]) = ({sizes[dst]}, {sizes[src]})")
    layers = [l for g in groups for l in g]
    if any(not 0 <= l < n_layers for l in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"groups must name distinct layers in 0..{n_layers - 1}, got {[list(g) for g in groups]}")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have one entry per node ({n}), got shape {labels.shape}")
    if k < 1 or labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in 0..{k - 1} (k = {k})")


def _ncut_from_totals(w_in: np.ndarray, vol: np.ndarray, eps: float) -> float:
    return float(np.sum(np.maximum(vol - w_in, 0.0) / (vol + eps)))


def refine_partition(
    sizes: Sequence[int],
    blocks: Sequence[Tuple[int, int, np.ndarray]],
    groups: Sequence[Sequence[int]],
    labels: np.ndarray,
    k: int,
    degrees: np.ndarray,
    max_passes: int = 12,
    inner_passes: int = 1,
    eps: float = 1e-8,
    return_start: bool = False,
    backend: str = "auto",
):
    """Lower the n-cut of ``labels`` by batched greedy node moves.

    Args:
        sizes: nodes per layer; blocks: ``(src, dst, |W|)`` edge blocks (dense or CSR).
        groups: lists of layers whose nodes share no edges (colour classes, or single layers).
        labels: starting labels (every cluster non-empty), one per node.
        k: number of clusters.
        degrees: weighted degree of every node.
        max_passes: sweeps over all groups; inner_passes: batches tried per group visit.
        backend: ``"native"`` (the C kernel; dense blocks only), ``"numpy"``, or ``"auto"``
            (native where it applies). Both make the same moves up to rounding: their labels
            differ only where two moves' gains tie within rounding (the numpy version sums
            float32 blocks' products in float32, the kernel in float64).

    Returns:
        ``(labels, ncut)`` with ``ncut`` no higher than the start's; with ``return_start``
        ``(labels, ncut, start_ncut)`` (the start's n-cut, from the same exact sums).
    """
    if backend not in ("auto", "native", "numpy"):
        raise ValueError(f"backend must be 'auto', 'native' or 'numpy', got {backend!r}")
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    deg_in = np.asarray(degrees, dtype=np.float64)
    if deg_in.shape != (n,):
        raise ValueError(f"degrees must have one entry per node ({n})")
    if not np.isfinite(deg_in).all():
        raise ValueError("degrees are not all finite (NaN/Inf weights?); the n-cut is undefined")
    _check_inputs(sizes, blocks, groups, labels, k, n)
    layer_groups = [list(g) for g in groups if len(g)]
    if backend != "numpy":
        out = _refine_native(sizes, offsets, blocks, layer_groups, labels, k, deg_in, max_passes, inner_passes, eps)
        if out is not None:
            return out if return_start else out[:2]
        if backend == "native":
            raise RuntimeError("the native refinement kernel is not installed or does not take these blocks "
                               "(dense float32/float64 only); use backend='numpy'")
    dtype = blocks[0][2].dtype if blocks else np.float64

    # Nodes are renumbered so that every group is one contiguous range (its rows of the edge
    # totals are then a view, not a gather per visit); ``node_order[p]`` is the node at position p.
    placed = [l for g in layer_groups for l in g]
    unplaced = set(range(len(sizes))) - set(placed)
    order_layers = placed + sorted(unplaced)
    start_of = np.zeros(len(sizes), dtype=np.int64)
    pos = 0
    for l in order_layers:
        start_of[l] = pos
        pos += sizes[l]
    node_order = np.concatenate([np.arange(offsets[l], offsets[l + 1]) for l in order_layers])
    labels = np.asarray(labels, dtype=np.int64)[node_order]
    deg = deg_in[node_order]

    def layer_slice(l: int) -> slice:
        return slice(start_of[l], start_of[l] + sizes[l])

    # e[c, i]: edge weight from node i to cluster c (cluster-major: the per-node maximum over
    # clusters is then an elementwise maximum of k rows). Kept up to date incrementally: a move
    # of node j changes e only for j's neighbours, by the column (or row) of j's weights.
    e = np.zeros((k, n))
    for src, dst, w in blocks:
        # (sparse or dense block on the left: a dense @ CSR product would give np.matrix)
        e[:, layer_slice(dst)] += (w @ one_hot(labels[layer_slice(src)], k, dtype)).T
        e[:, layer_slice(src)] += (w.T @ one_hot(labels[layer_slice(dst)], k, dtype)).T
    vol = np.bincount(labels, weights=deg, minlength=k)
    w_in = np.bincount(labels, weights=e[labels, np.arange(n)], minlength=k)  # = 2 x inner weight
    counts = np.bincount(labels, minlength=k)
    current = start = _ncut_from_totals(w_in, vol, eps)
    layer_at = np.repeat(np.asarray(order_layers), [sizes[l] for l in order_layers])

    # Blocks touching each layer, as (matrix, other layer, layer is the block's source).
    touching: List[List[Tuple[object, int, bool]]] = [[] for _ in sizes]
    for src, dst, w in blocks:
        touching[src].append((w, dst, True))
        touching[dst].append((w, src, False))

    def apply_moves(nodes: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        """Update e of the neighbours of the moved ``nodes`` (positions)."""
        cols = np.arange(nodes.size)
        change_all = np.zeros((k, nodes.size), dtype=dtype)
        change_all[new, cols] = 1
        change_all[old, cols] -= 1
        moved_layer = layer_at[nodes]
        for here in np.unique(moved_layer):
            sel = np.nonzero(moved_layer == here)[0]
            local = nodes[sel] - start_of[here]
            change = change_all[:, sel]
            for w, there, is_src in touching[here]:
                target = e[:, layer_slice(there)]
                many = local.size * _GATHER_RATIO >= w.shape[1]
                if sp.issparse(w):
                    # Sparse block on the left (a dense @ CSR product gives np.matrix); CSR
                    # column slicing is slow, so many moved sources take one full product.
                    if not is_src:
                        target += (w[local, :].T @ change.T).T
                    elif many:
                        full = np.zeros((w.shape[1], k), dtype=dtype)
                        full[local] = change.T
                        target += (w @ full).T
                    else:
                        target += (w[:, local] @ change.T).T
                elif not is_src:  # moved nodes are destinations: e[:, src] += change @ W[local, :] (row gather)
                    target += change @ w[local, :]
                elif many:
                    # Moved sources: a column gather touches a cache line per entry; for more
                    # than 1/16 of the columns one streaming product with the (mostly zero)
                    # change matrix is faster.
                    full = np.zeros((k, w.shape[1]), dtype=dtype)
                    full[:, local] = change
                    target += full @ w.T
                else:  # e[:, dst] += change @ W[:, local]^T
                    target += change @ w[:, local].T

    bounds = []
    for g in layer_groups:
        lo = start_of[g[0]]
        bounds.append((lo, lo + sum(sizes[l] for l in g)))
    for _ in range(max_passes):
        improved = False
        for lo, hi in bounds:
            d = deg[lo:hi]
            rows = np.arange(hi - lo)
            for _ in range(inner_passes):
                eg = e[:, lo:hi]  # a view: (k, nodes of the group)
                a = labels[lo:hi]
                e_a = eg[a, rows]
                # Moving node i from a to b lowers the n-cut by gain_b - loss_a, with
                # loss_a = w_a / vol_a - (w_a - 2 e_ia) / (vol_a - d_i) and
                # gain_b = (w_b + 2 e_ib) / (vol_b + d_i) - w_b / vol_b = (2 e_ib - c_b d_i) / (vol_b + d_i)
                # where c_b = w_b / vol_b (eps added to every volume, as in the n-cut).
                vol_a = vol[a]
                vol_a_new = vol_a - d
                loss = w_in[a] / (vol_a + eps)
                loss -= np.divide(w_in[a] - 2 * e_a, vol_a_new + eps, where=vol_a_new > 0, out=np.zeros(hi - lo))
                gain = np.multiply.outer(-(w_in / (vol + eps)), d)
                gain += eg
                gain += eg
                gain /= np.add.outer(vol + eps, d)
                gain[a, rows] = -np.inf
                best = gain.max(axis=0)  # k rows: an elementwise maximum
                best -= loss  # the n-cut decrease of each node's best single move
                cand = np.nonzero(best > 1e-12)[0]
                if cand.size == 0:
                    break
                cand = cand[np.argsort(-best[cand], kind="stable")]  # ties: lower position first
                best_b = np.zeros(hi - lo, dtype=np.int64)
                best_b[cand] = gain[:, cand].argmax(axis=0)
                batch = _best_prefix(cand, a, best_b, eg, d, w_in, vol, counts, current, k, eps)
                if batch is None:
                    break
                src_c, dst_c = a[batch], best_b[batch]
                w_in, vol = _totals_after(batch, a, best_b, eg, d, w_in, vol, k)
                current = _ncut_from_totals(w_in, vol, eps)
                labels[lo + batch] = dst_c
                apply_moves(lo + batch, src_c, dst_c)
                counts = counts - np.bincount(src_c, minlength=k) + np.bincount(dst_c, minlength=k)
                improved = True
        if not improved:
            break
    out = np.empty(n, dtype=np.int64)
    out[node_order] = labels
    labels = out
    return (labels, current, start) if return_start else (labels, current)


def _totals_after(batch, a, best_b, eg, d, w_in, vol, k):
    """Cluster totals ``(w_in, vol)`` after the moves ``batch`` (from ``a`` to ``best_b``).

    Nodes of one group share no edges, so the moves' changes simply add up."""
    src_c, dst_c = a[batch], best_b[batch]
    new_w = w_in - 2 * np.bincount(src_c, weights=eg[src_c, batch], minlength=k) \
        + 2 * np.bincount(dst_c, weights=eg[dst_c, batch], minlength=k)
    new_vol = vol - np.bincount(src_c, weights=d[batch], minlength=k) + np.bincount(dst_c, weights=d[batch], minlength=k)
    return new_w, new_vol


def _best_prefix(cand, a, best_b, eg, d, w_in, vol, counts, current, k, eps):
    """The moves to make: the longest of the prefixes of ``cand`` (sorted by single-move gain)
    of length ``m, m/2, m/4, ...`` whose exact n-cut is lower than ``current``, or ``None``.

    Moving a set of nodes of one group changes the cluster totals by the sum of the single
    moves' changes (they share no edges), so the totals of every prefix are cumulative sums
    and all prefixes are scored at once. A prefix that would empty a cluster is replaced by
    its moves that keep every cluster non-empty. (Taking the prefix with the lowest n-cut
    instead converged to worse partitions on the 20k-node MLP; the longest improving prefix
    of any length, to much worse ones.)
    """
    m = cand.size
    src_c, dst_c = a[cand], best_b[cand]
    sizes = []
    size = m
    while size > 0:
        sizes.append(size)
        size //= 2
    ends = np.asarray(sizes[::-1])  # prefix lengths, ascending: 1, ..., m // 2, m
    n_seg = ends.size
    # Segment i holds the candidates in prefix i but not in prefix i - 1; per-segment cluster
    # totals by one bincount per quantity, then a cumulative sum over the few segments.
    seg = np.searchsorted(ends, np.arange(m), side="right") * k
    ew = 2.0 * eg[src_c, cand], 2.0 * eg[dst_c, cand]

    def prefix_totals(weights_out, weights_in):
        per_seg = np.bincount(seg + dst_c, weights=weights_in, minlength=n_seg * k) \
            - np.bincount(seg + src_c, weights=weights_out, minlength=n_seg * k)
        return np.cumsum(per_seg.reshape(n_seg, k), axis=0)[::-1]  # descending prefix lengths

    new_w = w_in[None, :] + prefix_totals(ew[0], ew[1])
    dd = d[cand]
    new_vol = vol[None, :] + prefix_totals(dd, dd)
    values = np.sum(np.maximum(new_vol - new_w, 0.0) / (new_vol + eps), axis=1)
    if np.all(np.bincount(src_c, minlength=k) < counts):
        valid = np.ones(n_seg, dtype=bool)  # not even all the moves together empty a cluster
    else:
        ones = np.ones(m)
        valid = np.all(counts[None, :] + prefix_totals(ones, ones) > 0.5, axis=1)
    for size, value, ok in zip(sizes, values, valid):
        if ok:
            if value < current - 1e-12:
                return cand[:size]
            continue
        batch = _keep_nonempty(cand[:size], a, best_b, counts, k)  # never empty a cluster
        if batch.size == 0:
            continue
        if _ncut_from_totals(*_totals_after(batch, a, best_b, eg, d, w_in, vol, k), eps) < current - 1e-12:
            return batch
    return None


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
