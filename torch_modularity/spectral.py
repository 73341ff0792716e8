"""Spectral clustering of weight graphs and the normalized cut, computed from per-layer blocks.

The pipeline follows the research code (scikit-learn's ``SpectralClustering`` with a
precomputed affinity): the ``k`` eigenvectors of the normalized Laplacian
``L = I - D^-1/2 A D^-1/2`` with the smallest eigenvalues (the trivial one kept), each divided
by ``sqrt(degree)``, then k-means++ with restarts on the rows. It never forms the N x N matrix:
a layered graph is bipartite (even vs odd layers), so the eigenvectors come from the Gram
operator ``B^T B`` of the normalized adjacency on the smaller colour class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh

from ._threads import blas_threads, torch_threads
from ._torch_modes import full_precision
from .graph import GraphLike, WeightGraph, as_graph
from . import _native
from .refine import one_hot, refine_partition

__all__ = ["ncut", "spectral_clustering", "spectral_embedding"]

NCUT_EPS = 1e-8  # added to each cluster volume, as in the research code
_EXACT_SUM_LIMIT = 1 << 22


# --------------------------------------------------------------------------- block operators
def _block_sums(w, axis: int) -> np.ndarray:
    """Row (axis=1) or column (axis=0) sums of a dense or CSR block, as float64."""
    return np.asarray(w.sum(axis=axis, dtype=np.float64)).ravel()


class _NormalizedBlocks:
    """Normalized adjacency ``M = D^-1/2 A D^-1/2`` of a layered graph, applied blockwise.

    The blocks are kept as given (no scaled copy: for a 20k-node MLP that copy alone was 268 MB
    and ~0.4 s of page faults and passes); products scale the skinny vector blocks instead,
    ``M x = D^-1/2 (A (D^-1/2 x))``.
    """

    def __init__(self, sizes: Sequence[int], blocks: Sequence[Tuple[int, int, np.ndarray]], dtype=None,
                 degrees: Optional[np.ndarray] = None):
        dtype = np.dtype(dtype or (blocks[0][2].dtype if blocks else np.float64))
        self.sizes = [int(s) for s in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        if degrees is not None:
            # Already summed by the caller (WeightGraph.degrees, float64 like here).
            deg = np.asarray(degrees, dtype=np.float64)
            if deg.shape != (self.n,):
                raise ValueError(f"degrees must have one entry per node ({self.n}), got shape {deg.shape}")
        else:
            deg = np.zeros(self.n)
            for src, dst, w in blocks:
                deg[self.offsets[dst]:self.offsets[dst + 1]] += _block_sums(w, 1)
                deg[self.offsets[src]:self.offsets[src + 1]] += _block_sums(w, 0)
        if np.any(deg <= 0):
            raise ValueError(
                f"{int(np.sum(deg <= 0))} nodes have no edges; remove isolated nodes first (WeightGraph.remove_isolated)"
            )
        self.degrees = deg
        self.inv_sqrt = (1.0 / np.sqrt(deg)).astype(dtype)
        self.blocks = []
        for src, dst, w in blocks:
            if sp.issparse(w):
                w = sp.csr_matrix(w, dtype=dtype)
                self.blocks.append((src, dst, w, w.T.tocsr()))  # CSR of the transpose: fast products
            else:
                w = w.astype(dtype, copy=False)
                self.blocks.append((src, dst, w, w.T))
        self.dtype = dtype

    def layer(self, x: np.ndarray, l: int) -> np.ndarray:
        return x[self.offsets[l]:self.offsets[l + 1]]

    def matmat(self, x: np.ndarray) -> np.ndarray:
        """``M @ x`` for an (N, m) block of vectors."""
        scale = self.inv_sqrt.reshape((-1,) + (1,) * (x.ndim - 1))
        xs = x * scale
        y = np.zeros_like(xs)
        for src, dst, s, st in self.blocks:
            y[self.offsets[dst]:self.offsets[dst + 1]] += s @ self.layer(xs, src)
            y[self.offsets[src]:self.offsets[src + 1]] += st @ self.layer(xs, dst)
        y *= scale
        return y


class _BipartiteGram:
    """Gram operator ``G = B^T B`` on the smaller colour class of a bipartite layered graph.

    ``B = S_large A S_small`` with the raw blocks ``A`` and ``S = D^-1/2`` of each side.
    """

    def __init__(self, op: _NormalizedBlocks, colour: np.ndarray):
        self.op = op
        sizes = np.asarray(op.sizes)
        side_sizes = [int(sizes[colour == c].sum()) for c in (0, 1)]
        self.small = int(np.argmin(side_sizes))
        self.colour = colour
        # Position of each layer inside its colour class's vector.
        running = [0, 0]
        self.start = np.zeros(len(sizes), dtype=np.int64)
        for l, s in enumerate(sizes):
            self.start[l] = running[colour[l]]
            running[colour[l]] += s
        self.n_small, self.n_large = running[self.small], running[1 - self.small]
        self.sizes = sizes
        self.scale_small = np.zeros(self.n_small, dtype=op.dtype)
        self.scale_large = np.zeros(self.n_large, dtype=op.dtype)
        for l in range(len(sizes)):
            side = self.scale_small if colour[l] == self.small else self.scale_large
            side[self._sl(l)] = op.layer(op.inv_sqrt, l)
        # (raw matrix, output slice, input slice) for both directions, resolved once: the
        # operator is applied ~100 times per eigensolve.
        self._fwd, self._bwd = [], []
        # The same pairs grouped by large-side layer, for the Gram product (see gram()).
        by_large: Dict[int, List[Tuple[object, object, slice]]] = {}
        for src, dst, m, mt in op.blocks:
            if colour[src] == self.small:  # src on the small side, dst on the large side
                self._fwd.append((m, self._sl(dst), self._sl(src)))
                self._bwd.append((mt, self._sl(src), self._sl(dst)))
                by_large.setdefault(dst, []).append((m, mt, self._sl(src)))
            else:
                self._fwd.append((mt, self._sl(src), self._sl(dst)))
                self._bwd.append((m, self._sl(dst), self._sl(src)))
                by_large.setdefault(src, []).append((mt, m, self._sl(dst)))
        self._by_large = [(self._sl(l), pairs) for l, pairs in sorted(by_large.items())]
        self.scale_large_sq = self.scale_large * self.scale_large

    def _sl(self, l: int) -> slice:
        return slice(int(self.start[l]), int(self.start[l] + self.sizes[l]))

    @staticmethod
    def _col(v: np.ndarray, like: np.ndarray) -> np.ndarray:
        return v.reshape((-1,) + (1,) * (like.ndim - 1))

    def forward(self, z: np.ndarray) -> np.ndarray:
        """``B z``: small side -> large side."""
        zs = z * self._col(self.scale_small, z)
        y = np.zeros((self.n_large,) + z.shape[1:], dtype=z.dtype)
        for m, out, inp in self._fwd:
            y[out] += m @ zs[inp]
        y *= self._col(self.scale_large, y)
        return y

    def gram(self, z: np.ndarray) -> np.ndarray:
        """``B^T B z``, one large-side layer at a time: each block is used by the backward
        product right after the forward one, while it is still in cache (the blocks of the
        paper MLP, 1.6 MB in float32, do not fit in a 1 MB L2 all at once; ~10-15 % faster)."""
        zs = z * self._col(self.scale_small, z)
        out = np.zeros((self.n_small,) + z.shape[1:], dtype=z.dtype)
        for sl, pairs in self._by_large:
            y = pairs[0][0] @ zs[pairs[0][2]]
            for m, _, inp in pairs[1:]:
                y += m @ zs[inp]
            y *= self._col(self.scale_large_sq[sl], y)
            for _, mt, dst in reversed(pairs):  # the block read last first
                out[dst] += mt @ y
        out *= self._col(self.scale_small, out)
        return out

    def to_full(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Scatter small-side and large-side parts into node order."""
        x = np.zeros((self.op.n,) + z.shape[1:], dtype=z.dtype)
        for l in range(len(self.sizes)):
            part = z if self.colour[l] == self.small else y
            x[self.op.offsets[l]:self.op.offsets[l + 1]] = part[self._sl(l)]
        return x


# Below this many nodes (on the side the solver works on), a dense eigendecomposition is
# both faster and more robust than Lanczos.
_DENSE_LIMIT = 400


def _top_eigh(apply, n: int, k: int, rng: np.random.Generator, tol: float, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` eigenpairs of a symmetric operator, descending."""
    if n <= _DENSE_LIMIT or k >= n - 1:
        dense = apply(np.eye(n, dtype=dtype))
        dense = (dense + dense.T) / 2
        vals, vecs = scipy.linalg.eigh(dense, subset_by_index=[n - k, n - 1])
    else:
        op = LinearOperator((n, n), matvec=apply, matmat=apply, dtype=dtype)
        # 30 Lanczos vectors for k = 12: ~67 products instead of ~81 with 60 (paper MLP, 20 graphs).
        ncv = min(n, max(2 * k + 6, 30))
        v0 = rng.uniform(-1, 1, n).astype(dtype)
        vals, vecs = eigsh(op, k=k, which="LA", ncv=ncv, tol=tol, v0=v0)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


# From this many nodes on the solver's side, a Chebyshev-filtered block iteration (GEMMs on
# k + 8 vectors) beats Lanczos (one memory-bound matrix-vector product at a time).
_BLOCK_SOLVER_MIN = 6000


def _uses_block_solver(sizes: Sequence[int], colour: Optional[np.ndarray]) -> bool:
    """Whether the embedding of a graph with these layers goes through the block eigensolver."""
    if colour is None:
        return False
    sizes = np.asarray(sizes)
    return int(min(sizes[colour == c].sum() for c in (0, 1))) >= _BLOCK_SOLVER_MIN


def resolve_device(device, graph: WeightGraph):
    """The device the block eigensolver of ``graph`` runs on: ``device`` if given (checked),
    else the weights' device."""
    import torch

    if device is None:
        return graph.device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device ({err}); use e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available here; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _torch_block(m):
    """A dense numpy block or CSR matrix as a torch tensor (dense: no copy)."""
    import torch

    if sp.issparse(m):
        m = sp.csr_matrix(m)
        # int32 index arrays are shared with scipy (no copy) when they fit, as they do below 2^31 nnz.
        index = np.int32 if m.indptr.dtype == np.int32 and m.indices.dtype == np.int32 else np.int64
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(index, copy=False)),
                                       torch.from_numpy(m.indices.astype(index, copy=False)),
                                       torch.from_numpy(m.data), size=m.shape)
    # A transposed view stays a view (torch passes the transpose flag to BLAS): no copy.
    return torch.from_numpy(m)


@full_precision  # the products in op() too, not only subspace_eigs' own
def _top_eigh_block(gram: "_BipartiteGram", k: int, rng: np.random.Generator, dtype,
                    device=None) -> Tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` eigenpairs of the Gram operator (spectrum in [0, 1]) by a block method.

    Chebyshev-filtered subspace iteration on ``k + 8`` vectors, applied with torch GEMMs
    (dense blocks) or multi-threaded sparse CSR products (pruned blocks), on ``device``
    (default CPU; the random start is drawn on the CPU, so it is the same on every device). Residual tolerance
    1e-3: on a random graph's dense bulk (relative gaps ~1e-3) the individual bulk
    eigenvectors are not resolved, but the partition found from the block is as good as
    from converged vectors (benchmarks/bench_clusterability.py measures it).
    """
    import warnings

    import torch

    from .eigen import subspace_eigs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        device = torch.device(device or "cpu")
        # Each dense block is moved once; its transpose is a view of the moved tensor.
        moved = {}
        for _, _, m, mt in gram.op.blocks:
            t = _torch_block(m).to(device)
            moved[id(m)] = t
            moved[id(mt)] = _torch_block(mt).to(device) if sp.issparse(mt) else t.T

        fwd = [(moved[id(m)], out, inp) for m, out, inp in gram._fwd]
        bwd = [(moved[id(m)], out, inp) for m, out, inp in gram._bwd]

    op_threads = torch.get_num_threads()
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    s_small = torch.from_numpy(gram.scale_small).to(device=device, dtype=tdtype)[:, None]
    # G z = S_small A^T S_large^2 A S_small z: the middle scaling applied once.
    s_large2 = torch.from_numpy(gram.scale_large.astype(np.float64) ** 2).to(device=device, dtype=tdtype)[:, None]

    def op(z: "torch.Tensor") -> "torch.Tensor":
        # The products with the big blocks may use the caller's torch threads.
        with torch_threads(op_threads):
            zs = z * s_small
            y = torch.zeros((gram.n_large, z.shape[1]), dtype=z.dtype, device=z.device)
            for m, out, inp in fwd:
                y[out] += m @ zs[inp]
            y *= s_large2
            x = torch.zeros_like(z)
            for m, out, inp in bwd:
                x[out] += m @ y[inp]
            x *= s_small
        return x

    seed = int(rng.integers(2**31 - 1))
    # split="stages": each operator call is a pass over large, memory-bound blocks, so all
    # columns go through together (see subspace_eigs). QR / Rayleigh-Ritz on the skinny block:
    # one thread. Degree 4: the Rayleigh-Ritz checks come often enough that the 20k-node MLP
    # converges in 6 operator calls (degree 8: 10) and the 100k pruned one in 11 (19), with
    # the same partitions on planted graphs; degree 3 met the tolerance with a worse subspace
    # on one of them (n-cut 10.16 vs 9.79).
    with torch_threads(1):
        res = subspace_eigs(op, gram.n_small, k, lower=0.0, upper=1.0, degree=4, tol=1e-3, max_iter=60, seed=seed,
                            dtype=torch.float32 if dtype == np.float32 else torch.float64, split="stages",
                            device=device)
    return res.values[:k].cpu().numpy().astype(np.float64), res.vectors[:, :k].cpu().numpy().astype(dtype)


def _deterministic_sign(u: np.ndarray) -> np.ndarray:
    """Flip each column so that its entry of largest magnitude is positive (as scikit-learn)."""
    idx = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[idx, np.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs


@dataclass
class SpectralEmbedding:
    """The ``k`` smallest eigenpairs of the normalized Laplacian of a graph."""

    eigenvalues: np.ndarray  # ascending eigenvalues of L
    eigenvectors: np.ndarray  # (N, k) orthonormal eigenvectors of L (unit norm)
    degrees: np.ndarray
    method: str

    def scaled(self) -> np.ndarray:
        """Rows scaled by ``1/sqrt(degree)`` with a deterministic sign: the k-means input."""
        return _deterministic_sign(self.eigenvectors / np.sqrt(self.degrees)[:, None])


def _embedding_from_blocks(
    sizes: Sequence[int],
    blocks: Sequence[Tuple[int, int, np.ndarray]],
    colour: Optional[np.ndarray],
    k: int,
    rng: np.random.Generator,
    tol: Optional[float] = None,
    device=None,
    degrees: Optional[np.ndarray] = None,
) -> SpectralEmbedding:
    op = _NormalizedBlocks(sizes, blocks, degrees=degrees)
    if tol is None:
        tol = 1e-5 if op.dtype == np.float32 else 1e-8
    n = op.n
    if k > n:
        raise ValueError(f"cannot compute {k} eigenvectors of a graph with {n} nodes")
    if colour is not None:
        gram = _BipartiteGram(op, colour)
        # The Gram route gives the eigenvalues sigma^2 of B^T B; M's top-k are +sigma as
        # long as the k-th singular value is clearly positive. Otherwise M's top-k include
        # zero eigenvalues that live only on the large side: use the generic path.
        if gram.n_small > k + 1:
            if gram.n_small >= _BLOCK_SOLVER_MIN:
                vals, z = _top_eigh_block(gram, k, rng, op.dtype, device)
            else:
                vals, z = _top_eigh(gram.gram, gram.n_small, k, rng, tol, op.dtype)
            sigma = np.sqrt(np.clip(vals, 0.0, None))
            if sigma[-1] > (1e-3 if op.dtype == np.float32 else 1e-6):
                y = gram.forward(z) / sigma[None, :]
                x = gram.to_full(z, y) / np.sqrt(2.0)
                x /= np.linalg.norm(x, axis=0, keepdims=True)
                return SpectralEmbedding((1.0 - sigma).astype(np.float64), x, op.degrees, "bipartite-gram")
    vals, x = _top_eigh(op.matmat, n, k, rng, tol, op.dtype)
    return SpectralEmbedding((1.0 - vals).astype(np.float64), x, op.degrees, "generic")


def spectral_embedding(graph: GraphLike, n_components: int = 12, seed: int = 0, dtype=None,
                       device=None) -> SpectralEmbedding:
    """The ``n_components`` smallest eigenpairs of the normalized Laplacian, from the blocks.

    Example:
        >>> import torch
        >>> emb = spectral_embedding(WeightGraph.from_weights([torch.rand(30, 20), torch.rand(10, 30)]), 4)
        >>> emb.eigenvectors.shape, round(float(emb.eigenvalues[0]), 6)
        ((60, 4), 0.0)

    Args:
        graph: a WeightGraph (or model / weight list) without isolated nodes.
        n_components: number of eigenpairs (the trivial one included).
        seed: seeds the Lanczos start vector.
        dtype: engine precision, ``numpy.float64`` or ``numpy.float32``; default float64 for
            graphs up to 131k weight entries, float32 above (``WeightGraph.engine_dtype``).
        device: where the block eigensolver of large graphs (6000+ nodes on the smaller side
            of a bipartite graph) runs; default the weights' device (``WeightGraph.device``).

    Returns:
        A :class:`SpectralEmbedding` with ascending eigenvalues of ``L``.
    """
    g = as_graph(graph)
    with blas_threads(1):
        return _embedding_from_blocks(g.layer_sizes, g.numpy_blocks(dtype), g.layer_coloring(), int(n_components),
                                      _rng(seed), device=resolve_device(device, g))


# --------------------------------------------------------------------------- k-means
def _kmeans_plusplus(x: np.ndarray, sq_norms: np.ndarray, k: int, rng: np.random.Generator,
                     n_seeds: int = 1) -> np.ndarray:
    """Greedy k-means++ seeding (the variant scikit-learn uses) of ``n_seeds`` independent
    restarts at once: returns centre indices, ``(n_seeds, k)``.

    The restarts share every numpy call (on a few thousand points the calls, not the
    arithmetic, are the cost); each draws its own candidates.
    """
    n = x.shape[0]
    trials = 2 + int(np.log(k))
    rows = np.arange(n_seeds)
    centres = np.empty((n_seeds, k), dtype=np.int64)
    centres[:, 0] = rng.integers(n, size=n_seeds)
    # Squared distances of every point to a set of candidates c: [x_c, |x_c|^2] @ [-2 x^T; 1] + |x|^2,
    # one GEMM and one addition.
    d = x.shape[1]
    x_aug = np.empty((n, d + 1))
    x_aug[:, :d] = x
    x_aug[:, d] = sq_norms
    right = np.empty((d + 1, n))
    np.multiply(x.T, -2.0, out=right[:d])
    right[d] = 1.0

    def sq_dist(idx: np.ndarray) -> np.ndarray:
        out = x_aug[idx] @ right
        out += sq_norms
        return np.maximum(out, 0, out=out)

    closest = sq_dist(centres[:, 0])
    # Each restart's draws search one cumulative sum over all restarts' potentials, offset by
    # the restarts before it: one searchsorted call instead of one per restart.
    base = (rows * n)[:, None]
    for c in range(1, k):
        cum = np.cumsum(closest, axis=None)
        total = closest.sum(axis=1)
        draws = rng.uniform(0, 1, (n_seeds, trials)) * total[:, None]
        draws += (cum[n - 1::n] - total)[:, None]
        cand = np.searchsorted(cum, draws) - base
        np.maximum(cand, 0, out=cand)  # (ufuncs: np.clip's wrapper costs more than the work here)
        np.minimum(cand, n - 1, out=cand)
        dist = sq_dist(cand.ravel()).reshape(n_seeds, trials, n)
        np.minimum(dist, closest[:, None, :], out=dist)
        best = np.argmin(dist.sum(axis=2), axis=1)
        centres[:, c] = cand[rows, best]
        closest = dist[rows, best]
        for r in (np.nonzero(total <= 0)[0] if total.min() <= 0 else ()):
            # Every point of this restart coincides with a centre already: a distinct index at random.
            rest = np.setdiff1d(np.arange(n), centres[r, :c])
            centres[r, c] = rng.choice(rest)
            closest[r] = 0.0
    return centres


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``(k, d)`` sums of the points of each cluster: one GEMM with the indicator matrix (a
    bincount per dimension was ~3x slower on 1818 x 12 points)."""
    h = np.zeros((x.shape[0], k))
    h[np.arange(x.shape[0]), labels] = 1.0
    return h.T @ x


def _lloyd(x_aug: np.ndarray, sq_norms: np.ndarray, centres: np.ndarray, max_iter: int, tol: float,
           min_changes: int = 0):
    """Lloyd iterations from ``centres``; ``x_aug`` is the points with a column of ones appended.

    The assignment is one GEMM, ``[x, 1] @ [-2 C^T; |c|^2]`` (``||x||^2`` is the same for every
    centre, so the argmin needs only the rest), and the cluster sums are updated only for the
    points that changed cluster: after the first few iterations a handful do, and a full pass
    over the points per iteration was most of the cost. It stops when at most ``min_changes``
    labels change, or when the centres move by at most ``tol`` (squared distance).
    """
    k, d = centres.shape
    n = x_aug.shape[0]
    x = x_aug[:, :d]
    labels = None
    sums = counts = None
    c_aug = np.empty((d + 1, k))
    partial = np.empty((n, k))  # reused: a fresh (n, k) array per step costs page faults

    def distances_less_norms(centres: np.ndarray) -> np.ndarray:
        """``|c|^2 - 2 x.c`` for every point and centre, into ``partial``: one GEMM (few numpy
        calls: on a few thousand points they, not the arithmetic, cost)."""
        np.multiply(centres.T, -2.0, out=c_aug[:d])
        np.einsum("ij,ij->i", centres, centres, out=c_aug[d])
        return np.matmul(x_aug, c_aug, out=partial)

    for _ in range(max_iter):
        new_labels = distances_less_norms(centres).argmin(axis=1)
        moved = None if labels is None else np.flatnonzero(new_labels != labels)
        if moved is not None and moved.size <= min_changes:
            break  # assignments are (nearly) stable: the centres would not move (much) any more
        if moved is None or moved.size > n // 8:
            sums, counts = _cluster_sums(x, new_labels, k), np.bincount(new_labels, minlength=k)
        else:
            src, dst, xm = labels[moved], new_labels[moved], x[moved]
            np.subtract.at(sums, src, xm)
            np.add.at(sums, dst, xm)
            counts = counts + np.bincount(dst, minlength=k) - np.bincount(src, minlength=k)
        labels = new_labels
        if counts.min() == 0:
            # Re-seed empty clusters with the points farthest from their centres, never taking
            # a cluster's last point (with duplicate points that would empty another cluster).
            empty = np.nonzero(counts == 0)[0]
            point_dist = partial[np.arange(n), labels] + sq_norms
            for c in empty:
                eligible = counts[labels] > 1
                if not eligible.any():
                    break
                p = int(np.argmax(np.where(eligible, point_dist, -np.inf)))
                sums[labels[p]] -= x[p]
                counts[labels[p]] -= 1
                sums[c] = x[p]
                counts[c] = 1
                labels[p] = c
        # A cluster left empty (fewer distinct points than clusters) keeps its centre.
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        step = new - centres
        centres = new
        if np.vdot(step, step) <= tol:
            break
    dist = distances_less_norms(centres)
    dist += sq_norms[:, None]
    labels = np.argmin(dist, axis=1)
    inertia = float(np.maximum(dist[np.arange(n), labels], 0).sum())
    return labels, centres, inertia, dist


def _ensure_k_clusters(labels: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the point that fits its current cluster worst."""
    labels = labels.copy()
    while True:
        counts = np.bincount(labels, minlength=k)
        empty = np.nonzero(counts == 0)[0]
        if empty.size == 0:
            return labels
        own = dist[np.arange(len(labels)), labels].copy()
        own[counts[labels] <= 1] = -np.inf  # never empty another cluster
        labels[int(np.argmax(own))] = empty[0]


def _kmeans_native(x: np.ndarray, sq_norms: np.ndarray, k: int, n_seeds: int, rng: np.random.Generator,
                   max_iter: int, abs_tol: float, min_changes: int):
    """k-means++ and Lloyd by the C kernel: ``(labels, dist)`` of the best restart, or ``None``
    when the kernel is missing or the seeding degenerates (every point on a centre; ``rng`` is
    then rewound, and the numpy version draws exactly what it would have)."""
    lib = _native.kernels()
    if lib is None:
        return None
    n, d = x.shape
    state = rng.bit_generator.state
    trials = 2 + int(np.log(k))
    # The same draws, in the same order, as _kmeans_plusplus makes step by step.
    first = rng.integers(n, size=n_seeds)
    uniforms = rng.uniform(0, 1, (k - 1, n_seeds, trials))
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty((n, k))
    inertia = np.zeros(1)
    status = lib.tm_kmeans(n, d, x.ctypes.data, sq_norms.ctypes.data, k, n_seeds, trials, first.ctypes.data,
                           uniforms.ctypes.data, int(max_iter), float(abs_tol), int(min_changes), labels.ctypes.data,
                           dist.ctypes.data, inertia.ctypes.data)
    if status == 1:
        rng.bit_generator.state = state
        return None
    if status != 0:
        raise MemoryError("the k-means kernel could not allocate its work arrays")
    return labels, dist


def kmeans(x: np.ndarray, k: int, n_init: int, rng: np.random.Generator, max_iter: int = 300, tol: float = 1e-4,
           change_tol: float = 1e-3, backend: str = "auto") -> np.ndarray:
    """k-means++ with ``n_init`` restarts; returns labels of exactly ``k`` non-empty clusters.

    Lloyd stops when the centres move by at most ``tol`` (relative to the data's variance, as
    scikit-learn) or when at most a fraction ``change_tol`` of the labels changed: the last
    iterations of a structureless embedding move one or two points each, and the n-cut
    refinement that follows moves single nodes by their exact gain (paper MLP: ~20 % fewer
    iterations; mean n-cut over 20 random and planted graphs within 0.01 %).

    ``backend``: ``"native"`` (the C kernel), ``"numpy"``, or ``"auto"`` (native when built).
    Both draw the same random numbers and compute the same steps (labels equal up to rounding).
    """
    if backend not in ("auto", "native", "numpy"):
        raise ValueError(f"backend must be 'auto', 'native' or 'numpy', got {backend!r}")
    n = x.shape[0]
    if k > n:
        raise ValueError(f"cannot form {k} clusters from {n} points")
    x = np.ascontiguousarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("k-means input has non-finite (NaN/Inf) values")
    sq_norms = (x ** 2).sum(axis=1)
    mean = x.mean(axis=0)
    # Mean per-dimension variance, from the squared norms (np.var's temporaries cost more).
    abs_tol = tol * max(float(sq_norms.sum()) / n - float(mean @ mean), 0.0) / x.shape[1]
    if backend != "numpy":
        out = _kmeans_native(x, sq_norms, k, max(1, int(n_init)), rng, max_iter, abs_tol, int(change_tol * n))
        if out is not None:
            return _ensure_k_clusters(out[0], out[1], k)
        if backend == "native" and not _native.available():
            raise RuntimeError("the native k-means kernel is not installed; use backend='numpy'")
    x_aug = np.empty((n, x.shape[1] + 1))
    x_aug[:, :-1] = x
    x_aug[:, -1] = 1.0
    seeds = _kmeans_plusplus(x, sq_norms, k, rng, max(1, int(n_init)))
    best = None
    for idx in seeds:
        centres = x[idx].copy()
        labels, centres, inertia, dist = _lloyd(x_aug, sq_norms, centres, max_iter, abs_tol, int(change_tol * n))
        if best is None or inertia < best[0]:
            best = (inertia, labels, dist)
    return _ensure_k_clusters(best[1], best[2], k)


# --------------------------------------------------------------------------- n-cut
def _cluster_association(offsets: np.ndarray, blocks, labels: np.ndarray, k: int) -> np.ndarray:
    """``k x k`` matrix of summed edge weights between clusters (both directions).

    Sums are formed in float64 (exact enough to serve as an oracle) except for blocks above
    4M entries, which are summed in their own precision to avoid a float64 copy.
    """
    assoc = np.zeros((k, k))
    for src, dst, w in blocks:
        ls = labels[offsets[src]:offsets[src + 1]]
        ld = labels[offsets[dst]:offsets[dst + 1]]
        dtype = np.float64 if w.shape[0] * w.shape[1] <= _EXACT_SUM_LIMIT else w.dtype
        per_dst = np.asarray(w @ one_hot(ls, k, dtype), dtype=np.float64)  # (n_dst, k): weight to each cluster
        c = one_hot(ld, k).T @ per_dst
        assoc += c + c.T
    return assoc


def _ncut_from_blocks(offsets, blocks, degrees, labels: np.ndarray, k: int) -> float:
    assoc = _cluster_association(offsets, blocks, labels, k)
    vol = np.bincount(labels[labels >= 0], weights=degrees[labels >= 0], minlength=k)
    cut = np.maximum(vol - np.diag(assoc), 0.0)  # rounding can leave -1e-16 for a cluster with no cut
    present = np.bincount(labels[labels >= 0], minlength=k) > 0
    return float(np.sum(cut[present] / (vol[present] + NCUT_EPS)))


def _check_labels(labels, num_nodes: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != num_nodes:
        raise ValueError(f"labels must be a 1-D array with one entry per node ({num_nodes}), got shape {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        if lab.dtype == bool or not np.issubdtype(lab.dtype, np.number):
            raise ValueError(f"labels must be integer cluster ids (or -1 for ignored nodes), got dtype {lab.dtype}")
        finite = np.isfinite(lab)
        if not finite.all() or not np.all(lab[finite] == np.round(lab[finite])):
            raise ValueError("labels must be integer cluster ids (or -1 for ignored nodes); got non-integer values")
    lab = lab.astype(np.int64)
    if lab.size and lab.min() < -1:
        raise ValueError(f"labels must be >= -1 (-1 marks ignored nodes), got {lab.min()}")
    return lab


def ncut(graph: GraphLike, labels) -> float:
    """k-way normalized cut: the sum over clusters of ``cut_c / (vol_c + 1e-8)``.

    ``cut_c`` is the weight of edges leaving cluster ``c`` and ``vol_c`` the summed degree of
    its nodes (a sum, not a mean, so the value lies in ``[0, k]``). Nodes labelled -1 belong
    to no cluster: they are not scored, but edges from a cluster to them count as cut.

    Example:
        >>> import torch
        >>> g = WeightGraph.from_weights([torch.eye(2)])   # two disjoint edges
        >>> ncut(g, [0, 1, 0, 1]), round(ncut(g, [0, 0, 1, 1]), 6)
        (0.0, 2.0)

    Args:
        graph: a WeightGraph (or a model / list of weight matrices).
        labels: cluster id per node, length ``num_nodes``; -1 ignores a node.

    Returns:
        The n-cut as a float.
    """
    g = as_graph(graph)
    lab = _check_labels(labels, g.num_nodes)
    if not np.any(lab >= 0):
        return 0.0
    # Only the clusters present count: compact the ids so that sparse ids (e.g. 10**6)
    # do not allocate a huge k x k table.
    present = lab >= 0
    ids, compact = np.unique(lab[present], return_inverse=True)
    lab = lab.copy()
    lab[present] = compact
    k = int(ids.size)
    # float64 (oracle-grade) unless the graph is too large for a float64 copy.
    entries = sum(b.weight.shape[0] * b.weight.shape[1] for b in g.blocks)
    blocks = g.numpy_blocks(np.float64 if entries <= _EXACT_SUM_LIMIT else None)
    return _ncut_from_blocks(g.layer_offsets, blocks, g.degrees(), lab, k)


# --------------------------------------------------------------------------- clustering
def check_seed(seed) -> int:
    """``seed`` as an int, or a clear error: every random choice derives from an explicit seed, so
    ``None`` (fresh OS entropy: results that cannot be reproduced), floats, strings and negative
    numbers are refused."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be a non-negative int (results derive from it and are reproducible), "
                        f"got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    return int(seed)


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed if isinstance(seed, np.random.SeedSequence)
                                 else np.random.SeedSequence(check_seed(seed)))


@dataclass
class _Partition:
    labels: np.ndarray
    ncut: float
    eigenvalues: np.ndarray
    method: str


# Eigensolver tolerance when the embedding only feeds k-means (the block solver of large graphs
# stops at 1e-3 too). Lanczos needs ~17 % fewer products than at 1e-5 on the paper MLP, with
# the same or lower mean n-cut on the 20 graphs of the quality benchmark; spectral_embedding
# itself keeps the tighter default.
_CLUSTER_TOL = 1e-3
# Lloyd's early stop (fraction of labels changing) when refinement follows: the node moves
# with the exact n-cut gain finish what the last Lloyd iterations would do. Over 20 random and
# 20 planted paper-MLP graphs, mean n-cut 10.1666 / 9.7453 with 0.03 vs 10.1679 / 9.7450 with
# kmeans's own 1e-3, and ~20 % less time for k-means + refinement.
_REFINED_CHANGE_TOL = 0.03


def _cluster_blocks(sizes, blocks, colour, k: int, rng: np.random.Generator, n_init: int, refine: bool = True,
                    device=None, degrees: Optional[np.ndarray] = None) -> _Partition:
    """The whole pipeline on numpy blocks of a graph without isolated nodes."""
    # Matrix-vector products, skinny GEMMs and small k-means steps (numpy's OpenBLAS): one
    # thread is as fast on an idle machine and far faster on a busy one (see _threads). The
    # block eigensolver of large graphs runs in torch, with torch's own threads.
    with blas_threads(1):
        return _cluster_blocks_unthreaded(sizes, blocks, colour, k, rng, n_init, refine, device, degrees)


def _cluster_blocks_unthreaded(sizes, blocks, colour, k, rng, n_init, refine, device, degrees=None) -> _Partition:
    n = int(sum(sizes))
    if k < 2:
        raise ValueError(f"n_clusters must be at least 2, got {k}")
    if k > n:
        raise ValueError(f"n_clusters={k} is larger than the number of non-isolated nodes ({n}); use fewer clusters")
    emb = _embedding_from_blocks(sizes, blocks, colour, k, rng, tol=_CLUSTER_TOL, device=device, degrees=degrees)
    labels = kmeans(emb.scaled(), k, n_init, rng, **({"change_tol": _REFINED_CHANGE_TOL} if refine else {}))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    method = emb.method
    if refine:
        # Layers never have edges inside them; colour classes of a bipartite graph neither.
        if colour is not None:
            groups = [np.nonzero(colour == c)[0].tolist() for c in (0, 1)]
        else:
            groups = [[l] for l in range(len(sizes))]
        refined, _, start = refine_partition(sizes, blocks, groups, labels, k, emb.degrees, return_start=True)
        refined_value = _ncut_from_blocks(offsets, blocks, emb.degrees, refined, k)
        # Never report a worse partition. refine's own start value (cluster totals from products
        # in the blocks' precision) settles the usual case of a clear gain; otherwise the start
        # is recomputed exactly and the two partitions compared on the same footing.
        if refined_value < start - 1e-6 * max(1.0, abs(start)):
            labels, value = refined, refined_value
        else:
            value = _ncut_from_blocks(offsets, blocks, emb.degrees, labels, k)
            if refined_value <= value:
                labels, value = refined, refined_value
        method += "+refined"
    else:
        value = _ncut_from_blocks(offsets, blocks, emb.degrees, labels, k)
    return _Partition(labels, value, emb.eigenvalues, method)


def spectral_clustering(
    graph: GraphLike, n_clusters: int = 12, seed: int = 0, n_init: int = 3, refine: bool = True, dtype=None,
    device=None,
) -> np.ndarray:
    """Partition a weight graph into ``n_clusters`` clusters by spectral clustering.

    Normalized-Laplacian embedding (trivial eigenvector kept, rows scaled by
    ``1/sqrt(degree)``), then k-means++ with ``n_init`` restarts, as the research code's
    scikit-learn pipeline. Isolated nodes are left out and labelled -1. The result always
    has exactly ``n_clusters`` non-empty clusters.

    Example:
        >>> import torch
        >>> g = WeightGraph.from_weights([torch.rand(64, 32), torch.rand(16, 64)])
        >>> labels = spectral_clustering(g, n_clusters=4, seed=0)
        >>> labels.shape, sorted(set(labels.tolist()))
        ((112,), [0, 1, 2, 3])

    Args:
        graph: a WeightGraph, an ``nn.Module`` chain of Linear layers or a list of weights.
        n_clusters: number of clusters ``k`` (at least 2, at most the non-isolated nodes).
        seed: seeds the eigensolver start and k-means; no global RNG is used.
        n_init: number of k-means++ restarts (the best inertia is kept).
        refine: improve the k-means partition by greedy node moves with the exact n-cut gain
            (never raises the n-cut); ``False`` gives the plain research-code pipeline.
        dtype: engine precision (see :func:`spectral_embedding`).
        device: where the block eigensolver of large graphs runs (see
            :func:`spectral_embedding`); k-means and refinement run on the CPU.

    Returns:
        An int64 numpy array of labels, one per node, -1 for isolated nodes.
    """
    g = as_graph(graph)
    small, kept, degrees = g._remove_isolated_with_degrees()
    part = _cluster_blocks(small.layer_sizes, small.numpy_blocks(dtype), small.layer_coloring(), int(n_clusters),
                           _rng(seed), n_init, refine, device=resolve_device(device, g), degrees=degrees)
    full = -np.ones(g.num_nodes, dtype=np.int64)
    full[kept] = part.labels
    return full
