"""Differentiable spectral clusterability regularizer.

``SpectralRegularizer(model)()`` is ``weight * (lambda_2 + ... + lambda_{n_eigs+1})``, the sum of
the smallest non-trivial eigenvalues of the normalized Laplacian ``L = I - D^-1/2 A D^-1/2`` of
the model's weight graph (the graph of :meth:`WeightGraph.from_module`: every unit a node, every
weight an edge of weight ``|w|``, biases ignored), as a scalar tensor that back-propagates into
every weight of the graph. Small eigenvalues mean a graph that splits into weakly connected
parts, so adding the penalty to the loss makes the network more clusterable (lower n-cut).

How (``performance.md`` section 5):

* No autograd through an eigensolver. The ``k = n_eigs + 1`` smallest eigenvectors ``X`` of
  ``L`` (the trivial one included) come from the warm-started block Chebyshev solver of
  :mod:`torch_modularity.eigen` on the small-side Gram operator, without gradient, and the
  penalty is the Hellmann-Feynman (HF) closed form ``k - trace(X^T M(W) X)`` with ``X``
  detached and ``M(W) = D^-1/2 |W| D^-1/2`` built in torch from the weights (degrees included,
  so the gradient flows through them too). Its value is the sum of the Rayleigh quotients, i.e.
  the eigenvalue sum, and its gradient is the exact gradient of the eigenvalue sum whenever
  ``lambda_{k+1} > lambda_k`` (the solver's residual decides how exact). With a chain of layers
  the trace splits into per-layer terms ``2 * sum_i x_dst,i^T S_l x_src,i`` with
  ``S_l = D_dst^-1/2 |W_l| D_src^-1/2``: a few GEMMs over the weights.
* The solver's block (``n_eigs + 1 + 8`` vectors) is kept between calls: each step starts from
  the previous step's eigenvectors, so one or two low-degree Chebyshev iterations suffice.
* When the gap is tiny (random init) the eigenvectors are not unique, but the penalty is
  still the (finite, bounded) sum of Rayleigh quotients of an orthonormal block: it stays
  finite and its gradient bounded; the gap opens within a few training steps.

Cost (``benchmarks/bench_regularizer.py``, 784-256x4-10 MLP, batch 128, Adam, float32, the
2-core CPU box run alone, 2026-11-28): a regularized step took ~1.4-1.5x a plain one on one and
on two threads (+40-48 % by medians in eight runs; the naive dense-``eigh`` step ~100-130x), with
a gradient error of ~1e-6 against float64 dense ``eigh``. On CPU chains the per-step work runs in
three compiled calls (``_chain_step.h``, through the BLAS/LAPACK routines torch itself uses, split
over torch's own OpenMP threads when it runs on several, from a workspace kept between calls):
|W| and the degrees in one pass over the weights; the eigensolver step; and the backward, one
GEMM and one sign pass per layer. The step starts from the last two solves' wanted subspaces
extrapolated linearly (weights move smoothly in training), then does one Chebyshev iteration of
degree 1 on the Gram operator, a Rayleigh-Ritz step and a polishing power step
(:class:`_ChainGram`), whose by-products give ``M X`` exactly, so the HF loss needs no GEMM of
its own. Those GEMMs (~90 MFLOP on the paper MLP) are most of what is left. Elsewhere (GPU,
``backend="torch"``, no compiler at install) the same step runs as torch operations, and the
|W| and sign(W) of every layer go into buffers kept between calls (page faults of fresh large
tensors cost more than the values). ``overlap=True`` starts the compiled work on a worker
thread when the model's forward begins (see the class). ``every=N`` skips the solver on the
steps in between (gradient error ~4e-3 after one reused step, growing linearly). On a GPU (an
H200) the torch step is launch-bound: a few hundred small kernels and one host synchronisation
per step add ~7.5 ms to a 2 ms plain step of that MLP; the small ``eigh``/QR of the solver run
on the host, where they are cheaper at these sizes.

Relation to the research code (``method.md`` section 5): its gradient was exactly 0.5x the true
derivative of its loss ``(cluster_lambda / num_cluster_eigs) * sum(lambda_2 .. lambda_{k+1})``
with ``cluster_lambda = 0.1``, ``num_cluster_eigs = 3``. Ours is exact, so the research dynamics
are reproduced by ``weight = 0.5 * cluster_lambda / num_cluster_eigs = 0.05 / 3 = 0.01667`` with
``n_eigs=3`` and ``normalize_relu=True`` (the reported penalty value is then half of theirs).
"""
from __future__ import annotations

import ctypes
import math
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import _native
from ._torch_modes import eager_under_compile, full_precision
from .eigen import EigResult, _safe_rsqrt, chebyshev_eigs, default_tol, layer_coloring
from .graph import WeightGraph, unwrap_model as _unwrap
from .spectral import check_seed
from .trace import GraphRebuilder

__all__ = [
    "SpectralRegularizer",
    "normalize_relu_",
    "DisconnectedGraphWarning",
    "DEFAULT_N_EIGS",
    "DEFAULT_WEIGHT",
]

#: Default number of non-trivial eigenvalues: the 11 that, with the trivial one, span the
#: embedding of a 12-cluster spectral clustering (the paper's k = 12).
DEFAULT_N_EIGS = 11
#: Default weight of the eigenvalue sum (see :class:`SpectralRegularizer` for how it was chosen).
DEFAULT_WEIGHT = 0.05


class DisconnectedGraphWarning(UserWarning):
    """The weight graph lost edges to the point of isolated nodes or separate components."""


# Activations f with f(s x) = s f(x) for s > 0: per-unit rescaling passes through them.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Flatten)




def _linear_chain(module: nn.Module) -> List[Tuple[str, nn.Linear]]:
    return [(path, m) for path, m in module.named_modules() if isinstance(m, nn.Linear)]


def _weight_param(lin: nn.Linear) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The tensor to rescale in place (``weight_orig`` under ``torch.nn.utils.prune``) and the mask."""
    if hasattr(lin, "weight_orig"):
        return lin.weight_orig, getattr(lin, "weight_mask", None)
    return lin.weight, None


def _check_homogeneous(module: nn.Module, chain: List[Tuple[str, nn.Linear]]) -> None:
    """Raise if a leaf module between two Linear layers is not positively homogeneous."""
    linear_ids = {id(m) for _, m in chain}
    seen_linear = 0
    for path, m in module.named_modules():
        if id(m) in linear_ids:
            seen_linear += 1
            continue
        if list(m.children()):
            continue
        if 0 < seen_linear < len(chain) and not isinstance(m, _HOMOGENEOUS):
            raise ValueError(
                f"normalize_relu: module {type(m).__name__} at '{path}' sits between Linear layers and is not "
                f"positively homogeneous (f(s x) = s f(x) for s > 0), so per-unit rescaling would change the "
                f"network's function; it is only function-preserving for ReLU / LeakyReLU / PReLU nets"
            )


@torch.no_grad()
def normalize_relu_(model: nn.Module) -> List[torch.Tensor]:
    """Rescale every hidden unit of a ReLU MLP without changing its function (in place).

    The research code's ``NormalizeWeights``: for each hidden unit (every output unit of every
    ``nn.Linear`` but the last), ``s = ||(incoming weights, bias)||_2 / sqrt(2)``; the incoming
    weights and the bias are divided by ``s`` and the unit's outgoing weights (its column of
    the next Linear's weight) multiplied by ``s``. Since ``relu(x / s) * s = relu(x)`` for
    ``s > 0``, the network computes the same function (up to rounding), but every hidden unit
    now has incoming norm ``sqrt(2)``. This removes the per-unit rescaling freedom that
    normalized-Laplacian eigenvalues are sensitive to (and a regularizer could exploit).

    Units with all-zero incoming weights and bias are left alone. Under
    ``torch.nn.utils.prune`` the norm uses the masked weights and ``weight_orig`` is rescaled.
    Optimizer state (e.g. Adam moments) is not adjusted, as in the research code.

    Example:
        >>> torch.manual_seed(0)  # doctest: +SKIP
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(5, 4)
        >>> before = mlp(x)
        >>> _ = normalize_relu_(mlp)
        >>> torch.allclose(mlp(x), before, atol=1e-6)
        True

    Args:
        model: a chain of ``nn.Linear`` layers (``nn.Sequential``-like; DDP and
            ``torch.compile`` wrappers are unwrapped). Only ReLU, LeakyReLU, PReLU, Identity,
            Dropout and Flatten may sit between the Linear layers (activations applied in a
            custom ``forward`` are not visible and assumed to be ReLU-like).

    Returns:
        The scale factors ``s``, one tensor per hidden layer.

    Raises:
        ValueError: a non-homogeneous activation module between Linear layers.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    module = _unwrap(model)
    chain = _linear_chain(module)
    _check_homogeneous(module, chain)
    scales = []
    for (_, lin), (_, nxt) in zip(chain[:-1], chain[1:]):
        w, mask = _weight_param(lin)
        w_eff = (w * mask if mask is not None else w).detach()
        acc = torch.float64 if w_eff.dtype == torch.float64 else torch.float32
        sq = (w_eff.to(acc) ** 2).sum(dim=1)
        if lin.bias is not None:
            sq = sq + lin.bias.detach().to(acc) ** 2
        s = sq.sqrt() / math.sqrt(2.0)
        s = torch.where(s > 0, s, torch.ones_like(s))
        w.div_(s.to(w.dtype)[:, None])
        if lin.bias is not None:
            lin.bias.div_(s.to(lin.bias.dtype))
        w2, _ = _weight_param(nxt)
        if w2.shape[1] != s.shape[0]:
            raise ValueError(
                f"normalize_relu: Linear layers do not chain ({tuple(w.shape)} then {tuple(w2.shape)})"
            )
        w2.mul_(s.to(device=w2.device, dtype=w2.dtype)[None, :])
        if hasattr(lin, "weight_orig"):
            lin.weight = w * mask  # keep the derived attribute current until the next forward
        if hasattr(nxt, "weight_orig"):
            nxt.weight = w2 * nxt.weight_mask
        scales.append(s.to(dtype=w.dtype))
    return scales


# Below this many entries, QR of a vector block living on an accelerator is done on the CPU:
# a round trip of a few hundred kB costs less than the library call's launch and checks
# there (measured on an H200: 0.15 vs 0.48 ms for 522 x 20; 2.4 vs 0.2 ms for 8986 x 20).
_HOST_QR_MAX = 1 << 17


def _orthonormal_rows(y: torch.Tensor) -> torch.Tensor:
    """Rows spanning the same space as ``y``'s rows, orthonormal (reduced QR of ``y^T``)."""
    if y.device.type != "cpu" and y.numel() <= _HOST_QR_MAX:
        return torch.linalg.qr(y.T.cpu(), mode="reduced").Q.T.to(y.device, non_blocking=True)
    return torch.linalg.qr(y.T, mode="reduced").Q.T


def _small_eigh(h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of a small symmetric matrix; on the CPU for accelerator tensors (the library
    call there costs ~0.3-0.7 ms of launches and checks for a 20 x 20 matrix, the round trip
    ~0.14 ms), so the result is also the same on every device."""
    if h.device.type != "cpu":
        vals, vecs = torch.linalg.eigh(h.cpu())
        return vals.to(h.device, non_blocking=True), vecs.to(h.device, non_blocking=True)
    return torch.linalg.eigh(h)


def _extrapolate_rows(zt: torch.Tensor, previous: torch.Tensor, k: int) -> torch.Tensor:
    """``zt`` (rows: the last solve's Ritz vectors) with its first ``k`` rows moved on by the
    motion of their span since ``previous`` (the solve before, same layout).

    Training moves the weights smoothly (Adam's momentum), so the wanted subspace moves smoothly
    too: ``S_next ~ S + (S - S_prev)``. With ``Z``, ``Z_prev`` the wanted vectors of the last two
    solves (orthonormal rows), ``(I - P_prev) Z`` is the motion of the subspace (rotations inside
    it do not matter: Rayleigh-Ritz undoes them), and ``2 Z - P_prev Z`` the extrapolated start
    (rows not orthonormal; the solver orthonormalizes after filtering). On the paper MLP it cut
    the gradient error of a degree-1 step from ~4.5e-6 to ~1e-6.
    """
    a, b = previous[:k], zt[:k]
    out = zt.clone()
    out[:k] = torch.addmm(b, b @ a.T, a, beta=2.0, alpha=-1.0)
    return out


def _int64s(values: Sequence[int], cache: Optional[Dict[Tuple[int, ...], torch.Tensor]] = None) -> torch.Tensor:
    """``values`` as an int64 tensor for the compiled kernels, memoized in ``cache`` by the values
    (layer sizes, and data pointers: the |W| buffers and the weights keep their storage across steps)."""
    key = tuple(values)
    if cache is None:
        return torch.tensor(key, dtype=torch.int64)
    found = cache.get(key)
    if found is None:
        if len(cache) > 8:
            cache.clear()
        found = cache[key] = torch.tensor(key, dtype=torch.int64)
    return found


def _addresses(tensors: Sequence[torch.Tensor], cache: Optional[Dict[Tuple[int, ...], torch.Tensor]] = None
               ) -> torch.Tensor:
    """The tensors' data pointers as an int64 tensor (see :func:`_int64s`)."""
    return _int64s([t.data_ptr() for t in tensors], cache)


def _contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous tensor of ``dtype``: itself when it already is (no torch op: a few us each)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype=dtype).contiguous()


def _team_address(single_thread: bool) -> Optional[int]:
    """The compiled kernels' OpenMP team (:func:`_native.openmp_team`) for torch's current thread
    count, or ``None`` (one thread: the worker thread of ``overlap``, or torch set to one)."""
    if single_thread:
        return None
    team = _native.openmp_team(torch.get_num_threads())
    return team.data_ptr() if team is not None else None


def _pointer_array(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    """The tensors' data pointers as a ctypes int64 array: for pointers that change every call
    (fresh outputs), where a memoized tensor (:func:`_addresses`) would not be reused."""
    ptrs = [t.data_ptr() for t in tensors]
    return (ctypes.c_int64 * len(ptrs))(*ptrs)


def _native_grads_call(ws: Sequence[torch.Tensor], x: torch.Tensor, mx: torch.Tensor, inv_all: torch.Tensor,
                       sqrt_all: torch.Tensor, c: Union[torch.Tensor, float], single_thread: bool = False,
                       cache: Optional[Dict[Tuple[int, ...], torch.Tensor]] = None,
                       work: Optional[_native.Workspace] = None):
    """``(kernel, arguments, gradients)`` of :func:`_native_chain_grads`, everything allocated (the
    inputs may be filled later, before the call). ``c``: one cotangent per vector, or one value
    for all (a plain ``loss = ... + reg()``: no tensor to build)."""
    dtype = x.dtype
    lib = _native.kernels()
    fn = lib.tm_chain_grad_f32 if dtype == torch.float32 else lib.tm_chain_grad_f64
    gemm = _native.chain_routines(dtype)[0]
    sizes = [ws[0].shape[1]] + [w.shape[0] for w in ws]
    grads = [torch.empty(w.shape, dtype=dtype) for w in ws]
    w_addrs = _addresses(ws, cache)
    g_addrs = _pointer_array(grads)
    sizes_t = _int64s(sizes, cache)
    if isinstance(c, torch.Tensor):
        c = c.to(dtype).contiguous()
        c_address = c.data_ptr()
    else:
        c = ((ctypes.c_float if dtype == torch.float32 else ctypes.c_double) * x.shape[0])(*([c] * x.shape[0]))
        c_address = ctypes.addressof(c)
    args = (gemm, _native.mkl_set_num_threads_local() if single_thread else None, _team_address(single_thread),
            len(sizes), sizes_t.data_ptr(),
            w_addrs.data_ptr(), x.data_ptr(), mx.data_ptr(), inv_all.data_ptr(), sqrt_all.data_ptr(), x.shape[0],
            c_address, ctypes.addressof(g_addrs), work.address if work is not None else None)
    return fn, args, (grads, (ws, w_addrs, g_addrs, sizes_t, c, x, mx, inv_all, sqrt_all, work))


def _native_chain_grads(ws: Sequence[torch.Tensor], x: torch.Tensor, mx: torch.Tensor, inv_all: torch.Tensor,
                        sqrt_all: torch.Tensor, c: Union[torch.Tensor, float], single_thread: bool = False,
                        cache: Optional[Dict[Tuple[int, ...], torch.Tensor]] = None,
                        work: Optional[_native.Workspace] = None) -> List[torch.Tensor]:
    """Weight gradients of ``sum_i c_i x_i^T M(W) x_i`` (``_HFTrace.backward`` with ``M X`` known) by
    the compiled kernel: one GEMM and one sign pass per layer, the GIL released. All inputs CPU,
    contiguous, of the weights' dtype. ``single_thread``: MKL on one thread (else torch's setting)."""
    fn, args, (grads, _) = _native_grads_call(ws, x, mx, inv_all, sqrt_all, c, single_thread, cache, work)
    if fn(*args) != 0:
        raise MemoryError("the compiled regularizer kernel could not allocate its work arrays")
    if work is not None:
        work.fit()
    return grads


def _run_native_calls(prepare, step, grads, keepalive=None) -> Tuple[int, int, int]:
    """The worker thread's job: the three compiled calls, nothing else (no torch operation, so it
    needs the GIL only between them). Returns their statuses (``1`` where skipped).

    ``keepalive`` holds every tensor the calls read or write: the job keeps them alive even if the
    regularizer that started it is garbage-collected meanwhile."""
    s_prep = prepare[0](*prepare[1])
    if s_prep != 0:
        return s_prep, 0, 1
    s_step = step[0](*step[1])
    if s_step <= 0:
        return s_prep, s_step, 1
    return s_prep, s_step, grads[0](*grads[1])


class _ChainGram:
    """Warm-started subspace iteration on the small-side Gram operator of a Linear chain, lean.

    The per-step solver of :class:`SpectralRegularizer` on chains (``performance.md`` section 5):
    the same Chebyshev-filtered subspace iteration with Rayleigh-Ritz as
    :func:`torch_modularity.eigen.subspace_eigs`, written for the chain's row layout (vectors
    as rows ``(m, n_l)`` per layer, two skinny GEMMs per block and Gram application) and with
    its by-products kept: the Rayleigh-Ritz step computes ``B Q`` (large side) and, for the
    ``k`` wanted vectors, ``B^T B z``, which give ``M x`` for every eigenvector ``x`` exactly.
    The HF loss then needs no GEMM of its own in the forward pass and only the gradient's outer
    product in the backward pass. Used only from a warm start; the regularizer falls back to
    :func:`chebyshev_eigs` for cold starts and whenever this step reports a problem.
    """

    def __init__(self, sizes: Sequence[int], work: Optional[_native.Workspace] = None) -> None:
        n_layers = len(sizes)
        self.work = work  # scratch of the compiled step (calls on the caller's thread only)
        coloring = layer_coloring(n_layers, [(l, l + 1) for l in range(n_layers - 1)])
        side = [0, 0]
        for c, n in zip(coloring, sizes):
            side[c] += n
        small = 0 if side[0] <= side[1] else 1  # the choice GramOperator makes: warm blocks interchange
        self.sizes = list(sizes)
        self.small = [l for l in range(n_layers) if coloring[l] == small]
        self.large = [l for l in range(n_layers) if coloring[l] != small]
        self.bounds = self._offsets(self.small)  # column range of each small-side layer
        self.small_flags = [int(l in self.bounds) for l in range(n_layers)]
        # The step's int64 inputs that never change (made once, not looked up in the memo per call).
        self._sizes_t = torch.tensor(self.sizes, dtype=torch.int64)
        self._small_t = torch.tensor(self.small_flags, dtype=torch.int64)
        self.large_bounds = self._offsets(self.large)
        self._orders: Dict[torch.device, torch.Tensor] = {}
        self.n_small = sum(sizes[l] for l in self.small)
        # The filter's lower cut of the next step (a Ritz value of this one) as a Python float,
        # read together with the residuals: one host-device synchronisation per step.
        self._next_cut: Optional[Tuple[torch.Tensor, float]] = None
        self._addr_cache: Dict[Tuple[int, ...], torch.Tensor] = {}  # int64 tensors for step_native (_int64s)
        self._block_rows: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (EigResult.block, its rows), see _rows

    def _node_order(self, device) -> torch.Tensor:
        """Index of every node (in node order) in a row laid out as (small side, large side)."""
        order = self._orders.get(device)
        if order is None:
            parts = []
            for l, n in enumerate(self.sizes):
                a = self.bounds[l][0] if l in self.bounds else self.n_small + self.large_bounds[l][0]
                parts.append(torch.arange(a, a + n))
            order = self._orders[device] = torch.cat(parts).to(device)
        return order

    def _offsets(self, layers: Sequence[int]) -> Dict[int, Tuple[int, int]]:
        out, off = {}, 0
        for l in layers:
            out[l] = (off, off + self.sizes[l])
            off += self.sizes[l]
        return out

    def _raw(self, scaled: Dict[int, torch.Tensor], blocks, targets) -> Dict[int, torch.Tensor]:
        """``(A v)_j`` for the layers ``targets`` from the other side's (already scaled) parts."""
        out = {}
        n_layers = len(self.sizes)
        for j in targets:
            below = scaled.get(j - 1)
            above = scaled.get(j + 1) if j + 1 < n_layers else None
            if below is not None and above is not None:
                out[j] = torch.addmm(below @ blocks[j - 1].T, above, blocks[j])  # one fused accumulate
            elif below is not None:
                out[j] = below @ blocks[j - 1].T
            else:
                out[j] = above @ blocks[j]
        return out

    def _half_rows(self, t: torch.Tensor, blocks, inv_sides, to_large: bool) -> torch.Tensor:
        """``B t`` (``to_large``) or ``B^T t`` for a row block ``t`` of the other side, as one row
        block; ``inv_sides`` is ``(D_small^-1/2, D_large^-1/2)`` as rows (each scaling is one op
        over all layers of a side)."""
        src_bounds, targets = (self.bounds, self.large) if to_large else (self.large_bounds, self.small)
        inv_src, inv_dst = inv_sides if to_large else inv_sides[::-1]
        out = self._raw(self._split(t * inv_src, src_bounds), blocks, targets)
        return torch.cat([out[l] for l in targets], dim=1).mul_(inv_dst)

    def _split(self, t: torch.Tensor, bounds: Optional[Dict[int, Tuple[int, int]]] = None) -> Dict[int, torch.Tensor]:
        """Per-layer column views of a small-side (default) or large-side row block."""
        return {l: t[:, a:b] for l, (a, b) in (bounds or self.bounds).items()}

    def _gram(self, zt: torch.Tensor, blocks, inv_small: torch.Tensor, inv2_rows) -> torch.Tensor:
        """``G z = S_small A^T S_large^2 A S_small z`` for rows ``zt``; ``inv_small`` is the
        small side's ``D^-1/2`` as one row, ``inv2_rows[j]`` the large layers' ``D^-1``: the
        scalings between the two products are applied once."""
        y = self._raw(self._split(zt * inv_small), blocks, self.large)
        back = self._raw({j: v.mul_(inv2_rows[j]) for j, v in y.items()}, blocks, self.small)
        return torch.cat([back[l] for l in self.small], dim=1).mul_(inv_small)

    def step(self, blocks, inv, sqrt_d, warm: EigResult, k: int, degree: int, tol: float, max_iter: int,
             num_isolated: int = 0, zero_tol: float = 0.0, previous: Optional[torch.Tensor] = None):
        """Iterate from ``warm`` until the ``k`` returned vectors' residuals meet ``tol`` (at most
        ``max_iter`` times).

        ``previous`` is the warm block of the solve before ``warm`` (same shape), or ``None``: the
        wanted subspace is then extrapolated linearly from the two (see below) before filtering.

        Returns ``(result, x_rows, mx_rows, n_zero, q)``: an :class:`EigResult` (``method="gram"``),
        the eigenvectors ``X^T`` and ``(M X)^T`` as rows ``(k, N)`` in node order, how many of the
        ``k`` eigenvalues are at most ``zero_tol``, and the Rayleigh quotients ``x_i^T (M x)_i``
        with their sum in double, ``(q, q_sum)`` (``None`` here; the compiled step computes them);
        or ``None`` when the step cannot be trusted
        (non-finite values, a vanishing ``sigma_k``, or no convergence).
        """
        dtype = blocks[0].dtype
        zt = warm.block.T.to(dtype=dtype)  # (m, n_small) Ritz vectors of the previous step
        theta = warm.ritz_values.to(dtype=dtype)
        m = zt.shape[0]
        if zt.shape[1] != self.n_small or theta.numel() < m or m < k:
            return None
        if previous is not None and previous.shape == warm.block.shape:
            zt = _extrapolate_rows(zt, previous.T.to(dtype=dtype), k)
        # Row-shaped scalings, made once per step (each costs a dispatch per use otherwise).
        inv_small = torch.cat([inv[l] for l in self.small])[None, :]
        inv_sides = (inv_small, torch.cat([inv[l] for l in self.large])[None, :])
        inv2_rows = {j: (inv[j] * inv[j])[None, :] for j in self.large}
        v0 = torch.cat([sqrt_d[l] for l in self.small])
        tiny = torch.finfo(dtype).tiny
        v0 = v0 / v0.norm().clamp_min(tiny)
        cached = self._next_cut
        smallest = cached[1] if cached is not None and cached[0] is warm.ritz_values else float(theta[m - 1])
        # lambda_j <= zero_tol  <=>  sigma_j^2 >= (1 - zero_tol)^2 (Ritz values are sigma^2)
        zero_sigma2 = (1.0 - zero_tol) ** 2
        for it in range(max(1, max_iter)):
            # Chebyshev filter damping [0, cut] (cut = the smallest Ritz value), amplifying above it.
            # Normalized recurrence (as in eigen._chebyshev_filter): no overflow at any degree.
            cut = min(max(smallest, 1e-4), 1.0 - 1e-7)
            e = c = cut / 2.0
            t0 = (1.0 - c) / e
            rho_prev, rho = 1.0, t0
            y_prev = zt
            # In place on the fresh G y: fewer dispatches per step.
            y = self._gram(zt, blocks, inv_small, inv2_rows).sub_(zt, alpha=c).mul_(1.0 / (e * t0))
            for _ in range(1, degree):
                rho_next = 2.0 * t0 * rho - rho_prev
                y_next = (self._gram(y, blocks, inv_small, inv2_rows).sub_(y, alpha=c)
                          .mul_(2.0 * rho / (e * rho_next)).sub_(y_prev, alpha=rho_prev / rho_next))
                y_prev, y, rho_prev, rho = y, y_next, rho, rho_next
            y[0] = v0  # the exact top eigenvector (sigma = 1) replaces the most amplified direction
            q = _orthonormal_rows(y)  # (m, n_small)
            bq_t = self._half_rows(q, blocks, inv_sides, to_large=True)  # (m, n_large)
            theta, u = _small_eigh(bq_t @ bq_t.T)  # eigh reads one triangle: no symmetrizing needed
            theta, u = theta.flip(0), u.flip(1)
            zt = u.T @ q  # all m Ritz vectors: the next warm start
            yk = u[:, :k].T @ bq_t  # B z for the k wanted ones, (k, n_large)
            gzt = self._half_rows(yk, blocks, inv_sides, to_large=False)  # G z, (k, n_small)
            # Polish (one power step, as chebyshev_eigs(polish=True)): z' = orth(G z), whose error
            # outside the wanted subspace is smaller by about theta_bulk / theta_k; it costs one more
            # B and B^T on k vectors, which then give M x exactly again, and the residual of the
            # vectors returned, checked against tol.
            zp = _orthonormal_rows(gzt)
            overlap = (zp * zt[:k]).sum(dim=1)
            zp = zp * torch.copysign(torch.ones_like(overlap), overlap)[:, None]  # keep each vector's sign
            yk = self._half_rows(zp, blocks, inv_sides, to_large=True)
            sigma2 = (yk * yk).sum(dim=1)
            gzt = self._half_rows(yk, blocks, inv_sides, to_large=False)
            res = (gzt - sigma2[:, None] * zp).norm(dim=1)
            # Everything the host decides on, read in one synchronisation.
            worst, sigma2_k, smallest, n_zero = torch.stack(
                [res.max(), sigma2.min(), theta[m - 1], (sigma2 >= zero_sigma2).sum().to(dtype)]).tolist()
            if not math.isfinite(worst):
                return None
            if worst <= tol:
                break
        else:
            return None
        if sigma2_k <= 1e3 * torch.finfo(dtype).eps:
            return None  # sigma_k ~ 0: M's top-k are not all +sigma (the generic route decides)
        sigma = sigma2.sqrt().clamp_min(tiny)
        # x = (z, B z / sigma) / sqrt(2); (M x)_small = B^T B z / (sigma sqrt(2)), (M x)_large = B z / sqrt(2).
        inv_sigma = sigma.reciprocal()[:, None]
        y_over_sigma = yk * inv_sigma
        gz_over_sigma = gzt * inv_sigma
        r2 = 1.0 / math.sqrt(2.0)
        order = self._node_order(zp.device)  # (small side, large side) -> node order, one gather
        x_rows = torch.cat([zp, y_over_sigma], dim=1).index_select(1, order).mul_(r2)  # (k, N)
        mx_rows = torch.cat([gz_over_sigma, yk], dim=1).index_select(1, order).mul_(r2)
        result = EigResult(
            eigenvalues=1.0 - sigma, eigenvectors=x_rows.T, block=zt.T, ritz_values=theta,
            residuals=res, iterations=it + 1, matvecs=(degree + 2) * (it + 1), converged=True, method="gram",
            num_isolated=num_isolated,
        )
        self._next_cut = (theta, smallest)
        return result, x_rows, mx_rows, int(n_zero), None

    def native_ok(self, blocks, warm: EigResult) -> bool:
        """Whether :meth:`step_native` can run: CPU float32/float64 blocks, the compiled step and
        the BLAS/LAPACK routines available, a block no wider than the small side."""
        a = blocks[0]
        if a.device.type != "cpu" or _native.chain_routines(a.dtype) is None:
            return False
        return warm.block.dim() == 2 and warm.block.shape[1] <= self.n_small

    def step_native(self, blocks, inv_all: torch.Tensor, sqrt_all: torch.Tensor, warm: EigResult, k: int, degree: int,
                    tol: float, max_iter: int, num_isolated: int = 0, zero_tol: float = 0.0,
                    previous: Optional[torch.Tensor] = None, single_thread: bool = False):
        """:meth:`step` as one call of the compiled kernel (``_chain_step.h``): the same operations,
        with the ~150 small torch calls of a step (and their dispatch cost) replaced by direct
        BLAS/LAPACK calls. Same inputs (``inv_all``/``sqrt_all``: ``D^-1/2`` and ``D^1/2`` over all
        nodes) and returns; the GIL is released for the whole step. ``single_thread``: MKL runs on
        one thread (the worker thread's setting; else torch's). Check :meth:`native_ok` first."""
        call = self.native_call(blocks, inv_all, sqrt_all, warm, k, degree, tol, max_iter, zero_tol, previous,
                                single_thread)
        if call is None:
            return None
        fn, args, outputs = call
        status = fn(*args)
        if self.work is not None:
            self.work.fit()
        return self.native_finish(outputs, status, degree, num_isolated)

    def native_call(self, blocks, inv_all, sqrt_all, warm: EigResult, k: int, degree: int, tol: float, max_iter: int,
                    zero_tol: float, previous: Optional[torch.Tensor], single_thread: bool):
        """``(kernel, arguments, outputs)`` of :meth:`step_native`'s compiled call, everything
        allocated, so that the call itself needs no torch operation; ``None`` if the warm block does
        not fit. ``inv_all`` and ``sqrt_all`` (contiguous, the blocks' dtype) may be filled later,
        before the call."""
        dtype = blocks[0].dtype
        lib = _native.kernels()
        fns = _native.chain_routines(dtype)
        fn = lib.tm_chain_step_f32 if dtype == torch.float32 else lib.tm_chain_step_f64
        zt = self._rows(warm.block, dtype)
        m = zt.shape[0]
        theta = _contiguous_as(warm.ritz_values, dtype)
        if zt.shape[1] != self.n_small or theta.numel() < m or m < k:
            return None
        prev = None
        if previous is not None and previous.shape == warm.block.shape:
            prev = self._rows(previous, dtype)
        blocks = [b if b.is_contiguous() else b.contiguous() for b in blocks]
        sizes_t, small_t = self._sizes_t, self._small_t
        addrs = _addresses(blocks, self._addr_cache)
        inv_all, sqrt_all = _contiguous_as(inv_all, dtype), _contiguous_as(sqrt_all, dtype)
        n = inv_all.numel()
        out = dict(x=torch.empty(k, n, dtype=dtype), mx=torch.empty(k, n, dtype=dtype),
                   zt=torch.empty(m, self.n_small, dtype=dtype), theta=torch.empty(m, dtype=dtype),
                   res=torch.empty(k, dtype=dtype), eig=torch.empty(k, dtype=dtype), q=torch.empty(k, dtype=dtype),
                   stats=torch.empty(5, dtype=torch.float64),  # read only after a successful call
                   # Alive until the call returns: everything whose address the call gets (the memo of
                   # pointer arrays may drop addrs when it overflows; with overlap the call may outlive
                   # this object, when the regularizer is dropped mid-step).
                   keep=(blocks, zt, theta, prev, addrs, sizes_t, small_t, inv_all, sqrt_all))
        cached = self._next_cut
        smallest = cached[1] if cached is not None and cached[0] is warm.ritz_values else float(theta[m - 1])
        args = (*fns, _native.mkl_set_num_threads_local() if single_thread else None, _team_address(single_thread),
                len(self.sizes),
                sizes_t.data_ptr(), addrs.data_ptr(), small_t.data_ptr(), inv_all.data_ptr(), sqrt_all.data_ptr(),
                zt.data_ptr(), theta.data_ptr(), prev.data_ptr() if prev is not None else None, m, k, degree,
                float(tol), max(1, max_iter), (1.0 - zero_tol) ** 2, float(smallest), out["x"].data_ptr(),
                out["mx"].data_ptr(), out["zt"].data_ptr(), out["theta"].data_ptr(), out["res"].data_ptr(),
                out["eig"].data_ptr(), out["q"].data_ptr(), out["stats"].data_ptr(),
                self.work.address if self.work is not None and not single_thread else None)
        return fn, args, out

    def native_finish(self, out: Dict[str, Any], status: int, degree: int, num_isolated: int):
        """:meth:`step_native`'s return value from the compiled call's ``status`` and outputs."""
        if status == -1:
            raise MemoryError("the compiled regularizer step could not allocate its work arrays")
        if status <= 0:
            return None  # not trustworthy (or a LAPACK error): the generic route decides
        _, _, smallest, n_zero, q_sum = out["stats"].tolist()
        result = EigResult(
            eigenvalues=out["eig"], eigenvectors=out["x"].T, block=out["zt"].T, ritz_values=out["theta"],
            residuals=out["res"], iterations=status, matvecs=(degree + 2) * status, converged=True, method="gram",
            num_isolated=num_isolated,
        )
        self._next_cut = (out["theta"], smallest)
        self._block_rows = [(result.block, out["zt"])] + self._block_rows[:1]  # this block and the one before
        return result, out["x"], out["mx"], int(n_zero), (out["q"], q_sum)

    def _rows(self, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``block.T`` contiguous in ``dtype``: for the blocks of the last two compiled steps, the
        row array they are views of (no torch op)."""
        for view, rows in self._block_rows:
            if view is block and rows.dtype == dtype:
                return rows
        return _contiguous_as(block.T, dtype)


class _HFState:
    """Inputs of one penalty evaluation, kept alive by its autograd graph (weak-referenceable)."""

    __slots__ = ("blocks", "sizes", "inv", "x", "mx", "sqrt_d", "scratch", "u", "us", "ps", "acc", "done",
                 "native", "pre_grads", "pre_c", "addr_cache", "work", "k", "weight", "q", "q_sum", "__weakref__")

    def __init__(self, blocks, sizes, inv, x, mx=None, sqrt_d=None, scratch=None, k=0, weight=1.0, q=None):
        # All vectors as rows over the whole graph: x is X^T (k, N), inv / sqrt_d are D^-1/2 and
        # D^1/2 as (N,); per-layer parts are column views (one op for all layers instead of one per layer).
        self.blocks, self.sizes, self.inv, self.x = blocks, list(sizes), inv, x
        # (M X)^T, when the solver produced it for these very weights: then the forward and the
        # degree terms of the backward need no GEMM.
        self.mx, self.sqrt_d = mx, sqrt_d
        # Per layer, a tensor shaped like the block to hold sign(W) in the backward (None: none kept).
        self.scratch = scratch
        self.u = self.us = self.ps = self.acc = None
        self.done = False
        # The compiled backward applies (CPU chain, weights of the compute dtype); gradients computed
        # ahead for the cotangent pre_c (on the worker thread, see SpectralRegularizer.overlap).
        self.native = False
        self.pre_grads: Optional[List[torch.Tensor]] = None
        self.pre_c: Optional[float] = None
        self.addr_cache: Optional[Dict[Tuple[int, ...], torch.Tensor]] = None
        self.work: Optional[_native.Workspace] = None
        # The penalty is weight * (k - sum_i q_i); q: the quotients, given by the compiled step
        # (for x and M X of these weights, with q_sum, their sum in double) or set by the forward.
        self.k, self.weight, self.q = k, weight, q
        self.q_sum: Optional[float] = None


class _HFTrace(torch.autograd.Function):
    """The penalty ``weight * (k - sum_i q_i)`` from the Rayleigh quotients ``q_i = x_i^T M(W) x_i``
    of fixed vectors, differentiable in the weights (one autograd node for the whole penalty).

    ``M(W) = D^-1/2 |W| D^-1/2`` with degrees from ``|W|``. Forward and backward are written out
    (three GEMMs per layer in all, with inner dimension ``k`` or ``k + 2``) instead of
    being traced op by op; the vectors are kept as rows (``X^T``, shape ``(k, N)``, layer ``l``
    a column range), for which skinny GEMMs run about twice as fast, and elementwise work is
    done once over all layers. Per layer ``l`` (``U_l = D_l^-1/2 X_l``, ``P_l = A_l U_l``):

    * ``q = 2 sum_l colsum(U_{l+1} * P_l)``;
    * for the cotangent ``c`` of ``q`` (``-weight`` times the penalty's, per vector), with ``r_l = 2 rowsum((X_l c) *
      (P_{l-1} + A_l^T U_{l+1}))`` and ``g_l = -r_l d_l^-3/2 / 2`` (the path through the degrees):
      ``dq/dA_l = 2 U_{l+1} diag(c) U_l^T + g_{l+1} 1^T + 1 g_l^T``, one GEMM with inner
      dimension ``k + 2``, and ``dq/dW_l = sign(W_l) * dq/dA_l``.
    """

    @staticmethod
    def forward(ctx, state, *weights):
        blocks, x = state.blocks, state.x
        ctx.state = state
        ctx.save_for_backward(*weights)  # version check: weights must not change before backward
        if not (state.mx is not None and state.native):
            state.q = _HFTrace._quotients(state, blocks, x)
        elif state.q is None:
            state.q = (x * state.mx).sum(dim=1)  # q = x^T (M x); the compiled backward needs nothing more
        if state.q_sum is not None:  # one op: each small op costs ~10 us next to the compiled step
            return torch.full((), state.weight * (state.k - state.q_sum), dtype=x.dtype, device=x.device)
        return state.q.sum().neg_().add_(state.k).mul_(state.weight)

    @staticmethod
    def _quotients(state, blocks, x):
        u = x * state.inv[None, :]  # U^T, (k, N)
        uts = u.split(state.sizes, dim=1)
        state.u, state.us = u, uts
        if state.mx is not None:
            # q = x^T (M x); (A U)_l = D_l^1/2 (M X)_l for the backward.
            state.acc = state.mx * state.sqrt_d[None, :]
            return (x * state.mx).sum(dim=1)
        pts = [uts[l] @ a.T for l, a in enumerate(blocks)]  # P_l^T, (k, n_{l+1})
        q = None
        for l, pt in enumerate(pts):
            term = (uts[l + 1] * pt).sum(dim=1)
            q = term if q is None else q + term
        state.ps = pts
        return 2.0 * q

    @staticmethod
    @eager_under_compile  # run by the autograd engine inside a compiled step: eager, as the forward
    @full_precision  # a backward called inside an autocast region
    def backward(ctx, grad_out):
        st = ctx.state
        weights = ctx.saved_tensors
        st.done = True
        k = st.x.shape[0]
        if st.native and st.mx is not None:
            # CPU only: reading the cotangent costs no synchronisation.
            c = -st.weight * float(grad_out)  # d penalty / d q_i, the same for every i
            if st.pre_grads is not None and c == st.pre_c:
                grads = st.pre_grads  # computed ahead for exactly this cotangent
            else:
                grads = _native_chain_grads(weights, st.x, st.mx, st.inv, st.sqrt_d, c, cache=st.addr_cache,
                                            work=st.work)
            return (None, *[g if w.requires_grad else None for g, w in zip(grads, weights)])
        blocks, uts = st.blocks, st.us
        n_layers = len(st.sizes)
        acc = st.acc
        if acc is None:
            # (A U)_l = P_{l-1} + A_l^T U_{l+1}, as rows, for every layer.
            parts = []
            for l in range(n_layers):
                part = st.ps[l - 1] if l >= 1 else None
                if l < n_layers - 1:
                    qt = uts[l + 1] @ blocks[l]  # (A_l^T U_{l+1})^T, (k, n_l)
                    part = qt if part is None else part + qt
                parts.append(part)
            acc = torch.cat(parts, dim=1)
        c = (grad_out.to(st.u.dtype) * -st.weight).expand(k)[:, None]  # d penalty / d q_i
        # g = -r d^-3/2 / 2 with r = 2 rowsum((X c) * acc): the factors cancel.
        g = torch.mul(st.x, c).mul_(acc).sum(dim=0).mul_(st.inv.pow(3)).neg_()[None, :]
        ones = torch.ones_like(g)
        left = torch.cat([st.u * (2.0 * c), g, ones], dim=0).split(st.sizes, dim=1)  # (k + 2, n_l) views
        right = torch.cat([st.u, ones, g], dim=0).split(st.sizes, dim=1)
        grads = []
        for l, w in enumerate(weights):
            if not w.requires_grad:
                grads.append(None)
                continue
            a = blocks[l]
            grad_a = left[l + 1].T @ right[l]
            wd = w.detach()
            if wd.device != a.device or wd.dtype != a.dtype:
                wd = wd.to(device=a.device, dtype=a.dtype)
            buf = st.scratch[l] if st.scratch is not None else None
            sign = torch.sign(wd, out=buf) if buf is not None and buf.shape == wd.shape else wd.sign()
            grad_w = grad_a.mul_(sign)
            grads.append(grad_w if grad_w.dtype == w.dtype and grad_w.device == w.device
                         else grad_w.to(device=w.device, dtype=w.dtype))
        return (None, *grads)


class SpectralRegularizer:
    """``weight * (lambda_2 + ... + lambda_{n_eigs+1})`` of the model's weight graph, differentiable.

    Add it to the loss; nothing else changes in the training loop::

        reg = SpectralRegularizer(model)
        for x, y in loader:
            opt.zero_grad()
            loss = criterion(model(x), y) + reg()
            loss.backward()
            opt.step()

    The graph is the one :meth:`WeightGraph.from_module` builds with the same graph options
    (an MLP: every unit, input and output included, ``|w|`` edges, biases ignored; a CNN: the
    conv channels with BatchNorm folded; residual and concatenation DAGs too); nodes that are
    isolated (all incident weights exactly zero, e.g. pruned) are left out. The penalty is a
    0-dim tensor on the model's device in the weights' dtype (float32 for half precisions), and
    its gradient lands on each weight's own device and dtype, also when it is called inside a
    ``torch.autocast`` region (mixed precision is switched off for the penalty; on the chain path
    its backward may run inside the region too). See the module docstring for the
    method (no autograd through any eigensolver; exact Hellmann-Feynman gradient).

    Two paths. A chain of ``nn.Linear`` layers uses a hand-written solver step and backward
    (compiled on the CPU, see ``backend``; the fast path the overhead figures refer to). Any other model that
    :meth:`WeightGraph.from_module` reads (Conv2d with BatchNorm folded, residual adds,
    concatenations, Linear layers wired with skips) is traced once; every call rebuilds the edge
    blocks from the live parameters (kernel norms, ``|gamma| / sqrt(running_var + eps)``,
    identity skip edges) and autograd differentiates the same closed-form loss, so gradients
    reach conv weights and BatchNorm ``gamma`` (``running_var`` enters as a constant and is
    never changed by the penalty). Non-bipartite DAGs use the solver's generic route on
    ``D^-1/2 A D^-1/2``. ``normalize_relu`` is available on the chain path only.

    Defaults and scaling. ``n_eigs=11`` regularizes exactly the 11 non-trivial eigenvalues a
    12-cluster spectral clustering (the paper's measure) embeds with. ``weight=0.05``: plain
    Adam (lr 1e-3, batch 128, 20 epochs) on the 784-256x4-10 MNIST MLP, with vs without
    ``reg()`` from the same seed (``examples/train_regularized.py``, 2026-11-28), gave test
    accuracy 97.82 / 97.86 % vs 98.10 / 97.89 % (seeds 0 / 1), 12-cluster n-cut 0.35 / 0.36
    vs 9.80 / 9.80 on the whole graph and 6.89 / 5.68 vs 9.80 / 9.80 on the live subgraph
    (dead units removed: 160 / 154 of them, all hidden), z against 50 shuffles of the live
    subgraph -41 / -100. ``weight=0.1`` (the default before) lowered the live n-cut a little
    more (5.82 / 5.70) but cost 0.67 / 0.07 points of accuracy, over the 0.5-point budget we
    hold the default to on seed 0. The raw n-cut is mostly the dead units' doing; the live one
    is the honest measure. The eigenvalue sum is dimensionless, lies
    in ``[0, 2 n_eigs]`` and is invariant to a global rescaling of the weights, but its gradient
    w.r.t. one weight scales like ``1 / degree`` of the units it joins: wider layers (larger
    degrees) feel a weaker pull per weight, while the cross-entropy gradient does not shrink
    the same way. For other models start from the default, keep ``weight`` roughly
    proportional to ``1 / n_eigs`` when changing ``n_eigs`` (same push per eigenvalue), and
    scale it up for much wider layers (e.g. ~2x for twice the width) until the accuracy cost
    reaches what you accept; watch :func:`torch_modularity.flow.dead_units` (the penalty can
    also lower eigenvalues by cutting unused units off).

    Research-code equivalence: its gradient was 0.5x the true derivative, so its
    ``cluster_lambda=0.1`` over ``num_cluster_eigs=3`` eigenvalues corresponds to ``n_eigs=3,
    weight=0.5 * 0.1 / 3 = 0.01667, normalize_relu=True`` here.

    Args:
        model: an MLP, CNN or DAG model that :meth:`WeightGraph.from_module` supports (DDP /
            DataParallel / ``torch.compile`` wrappers are unwrapped; the penalty is built from
            the inner module's weights).
        n_eigs: number of non-trivial eigenvalues summed (``k = n_eigs + 1`` eigenvectors are
            tracked). Must be smaller than the number of non-isolated nodes.
        weight: multiplier of the eigenvalue sum.
        every: recompute the eigenvectors every ``every``-th call and reuse them in between
            (the HF loss is still evaluated with the current weights). Cheaper (the solver is
            most of the cost), but the gradient is then only approximate between recomputes:
            on the paper MLP during Adam training (lr 1e-3, around step 150) the relative
            gradient error was ~6e-3 with eigenvectors one step old, ~1.2e-2 two steps old,
            ~3e-2 five and ~6e-2 ten steps old, i.e. it grows about linearly with the age (the
            exact, warm-started ``every=1`` gradient: ~1e-6; ``benchmarks/bench_regularizer.py``
            measures both). Fine for shaping the network, not for exact gradients. The schedule
            keys on the call counter, which is identical on every DDP rank as long as every
            rank calls ``reg()`` once per step.
        normalize_relu: apply :func:`normalize_relu_` in a forward pre-hook of the model, i.e.
            before every training-mode forward pass (``model.training`` and grad enabled), like
            the research code's ``NormalizeWeights`` at the start of every batch. Call ``reg()``
            after ``model(x)`` (as in ``criterion(model(x), y) + reg()``): weights must not be
            rescaled between the penalty's forward and its backward (if ``reg()`` was called
            first, the rescaling is skipped for that forward and done at the next one).
            :meth:`remove` detaches the hook.
        degree: Chebyshev degree of the per-step (warm-started) solver iterations. On chains
            each step starts from the last two solves' wanted subspaces extrapolated linearly
            and ends with a polishing power step; degree 1 then gave gradient errors of ~1e-6
            on the paper MLP with Adam at lr 1e-3 and 1e-2 (degree 2: ~3e-7 for ~25 % more
            solver GEMM work). Where the weights move noisily (plain SGD at lr 0.1) the
            extrapolated start needs a second iteration; extrapolation then pauses for 4, 8, ...
            64 solves before it is tried again (1.17 iterations per step there instead of 2).
        block_size: solver block (default ``n_eigs + 1 + 8``).
        tol: solver residual tolerance of the returned eigenvectors (default ``1e-5`` for a
            float32 solver, ``1e-10`` for float64); a step iterates again until it holds.
        max_iter: solver iterations allowed per recompute after the first (warm starts).
        cold_iter, cold_degree: iterations and Chebyshev degree of the first (cold) solve. At
            random init the top of the spectrum is a dense bulk, the eigenvectors are barely
            defined and need not converge: training opens the gaps within a few steps, and the
            warm-started iterations then track them.
        seed: seed of the cold start (an explicit CPU ``torch.Generator``; the global RNG is
            never used), identical on every DDP rank.
        solver_dtype: dtype of the eigensolver (default: the weights' dtype, float32 at least).
            The HF loss itself is always evaluated in the weights' dtype.
        backend: ``"auto"`` (default): on CPU chains with float32/float64 weights, the compiled
            kernels (|W| and degrees, the solver step, the backward) when the package was built
            with them and torch exports its BLAS/LAPACK symbols (the x86-64 Linux wheels do);
            the torch version of the same step otherwise. ``"torch"`` forces the torch version,
            ``"native"`` the compiled one (``RuntimeError`` where it cannot run). Both give the
            same penalty and gradient up to rounding (tested against each other and against
            dense ``eigh``).
        overlap: start each step's compiled work (|W|, solve, gradients for the cotangent of a
            plain ``loss = ... + reg()``) on a worker thread from a forward pre-hook of the model,
            so that it runs next to the model's forward pass on an idle core; ``reg()`` waits for
            it and adopts it only if the weights are the same tensors, unchanged since (by their
            version counters, which writes through ``.data`` do not bump: do not change weights
            that way between the forward and ``reg()``); else, and for any other cotangent, it
            recomputes. CPU chains with the compiled backend only;
            skipped for eval-mode or no-grad forwards, pruned (``weight_orig``) models, and when
            ``reg()`` is called before the forward. Off by default: on the 2-core box it gave
            +50 % with one torch thread and +81 % with two (the forward needs both cores),
            against +40-48 % without; it may pay where cores are idle, so measure on your
            machine (``bench_regularizer.py --overlap``). The worker runs its calls on one
            thread: with one torch thread a run with overlap is bit-identical to one without; with
            several, the synchronous path splits the same work over torch's threads and the two
            runs differ at the rounding level (~4e-7 in the weights after 12 Adam steps).
            :meth:`remove` detaches the hook and stops the thread.
        example_input, kernel_norm, fold_batchnorm, include_dense, include_input: the graph
            options of :meth:`WeightGraph.from_module` (defaults: the research code's graphs:
            conv channels only for a CNN, every unit for an MLP; ``l1`` kernel norms; BatchNorm
            folded). Passing ``include_dense=False`` or ``include_input=False`` for an MLP
            selects the generic path.

    Attributes:
        n_isolated: isolated (degree-0) nodes at the last recompute.
        n_components: connected components of the non-isolated graph, checked when the
            eigenvalues suggest the graph fell apart (``None`` until then; 1 = connected).
        disconnected: ``True`` once isolated nodes or extra components were seen; a
            :class:`DisconnectedGraphWarning` is issued once. Training goes on: isolated nodes
            are masked out (degree ``0 -> D^-1/2 = 0``) and separate components only add zero
            eigenvalues. Never NaN.
        last_result: the last :class:`torch_modularity.eigen.EigResult` of the solver.
        steps: number of calls so far.

    Raises:
        ValueError: ``n_eigs`` < 1 or ``>=`` the number of non-isolated nodes, ``every`` < 1,
            non-finite ``weight``, non-finite model weights (naming the parameter; also at
            every call).
        TypeError: a model that :meth:`WeightGraph.from_module` cannot read (an unsupported
            module or op, named with its path).
        ValueError: ``normalize_relu=True`` on a model that is not a chain of Linear layers.
    """

    def __init__(
        self,
        model: nn.Module,
        n_eigs: int = DEFAULT_N_EIGS,
        weight: float = DEFAULT_WEIGHT,
        every: int = 1,
        normalize_relu: bool = False,
        *,
        degree: int = 1,
        block_size: Optional[int] = None,
        tol: Optional[float] = None,
        max_iter: int = 4,
        cold_iter: int = 50,
        cold_degree: int = 8,
        seed: int = 0,
        solver_dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
        overlap: bool = False,
        example_input: Any = None,
        kernel_norm: str = "l1",
        fold_batchnorm: bool = True,
        include_dense: Optional[bool] = None,
        include_input: Optional[bool] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        module = _unwrap(model)
        for name, value in (("n_eigs", n_eigs), ("every", every), ("degree", degree), ("max_iter", max_iter),
                            ("cold_iter", cold_iter), ("cold_degree", cold_degree)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if n_eigs < 1:
            raise ValueError(f"n_eigs must be at least 1, got {n_eigs}")
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        if degree < 1 or cold_degree < 1:
            raise ValueError(f"degree and cold_degree must be at least 1, got {degree}, {cold_degree}")
        if backend not in ("auto", "native", "torch"):
            raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"weight must be a finite number, got {weight}")
        self._module = module
        graph_options = dict(example_input=example_input, kernel_norm=kernel_norm, fold_batchnorm=fold_batchnorm,
                             include_dense=include_dense, include_input=include_input)
        chain = _linear_chain(module)
        self._chain: List[Tuple[str, nn.Linear]] = []
        self._rebuild = None
        use_chain = self._is_plain_chain(module, chain) and include_dense is not False and include_input is not False
        if use_chain:
            # Fast path: a chain of Linear layers, with the hand-written HF autograd function.
            self._chain = chain
            self._check_finite()
            graph = WeightGraph.from_module(module)
            chain_sizes = (chain[0][1].in_features,) + tuple(lin.out_features for _, lin in chain)
            pairs = [(b.src, b.dst) for b in graph.blocks]
            if graph.layer_sizes != chain_sizes or pairs != [(l, l + 1) for l in range(len(chain))]:
                use_chain, self._chain = False, []  # Linear layers wired as a DAG (skips): generic path
        if not use_chain:
            # Any graph WeightGraph.from_module builds (CNN channels with BatchNorm folded, residual
            # and concatenation DAGs): the graph is rebuilt from the live parameters at every call.
            if normalize_relu:
                raise ValueError(
                    "normalize_relu=True is only available for chains of nn.Linear layers (per-unit rescaling of "
                    "conv channels through BatchNorm and skip connections is not implemented); use "
                    "normalize_relu=False for this model"
                )
            self._check_finite()
            graph = WeightGraph.from_module(module, **graph_options)  # validates; warns about unused layers
            self._rebuild = GraphRebuilder.create(module, **graph_options)
            pairs = [(b.src, b.dst) for b in graph.blocks]
        self._pairs: List[Tuple[int, int]] = pairs
        self.layer_sizes: Tuple[int, ...] = graph.layer_sizes
        self.layer_names: Tuple[str, ...] = graph.layer_names
        n_iso = int((graph.degrees() <= 0).sum())
        n_active = graph.num_nodes - n_iso
        if n_eigs + 1 > n_active:
            raise ValueError(
                f"n_eigs={n_eigs} needs at least n_eigs + 1 = {n_eigs + 1} non-isolated nodes, but the weight graph "
                f"has {n_active}" + (f" ({n_iso} isolated nodes left out)" if n_iso else "")
            )
        self.n_eigs = int(n_eigs)
        self.k = self.n_eigs + 1
        self.weight = weight
        self.every = int(every)
        self.degree = int(degree)
        self.block_size = block_size
        self.tol = tol
        self.max_iter = int(max_iter)
        self.cold_iter = int(cold_iter)
        self.cold_degree = int(cold_degree)
        self.seed = check_seed(seed)
        self.solver_dtype = solver_dtype
        self.backend = backend
        self.overlap = bool(overlap)
        self.normalize_relu = bool(normalize_relu)
        self.steps = 0
        self.n_isolated = n_iso
        self.n_components: Optional[int] = None
        self.disconnected = False
        self.last_result: Optional[EigResult] = None
        self._vectors: Optional[torch.Tensor] = None  # eigenvectors as rows X^T, (k, N)
        self._eigs: Optional[torch.Tensor] = None
        self._eigs_q: Optional[torch.Tensor] = None  # the last penalty's Rayleigh quotients, unsorted
        self._warned = False
        self._zero_max = 1
        self._solves_since_check = 0
        self._hook = None
        self._chain_gram: Optional[_ChainGram] = None
        # The warm block of the solve before last_result (chain path), for extrapolating the next start.
        self._previous_block: Optional[torch.Tensor] = None
        self._extrapolate_pause = 0  # solves left without extrapolation
        self._extrapolate_backoff = 0  # the last pause's length (0: the last extrapolation paid)
        self._pending = None
        # Reused buffers for |W| and, in the backward, sign(W) of every layer (see _abs_blocks).
        self._abs_cache: Optional[List[torch.Tensor]] = None
        self._sign_scratch: Optional[List[torch.Tensor]] = None
        self._polish = True
        # The solve started by the forward pre-hook on the worker thread (see _start_prefetch).
        self._prefetch: Optional[Dict[str, Any]] = None
        # int64 tensors (data pointers, layer sizes) for the compiled kernels, by value (see _int64s)
        self._addr_cache: Dict[Tuple[int, ...], torch.Tensor] = {}
        self._work = _native.Workspace()  # the compiled kernels' scratch, reused across steps
        self._executor: Optional[ThreadPoolExecutor] = None
        self._prefetch_hook = None
        if self.normalize_relu:
            _check_homogeneous(module, self._chain)

            def _pre_hook(mod, args):
                if mod.training and torch.is_grad_enabled() and not self._penalty_pending():
                    normalize_relu_(mod)

            self._hook = module.register_forward_pre_hook(_pre_hook)
        if self._chain and self.overlap and backend != "torch":
            # Registered after the normalize_relu hook: it sees the rescaled weights. A weak
            # reference, so that the model's hook does not keep the regularizer alive.
            this = weakref.ref(self)

            def _prefetch_pre_hook(mod, args):
                reg = this()
                if reg is not None and mod.training and torch.is_grad_enabled():
                    reg._start_prefetch()

            self._prefetch_hook = module.register_forward_pre_hook(_prefetch_pre_hook)

    # ------------------------------------------------------------------ helpers
    def remove(self) -> None:
        """Detach the regularizer's forward pre-hooks from the model (``normalize_relu``'s and the
        one that starts the solve early, see ``overlap``) and stop its worker thread. The penalty
        still works after it, without the overlap. Calling it again is a no-op."""
        for attr in ("_hook", "_prefetch_hook"):
            handle = getattr(self, attr)
            if handle is not None:
                handle.remove()
                setattr(self, attr, None)
        self._drop_prefetch()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _penalty_pending(self) -> bool:
        """A penalty was computed and its graph (holding the weights) still awaits backward."""
        state = self._pending() if self._pending is not None else None
        return state is not None and not state.done

    @staticmethod
    def _is_plain_chain(module: nn.Module, chain: List[Tuple[str, nn.Linear]]) -> bool:
        """Only Linear layers carry parameters (PReLU aside), and there are some."""
        if not chain:
            return False
        for _, m in module.named_modules():
            if list(m.children()) or isinstance(m, (nn.Linear, nn.PReLU)):
                continue
            if any(True for _ in m.parameters(recurse=False)):
                return False
        return True

    def _param_names(self) -> List[str]:
        return [f"{path}.weight" if path else "weight" for path, _ in self._chain]

    def _graph_params(self):
        if self._rebuild is None:
            return [(name, lin.weight) for name, (_, lin) in zip(self._param_names(), self._chain)]
        return [(name, p) for name, p in self._module.named_parameters() if p.is_floating_point()]

    def _check_finite(self) -> None:
        for name, w in self._graph_params():
            if not bool(torch.isfinite(w).all()):
                bad = int((~torch.isfinite(w)).sum())
                raise ValueError(
                    f"parameter '{name}' has {bad} non-finite (NaN/Inf) weights; the spectral penalty is undefined "
                    f"(check the learning rate or the loss for overflow)"
                )

    def _weights(self) -> List[torch.Tensor]:
        ws = [lin.weight for _, lin in self._chain]
        sizes = [ws[0].shape[1]] + [w.shape[0] for w in ws]
        if tuple(sizes) != self.layer_sizes:
            raise ValueError(f"the model's layer sizes changed from {self.layer_sizes} to {tuple(sizes)}")
        return ws

    def _abs_blocks(self, ws: Sequence[torch.Tensor], device, dtype: torch.dtype, fill: bool = True) -> List[torch.Tensor]:
        """``|W|`` of every layer, written into the buffers of the last call when nothing still
        needs them (no penalty awaiting its backward).

        A fresh tensor of a 4096 x 4096 layer costs ~30 ms of page faults on top of the 8 ms the
        values take (the allocator maps large blocks anew each time); on the ~21k-node MLP that
        was ~0.25 s of every step for |W| and sign(W) together. Called under ``torch.no_grad()``.
        """
        cache = self._abs_cache
        if (cache is None or self._penalty_pending()
                or any(b.shape != w.shape or b.device != w.device or b.dtype != dtype for b, w in zip(cache, ws))):
            cache = ([w.to(device=device, dtype=dtype).abs() for w in ws] if fill
                     else [torch.empty(w.shape, device=device, dtype=dtype) for w in ws])
            self._abs_cache = cache
            # sign(W) for the backward goes into reused buffers too: a fresh tensor of a few hundred
            # kB or more is mapped anew by the allocator, and its page faults cost more than the
            # values (paper MLP: ~0.5 ms of a step for the five layers).
            self._sign_scratch = [torch.empty_like(a) for a in cache]
            return cache
        if fill:
            for buf, w in zip(cache, ws):
                if w.dtype == dtype:
                    torch.abs(w, out=buf)
                else:  # half-precision weights: abs(out=) does not convert
                    buf.copy_(w).abs_()
        return cache

    def _compute_dtype(self, ws: Sequence[torch.Tensor]) -> torch.dtype:
        return torch.float64 if any(w.dtype == torch.float64 for w in ws) else torch.float32

    def _graph_blocks(self, dtype: torch.dtype) -> List[torch.Tensor]:
        """The edge blocks (in ``self._pairs`` order) rebuilt from the live parameters, with autograd."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported once, when the regularizer was built
            sizes, _, blocks = self._rebuild(dtype)
        pairs = [(s, d) for s, d, _ in blocks]
        if tuple(sizes) != self.layer_sizes or pairs != self._pairs:
            raise ValueError(f"the model's weight graph changed from layers {self.layer_sizes} / blocks {self._pairs} "
                             f"to {tuple(sizes)} / {pairs}; build a new SpectralRegularizer")
        return [a for _, _, a in blocks]

    def _degrees(self, blocks: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        deg: List[Optional[torch.Tensor]] = [None] * len(self.layer_sizes)
        for (src, dst), a in zip(self._pairs, blocks):
            for layer, part in ((dst, a.sum(dim=1)), (src, a.sum(dim=0))):
                deg[layer] = part if deg[layer] is None else deg[layer] + part
        ref = blocks[0]
        return [d if d is not None else torch.zeros(n, device=ref.device, dtype=ref.dtype)
                for d, n in zip(deg, self.layer_sizes)]

    def _solve(self, blocks: List[torch.Tensor], degrees=None) -> EigResult:
        """A full solve (cold, or from the last result); ``degrees``: per layer, or over all nodes."""
        sizes = self.layer_sizes
        if isinstance(degrees, torch.Tensor):
            degrees = list(degrees.split(sizes))
        detached = [(src, dst, a.detach()) for (src, dst), a in zip(self._pairs, blocks)]
        dtype = self.solver_dtype or blocks[0].dtype
        tol = self.tol if self.tol is not None else default_tol(dtype)
        degrees = degrees if (degrees is not None and degrees[0].dtype == dtype) else None
        for warm in (self.last_result, None):
            res = chebyshev_eigs(
                sizes, detached, self.k,
                block_size=self.block_size, degree=self.degree if warm is not None else self.cold_degree, tol=tol,
                max_iter=self.max_iter if warm is not None else self.cold_iter,
                warm_start=warm, seed=self.seed, dtype=dtype, layer_degrees=degrees, prescale=False,
                polish=self._polish,
            )
            if bool(torch.isfinite(res.eigenvectors).all()) or warm is None:
                break  # else: a corrupted warm start (never seen); restart cold
        self._previous_block = None
        self.last_result = res
        self._report_connectivity(res, blocks)
        return res

    @staticmethod
    def _zero_tol(dtype: torch.dtype) -> float:
        """Eigenvalues at most this are counted as zero (one per connected component)."""
        return 1e-9 if dtype == torch.float64 else 1e-5

    def _report_connectivity(self, res: EigResult, blocks: List[torch.Tensor], n_zero: Optional[int] = None) -> None:
        self.n_isolated = res.num_isolated
        if n_zero is None:
            n_zero = int((res.eigenvalues <= self._zero_tol(res.eigenvalues.dtype)).sum())
        self._solves_since_check += 1
        if n_zero <= 1:
            # One zero eigenvalue: the non-isolated graph is connected.
            if self.n_components is not None:
                self.n_components = 1
        elif n_zero > self._zero_max or self._solves_since_check >= 200:
            # Several (near-)zero eigenvalues: maybe separate components, maybe just weakly coupled
            # modules. Check the support structurally (rare: on a new maximum, then every 200 solves).
            self._zero_max = max(self._zero_max, n_zero)
            self._solves_since_check = 0
            g = WeightGraph(self.layer_sizes, [(src, dst, a.detach()) for (src, dst), a in zip(self._pairs, blocks)])
            small, _ = g.remove_isolated()
            self.n_components = small.connected_components()[0]
        broken = self.n_isolated > 0 or (self.n_components or 1) > 1
        if broken:
            self.disconnected = True
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"SpectralRegularizer: the weight graph is disconnected ({self.n_isolated} isolated nodes, "
                    f"{self.n_components or 1} component(s) among the others); isolated nodes are left out and "
                    f"each extra component adds a zero eigenvalue. Training continues.",
                    DisconnectedGraphWarning,
                    stacklevel=4,
                )

    @staticmethod
    def _vector_rows(x: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
        """Eigenvectors ``(N, k)`` as rows ``X^T``, contiguous ``(k, N)`` (layer ``l``: a column range)."""
        return x.to(device=device, dtype=dtype).T.contiguous()

    # ------------------------------------------------------------------ main
    # Inside a torch.compile'd training step the penalty runs eagerly (one graph break): its
    # solver is compiled C and small host decisions, and tracing into it took minutes for nothing.
    # Under autocast the solver's and the penalty's products would run in half precision (and mix
    # dtypes with the written-out backward): the penalty is always computed in the weights' dtype.
    @eager_under_compile
    @full_precision
    def __call__(self) -> torch.Tensor:
        """The penalty ``weight * sum(lambda_2 .. lambda_{n_eigs+1})`` as a 0-dim tensor with gradient."""
        if self._rebuild is not None:
            return self._graph_call()
        ws = self._weights()
        device = ws[0].device
        cdtype = self._compute_dtype(ws)
        native = self._native_chain_ok(ws, cdtype)
        prefetched = self._collect_prefetch(ws)
        with torch.no_grad():
            if prefetched is not None:
                prepared, lean_out, previous, _ = prefetched
            else:
                prepared = self._prepare(ws, device, cdtype, native)
            blocks, deg, inv_all, sqrt_all, n_isolated = prepared
            mx = q_known = None
            if self._vectors is None or self.steps % self.every == 0:
                if prefetched is not None:
                    lean = self._lean_commit(lean_out, previous, blocks)
                else:
                    lean = self._lean_step(blocks, inv_all, sqrt_all, cdtype, n_isolated)
                if lean is not None:
                    res, self._vectors, mx, q_known = lean
                else:
                    res = self._solve(blocks, deg)
                    self._vectors = self._vector_rows(res.eigenvectors, cdtype, device)
            x = self._vectors.to(device=device, dtype=cdtype)
        state = _HFState(blocks, self.layer_sizes, inv_all, x, mx, sqrt_all, self._sign_scratch, self.k,
                         self.weight)
        if mx is not None and native:
            state.native, state.addr_cache, state.work = True, self._addr_cache, self._work
            if q_known is not None:
                state.q, state.q_sum = q_known
            if prefetched is not None and prefetched[3] is not None:
                state.pre_grads, state.pre_c = prefetched[3]
        penalty = _HFTrace.apply(state, *ws)
        if penalty.requires_grad:
            self._pending = weakref.ref(state)
        self.steps += 1
        # With vectors and M X from the lean step (checked finite there, from finite degrees)
        # the penalty is finite: no further synchronisation.
        if mx is None and not bool(torch.isfinite(state.q).all()):
            self._check_finite()  # names the parameter
            raise FloatingPointError("the spectral penalty is not finite although all weights are")  # pragma: no cover
        self._eigs, self._eigs_q = None, state.q  # sorted when asked for (eigenvalues())
        return penalty

    def _prepare(self, ws: Sequence[torch.Tensor], device, cdtype: torch.dtype, native: Optional[bool] = None):
        """``|W|`` blocks, the node degrees, ``D^-1/2`` and ``D^1/2`` (over all nodes), and the
        number of isolated nodes, for the chain path (by the compiled pass if ``native``, default
        :meth:`_native_chain_ok`); raises on non-finite weights."""
        if native if native is not None else self._native_chain_ok(ws, cdtype):
            stats, prepared = self._native_prepare_start(ws, cdtype)
            self._native_prepare_run(prepared)
            self._work.fit()
            total_degree, n_isolated = stats.tolist()
            if not math.isfinite(total_degree):
                self._check_finite()  # raises, naming the parameter
            return prepared[:4] + (int(n_isolated),)
        blocks = self._abs_blocks(ws, device, cdtype)
        flat = torch.cat(self._degrees(blocks))
        # One host-device synchronisation for both checks.
        total_degree, n_isolated = torch.stack([flat.sum(), (flat <= 0).sum().to(flat.dtype)]).tolist()
        if not math.isfinite(total_degree):
            self._check_finite()  # raises, naming the parameter
        # Once over all layers (the solver and the HF loss take per-layer views).
        return blocks, flat, _safe_rsqrt(flat), flat.clamp_min(0).sqrt(), int(n_isolated)

    def _native_chain_ok(self, ws: Sequence[torch.Tensor], cdtype: torch.dtype) -> bool:
        """Whether the compiled prepare/gradient kernels take these weights (CPU, contiguous, all
        of the compute dtype float32/float64, kernels and torch's BLAS found, backend not torch)."""
        if self.backend == "torch" or _native.chain_routines(cdtype) is None:
            return False
        return all(w.device.type == "cpu" and w.dtype == cdtype and w.is_contiguous() for w in ws)

    def _native_prepare_start(self, ws: Sequence[torch.Tensor], cdtype: torch.dtype, single_thread: bool = False):
        """The buffers :meth:`_native_prepare_run` fills: ``(stats, (blocks, degrees, D^-1/2, D^1/2))``, the
        degrees over all nodes (node order). ``single_thread``: no split over torch's threads (the
        worker thread of ``overlap``)."""
        blocks = self._abs_blocks(ws, ws[0].device, cdtype, fill=False)
        n = sum(self.layer_sizes)
        deg, inv_all, sqrt_all = (torch.empty(n, dtype=cdtype) for _ in range(3))
        stats = torch.empty(2, dtype=torch.float64)
        lib = _native.kernels()
        fn = lib.tm_chain_prepare_f32 if cdtype == torch.float32 else lib.tm_chain_prepare_f64
        w_addrs = _addresses(ws, self._addr_cache)
        b_addrs = _addresses(blocks, self._addr_cache)
        sizes = _int64s(self.layer_sizes, self._addr_cache)
        args = (len(self.layer_sizes), sizes.data_ptr(), w_addrs.data_ptr(), b_addrs.data_ptr(), deg.data_ptr(),
                inv_all.data_ptr(), sqrt_all.data_ptr(), stats.data_ptr(), _team_address(single_thread),
                None if single_thread else self._work.address)
        call = (fn, args, (ws, w_addrs, b_addrs, sizes))
        return stats, (blocks, deg, inv_all, sqrt_all, deg, call)

    @staticmethod
    def _native_prepare_run(prepared) -> None:
        """|W| into the blocks, degrees, D^-1/2, D^1/2 and ``stats = (total degree, isolated count)``:
        one compiled pass over the weights (releases the GIL)."""
        fn, args, _ = prepared[5]
        if fn(*args) != 0:
            raise MemoryError("the compiled regularizer kernel could not allocate its work arrays")

    def _lean_plan(self, blocks, inv_all, sqrt_all, cdtype, num_isolated: int):
        """``(solver, args, previous)`` of the warm per-step solve on a chain, or ``None`` (cold
        start, or a solver dtype the lean step does not run): :meth:`_solve` then."""
        warm = self.last_result
        if (warm is None or warm.method != "gram" or warm.block.dim() != 2
                or (self.solver_dtype is not None and self.solver_dtype != cdtype)):
            return None
        if self._chain_gram is None:
            self._chain_gram = _ChainGram(self.layer_sizes, self._work)
        tol = self.tol if self.tol is not None else default_tol(cdtype)
        # Extrapolating pays when the weights move smoothly (Adam); with noisy steps (plain SGD
        # at a large rate) it doubles the noise and the step needs a second iteration. Then it
        # pauses for 4, 8, ... 64 solves (doubling while it keeps failing) before trying again.
        previous = self._previous_block if self._extrapolate_pause == 0 else None
        gram = self._chain_gram
        rest = (warm, self.k, self.degree, tol, self.max_iter, num_isolated, self._zero_tol(cdtype))
        if self.backend != "torch" and gram.native_ok(blocks, warm):
            return gram.step_native, (blocks, inv_all, sqrt_all) + rest, previous
        if self.backend == "native":
            raise RuntimeError("backend='native': the compiled regularizer step is not available here (it needs "
                               "the compiled kernels, CPU float32/float64 weights and torch's BLAS/LAPACK "
                               "symbols); use backend='auto'")
        inv, sqrt_d = list(inv_all.split(self.layer_sizes)), list(sqrt_all.split(self.layer_sizes))
        return gram.step, (blocks, inv, sqrt_d) + rest, previous

    def _lean_step(self, blocks, inv_all, sqrt_all, cdtype, num_isolated: int = 0):
        """The warm per-step solve on a chain (:class:`_ChainGram`), or ``None`` to use :meth:`_solve`."""
        plan = self._lean_plan(blocks, inv_all, sqrt_all, cdtype, num_isolated)
        if plan is None:
            return None
        solver, args, previous = plan
        return self._lean_commit(solver(*args, previous=previous), previous, blocks)

    def _lean_commit(self, out, previous, blocks):
        """Adopt a lean step's output (``None``: it failed) as the current solve."""
        if out is None:
            return None
        res, xs, mx, n_zero, q = out
        if previous is None:
            self._extrapolate_pause = max(0, self._extrapolate_pause - 1)
        elif res.iterations > 1:
            self._extrapolate_backoff = min(2 * self._extrapolate_backoff, 64) if self._extrapolate_backoff else 4
            self._extrapolate_pause = self._extrapolate_backoff
        else:
            self._extrapolate_backoff = 0
        self._previous_block = self.last_result.block
        self.last_result = res
        self._report_connectivity(res, blocks, n_zero)
        return res, xs, mx, q

    # ------------------------------------------------------------------ overlap
    def _start_prefetch(self) -> None:
        """Forward pre-hook: launch this step's work on the worker thread (chain path, CPU).

        Called as the forward pass starts, when the weights are final for the step. The worker
        runs the compiled kernels, which release the GIL, next to the forward: |W| and the
        degrees, the eigensolver step, and the weight gradients for the cotangent a plain
        ``loss = ... + reg(); loss.backward()`` gives (``-weight`` per eigenvalue). ``reg()``
        adopts the results only if the weights are the same tensors, unchanged since; the backward
        uses the gradients only for exactly that cotangent. Anything else (non-finite weights, a
        changed model) leaves the work to ``reg()``, which raises where it must.
        """
        if self._prefetch is not None or self._penalty_pending():
            return
        if self._vectors is None or self.steps % self.every != 0 or self.backend == "torch":
            return
        warm = self.last_result
        if warm is None or warm.method != "gram" or any(hasattr(lin, "weight_orig") for _, lin in self._chain):
            return  # cold start; or a pruning reparametrization, whose weights are only derived in the forward
        try:
            ws = [w.detach() for w in self._weights()]
        except ValueError:
            return
        cdtype = self._compute_dtype(ws)
        if not self.overlap or not self._native_chain_ok(ws, cdtype):
            return
        with torch.no_grad():
            stats, prepared = self._native_prepare_start(ws, cdtype, single_thread=True)
            blocks, _, inv_all, sqrt_all = prepared[:4]
            plan = self._lean_plan(blocks, inv_all, sqrt_all, cdtype, 0)
            if plan is None or getattr(plan[0], "__func__", None) is not _ChainGram.step_native:
                return
            warm, k, degree, tol, max_iter, _, zero_tol = plan[1][3:]
            # Everything the worker's calls read or write is allocated here, on this thread: the
            # worker runs compiled code only, and needs the GIL just to start each call.
            step = self._chain_gram.native_call(blocks, inv_all, sqrt_all, warm, k, degree, tol, max_iter, zero_tol,
                                                plan[2], single_thread=True)
            if step is None:
                return
            c = -self.weight
            grads = _native_grads_call(ws, step[2]["x"], step[2]["mx"], inv_all, sqrt_all, c, single_thread=True,
                                       cache=self._addr_cache)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="SpectralRegularizer")
        future = self._executor.submit(_run_native_calls, prepared[5], step[:2], grads[:2],
                                       keepalive=(ws, stats, prepared, step, grads, c))
        self._prefetch = dict(future=future, weights=[(w, w._version) for w in self._weights()], warm=warm,
                              steps=self.steps, prepared=prepared, stats=stats, previous=plan[2], step=step,
                              grads=grads, c=c, degree=degree)

    def _collect_prefetch(self, ws: Sequence[torch.Tensor]):
        """``(prepared, lean output, previous, (gradients, c) or None)`` of the work started by the
        forward pre-hook, if it ran on exactly these weights (same tensors, unchanged since) from the
        current warm state; else ``None`` and the call computes everything itself."""
        pre, self._prefetch = self._prefetch, None
        if pre is None:
            return None
        try:
            s_prep, s_step, s_grad = pre["future"].result()  # always waited for: it writes the |W| buffers
        except Exception:  # noqa: BLE001 - recomputed in the caller's thread, which raises if it must
            return None
        same = (len(ws) == len(pre["weights"])
                and all(w is w0 and w._version == v0 for w, (w0, v0) in zip(ws, pre["weights"])))
        if (s_prep != 0 or not same or pre["warm"] is not self.last_result or pre["steps"] != self.steps
                or self._penalty_pending()):
            return None
        total_degree, n_isolated = pre["stats"].tolist()
        if not math.isfinite(total_degree):
            return None  # the caller recomputes and raises, naming the parameter
        prepared = pre["prepared"][:4] + (int(n_isolated),)
        out = self._chain_gram.native_finish(pre["step"][2], s_step, pre["degree"], int(n_isolated))
        if out is None:
            return prepared, None, pre["previous"], None  # the caller solves from scratch
        grads = (pre["grads"][2][0], pre["c"]) if s_grad == 0 else None
        return prepared, out, pre["previous"], grads

    def _drop_prefetch(self) -> None:
        """Forget a started solve (after waiting for it: it reads the |W| buffers)."""
        pre, self._prefetch = self._prefetch, None
        if pre is not None:
            wait([pre["future"]])

    def _graph_call(self) -> torch.Tensor:
        """The penalty of a CNN/DAG graph: the same HF loss, differentiated by autograd."""
        params = [p for _, p in self._graph_params()]
        cdtype = self._compute_dtype(params)
        blocks = self._graph_blocks(cdtype)
        device = blocks[0].device
        deg = self._degrees(blocks)
        with torch.no_grad():
            if not math.isfinite(sum(float(d.detach().sum()) for d in deg)):
                self._check_finite()  # raises, naming the parameter
            if self._vectors is None or self.steps % self.every == 0:
                res = self._solve(blocks, [d.detach() for d in deg])
                self._vectors = self._vector_rows(res.eigenvectors, cdtype, device)
            xs = self._vectors.to(device=device, dtype=cdtype).split(self.layer_sizes, dim=1)
        # D^-1/2 with isolated nodes masked; the clamp keeps the derivative finite at degree 0.
        tiny = torch.finfo(cdtype).tiny
        inv = [torch.where(d > 0, d.clamp_min(tiny).rsqrt(), torch.zeros_like(d)) for d in deg]
        us = [x * i[None, :] for x, i in zip(xs, inv)]
        q = None
        for (src, dst), a in zip(self._pairs, blocks):
            term = (us[dst] * (us[src] @ a.T)).sum(dim=1)
            q = term if q is None else q + term
        q = 2.0 * q
        total = self.k - q.sum()
        self.steps += 1
        if not bool(torch.isfinite(total)):
            self._check_finite()
            raise FloatingPointError("the spectral penalty is not finite although all weights are")  # pragma: no cover
        self._eigs = (1.0 - q.detach()).sort().values[1:]
        return total * self.weight

    forward = __call__

    @torch.no_grad()
    def eigenvalues(self) -> torch.Tensor:
        """``lambda_2 .. lambda_{n_eigs+1}`` (ascending, detached) at the last call.

        They are the Rayleigh quotients the last penalty was built from (exact eigenvalues up
        to the solver tolerance on recompute steps; with ``every > 1`` the stale vectors'
        quotients in between). Before the first call they are computed now (no step counted).
        """
        if self._eigs is None and self._eigs_q is not None:
            self._eigs, self._eigs_q = (1.0 - self._eigs_q).sort().values[1:], None
        if self._eigs is None:
            if self._rebuild is not None:
                blocks = self._graph_blocks(self._compute_dtype([p for _, p in self._graph_params()]))
                res = self._solve(blocks)
                return res.eigenvalues[1:].to(blocks[0].dtype).clone()
            ws = self._weights()
            cdtype = self._compute_dtype(ws)
            res = self._solve([w.to(device=ws[0].device, dtype=cdtype).abs() for w in ws])
            return res.eigenvalues[1:].to(cdtype).clone()
        return self._eigs.clone()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Warm-start state: step counter, solver block and current eigenvectors (tensors on the model's device)."""
        res = self.last_result
        return {
            "version": 1,
            "layer_sizes": list(self.layer_sizes),
            "n_eigs": self.n_eigs,
            "steps": self.steps,
            "method": None if res is None else res.method,
            "block": None if res is None else res.block.detach().clone(),
            "ritz_values": None if res is None else res.ritz_values.detach().clone(),
            "previous_block": None if self._previous_block is None else self._previous_block.detach().clone(),
            "extrapolate_pause": self._extrapolate_pause,
            "extrapolate_backoff": self._extrapolate_backoff,
            "vectors": None if self._vectors is None else self._vectors.T.detach().clone(),
            "eigenvalues": None if self._eigs is None and self._eigs_q is None else self.eigenvalues(),
            "n_isolated": self.n_isolated,
            "n_components": self.n_components,
            "disconnected": self.disconnected,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (e.g. from a checkpoint) for a smooth resume.

        Raises:
            ValueError: the state belongs to a different architecture or ``n_eigs``.
        """
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a SpectralRegularizer state_dict (missing or unknown 'version')")
        if tuple(state["layer_sizes"]) != tuple(self.layer_sizes):
            raise ValueError(f"state_dict is for layer sizes {tuple(state['layer_sizes'])}, this model has {self.layer_sizes}")
        if int(state["n_eigs"]) != self.n_eigs:
            raise ValueError(f"state_dict is for n_eigs={state['n_eigs']}, this regularizer has n_eigs={self.n_eigs}")
        device = next(p for _, p in self._graph_params()).device
        self._drop_prefetch()
        self.steps = int(state["steps"])
        self.n_isolated = int(state.get("n_isolated", 0))
        self.n_components = state.get("n_components")
        self.disconnected = bool(state.get("disconnected", False))
        self._previous_block = None
        self._extrapolate_pause = int(state.get("extrapolate_pause", 0))
        self._extrapolate_backoff = int(state.get("extrapolate_backoff", 0))
        if state.get("block") is None:
            self.last_result, self._vectors, self._eigs, self._eigs_q = None, None, None, None
            return
        block = state["block"].to(device)
        previous = state.get("previous_block")
        if previous is not None and previous.shape == block.shape:
            self._previous_block = previous.to(device)
        ritz = state["ritz_values"].to(device)
        vectors = state["vectors"].to(device) if state.get("vectors") is not None else None
        k = self.k
        self.last_result = EigResult(
            eigenvalues=torch.empty(0, device=device), eigenvectors=vectors if vectors is not None else torch.empty(0),
            block=block, ritz_values=ritz, residuals=torch.empty(0, device=device), iterations=0, matvecs=0,
            converged=True, method=str(state["method"]), num_isolated=self.n_isolated,
        )
        if vectors is not None:
            if vectors.shape != (sum(self.layer_sizes), k):
                raise ValueError(f"state_dict vectors have shape {tuple(vectors.shape)}, expected {(sum(self.layer_sizes), k)}")
            self._vectors = self._vector_rows(vectors, vectors.dtype, device)
        else:
            self._vectors = None
        self._eigs = state["eigenvalues"].to(device) if state.get("eigenvalues") is not None else None
        self._eigs_q = None

    def __repr__(self) -> str:
        return (f"SpectralRegularizer(n_eigs={self.n_eigs}, weight={self.weight}, every={self.every}, "
                f"normalize_relu={self.normalize_relu}, layer_sizes={self.layer_sizes})")
