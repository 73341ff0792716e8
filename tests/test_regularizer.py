"""SpectralRegularizer: value, exact gradient, stability, ReLU rescaling, state, DDP, bad inputs."""
from __future__ import annotations

import copy
import gc
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from torch_modularity.regularizer import DisconnectedGraphWarning, SpectralRegularizer, normalize_relu_


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(sizes, seed=0, dtype=torch.float64, act=nn.ReLU, flatten=False):
    gen = torch.Generator().manual_seed(seed)
    layers = [nn.Flatten()] if flatten else []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=dtype) / math.sqrt(a))
            lin.bias.copy_(0.1 * torch.randn(b, generator=gen, dtype=dtype))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _planted_mlp(planted_weights, sizes, k=3, seed=0):
    """An MLP whose weights have k planted modules: well separated small eigenvalues."""
    weights, _ = planted_weights(sizes, k=k, seed=seed)
    model = _mlp(sizes, seed=seed)
    with torch.no_grad():
        for lin, w in zip(_linears(model), weights):
            lin.weight.copy_(w)
    return model


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _dense_laplacian_torch(weights):
    """L = I - D^-1/2 |A| D^-1/2 of the chain, built densely in torch (differentiable)."""
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    off = np.concatenate([[0], np.cumsum(sizes)])
    n = int(off[-1])
    a = weights[0].new_zeros(n, n)
    for l, w in enumerate(weights):
        a[off[l + 1]:off[l + 2], off[l]:off[l + 1]] = w.abs()
        a[off[l]:off[l + 1], off[l + 1]:off[l + 2]] = w.abs().T
    s = a.sum(dim=1).rsqrt()
    return torch.eye(n, dtype=a.dtype) - s[:, None] * a * s[None, :]


def _dense_sum(weights, n_eigs):
    return torch.linalg.eigvalsh(_dense_laplacian_torch(weights))[1:n_eigs + 1].sum()


def _grads(model, value):
    ws = [lin.weight for lin in _linears(model)]
    return torch.autograd.grad(value, ws)


def _rel(a, b):
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b))
    den = sum(float((y ** 2).sum()) for y in b)
    return math.sqrt(num / den)


SIZES = [20, 16, 12, 8, 5]


# ----------------------------------------------------------------------------- value and gradient
@pytest.mark.parametrize("n_eigs", [2, 4])
def test_value_and_gradient_match_dense_eigh(planted_weights, n_eigs):
    model = _planted_mlp(planted_weights, SIZES, k=3, seed=1)
    ws = [lin.weight for lin in _linears(model)]
    ev = torch.linalg.eigvalsh(_dense_laplacian_torch([w.detach() for w in ws]))
    gap = float(ev[n_eigs + 1] - ev[n_eigs])
    assert gap > 1e-3  # the test needs lambda_{k+1} > lambda_k
    reg = SpectralRegularizer(model, n_eigs=n_eigs, weight=0.7, tol=1e-13)
    value = reg()
    assert value.dim() == 0 and value.dtype == torch.float64
    exact = _dense_sum(ws, n_eigs)
    assert abs(value.item() - 0.7 * exact.item()) < 1e-12
    np.testing.assert_allclose(reg.eigenvalues().numpy(), ev[1:n_eigs + 1].numpy(), atol=1e-12)
    g_ours = _grads(model, value)
    g_ref = [0.7 * g for g in _grads(model, exact)]
    assert _rel(g_ours, g_ref) < 1e-10


def test_gradient_matches_central_finite_differences(planted_weights):
    model = _planted_mlp(planted_weights, SIZES, k=3, seed=2)
    reg = SpectralRegularizer(model, n_eigs=3, weight=1.0, tol=1e-13)
    grads = _grads(model, reg())
    gen = torch.Generator().manual_seed(0)
    directions = [torch.randn(lin.weight.shape, generator=gen, dtype=torch.float64) for lin in _linears(model)]
    predicted = sum(float((g * d).sum()) for g, d in zip(grads, directions))
    h = 1e-5
    values = []
    for sign in (1.0, -1.0):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for lin, d in zip(_linears(moved), directions):
                lin.weight.add_(sign * h * d)
        values.append(SpectralRegularizer(moved, n_eigs=3, weight=1.0, tol=1e-13)().item())
    fd = (values[0] - values[1]) / (2 * h)
    assert abs(fd - predicted) < 1e-6 * max(1.0, abs(predicted))


def test_float32_model(planted_weights):
    model = _planted_mlp(planted_weights, SIZES, k=3, seed=3).float()
    reg = SpectralRegularizer(model, n_eigs=3)
    value = reg()
    assert value.dtype == torch.float32
    g = _grads(model, value)
    assert all(x.dtype == torch.float32 for x in g)
    ws64 = [lin.weight.detach().double().requires_grad_(True) for lin in _linears(model)]
    exact = reg.weight * _dense_sum(ws64, 3)
    assert abs(value.item() - exact.item()) < 1e-5 * reg.weight * 3
    ref = torch.autograd.grad(exact, ws64)
    assert _rel([x.double() for x in g], ref) < 1e-4


def _native_step_available():
    from torch_modularity import _native

    return _native.chain_routines(torch.float64) is not None


def test_native_regularizer_step_is_available_on_linux_x86_64():
    # The compiled step needs the kernels (built by `pip install`) and torch's exported MKL
    # BLAS/LAPACK symbols, which the x86-64 Linux wheels have: a regression here would silently
    # cost the regularizer its fast path.
    import platform
    import sys

    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        pytest.skip("the availability guarantee is for x86-64 Linux only")
    assert _native_step_available()
    from torch_modularity import _native

    # and torch's OpenMP team, which the kernels split their work over on several threads
    assert _native.openmp_team(2) is not None


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_warm_started_training_keeps_the_gradient_exact(planted_weights, backend):
    """A few SGD steps: each step's warm-started gradient still matches dense eigh (both the
    torch and the compiled per-step solver)."""
    if backend == "native" and not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    model = _planted_mlp(planted_weights, SIZES, k=3, seed=4)
    reg = SpectralRegularizer(model, n_eigs=3, weight=1.0, tol=1e-12, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        value = reg()
        value.backward()
        ws = [lin.weight.detach().clone().requires_grad_(True) for lin in _linears(model)]
        ref = torch.autograd.grad(_dense_sum(ws, 3), ws)
        assert _rel([lin.weight.grad for lin in _linears(model)], ref) < 1e-9
        opt.step()
    assert reg.steps == 4 and reg.last_result.iterations <= 4
    assert reg._chain_gram is not None  # the warm steps took the lean chain solver


def _trained_state(sizes, dtype, steps=12, seed=0, degree=1):
    """A regularizer warm-started by a few Adam steps (torch backend), and its step's inputs."""
    model = _mlp(sizes, seed=seed, dtype=dtype)
    reg = SpectralRegularizer(model, n_eigs=4, weight=0.5, degree=degree, backend="torch")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, sizes[0], generator=gen, dtype=dtype)
    before = None
    for _ in range(steps):
        before = reg.last_result
        opt.zero_grad()
        (model(x).square().mean() + reg()).backward()
        opt.step()
    reg._before_last_block = before.block  # the warm block of the solve before last_result
    ws = reg._weights()
    with torch.no_grad():
        blocks = [w.detach().abs() for w in ws]
        deg = [torch.zeros(n, dtype=dtype) for n in reg.layer_sizes]
        for l, a in enumerate(blocks):
            deg[l + 1] += a.sum(dim=1)
            deg[l] += a.sum(dim=0)
        flat = torch.cat(deg)
    return reg, blocks, flat.rsqrt(), flat.sqrt()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes,degree,extrapolate", [
    ([30, 24, 20, 16, 6], 1, True),   # the small side holds the input layer
    ([12, 40, 36, 8], 2, False),      # odd number of blocks, degree-2 filter
    ([25, 30, 10, 20, 18, 6], 1, False),
])
def test_native_step_matches_torch_step(dtype, sizes, degree, extrapolate):
    """The compiled per-step solver does what _ChainGram.step does: same Ritz values, eigenvalues,
    eigenvectors (up to each vector's sign), M X, residuals and zero count, from the same warm start."""
    if not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    reg, blocks, inv_all, sqrt_all = _trained_state(sizes, dtype, degree=degree)
    gram, warm = reg._chain_gram, reg.last_result
    assert gram is not None and warm.method == "gram" and gram.native_ok(blocks, warm)
    previous = reg._before_last_block if extrapolate else None
    assert previous is None or previous.shape == warm.block.shape
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    args = (warm, reg.k, degree, tol, 8, 0, 1e-5)
    cut = gram._next_cut
    ref = gram.step(blocks, list(inv_all.split(reg.layer_sizes)), list(sqrt_all.split(reg.layer_sizes)), *args,
                    previous=previous)
    gram._next_cut = cut
    out = gram.step_native(blocks, inv_all, sqrt_all, *args, previous=previous)
    assert ref is not None, "the torch step did not converge: the test needs a converging case"
    assert out is not None
    (r_ref, x_ref, mx_ref, z_ref, q_ref), (r_out, x_out, mx_out, z_out, q_out) = ref, out
    assert q_ref is None  # the torch step leaves the quotients to the penalty's forward
    # the compiled step's quotients are x_i^T (M x)_i of its own output
    q_out, q_sum = q_out
    q_tol = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(q_out, (x_out * mx_out).sum(dim=1), rtol=0, atol=q_tol)
    assert q_sum == pytest.approx(float(q_out.double().sum()), abs=1e-12 if dtype == torch.float64 else 1e-5)
    close = 1e-12 if dtype == torch.float64 else 2e-5
    assert r_out.iterations == r_ref.iterations and z_out == z_ref
    torch.testing.assert_close(r_out.eigenvalues, r_ref.eigenvalues, rtol=0, atol=close)
    torch.testing.assert_close(r_out.ritz_values, r_ref.ritz_values, rtol=0, atol=close)
    signs = torch.sign((x_out * x_ref).sum(dim=1, keepdim=True))
    assert bool((signs != 0).all())
    vec_close = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(x_out * signs, x_ref, rtol=0, atol=vec_close)
    torch.testing.assert_close(mx_out * signs, mx_ref, rtol=0, atol=vec_close)
    assert float(r_out.residuals.max()) <= tol
    # the kept Ritz block spans the same subspace
    b_out, b_ref = r_out.block.T, r_ref.block.T
    overlap = torch.linalg.svdvals(b_out @ b_ref.T)
    assert float(overlap.min()) > 1 - (1e-9 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_kernels_split_over_torch_threads_match_one_thread(dtype):
    """With torch on several threads the compiled step and gradient split their products over
    torch's OpenMP team (by output units, cut at cache lines): the same results as on one thread
    up to rounding, and bit for bit the same for the same thread count. Layer widths below and
    not a multiple of the 16-unit cut, and 3 threads, give empty and uneven parts."""
    from torch_modularity import _native
    from torch_modularity.regularizer import _native_chain_grads

    if not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    if _native.openmp_team(2) is None:
        pytest.skip("this torch build has no GNU OpenMP team to split over")
    sizes = [30, 24, 20, 16, 6]
    reg, blocks, inv_all, sqrt_all = _trained_state(sizes, dtype)
    gram, warm = reg._chain_gram, reg.last_result
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    args = (warm, reg.k, 1, tol, 8, 0, 1e-5)
    ws = [w.detach() for w in reg._weights()]
    c = torch.linspace(-1.0, 0.5, reg.k, dtype=dtype)
    cut = gram._next_cut
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            gram._next_cut = cut
            res, x, mx, _, _ = gram.step_native(blocks, inv_all, sqrt_all, *args)
            reference = runs.get(1, (None, x, mx))
            grads = _native_chain_grads(ws, reference[1], reference[2], inv_all, sqrt_all, c)
            run = (res.eigenvalues, x, mx, *grads)
            if threads in runs:
                for a, b in zip(run, runs[threads]):
                    assert torch.equal(a, b), "same thread count, different result"
            runs[threads] = run
    finally:
        torch.set_num_threads(before)
    assert _native.openmp_team(1) is None
    close = 1e-12 if dtype == torch.float64 else 2e-5
    for threads in (2, 3):
        run = list(runs[threads])
        signs = torch.sign((run[1] * runs[1][1]).sum(dim=1, keepdim=True))  # each vector's sign is arbitrary
        assert bool((signs != 0).all())
        run[1], run[2] = run[1] * signs, run[2] * signs
        for a, b in zip(run, runs[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=close * max(1.0, float(b.abs().max())))


def test_native_kernels_reuse_their_workspace_with_identical_results():
    """The compiled kernels carve their work arrays from the regularizer's workspace once it has
    grown to their need (no allocation per step), with results bit for bit those of kernels that
    allocate their own; a copied regularizer starts with an empty workspace of its own."""
    from torch_modularity import _native
    from torch_modularity.regularizer import _native_chain_grads

    if not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    reg, blocks, inv_all, sqrt_all = _trained_state([30, 24, 20, 16, 6], torch.float64)
    gram, warm = reg._chain_gram, reg.last_result
    ws = [w.detach() for w in reg._weights()]
    c = torch.linspace(-1.0, 0.5, reg.k, dtype=torch.float64)
    args = (warm, reg.k, 1, 1e-8, 8, 0, 1e-5)
    cut = gram._next_cut
    work = _native.Workspace()
    runs = []
    for use in (None, work, work):  # own allocations; the workspace growing; the workspace reused
        gram.work, gram._next_cut = use, cut
        res, x, mx, _, _ = gram.step_native(blocks, inv_all, sqrt_all, *args)
        grads = _native_chain_grads(ws, x, mx, inv_all, sqrt_all, c, work=use)
        runs.append((res.eigenvalues, x, mx, *grads))
        if use is not None:
            assert work.buffer is not None and work.spec[2] <= work.buffer.numel()
    size = work.buffer.numel()
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)
    assert work.buffer.numel() == size  # no regrowth once fitted
    # the regularizer's own workspace: grown by its first compiled step, not copied with it
    model = _mlp([30, 24, 20, 16, 6], seed=3, dtype=torch.float64)
    live = SpectralRegularizer(model, n_eigs=4, backend="native")
    for _ in range(3):
        live().backward()
    assert live._work.buffer is not None and live._work.spec[2] <= live._work.buffer.numel()
    copied = copy.deepcopy(live)
    assert copied._work is not live._work and copied._work.buffer is None
    copied().backward()  # grows its own


def test_native_step_reports_failure_and_the_regularizer_falls_back():
    """No convergence within max_iter (tol 0): the compiled step returns None like the torch one,
    and the regularizer falls back to the generic solver with a correct value."""
    if not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    reg, blocks, inv_all, sqrt_all = _trained_state([30, 24, 20, 16, 6], torch.float64)
    warm = reg.last_result
    assert reg._chain_gram.step_native(blocks, inv_all, sqrt_all, warm, reg.k, 1, 0.0, 2, 0, 1e-9) is None
    reg.tol, reg.max_iter, reg.backend = 0.0, 1, "native"
    value = reg()
    ws = [w.detach() for w in reg._weights()]
    assert value.item() == pytest.approx(reg.weight * _dense_sum(ws, reg.n_eigs).item(), rel=1e-8)


def test_backend_is_validated():
    with pytest.raises(ValueError, match="backend"):
        SpectralRegularizer(_mlp([6, 5, 4]), n_eigs=2, backend="fast")


def test_reused_buffers_keep_gradients_exact(planted_weights):
    """|W| and sign(W) buffers are reused across steps (for every layer): gradients stay
    exact while the weights change, and a second penalty taken before the first one's backward
    gets its own buffers."""
    model = _planted_mlp(planted_weights, SIZES, k=3, seed=5)
    reg = SpectralRegularizer(model, n_eigs=3, weight=1.0, tol=1e-12)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        opt.zero_grad()
        if step == 2:
            first, second = reg(), reg()  # both pending: the second must not write into the first's |W|
            assert second.item() == pytest.approx(first.item(), rel=1e-9)
            first.backward()
        else:
            reg().backward()
        ws = [lin.weight.detach().clone().requires_grad_(True) for lin in _linears(model)]
        ref = torch.autograd.grad(_dense_sum(ws, 3), ws)
        assert _rel([lin.weight.grad for lin in _linears(model)], ref) < 1e-9
        opt.step()
    assert reg._sign_scratch is not None and all(b is not None for b in reg._sign_scratch)


def _top_rows(h, k):
    return torch.linalg.eigh(h).eigenvectors[:, -k:].T  # (k, n) orthonormal rows


def _subspace_error(rows, exact_rows):
    q = torch.linalg.qr(rows.T).Q
    return float(torch.linalg.matrix_norm(q - exact_rows.T @ (exact_rows @ q), ord=2))


def test_extrapolated_start_tracks_a_smoothly_moving_subspace():
    """2 Z - P_prev Z is a second-order prediction of the wanted subspace (vs first order for
    the last one), blind to rotations inside it; rows beyond k are left as they were."""
    from torch_modularity.regularizer import _extrapolate_rows

    gen = torch.Generator().manual_seed(0)
    n, k, m, h = 40, 5, 8, 5e-3

    def sym():
        a = torch.randn(n, n, generator=gen, dtype=torch.float64)
        return a + a.T

    h0 = torch.diag(torch.arange(n, dtype=torch.float64))  # well separated top eigenvalues
    h1, h2 = sym(), sym()
    path = [_top_rows(h0 + t * h1 + t * t * h2, m) for t in (0.0, h, 2 * h)]
    # Ritz blocks list the wanted vectors first; rotate them inside their span at random.
    z_prev = torch.cat([path[0][-k:], path[0][:-k]])
    rot = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64)).Q
    z = torch.cat([rot @ path[1][-k:], path[1][:-k]])
    target = path[2][-k:]
    out = _extrapolate_rows(z, z_prev, k)
    plain_err = _subspace_error(z[:k], target)
    extrapolated_err = _subspace_error(out[:k], target)
    assert plain_err > 1e-3  # the subspace did move
    assert extrapolated_err < 0.05 * plain_err
    assert torch.equal(out[k:], z[k:])
    # Rotating the previous wanted rows inside their span changes nothing.
    again = _extrapolate_rows(z, torch.cat([rot.T @ z_prev[:k], z_prev[k:]]), k)
    assert torch.allclose(again, out, atol=1e-12)


def test_extrapolation_pauses_while_it_costs_iterations():
    """An extrapolated step that needed a second iteration pauses extrapolation for 4 solves,
    then 8, ... (doubling while it keeps failing, at most 64); one that paid resets it."""
    from torch_modularity.eigen import EigResult

    model = _mlp([12, 10, 8, 4], seed=3)
    reg = SpectralRegularizer(model, n_eigs=3)
    reg()  # cold solve: a warm "gram" result to continue from
    iterations = iter([2] + [1] * 4 + [2] + [1] * 8 + [1, 1, 2] + [1] * 4 + [1])
    extrapolated = []

    class RecordingGram:
        def native_ok(self, blocks, warm):
            return False

        def step(self, blocks, inv, sqrt_d, warm, k, *args, previous=None, **kwargs):
            extrapolated.append(previous is not None)
            res = EigResult(eigenvalues=warm.ritz_values[:k], eigenvectors=torch.zeros(0), block=warm.block,
                            ritz_values=warm.ritz_values, residuals=torch.zeros(k), iterations=next(iterations),
                            matvecs=0, converged=True, method="gram", num_isolated=0)
            return res, None, None, 1, None

    reg._chain_gram = RecordingGram()
    reg._previous_block = reg.last_result.block
    states = []
    for _ in range(22):
        reg._lean_step(None, torch.ones(sum(reg.layer_sizes)), torch.ones(sum(reg.layer_sizes)), torch.float64)
        state = reg.state_dict()
        states.append((state["extrapolate_pause"], state["extrapolate_backoff"]))
    assert extrapolated == ([True] + [False] * 4 + [True] + [False] * 8 + [True, True, True] + [False] * 4
                            + [True])
    assert states[0] == (4, 4) and states[5] == (8, 8) and states[14] == (0, 0) and states[17] == (3, 4)
    assert states[-1] == (0, 0)


def test_every_reuses_the_block_between_recomputes(planted_weights):
    model = _planted_mlp(planted_weights, SIZES, k=3, seed=5)
    reg = SpectralRegularizer(model, n_eigs=3, weight=1.0, every=3, tol=1e-12)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    results, errors = [], []
    for step in range(6):
        opt.zero_grad()
        value = reg()
        value.backward()
        results.append(reg.last_result)
        ws = [lin.weight.detach().clone().requires_grad_(True) for lin in _linears(model)]
        ref = torch.autograd.grad(_dense_sum(ws, 3), ws)
        errors.append(_rel([lin.weight.grad for lin in _linears(model)], ref))
        opt.step()
    assert results[0] is results[1] is results[2] and results[3] is results[4] is results[5]
    assert results[2] is not results[3]
    assert errors[0] < 1e-9 and errors[3] < 1e-9  # fresh eigenvectors: exact
    assert 1e-9 < errors[1] < 0.1 and 1e-9 < errors[4] < 0.1  # stale: approximate, still close


# ----------------------------------------------------------------------------- stability
def test_finite_on_random_init_with_tiny_gaps():
    torch.manual_seed(0)  # default nn.Linear init, as users have it
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    reg = SpectralRegularizer(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        value = reg()
        assert torch.isfinite(value)
        value.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    ev = reg.eigenvalues()
    assert ev.shape == (11,) and torch.isfinite(ev).all() and (ev >= -1e-6).all()


def test_finite_with_exactly_degenerate_eigenvalues():
    model = _mlp([6, 6, 6])
    with torch.no_grad():
        for lin in _linears(model):
            lin.weight.fill_(0.5)  # complete bipartite layers: massively degenerate spectrum
    reg = SpectralRegularizer(model, n_eigs=3)
    value = reg()
    (g0, g1) = _grads(model, value)
    assert torch.isfinite(value) and torch.isfinite(g0).all() and torch.isfinite(g1).all()


def test_disconnection_is_reported_once_and_training_continues():
    model = _mlp([8, 6, 6, 4], seed=7)
    with torch.no_grad():
        lin = _linears(model)
        lin[0].weight[2].zero_()
        lin[1].weight[:, 2].zero_()  # hidden unit 2 of layer 1: isolated
    with pytest.warns(DisconnectedGraphWarning):
        reg = SpectralRegularizer(model, n_eigs=3)
        value = reg()
    assert reg.disconnected and reg.n_isolated == 1
    g = _grads(model, value)
    assert torch.isfinite(value) and all(torch.isfinite(x).all() for x in g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg()  # no second warning
    # Two separate components: block-diagonal weights.
    model2 = _mlp([4, 4, 4], seed=8)
    with torch.no_grad():
        for lin in _linears(model2):
            lin.weight[:2, 2:] = 0.0
            lin.weight[2:, :2] = 0.0
    with pytest.warns(DisconnectedGraphWarning):
        reg2 = SpectralRegularizer(model2, n_eigs=2)
        value2 = reg2()
    assert reg2.n_components == 2 and reg2.disconnected
    assert abs(float(reg2.eigenvalues()[0])) < 1e-9  # lambda_2 = 0
    assert all(torch.isfinite(x).all() for x in _grads(model2, value2))


# ----------------------------------------------------------------------------- ReLU rescaling
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_normalize_relu_preserves_the_function(dtype, tol):
    model = _mlp([10, 16, 12, 4], seed=9, dtype=dtype)
    with torch.no_grad():
        _linears(model)[0].weight.mul_(7.0)  # far from normalized
    x = torch.randn(32, 10, generator=torch.Generator().manual_seed(1), dtype=dtype)
    before = model(x).detach()
    scales = normalize_relu_(model)
    after = model(x).detach()
    assert len(scales) == 2
    assert float((after - before).abs().max()) <= tol * max(1.0, float(before.abs().max()))
    for lin in _linears(model)[:-1]:
        norms = torch.sqrt((lin.weight.detach().double() ** 2).sum(1) + lin.bias.detach().double() ** 2)
        np.testing.assert_allclose(norms.numpy(), math.sqrt(2.0), rtol=1e-5)


def test_normalize_relu_with_pruning_and_leaky_relu():
    import torch.nn.utils.prune as prune

    model = _mlp([8, 10, 6, 3], seed=10, act=nn.LeakyReLU)
    prune.random_unstructured(_linears(model)[1], "weight", amount=0.4)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = model(x)
    normalize_relu_(model)
    assert torch.allclose(model(x), before, atol=1e-12)


def test_normalize_relu_refuses_non_homogeneous_activations():
    with pytest.raises(ValueError, match="Tanh"):
        normalize_relu_(_mlp([4, 5, 3], act=nn.Tanh))
    with pytest.raises(ValueError, match="Tanh"):
        SpectralRegularizer(_mlp([4, 5, 3], act=nn.Tanh), n_eigs=2, normalize_relu=True)


def test_normalize_relu_option_runs_before_each_training_forward():
    model = _mlp([10, 16, 12, 4], seed=11)
    with torch.no_grad():
        _linears(model)[0].weight.mul_(5.0)
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = model(x).detach()
    reg = SpectralRegularizer(model, n_eigs=3, normalize_relu=True)
    model.eval()
    model(x)
    assert float(_linears(model)[0].weight.detach().abs().max()) > 2.0  # eval forward: untouched
    model.train()
    out = model(x)
    loss = out.square().mean() + reg()
    loss.backward()  # no in-place error: rescaled before the forward
    assert torch.allclose(out, reference, atol=1e-12)
    lin = _linears(model)[0]
    norms = torch.sqrt((lin.weight ** 2).sum(1) + lin.bias ** 2)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(2.0)))
    # reg() before the forward: the rescaling waits for the next forward (no in-place error).
    with torch.no_grad():
        lin.weight.mul_(3.0)
    penalty = reg()
    out = model(x)
    (out.square().mean() + penalty).backward()
    assert not torch.allclose(torch.sqrt((lin.weight ** 2).sum(1) + lin.bias ** 2), norms)
    model(x)
    assert torch.allclose(torch.sqrt((lin.weight ** 2).sum(1) + lin.bias ** 2), norms)
    reg.remove()
    with torch.no_grad():
        lin.weight.mul_(3.0)
    model(x)
    assert not torch.allclose(torch.sqrt((lin.weight ** 2).sum(1) + lin.bias ** 2), norms)


# ----------------------------------------------------------------------------- compiled kernels, overlap
def _oracle_grads(model, n_eigs, scale=1.0):
    ws = [lin.weight.detach().clone().requires_grad_(True) for lin in _linears(model)]
    return [scale * g for g in torch.autograd.grad(_dense_sum(ws, n_eigs), ws)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_prepare_matches_torch_prepare(dtype):
    """|W|, degrees, D^-1/2, D^1/2 and the isolated count from the compiled pass equal the torch ops'."""
    if not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    model = _mlp([30, 24, 20, 6], seed=7, dtype=dtype)
    with torch.no_grad():
        _linears(model)[1].weight[3].zero_()  # unit 3 of layer 2 keeps only its incoming edges
        _linears(model)[2].weight[:, 5].zero_()
        _linears(model)[1].weight[5].zero_()  # unit 5 of layer 2: no edge at all (isolated)
    ws = [w.detach() for w in SpectralRegularizer(model, n_eigs=3)._weights()]
    ref = SpectralRegularizer(model, n_eigs=3, backend="torch")._prepare(ws, ws[0].device, dtype)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):  # split by rows over torch's threads when it runs on several
            torch.set_num_threads(threads)
            native = SpectralRegularizer(model, n_eigs=3, backend="native")._prepare(ws, ws[0].device, dtype)
            for a, b in zip(native[0], ref[0]):
                assert torch.equal(a, b)  # |W| is exact
            tol = dict(rtol=1e-13, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=0)
            torch.testing.assert_close(native[1], ref[1], **tol)
            torch.testing.assert_close(native[2], ref[2], **tol)
            torch.testing.assert_close(native[3], ref[3], **tol)
            assert native[4] == ref[4] == 1
    finally:
        torch.set_num_threads(before)


def _regularized_steps(model, reg, steps, x, opt_lr=0.05, before=None):
    opt = torch.optim.SGD(model.parameters(), lr=opt_lr)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        if before is not None:
            before()
        (out.square().mean() + reg()).backward()
        opt.step()
    return [lin.weight.detach().clone() for lin in _linears(model)]


def test_overlap_trains_exactly_like_the_synchronous_path(planted_weights):
    """overlap=True: the work started in the forward pre-hook is used at every step, and the
    weights follow the synchronous run's to rounding; each gradient matches dense eigh."""
    if not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    x = torch.randn(16, SIZES[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = _planted_mlp(planted_weights, SIZES, k=3, seed=4), _planted_mlp(planted_weights, SIZES, k=3, seed=4)
    reg_a = SpectralRegularizer(a, n_eigs=3, weight=0.5, tol=1e-12, overlap=True)
    reg_b = SpectralRegularizer(b, n_eigs=3, weight=0.5, tol=1e-12)
    used = []
    collect = reg_a._collect_prefetch
    reg_a._collect_prefetch = lambda ws: used.append(collect(ws)) or used[-1]
    wa = _regularized_steps(a, reg_a, 6, x)
    wb = _regularized_steps(b, reg_b, 6, x)
    for p, q in zip(wa, wb):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert sum(u is not None for u in used) == 5  # every step but the cold first one
    # one more step, checked against the oracle
    opt = torch.optim.SGD(a.parameters(), lr=0.0)
    opt.zero_grad()
    a(x)
    reg_a().backward()
    assert used[-1] is not None and used[-1][3] is not None  # gradients computed ahead were used
    assert _rel([lin.weight.grad for lin in _linears(a)], _oracle_grads(a, 3, 0.5)) < 1e-9
    reg_a.remove()


def test_overlap_discards_work_on_changed_weights_and_other_cotangents(planted_weights):
    """Weights changed between the forward and reg(), a scaled penalty, reg() before the
    forward, eval-mode forwards: the results stay exact (the early work is discarded or not started)."""
    if not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    model = _planted_mlp(planted_weights, SIZES, k=3, seed=6)
    reg = SpectralRegularizer(model, n_eigs=3, weight=1.0, tol=1e-12, overlap=True)
    x = torch.randn(8, SIZES[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _regularized_steps(model, reg, 2, x)  # warm
    collect = reg._collect_prefetch
    used = []
    reg._collect_prefetch = lambda ws: used.append(collect(ws)) or used[-1]

    def grads_after(fn):
        for lin in _linears(model):
            lin.weight.grad = None
        fn()
        return [lin.weight.grad for lin in _linears(model)]

    # 1. weights modified in place after the forward
    def changed():
        model(x)
        with torch.no_grad():
            _linears(model)[1].weight.mul_(1.3)
        reg().backward()
    g = grads_after(changed)
    assert used[-1] is None and _rel(g, _oracle_grads(model, 3)) < 1e-9
    # 2. a scaled penalty: the cotangent is not the one the gradients were computed for
    def scaled():
        model(x)
        (2.5 * reg()).backward()
    g = grads_after(scaled)
    assert used[-1] is not None and _rel(g, _oracle_grads(model, 3, 2.5)) < 1e-9
    # 3. reg() before the forward: the hook sees a pending penalty and starts nothing
    def reg_first():
        penalty = reg()
        model(x)
        assert reg._prefetch is None
        penalty.backward()
    g = grads_after(reg_first)
    assert _rel(g, _oracle_grads(model, 3)) < 1e-9
    # 4. eval-mode and no-grad forwards start nothing
    model.eval()
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    assert reg._prefetch is None


def _warm_overlapping(sizes, seed):
    """An MLP with an ``overlap=True`` regularizer after two training steps, and its input."""
    if not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    model = _mlp(sizes, seed=seed)
    reg = SpectralRegularizer(model, n_eigs=3, overlap=True)
    x = torch.randn(8, sizes[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _regularized_steps(model, reg, 2, x)
    return model, reg, x


def test_overlap_with_non_finite_weights_raises_at_the_penalty():
    model, reg, x = _warm_overlapping([12, 10, 8, 4], seed=2)
    with torch.no_grad():
        _linears(model)[2].weight[0, 0] = float("nan")
    model(x)  # the hook must not raise inside the forward
    with pytest.raises(ValueError, match=r"'4\.weight'"):
        reg()


def test_overlap_hook_removal_normal_repeated_and_after_error():
    """remove() detaches the hooks (normal, repeated, after a failed penalty); the penalty still works."""
    model = _mlp([12, 10, 8, 4], seed=3)
    n_hooks = len(model._forward_pre_hooks)
    reg = SpectralRegularizer(model, n_eigs=3, overlap=True, normalize_relu=True)
    assert len(model._forward_pre_hooks) == n_hooks + 2
    x = torch.randn(4, 12, dtype=torch.float64)
    _regularized_steps(model, reg, 2, x)
    model(x)  # leaves a started job behind
    reg.remove()
    assert len(model._forward_pre_hooks) == n_hooks and reg._prefetch is None and reg._executor is None
    reg.remove()  # repeated: no-op
    model(x)
    assert reg._prefetch is None
    for lin in _linears(model):
        lin.weight.grad = None
    value = reg()
    value.backward()
    assert _rel([lin.weight.grad for lin in _linears(model)], _oracle_grads(model, 3, reg.weight)) < 1e-6
    # after an error: non-finite weights make reg() raise; remove() still cleans up
    reg2 = SpectralRegularizer(model, n_eigs=3, overlap=True)
    with torch.no_grad():
        _linears(model)[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        reg2()
    reg2.remove()
    assert len(model._forward_pre_hooks) == n_hooks


def test_overlap_survives_the_regularizer_being_dropped_mid_step():
    """A started job keeps its buffers alive: dropping the regularizer (and collecting it) while the
    worker runs must not free memory under it; the model keeps working."""
    import gc

    model, reg, x = _warm_overlapping([40, 64, 64, 10], seed=8)
    model(x)  # starts a job
    del reg
    gc.collect()
    for _ in range(3):
        model(x).sum().backward()  # the (now inert) hook must not fail
    assert torch.isfinite(model[0].weight.grad).all()


def test_overlap_skips_pruned_models():
    """Under torch.nn.utils.prune the weights are derived in the forward: nothing is started early,
    and the penalty stays exact."""
    import torch.nn.utils.prune as prune

    if not _native_step_available():
        pytest.skip("compiled regularizer step not available on this platform")
    model = _mlp([12, 10, 8, 4], seed=5)
    prune.l1_unstructured(_linears(model)[1], "weight", amount=0.3)
    reg = SpectralRegularizer(model, n_eigs=3, weight=1.0, overlap=True, tol=1e-12)
    x = torch.randn(4, 12, dtype=torch.float64)
    _regularized_steps(model, reg, 2, x)
    model(x)
    assert reg._prefetch is None
    for lin in _linears(model):
        getattr(lin, "weight_orig", lin.weight).grad = None
    reg().backward()
    ws = [lin.weight.detach().clone().requires_grad_(True) for lin in _linears(model)]
    ref = torch.autograd.grad(_dense_sum(ws, 3), ws)
    got = [lin.weight_orig.grad * lin.weight_mask if hasattr(lin, "weight_orig") else lin.weight.grad
           for lin in _linears(model)]
    assert _rel(got, [r * (lin.weight_mask if hasattr(lin, "weight_mask") else 1) for r, lin in
                      zip(ref, _linears(model))]) < 1e-8


# ----------------------------------------------------------------------------- state, RNG, device
def _train(model, reg, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(16, model[0].in_features, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        (model(x).square().mean() + reg()).backward()
        opt.step()
    return opt


def test_state_dict_round_trip_resumes_exactly():
    model = _mlp([12, 10, 8, 4], seed=12)
    reg = SpectralRegularizer(model, n_eigs=3, every=2)
    opt = _train(model, reg, 3, seed=0)
    state = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "reg": copy.deepcopy(reg.state_dict())}
    _continue(model, reg, opt, 3)

    model2 = _mlp([12, 10, 8, 4], seed=99)
    model2.load_state_dict(state["model"])
    reg2 = SpectralRegularizer(model2, n_eigs=3, every=2)
    reg2.load_state_dict(state["reg"])
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(state["opt"])
    assert reg2.steps == 3
    _continue(model2, reg2, opt2, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(reg.eigenvalues(), reg2.eigenvalues())
    with pytest.raises(ValueError, match="n_eigs"):
        SpectralRegularizer(model2, n_eigs=2).load_state_dict(state["reg"])
    with pytest.raises(ValueError, match="layer sizes"):
        SpectralRegularizer(_mlp([12, 9, 8, 4]), n_eigs=3).load_state_dict(state["reg"])


def _continue(model, reg, opt, steps):
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        (model(x).square().mean() + reg()).backward()
        opt.step()


def test_global_rng_untouched_and_seeded():
    model = _mlp([12, 10, 8, 4], seed=13)
    state = torch.random.get_rng_state()
    a = SpectralRegularizer(model, n_eigs=3, cold_iter=1, tol=0.0, seed=5)
    b = SpectralRegularizer(model, n_eigs=3, cold_iter=1, tol=0.0, seed=5)
    va, vb = a(), b()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert va.item() == vb.item() and torch.equal(a.last_result.block, b.last_result.block)


def test_eigenvalues_before_first_call_and_gradients_on_own_dtype():
    model = _mlp([12, 10, 8, 4], seed=14, dtype=torch.float32)
    reg = SpectralRegularizer(model, n_eigs=3)
    ev = reg.eigenvalues()
    assert ev.shape == (3,) and not ev.requires_grad and reg.steps == 0
    value = reg()
    assert value.requires_grad and value.dtype == torch.float32
    value.backward()
    assert all(lin.weight.grad.dtype == torch.float32 for lin in _linears(model))
    assert all(lin.bias.grad is None for lin in _linears(model))  # biases are not in the graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model(planted_weights):
    model = _planted_mlp(planted_weights, SIZES, k=3, seed=15)
    cpu_value = SpectralRegularizer(model, n_eigs=3, tol=1e-12)().item()
    model = model.cuda()
    reg = SpectralRegularizer(model, n_eigs=3, tol=1e-12)
    value = reg()
    assert value.device.type == "cuda" and abs(value.item() - cpu_value) < 1e-10
    value.backward()
    assert all(lin.weight.grad.device.type == "cuda" for lin in _linears(model))


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    model = _mlp([4, 3, 2])
    with pytest.raises(ValueError, match="n_eigs"):
        SpectralRegularizer(model, n_eigs=9)  # 9 nodes: needs n_eigs + 1 <= 9
    SpectralRegularizer(model, n_eigs=8)
    with pytest.raises(ValueError, match="n_eigs"):
        SpectralRegularizer(model, n_eigs=0)
    with pytest.raises(ValueError, match="every"):
        SpectralRegularizer(model, n_eigs=2, every=0)
    with pytest.raises(ValueError, match="weight"):
        SpectralRegularizer(model, n_eigs=2, weight=float("nan"))
    with pytest.raises(TypeError):
        SpectralRegularizer(model, n_eigs=2.5)
    with pytest.raises(TypeError):
        SpectralRegularizer("not a model")
    with pytest.raises(ValueError, match="no nn.Linear"):
        SpectralRegularizer(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no edges"):  # a lone conv: the default CNN graph is its channels only
        SpectralRegularizer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)))
    with pytest.raises(TypeError, match="LayerNorm"):
        SpectralRegularizer(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="normalize_relu"):
        SpectralRegularizer(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)), n_eigs=2,
                            normalize_relu=True)

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.c(self.b(h).relu() + h)

    SpectralRegularizer(Skip(), n_eigs=2)()  # Linear layers wired as a DAG: the generic path (tested below)
    bad = _mlp([4, 3, 2])
    with torch.no_grad():
        bad[2].weight[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        SpectralRegularizer(bad, n_eigs=2)
    reg = SpectralRegularizer(model, n_eigs=2)
    reg()
    with torch.no_grad():
        model[0].weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        reg()


# ----------------------------------------------------------------------------- DDP
DDP_SIZES = [6, 8, 8, 3]
DDP_STEPS = 4


def _ddp_model():
    return _mlp(DDP_SIZES, seed=21)


def _ddp_data():
    gen = torch.Generator().manual_seed(22)
    return torch.randn(8, DDP_SIZES[0], generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)


def _ddp_train(model, wrapped, x, y, steps, overlap=False):
    reg = SpectralRegularizer(wrapped, n_eigs=3, weight=0.5, normalize_relu=True, tol=1e-12, overlap=overlap)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    penalties = []
    for _ in range(steps):
        opt.zero_grad()
        out = wrapped(x)  # forward first: normalize_relu rescales in the forward pre-hook
        penalty = reg()
        loss = nn.functional.cross_entropy(out, y) + penalty
        loss.backward()
        opt.step()
        penalties.append(penalty.item())
    return penalties


def _ddp_rank(rank, world, out_dir, overlap):
    model = _ddp_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = _ddp_data()
    half = len(x) // world
    pens = _ddp_train(model, ddp, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half], DDP_STEPS,
                      overlap)
    torch.save({"state": model.state_dict(), "penalties": pens}, os.path.join(out_dir, f"rank{rank}.pt"))


def _ddp_worker(rank, world, init_file, out_dir, overlap=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # The DDP objects die in _ddp_rank, before the process group: dropped afterwards, the
        # reducer's last reference destroys the group while holding the GIL, which can deadlock.
        _ddp_rank(rank, world, out_dir, overlap)
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overlap", [False, True])
def test_ddp_two_processes_match_single_process(tmp_path, overlap, run_processes):
    """Weights identical on both ranks and equal to a single-process run (also with the solve
    started early on a worker thread in every rank, ``overlap=True``)."""
    init_file = tmp_path / "init"
    run_processes(_ddp_worker, args=(2, str(init_file), str(tmp_path), overlap), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert r0["penalties"] == r1["penalties"]
    # Single process on the full batch: the DDP-averaged gradient is mean(CE grads) + penalty grad.
    model = _ddp_model()
    x, y = _ddp_data()
    pens = _ddp_train(model, model, x, y, DDP_STEPS, overlap)
    for key, value in model.state_dict().items():
        assert torch.allclose(value, r0["state"][key], atol=1e-12, rtol=0), key
    np.testing.assert_allclose(pens, r0["penalties"], atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_autocast_region_changes_neither_penalty_nor_gradient(planted_weights, backend):
    """Inside ``torch.autocast`` (a mixed-precision training step) the penalty is still computed in
    the weights' dtype: the same value and gradient, bit for bit, as outside, also when the
    backward runs inside the region (without the fix: a dtype error in the forward, then a
    bf16-rounded gradient)."""
    results = []
    for autocast in (False, True):
        net = _planted_mlp(planted_weights, [48, 32, 32, 10], k=3, seed=4).float()
        reg = SpectralRegularizer(net, n_eigs=3, backend=backend)
        for _ in range(3):  # a cold solve, then warm steps
            net.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                value = reg()
                value.backward()
        assert value.dtype == torch.float32
        results.append((value.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    (v0, g0), (v1, g1) = results
    assert torch.equal(v0, v1)
    assert len(g0) == len(g1) == 3 and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_autocast_region_on_a_cnn_graph():
    """The traced (CNN) path too: same penalty under autocast; the gradient is the same when the
    backward runs outside the region, as torch recommends for any model."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                                 nn.Conv2d(8, 6, 3))
    net = make()
    results = []
    for autocast in (False, True):
        model = copy.deepcopy(net)
        reg = SpectralRegularizer(model, n_eigs=3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = reg()
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (v0, g0), (v1, g1) = results
    assert v1.dtype == torch.float32 and torch.equal(v0, v1)
    assert len(g0) == len(g1) >= 2 and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_inside_a_compiled_training_step_the_penalty_runs_eagerly(compiled_training_runs):
    """``torch.compile`` of a whole training step: the regularizer (its forward and its backward)
    is one graph break, not traced (tracing into it compiled ~40 frames and took minutes on the
    paper MLP), and the step trains like the eager one."""

    def attach(model, opt):
        reg = SpectralRegularizer(model, n_eigs=3)
        return reg, lambda: reg.eigenvalues().tolist()

    frames = compiled_training_runs(attach)
    assert frames[True] <= frames[False] + 2, frames


@pytest.mark.parametrize("dtype,calls", [(torch.float32, 2), (torch.float16, 1), (torch.bfloat16, 1)])
def test_training_with_moving_abs_buffers_stays_exact(dtype, calls):
    """The compiled step reads memoized pointer arrays. When |W| lands in fresh buffers (a second
    ``reg()`` while the first awaits its backward; half-precision weights until |W| was converted
    into reused buffers) the memo turns over, and a step once passed the address of a layer-size
    array the memo had just dropped: a use after free (a 3e16-byte allocation request by step 8,
    or garbage sizes; AddressSanitizer names it). Trained for 30 steps, the eigenvalues stay equal
    to dense ``eigh`` of the float64 weights."""
    model = _mlp([120, 96, 96, 10], seed=22, dtype=torch.float32).to(dtype)
    reg = SpectralRegularizer(model, n_eigs=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 120, generator=gen).to(dtype)
    for _ in range(30):
        opt.zero_grad()
        penalty = sum(reg() for _ in range(calls))
        (model(x).float().square().mean() + penalty).backward()
        opt.step()
    assert penalty.dtype == torch.float32 and reg.steps == 30 * calls
    weights = [lin.weight.detach().double() for lin in _linears(model)]
    expected = torch.linalg.eigvalsh(_dense_laplacian_torch(weights))[1:4]
    torch.testing.assert_close(reg.eigenvalues().double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::torch_modularity.regularizer.DisconnectedGraphWarning")  # the pruned rows
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_path_matches_torch_path_on_random_chains(threads):
    """Seeded random chains the hand-picked cases miss (1-unit layers, layers whose rows were
    pruned to zero, 2-6 blocks, 1-5 eigenvalues, float32 and float64), four SGD steps each: the
    compiled path (also split over two threads) ends with the torch path's penalty. A fuzz of
    the same kind under AddressSanitizer (scripts/asan_check.sh) ran 390 chains clean."""
    rng = np.random.default_rng(2026)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(10):
            sizes = [int(v) for v in rng.integers(1, 48, size=int(rng.integers(3, 8)))]
            n_eigs = int(min(rng.integers(1, 6), sum(sizes) - 2))
            dtype = torch.float64 if rng.random() < 0.5 else torch.float32
            seed, dead = int(rng.integers(1000)), rng.random(len(sizes)) < 0.25
            values = []
            for backend in ("auto", "torch"):
                model = _mlp(sizes, seed=seed, dtype=dtype)
                with torch.no_grad():
                    for lin, kill in zip(_linears(model), dead):
                        if kill:
                            lin.weight[: max(1, lin.weight.shape[0] // 3)] = 0
                reg = SpectralRegularizer(model, n_eigs=n_eigs, backend=backend)
                opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                for _ in range(4):
                    opt.zero_grad()
                    penalty = reg()
                    penalty.backward()
                    opt.step()
                values.append(penalty.item())
            tol = 1e-4 if dtype == torch.float32 else 1e-9
            assert values[0] == pytest.approx(values[1], rel=tol, abs=tol), (sizes, n_eigs, dtype)
    finally:
        torch.set_num_threads(n)


def test_importing_the_package_does_not_import_dynamo():
    """``torch.compiler.disable`` at import time loaded dynamo and made ``import torch_modularity``
    ~2 s slower in every process (CLI, spawned workers): the eager-under-compile wrappers make
    their disabled copies only when dynamo traces them."""
    import subprocess
    import sys

    code = ("import sys, torch; before = 'torch._dynamo' in sys.modules; import torch_modularity; "
            "print(before, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    assert after == before  # whatever torch itself imports, the package adds no dynamo
