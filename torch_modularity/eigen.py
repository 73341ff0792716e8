"""Torch block eigensolver for the normalized Laplacian of a layered weight graph.

Computes the ``k`` smallest eigenpairs of ``L = I - M``, ``M = D^-1/2 A D^-1/2``, of a graph
given as per-layer blocks of non-negative edge weights (the ``WeightGraph`` layout: block
``(src, dst, A)`` with ``A`` of shape ``(n_dst, n_src)``), on the blocks' own device and in
their own dtype. The ``N x N`` matrix is never formed; every operator application is a few
dense GEMMs with the blocks.

Method (``performance.md`` sections 1, 5 and 7):

* **Bipartite graphs** (every chain of layers): with the node layers 2-coloured,
  ``M = [[0, B^T], [B, 0]]`` and the top eigenpairs of ``M`` are ``(sigma_i, (z_i; B z_i /
  sigma_i) / sqrt(2))`` where ``(sigma_i^2, z_i)`` are the top eigenpairs of the Gram operator
  ``G = B^T B`` (:class:`GramOperator`) on the *smaller* colour class. ``G``'s spectrum lies in
  ``[0, 1]``.
* **Other graphs** (e.g. skip connections that create odd cycles): the top eigenpairs of ``M``
  itself (:class:`NormalizedAdjacency`), spectrum in ``[-1, 1]``.
* **Solver** (:func:`subspace_eigs`): Chebyshev-filtered subspace iteration with Rayleigh-Ritz
  on a block of ``m = k + 8`` vectors. Each iteration applies a degree-``d`` Chebyshev
  polynomial that damps the interval ``[lower, theta_m]`` (``theta_m`` the smallest Ritz value
  of the block) and amplifies what lies above, then orthonormalizes (Householder QR) and
  solves the small ``m x m`` Rayleigh-Ritz problem. It stops when every wanted Ritz pair has a
  residual ``||Op x - theta x|| <= tol``. Converged leading pairs are locked (deflated from the
  filter); columns whose amplification differs by more than ``eps^-1/2`` are filtered in
  separate, mutually deflated groups, so float32 keeps its accuracy on spectra with a few
  isolated top eigenvalues above a dense bulk (what weight graphs have). It starts either from
  a previous block (warm start, e.g. the previous training step's: then one iteration of
  degree 2 usually suffices) or from a random block drawn from an explicit
  ``torch.Generator`` (the global RNG is never used), with the exact trivial eigenvector
  ``sqrt(degree)`` as its first column.
* **Polish**: the returned eigenvectors take one more power step, ``orth(Op X)``, from the
  last Rayleigh-Ritz step's by-product (no extra operator application).

Main entry point: :func:`chebyshev_eigs`. Example::

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w1 = torch.rand(30, 20, generator=g, dtype=torch.float64)
    >>> w2 = torch.rand(10, 30, generator=g, dtype=torch.float64)
    >>> res = chebyshev_eigs([20, 30, 10], [(0, 1, w1), (1, 2, w2)], k=4, seed=0)
    >>> res.eigenvalues.shape, res.eigenvectors.shape, res.method
    (torch.Size([4]), torch.Size([60, 4]), 'gram')
    >>> again = chebyshev_eigs([20, 30, 10], [(0, 1, w1), (1, 2, w2)], k=4, warm_start=res)
    >>> again.iterations <= 1
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ._torch_modes import full_precision

__all__ = [
    "NormalizedAdjacency",
    "GramOperator",
    "SubspaceResult",
    "EigResult",
    "subspace_eigs",
    "chebyshev_eigs",
    "layer_coloring",
    "default_tol",
]

Block = Tuple[int, int, torch.Tensor]


def default_tol(dtype: torch.dtype) -> float:
    """Default residual tolerance: ``1e-5`` for float32 (and lower precisions), ``1e-10`` for float64."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def _compute_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def layer_coloring(num_layers: int, blocks: Sequence[Tuple[int, int]]) -> Optional[List[int]]:
    """A 2-colouring of the node layers such that every block joins two colours, or ``None``.

    ``blocks`` are ``(src, dst)`` pairs (extra tuple entries are ignored). A chain of layers is
    always 2-colourable (even vs odd layers); a skip connection across an even number of layers
    is not.
    """
    colour = [-1] * num_layers
    nbrs: List[List[int]] = [[] for _ in range(num_layers)]
    for b in blocks:
        s, d = int(b[0]), int(b[1])
        nbrs[s].append(d)
        nbrs[d].append(s)
    for start in range(num_layers):
        if colour[start] >= 0:
            continue
        colour[start] = 0
        stack = [start]
        while stack:
            u = stack.pop()
            for v in nbrs[u]:
                if colour[v] < 0:
                    colour[v] = 1 - colour[u]
                    stack.append(v)
                elif colour[v] == colour[u]:
                    return None
    return colour


def _safe_rsqrt(d: torch.Tensor) -> torch.Tensor:
    """``d^-1/2`` where ``d > 0``, else 0; finite gradient everywhere (no ``inf * 0``)."""
    pos = d > 0
    return torch.where(pos, torch.where(pos, d, torch.ones_like(d)).rsqrt(), torch.zeros_like(d))


def _row_apply(vt: torch.Tensor, terms_per_layer, in_slices, out_layers, out_sizes) -> torch.Tensor:
    """``(sum of mat @ v_src)^T`` per output layer, computed on row-major transposed blocks.

    ``terms_per_layer[l]`` lists ``(mat^T, src)`` pairs.

    ``vt`` is ``(m, n_in)`` (the block's vectors as rows): ``v_src^T @ mat^T`` runs about twice
    as fast as ``mat @ v_src`` for skinny blocks (m << n) in MKL/OpenBLAS, one or two threads.
    Returns the ``(m, n_out)`` result, the output layers side by side.
    """
    parts = []
    for l, size in zip(out_layers, out_sizes):
        acc = None
        for mat_t, src in terms_per_layer[l]:
            a = vt[:, in_slices[src]]
            if acc is None:
                acc = a @ mat_t
            else:
                acc.addmm_(a, mat_t)
        parts.append(acc if acc is not None else vt.new_zeros(vt.shape[0], size))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _as_rows(v: torch.Tensor) -> torch.Tensor:
    """``v^T`` as a contiguous tensor (no copy when ``v`` is already a transposed row-major block)."""
    vt = v.T
    return vt if vt.is_contiguous() else vt.contiguous()


class NormalizedAdjacency:
    """The normalized adjacency ``M = D^-1/2 A D^-1/2`` of a layered graph, applied blockwise.

    With ``prescale=True`` the blocks are scaled once on construction (``S = D_dst^-1/2 A
    D_src^-1/2``, a copy of the weights), so every application is a handful of GEMMs; with
    ``prescale=False`` the blocks are used as given and the degree scaling is applied to the
    vectors (cheaper when the operator is applied only a few times, e.g. one warm-started
    iteration per training step).

    Args:
        layer_sizes: nodes per layer.
        blocks: ``(src, dst, A)`` with ``A`` a non-negative ``(layer_sizes[dst], layer_sizes[src])``
            tensor (absolute weights: the caller takes ``abs``). All blocks are moved to the first
            block's device and to ``dtype``.
        dtype: computation dtype; default float64 if any block is float64, else float32.
        layer_degrees: the per-layer degree vectors, if the caller has them already.
        prescale: store the scaled blocks (see above).

    Nodes of degree 0 (isolated) are kept but masked: their rows and columns of ``M`` are zero
    (``D^-1/2`` is taken as 0 there), so they only add eigenvalues 0 to ``M`` (1 to ``L``) and
    never produce NaN. ``num_isolated`` counts them.

    Attributes:
        sizes, offsets, n: layer sizes, layer start offsets (length ``len(sizes) + 1``), nodes.
        blocks: the blocks ``(src, dst, S)`` as used (normalized when ``prescaled``).
        layer_degrees, layer_inv_sqrt: per-layer degree and ``D^-1/2`` vectors.
    """

    def __init__(self, layer_sizes: Sequence[int], blocks: Sequence[Block], dtype: Optional[torch.dtype] = None,
                 layer_degrees: Optional[Sequence[torch.Tensor]] = None, prescale: bool = True):
        self.sizes = [int(s) for s in layer_sizes]
        if not blocks:
            raise ValueError("a graph needs at least one edge block")
        offs = [0]
        for s in self.sizes:
            offs.append(offs[-1] + s)
        self.offsets = offs
        self.n = offs[-1]
        device = blocks[0][2].device
        self.dtype = dtype or _compute_dtype([b[2].dtype for b in blocks])
        self.device = device
        raw: List[Block] = []
        for src, dst, a in blocks:
            src, dst = int(src), int(dst)
            if not (0 <= src < len(self.sizes) and 0 <= dst < len(self.sizes)) or src == dst:
                raise ValueError(f"block ({src}, {dst}) must join two different layers in 0..{len(self.sizes) - 1}")
            if tuple(a.shape) != (self.sizes[dst], self.sizes[src]):
                raise ValueError(
                    f"block ({src}, {dst}) has shape {tuple(a.shape)}, expected ({self.sizes[dst]}, {self.sizes[src]})"
                )
            raw.append((src, dst, a.detach().to(device=device, dtype=self.dtype)))
        if layer_degrees is None:
            deg: List[Optional[torch.Tensor]] = [None] * len(self.sizes)
            for src, dst, a in raw:
                for layer, part in ((dst, a.sum(dim=1)), (src, a.sum(dim=0))):
                    deg[layer] = part if deg[layer] is None else deg[layer] + part
            self.layer_degrees = [
                d if d is not None else torch.zeros(s, device=device, dtype=self.dtype) for d, s in zip(deg, self.sizes)
            ]
            total = sum(float(d.sum()) for d in self.layer_degrees)
            if not math.isfinite(total):
                raise ValueError("the blocks contain non-finite (NaN/Inf) weights")
        else:  # the caller computed (and checked) them
            self.layer_degrees = [d.detach().to(device=device, dtype=self.dtype) for d in layer_degrees]
        self.layer_inv_sqrt = [_safe_rsqrt(d) for d in self.layer_degrees]
        inv = self.layer_inv_sqrt
        self.prescaled = bool(prescale)
        if self.prescaled:
            self.blocks: List[Block] = [(src, dst, (a * inv[dst][:, None]).mul_(inv[src][None, :])) for src, dst, a in raw]
        else:
            self.blocks = raw
        # For every layer: the (transposed matrix, source layer) terms of (M x)_layer; see _row_apply.
        self._terms: List[List[Tuple[torch.Tensor, int]]] = [[] for _ in self.sizes]
        for src, dst, sblk in self.blocks:
            self._terms[dst].append((sblk.T, src))
            self._terms[src].append((sblk, dst))

    @property
    def degrees(self) -> torch.Tensor:
        """Degree of every node, in node order."""
        return torch.cat(self.layer_degrees)

    @property
    def num_isolated(self) -> int:
        return int(sum(int((d <= 0).sum()) for d in self.layer_degrees))

    def trivial_vector(self) -> torch.Tensor:
        """``sqrt(degree) / ||sqrt(degree)||``: the eigenvector of ``M`` for eigenvalue 1."""
        v = self.degrees.clamp_min(0).sqrt()
        return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)

    def layer(self, x: torch.Tensor, l: int) -> torch.Tensor:
        return x[self.offsets[l]:self.offsets[l + 1]]

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        """``M @ x`` for an ``(N, m)`` block (or an ``(N,)`` vector).

        The result is the transpose of a row-major ``(m, N)`` tensor (see ``_row_apply``).
        """
        vec = x.dim() == 1
        x2 = x[:, None] if vec else x
        if not self.prescaled:
            x2 = x2 * self.inv_sqrt_all[:, None]
        slices = [slice(self.offsets[l], self.offsets[l + 1]) for l in range(len(self.sizes))]
        yt = _row_apply(_as_rows(x2), self._terms, slices, range(len(self.sizes)), self.sizes)
        if not self.prescaled:
            yt.mul_(self.inv_sqrt_all[None, :])
        y = yt.T
        return y[:, 0] if vec else y

    @property
    def inv_sqrt_all(self) -> torch.Tensor:
        if getattr(self, "_inv_all", None) is None:
            self._inv_all = torch.cat(self.layer_inv_sqrt)
        return self._inv_all

    __matmul__ = matmat

    def to_dense(self) -> torch.Tensor:
        """The ``N x N`` matrix ``M`` (for tests and tiny graphs only)."""
        return self.matmat(torch.eye(self.n, device=self.device, dtype=self.dtype))


class GramOperator:
    """``G = B^T B`` on the smaller colour class of a bipartite layered graph.

    With the node layers 2-coloured (``layer_coloring``), ``B`` maps the small class (vectors
    ``z`` of length :attr:`n`) to the large class (vectors ``y`` of length :attr:`n_large`); each
    class's vector is the concatenation of its layers, in layer order. ``G``'s eigenvalues are
    ``sigma^2`` in ``[0, 1]``, where ``+-sigma`` are the eigenvalues of ``M``.

    Args:
        adjacency: the :class:`NormalizedAdjacency` to work on.
        coloring: colour (0/1) per node layer; computed when omitted. Raises ``ValueError``
            when the graph is not bipartite.
    """

    def __init__(self, adjacency: NormalizedAdjacency, coloring: Optional[Sequence[int]] = None):
        self.adj = adjacency
        if coloring is None:
            coloring = layer_coloring(len(adjacency.sizes), [(s, d) for s, d, _ in adjacency.blocks])
            if coloring is None:
                raise ValueError("the graph is not bipartite (a block joins two layers of the same colour)")
        self.coloring = [int(c) for c in coloring]
        for s, d, _ in adjacency.blocks:
            if self.coloring[s] == self.coloring[d]:
                raise ValueError(f"block ({s}, {d}) joins two layers of the same colour")
        side = [0, 0]
        for c, size in zip(self.coloring, adjacency.sizes):
            side[c] += size
        self.small = 0 if side[0] <= side[1] else 1
        self.small_layers = [l for l, c in enumerate(self.coloring) if c == self.small]
        self.large_layers = [l for l, c in enumerate(self.coloring) if c != self.small]
        self.start = [0] * len(adjacency.sizes)
        running = [0, 0]
        for l, c in enumerate(self.coloring):
            self.start[l] = running[c]
            running[c] += adjacency.sizes[l]
        self.n = running[self.small]
        self.n_large = running[1 - self.small]

    @property
    def dtype(self) -> torch.dtype:
        return self.adj.dtype

    @property
    def device(self) -> torch.device:
        return self.adj.device

    def _part(self, v: torch.Tensor, l: int) -> torch.Tensor:
        return v[self.start[l]:self.start[l] + self.adj.sizes[l]]

    def _side_scale(self, layers: Sequence[int], power: int) -> torch.Tensor:
        key = (tuple(layers), power)
        cache = self.__dict__.setdefault("_scale_cache", {})
        if key not in cache:
            v = torch.cat([self.adj.layer_inv_sqrt[l] for l in layers])
            cache[key] = (v if power == 1 else v ** power)[:, None]
        return cache[key]

    def _apply(self, v: torch.Tensor, out_layers: Sequence[int], n_out: int) -> torch.Tensor:
        slices = [slice(self.start[l], self.start[l] + self.adj.sizes[l]) for l in range(len(self.adj.sizes))]
        sizes = [self.adj.sizes[l] for l in out_layers]
        return _row_apply(_as_rows(v), self.adj._terms, slices, out_layers, sizes).T

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``B z``: small side ``(n, m)`` -> large side ``(n_large, m)``."""
        vec = z.dim() == 1
        z2 = z[:, None] if vec else z
        if self.adj.prescaled:
            y = self._apply(z2, self.large_layers, self.n_large)
        else:
            y = self._apply(z2 * self._side_scale(self.small_layers, 1), self.large_layers, self.n_large)
            y.mul_(self._side_scale(self.large_layers, 1))
        return y[:, 0] if vec else y

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``B^T y``: large side -> small side."""
        vec = y.dim() == 1
        y2 = y[:, None] if vec else y
        if self.adj.prescaled:
            z = self._apply(y2, self.small_layers, self.n)
        else:
            z = self._apply(y2 * self._side_scale(self.large_layers, 1), self.small_layers, self.n)
            z.mul_(self._side_scale(self.small_layers, 1))
        return z[:, 0] if vec else z

    def matmat(self, z: torch.Tensor) -> torch.Tensor:
        """``G z = B^T B z`` for an ``(n, m)`` block (or an ``(n,)`` vector)."""
        if self.adj.prescaled:
            return self.adjoint(self.forward(z))
        vec = z.dim() == 1
        z2 = z[:, None] if vec else z
        y = self._apply(z2 * self._side_scale(self.small_layers, 1), self.large_layers, self.n_large)
        y.mul_(self._side_scale(self.large_layers, 2))
        out = self._apply(y, self.small_layers, self.n)
        out.mul_(self._side_scale(self.small_layers, 1))
        return out[:, 0] if vec else out

    __matmul__ = matmat

    def trivial_vector(self) -> torch.Tensor:
        """Small-side part of ``sqrt(degree)``, normalized: ``G``'s eigenvector for eigenvalue 1."""
        v = torch.cat([self.adj.layer_degrees[l] for l in self.small_layers]).clamp_min(0).sqrt()
        return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)

    def to_full(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scatter small-side ``z`` and large-side ``y`` into node order (``(N, m)``)."""
        parts = []
        for l, c in enumerate(self.coloring):
            parts.append(self._part(z if c == self.small else y, l))
        return torch.cat(parts)

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`to_full`: ``(z, y)`` from a node-ordered block."""
        z = torch.cat([self.adj.layer(x, l) for l in self.small_layers])
        y = torch.cat([self.adj.layer(x, l) for l in self.large_layers])
        return z, y

    def eigenvectors_of_m(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Unit eigenvectors of ``M`` (node order) and ``sigma = ||B z||`` from unit vectors ``z``.

        ``x = (z; B z / ||B z||) / sqrt(2)``. Columns with ``||B z|| = 0`` get ``y = 0``.
        """
        bz = self.forward(z)
        sigma = bz.norm(dim=0)
        y = bz / sigma.clamp_min(torch.finfo(bz.dtype).tiny)[None, :]
        return self.to_full(z, y) / math.sqrt(2.0), sigma


@dataclass
class SubspaceResult:
    """Output of :func:`subspace_eigs`.

    Attributes:
        values: the ``m`` Ritz values of the operator, descending.
        vectors: the ``(n, m)`` orthonormal Ritz block (columns in the order of ``values``):
            pass it back as ``start`` to warm-start.
        residuals: ``||Op x_i - theta_i x_i||`` of the ``k`` wanted pairs.
        iterations: filter + Rayleigh-Ritz iterations done.
        converged: every wanted residual is ``<= tol``.
        matvecs: operator applications (calls, each on part of the block).
        work: vectors the operator was applied to, summed over all calls (the cost measure:
            one call on ``c`` columns costs about ``c`` times one matrix-vector product).
        groups: number of filter groups in each iteration (columns whose filter amplification
            differs by more than ``eps^-1/2`` are filtered in separate, mutually deflated groups).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    converged: bool
    matvecs: int
    groups: List[int] = field(default_factory=list)
    work: int = 0
    applied: Optional[torch.Tensor] = None


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def _random_block(n: int, m: int, generator: torch.Generator, device, dtype) -> torch.Tensor:
    gdev = generator.device
    x = torch.randn(n, m, generator=generator, device=gdev, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def _cheb_ratio(t_hi: float, t_lo: float, degree: int) -> float:
    """``T_d(t_hi) / T_d(t_lo)`` for ``t_hi >= t_lo``, ``T_d`` the Chebyshev polynomial (|t| > 1 growth)."""
    def tcheb(t: float) -> float:
        t = abs(t)
        if t <= 1.0:
            return 1.0
        return math.cosh(degree * math.acosh(t)) if degree * math.acosh(t) < 700 else math.inf
    lo = tcheb(t_lo)
    return tcheb(t_hi) / lo


def _chebyshev_filter(op, x: torch.Tensor, degree: int, lower: float, cut: float, upper: float,
                      locked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``p(Op) x`` with ``p(t) = T_d(s(t)) / T_d(s(upper))``, ``s`` mapping ``[lower, cut]`` to ``[-1, 1]``.

    Eigen-directions with eigenvalues in ``[lower, cut]`` are damped to at most
    ``1 / T_d(s(upper))`` relative to the top of the spectrum; those above ``cut`` grow with
    ``T_d``. The normalization keeps the iterates O(1) (no overflow at any degree). With
    ``locked`` (orthonormal columns), every iterate is projected onto its orthogonal
    complement, i.e. the filter is applied to the deflated operator.
    """
    def proj(v: torch.Tensor) -> torch.Tensor:
        if locked is None or locked.shape[1] == 0:
            return v
        return v - locked @ (locked.T @ v)

    e = (cut - lower) / 2.0
    c = (cut + lower) / 2.0
    t0 = (upper - c) / e
    rho_prev, rho = 1.0, t0
    y_prev = proj(x)
    y = proj(op(y_prev) - c * y_prev) * (1.0 / (e * t0))
    for _ in range(1, degree):
        rho_next = 2.0 * t0 * rho - rho_prev
        if not math.isfinite(rho_next):
            break
        y_next = proj(op(y) - c * y) * (2.0 * rho / (e * rho_next)) - y_prev * (rho_prev / rho_next)
        y_prev, y = y, y_next
        rho_prev, rho = rho, rho_next
    return y


@full_precision
def subspace_eigs(
    op: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    k: int,
    *,
    lower: float,
    upper: float,
    block_size: Optional[int] = None,
    start: Optional[torch.Tensor] = None,
    start_values: Optional[torch.Tensor] = None,
    degree: int = 6,
    tol: Optional[float] = None,
    max_iter: int = 300,
    min_iter: int = 0,
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
    device=None,
    dtype: Optional[torch.dtype] = None,
    first_column: Optional[torch.Tensor] = None,
    split: str = "groups",
) -> SubspaceResult:
    """Top ``k`` eigenpairs of a symmetric operator by Chebyshev-filtered subspace iteration.

    Operator-agnostic core of :func:`chebyshev_eigs`: ``op`` maps an ``(n, m)`` block to
    ``Op @ block``; the spectrum must lie in ``[lower, upper]``.

    Each iteration: lock the leading Ritz pairs that already meet ``tol`` (they are kept in
    the block and refined by Rayleigh-Ritz but no longer filtered; the filter works on the
    deflated operator), filter the rest with a Chebyshev polynomial of degree ``degree``
    damping ``[lower, theta_m]``, orthonormalize, Rayleigh-Ritz. When the filter would amplify
    one column by more than ``eps^-1/2`` relative to a smaller wanted one, the columns are
    split into groups filtered one after the other, each deflated against the groups already
    filtered: otherwise rounding in the orthonormalization (relative ``eps``) of a column
    dominated by an amplified top direction would swamp the smaller wanted directions (seen in
    float32 on weight graphs, whose spectrum has a few isolated top eigenvalues above a dense
    bulk, at random init and during training alike).

    Args:
        op: the symmetric operator, applied to blocks.
        n: its dimension.
        k: number of wanted eigenpairs (largest eigenvalues).
        lower, upper: bounds of the spectrum (``[0, 1]`` for a Gram operator, ``[-1, 1]`` for ``M``).
        block_size: ``m`` (default ``k + 8``, capped at ``n``).
        start: ``(n, m')`` start block (e.g. a previous result's ``vectors``); missing columns
            are filled at random, extra ones dropped. ``None``: random start.
        start_values: the Ritz values (descending) belonging to a ``start`` that is a previous
            Rayleigh-Ritz block of a nearby operator (e.g. the previous training step's): the
            first iteration then filters at once instead of starting with a Rayleigh-Ritz step
            (one operator application less per call).
        degree: Chebyshev degree ``d`` (``d`` operator applications per iteration on the
            unlocked columns, plus one for Rayleigh-Ritz).
        tol: residual tolerance ``||Op x - theta x|| <= tol`` for all wanted pairs (default
            :func:`default_tol`).
        max_iter: cap on filter iterations (the result then has ``converged=False``).
        min_iter: filter iterations to do even if the start already meets ``tol``.
        generator: torch Generator for the random columns; default
            ``torch.Generator().manual_seed(seed)`` (CPU; the draw is moved to ``device``, so the
            start is the same on every device). The global RNG is never touched.
        seed: seed of the default generator.
        device, dtype: where and in which precision to work (default: ``start``'s, else CPU/float64).
        first_column: a known exact unit eigenvector for the eigenvalue ``upper`` (e.g. the
            trivial one); it replaces the first column of the start block (random or warm).
        split: how the amplification limit is kept. ``"groups"``: columns filtered in
            separate groups with the full degree (most accurate per operator application).
            ``"stages"``: all active columns together, the degree split into stages of lower
            degree with an orthonormalization between them (the same subspace in exact
            arithmetic; the same number of vectors through the operator but in far fewer
            calls, which is what counts when one call costs a pass over memory-bound blocks:
            large dense or sparse weight blocks).

    Returns:
        A :class:`SubspaceResult`.
    """
    if k < 1 or k > n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if not upper > lower:
        raise ValueError(f"need upper > lower, got [{lower}, {upper}]")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    m = min(n, int(block_size) if block_size is not None else k + 8)
    if m < k:
        raise ValueError(f"block_size {m} is smaller than k={k}")
    if start is not None:
        device = start.device if device is None else device
        dtype = start.dtype if dtype is None else dtype
    device = torch.device("cpu") if device is None else torch.device(device)
    dtype = torch.float64 if dtype is None else dtype
    tol = default_tol(dtype) if tol is None else float(tol)
    eps = torch.finfo(dtype).eps
    ratio_cap = eps ** -0.5
    matvecs = 0
    work = 0

    def apply(v: torch.Tensor) -> torch.Tensor:
        nonlocal matvecs, work
        matvecs += 1
        work += v.shape[1]
        return op(v)

    x = None
    if start is not None and start.dim() == 2 and start.shape[0] == n and start.shape[1] > 0:
        x = start.detach().to(device=device, dtype=dtype)[:, :m].clone()
    if x is None or x.shape[1] < m:
        gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        have = 0 if x is None else x.shape[1]
        extra = _random_block(n, m - have, gen, device, dtype)
        x = extra if x is None else torch.cat([x, extra], dim=1)
    if first_column is not None:
        x[:, 0] = first_column.to(device=device, dtype=dtype)

    def rayleigh_ritz(q: torch.Tensor, aq: torch.Tensor):
        h = q.T @ aq
        h = (h + h.T) * 0.5
        vals, u = torch.linalg.eigh(h)
        vals, u = vals.flip(0), u.flip(1)
        return vals, q @ u, aq @ u

    ax = None
    if start_values is not None and start is not None and start.shape[1] >= m and start_values.numel() >= m:
        # Warm start from a Ritz block: filter at once (the Ritz values give the filter interval).
        theta = start_values.detach().to(device=device, dtype=dtype)[:m]
    else:
        q = _orthonormalize(x)
        theta, x, ax = rayleigh_ritz(q, apply(q))
    it = 0
    res = None
    used: List[int] = []
    while True:
        if ax is not None:
            res = (ax[:, :k] - x[:, :k] * theta[None, :k]).norm(dim=0)
            res_list = res.tolist()
            worst = max(res_list)
            if not math.isfinite(worst):
                break
            if it >= min_iter and worst <= tol:
                return SubspaceResult(theta, x, res, it, True, matvecs, used, work, ax)
            if it >= max_iter:
                break
            nlock = 0
            while nlock < k and res_list[nlock] <= tol:
                nlock += 1
            ax_locked = ax[:, :nlock]
        else:
            if max_iter < 1:
                q = _orthonormalize(x)
                theta, x, ax = rayleigh_ritz(q, apply(q))
                continue
            nlock = 1 if first_column is not None else 0
            ax_locked = x[:, :nlock] * upper
        theta_l = theta.tolist()
        cut = min(max(theta_l[-1], lower + 1e-4 * (upper - lower)), upper - 1e-7 * (upper - lower))
        e, c = (cut - lower) / 2.0, (cut + lower) / 2.0
        ts = [(v - c) / e for v in theta_l]
        # Group the active columns so that, inside a group, the filter amplifies no column by more
        # than eps^-1/2 relative to the group's wanted ones; groups are filtered one after the
        # other, each deflated against the groups already filtered (and the locked vectors).
        groups = []
        if split == "stages" and nlock < m:
            stages = 1
            while stages < degree and _cheb_ratio(ts[nlock], ts[max(nlock, k - 1)],
                                                  -(-degree // stages)) > ratio_cap:
                stages += 1
            used.append(stages)
            defl = x[:, :nlock] if nlock else None
            y = x[:, nlock:]
            left = degree
            for st in range(stages):
                d_st = -(-left // (stages - st))
                left -= d_st
                y = _orthonormalize(_chebyshev_filter(apply, y, d_st, lower, cut, upper, defl))
                if defl is not None:
                    y = _orthonormalize(y - defl @ (defl.T @ y))
            basis = torch.cat([x[:, :nlock], y], dim=1)
        else:
            g0 = nlock
            while g0 < m:
                g1 = g0 + 1
                while g1 < m and _cheb_ratio(ts[g0], ts[min(g1, k - 1)], degree) <= ratio_cap:
                    g1 += 1
                groups.append((g0, g1))
                g0 = g1
            used.append(len(groups))
            basis = x[:, :nlock]
        for g0, g1 in groups:
            defl = basis if basis.shape[1] else None
            y = _chebyshev_filter(apply, x[:, g0:g1], degree, lower, cut, upper, defl)
            qg = _orthonormalize(y)
            if defl is not None:
                # Strongly filtered columns can be numerically dependent; QR then completes them
                # with arbitrary directions, which need deflating as well (two passes).
                overlap = defl.T @ qg
                qg = qg - defl @ overlap
                if float(overlap.abs().max()) > 0.1 * math.sqrt(eps):
                    qg = _orthonormalize(qg - defl @ (defl.T @ qg))
            basis = torch.cat([basis, qg], dim=1)
        qa = basis[:, nlock:]
        locked = basis[:, :nlock]
        q = basis
        aq = torch.cat([ax_locked, apply(qa)], dim=1)
        theta, x, ax = rayleigh_ritz(q, aq)
        it += 1
    res = (ax[:, :k] - x[:, :k] * theta[None, :k]).norm(dim=0)
    return SubspaceResult(theta, x, res, it, False, matvecs, used, work, ax)


def _polished(sub: SubspaceResult, k: int, shift: float) -> torch.Tensor:
    """Orthonormal basis of ``(Op + shift) X_k`` (one free power step), columns aligned with ``X_k``."""
    x = sub.vectors[:, :k]
    if sub.applied is None:
        return x
    y = sub.applied[:, :k] + shift * x if shift else sub.applied[:, :k]
    q = _orthonormalize(y)
    signs = torch.sign((q * x).sum(dim=0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs[None, :]


@dataclass
class EigResult:
    """The ``k`` smallest eigenpairs of the normalized Laplacian ``L = I - M``.

    Attributes:
        eigenvalues: ``(k,)`` ascending eigenvalues of ``L`` (the first is the trivial ~0).
        eigenvectors: ``(N, k)`` orthonormal eigenvectors of ``L`` in node order.
        block: the solver's whole Ritz block (``(n_small, m)`` on the small colour class for
            ``method == "gram"``, ``(N, m)`` for ``"generic"``): the warm start for the next call.
        ritz_values: ``(m,)`` Ritz values of the operator, descending (``sigma^2`` for the Gram
            operator, eigenvalues of ``M`` for the generic one).
        residuals: operator residuals of the ``k`` wanted pairs.
        iterations, matvecs, converged: solver statistics.
        method: ``"gram"`` (bipartite, small-side Gram operator) or ``"generic"`` (``M`` itself).
        num_isolated: degree-0 nodes (masked: they are not part of the wanted eigenpairs unless
            the rest of the graph has fewer than ``k`` nodes).
        groups: filter groups per iteration (see :func:`subspace_eigs`).
        work: vectors the operator was applied to in all (the cost measure).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    block: torch.Tensor
    ritz_values: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    matvecs: int
    converged: bool
    method: str
    num_isolated: int
    groups: List[int] = field(default_factory=list)
    work: int = 0


@full_precision
def chebyshev_eigs(
    layer_sizes: Sequence[int],
    blocks: Sequence[Block],
    k: int,
    *,
    block_size: Optional[int] = None,
    degree: int = 6,
    tol: Optional[float] = None,
    max_iter: int = 300,
    min_iter: int = 0,
    warm_start: Union[None, EigResult, torch.Tensor] = None,
    warm_values: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    bipartite: Union[str, bool] = "auto",
    coloring: Optional[Sequence[int]] = None,
    layer_degrees: Optional[Sequence[torch.Tensor]] = None,
    prescale: bool = True,
    polish: bool = True,
) -> EigResult:
    """The ``k`` smallest eigenpairs of the normalized Laplacian of a layered graph.

    Works from the per-layer blocks without forming ``N x N``, on the blocks' device, in
    their dtype (or ``dtype``). See the module docstring for the method.

    Args:
        layer_sizes: nodes per layer.
        blocks: ``(src, dst, A)``, ``A`` non-negative of shape ``(layer_sizes[dst],
            layer_sizes[src])`` (take ``abs`` of weights first). Degree-0 nodes are masked.
        k: number of eigenpairs, the trivial one included (e.g. 12 for 12 clusters).
        block_size: subspace size ``m`` (default ``k + 8``).
        degree: Chebyshev degree (4-8 is a good range; higher costs more per iteration but
            needs fewer iterations on hard, random-weight spectra).
        tol: residual tolerance on the operator (default ``1e-5`` in float32, ``1e-10`` in
            float64). In Gram mode the residual of ``M`` is ``residual / (sigma sqrt(2))``.
        max_iter: cap on iterations; a non-converged result is still returned
            (``converged=False``) with the best Ritz pairs found.
        min_iter: iterations to do even when the warm start already meets ``tol``.
        warm_start: a previous :class:`EigResult` of the same graph structure (or its
            ``block`` tensor); ignored when the shapes do not fit. With a result (or a block
            plus ``warm_values``) the first iteration filters at once, so a call on slightly
            changed weights costs ``degree + 1`` operator applications when it meets ``tol``
            after one iteration.
        warm_values: Ritz values (descending) of a bare ``warm_start`` block.
        generator, seed: randomness of a cold start (a CPU ``torch.Generator`` seeded with
            ``seed`` by default; never the global RNG).
        dtype: computation dtype (default: float64 if a block is float64, else float32).
        bipartite: ``"auto"`` (Gram route whenever the layers are 2-colourable), ``True``
            (require it) or ``False`` (always the generic route on ``M``).
        coloring: the layer 2-colouring, if known.
        layer_degrees: per-layer degree vectors, if already computed.
        prescale: scale the blocks once (a copy of the weights; best for many iterations)
            rather than the vectors in every application (best for one or two iterations).
        polish: return the eigenvectors after one more power step taken from the last
            Rayleigh-Ritz step's by-product ``Op X`` (no extra operator application): the
            components outside the wanted subspace shrink by about ``theta_bulk / theta_k``.
            The Ritz block kept for warm starts (``block``) is not changed.

    Returns:
        An :class:`EigResult`.

    Raises:
        ValueError: ``k`` larger than the number of nodes, malformed blocks, non-finite
            weights, or ``bipartite=True`` on a non-bipartite graph.
    """
    adj = NormalizedAdjacency(layer_sizes, blocks, dtype=dtype, layer_degrees=layer_degrees, prescale=prescale)
    k = int(k)
    if k < 1 or k > adj.n:
        raise ValueError(f"cannot compute {k} eigenpairs of a graph with {adj.n} nodes")
    if warm_start is not None and isinstance(warm_start, EigResult):
        warm_method, warm_block, warm_values = warm_start.method, warm_start.block, warm_start.ritz_values
    else:
        warm_method, warm_block = None, warm_start
    if warm_block is not None:
        warm_block = warm_block.to(device=adj.device, dtype=adj.dtype)
    common = dict(block_size=block_size, degree=degree, tol=tol, max_iter=max_iter, min_iter=min_iter,
                  generator=generator, seed=seed, device=adj.device, dtype=adj.dtype)
    n_iso = adj.num_isolated

    gram = None
    if bipartite is not False:
        if coloring is None:
            coloring = layer_coloring(len(adj.sizes), [(s, d) for s, d, _ in adj.blocks])
        if coloring is None and bipartite is True:
            raise ValueError("bipartite=True but the graph's layers are not 2-colourable")
        if coloring is not None:
            gram = GramOperator(adj, coloring)
            if gram.n < k:
                if bipartite is True:
                    raise ValueError(f"the small colour class has {gram.n} nodes < k={k}")
                gram = None
    if gram is not None:
        use_warm = warm_block is not None and warm_method in (None, "gram") and warm_block.shape[0] == gram.n
        sub = subspace_eigs(
            gram.matmat, gram.n, k, lower=0.0, upper=1.0,
            start=warm_block if use_warm else None, start_values=warm_values if use_warm else None,
            first_column=gram.trivial_vector(), **common,
        )
        sigma2 = sub.values[:k].clamp(0.0, 1.0)
        # M's top-k are +sigma only while sigma_k is clearly positive; else the generic route.
        if float(sigma2[-1]) > 1e3 * torch.finfo(adj.dtype).eps or bipartite is True:
            z = _polished(sub, k, 0.0) if polish else sub.vectors[:, :k]
            x, sigma = gram.eigenvectors_of_m(z)
            evals = 1.0 - sigma2.sqrt()
            return EigResult(evals, x, sub.vectors, sub.values, sub.residuals, sub.iterations, sub.matvecs,
                             sub.converged, "gram", n_iso, sub.groups, sub.work)
    use_warm = warm_block is not None and warm_method in (None, "generic") and warm_block.shape[0] == adj.n
    sub = subspace_eigs(
        adj.matmat, adj.n, k, lower=-1.0, upper=1.0,
        start=warm_block if use_warm else None, start_values=warm_values if use_warm else None,
        first_column=adj.trivial_vector(), **common,
    )
    evals = 1.0 - sub.values[:k]
    vecs = _polished(sub, k, 1.0) if polish else sub.vectors[:, :k]
    return EigResult(evals, vecs, sub.vectors, sub.values, sub.residuals, sub.iterations,
                     sub.matvecs, sub.converged, "generic", n_iso, sub.groups, sub.work)
