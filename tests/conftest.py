"""Shared fixtures: small random / planted-module weight lists and dense reference oracles.

The helpers are exposed as fixtures that return functions, so test modules never import
from this file. Every oracle here works on a dense numpy matrix built from the weights or
from ``WeightGraph.adjacency()``; none of them calls into the library's numerics.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import pytest
import scipy.sparse as sp
import torch


def _mlp_weights(sizes: Sequence[int], seed: int = 0, dtype=torch.float64, density=None) -> List[torch.Tensor]:
    """Random weights in torch layout ``(out, in)`` for the chain ``sizes``.

    Entries are standard normal (signed: the graph must take |w|). With ``density`` each
    entry is kept with that probability and zeroed otherwise (a "pruned" net).
    """
    gen = torch.Generator().manual_seed(seed)
    weights = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        w = torch.randn(n_out, n_in, generator=gen, dtype=dtype)
        if density is not None:
            w = w * (torch.rand(n_out, n_in, generator=gen) < density).to(dtype)
        weights.append(w)
    return weights


def _planted_weights(sizes: Sequence[int], k: int, seed: int = 0, strength: float = 4.0) -> Tuple[List[torch.Tensor], np.ndarray]:
    """Chain weights with ``k`` planted modules, and the planted module of every node.

    Every unit of every layer gets a module id in 0..k-1 (balanced, randomly placed within
    the layer). Weight magnitudes are U(0.5, 1) with a random sign, multiplied by
    ``strength`` when both ends are in the same module. With strength 4 and k = 3 a node
    sends 4 / (4 + 2) = 2/3 of its expected weight inside its module, far above the 1/3 of
    an unstructured graph: the planted partition is clearly the best k-way cut.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    modules = [rng.permutation(np.arange(n) % k) for n in sizes]
    weights = []
    for layer, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        mag = 0.5 + 0.5 * torch.rand(n_out, n_in, generator=gen, dtype=torch.float64)
        sign = torch.where(torch.rand(n_out, n_in, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
        same = torch.from_numpy(modules[layer + 1][:, None] == modules[layer][None, :])
        weights.append(torch.where(same, mag * strength, mag) * sign)
    return weights, np.concatenate(modules)


def _dense_adjacency_from_weights(weights: Sequence) -> np.ndarray:
    """The N x N adjacency of a chain, written out by hand from the weights (method.md 1.1)."""
    mats = [np.abs(np.asarray(torch.as_tensor(w).detach().to(torch.float64).numpy())) for w in weights]
    sizes = [mats[0].shape[1]] + [m.shape[0] for m in mats]
    off = np.concatenate([[0], np.cumsum(sizes)])
    a = np.zeros((off[-1], off[-1]))
    for l, m in enumerate(mats):
        # rows = receiving units (layer l+1), columns = sending units (layer l)
        a[off[l + 1]:off[l + 2], off[l]:off[l + 1]] = m
        a[off[l]:off[l + 1], off[l + 1]:off[l + 2]] = m.T
    return a


def _dense(a) -> np.ndarray:
    return a.toarray() if sp.issparse(a) else np.asarray(a, dtype=np.float64)


def _dense_laplacian(adj) -> np.ndarray:
    """L_sym = I - D^-1/2 A D^-1/2 as a dense float64 matrix (all degrees must be > 0)."""
    a = _dense(adj)
    d = a.sum(axis=1)
    assert np.all(d > 0), "the reference Laplacian needs a graph without isolated nodes"
    s = 1.0 / np.sqrt(d)
    return np.eye(len(d)) - s[:, None] * a * s[None, :]


def _brute_ncut(adj, labels) -> float:
    """sum over clusters c (label -1 excluded) of cut_c / (vol_c + 1e-8), by dense sums."""
    a = _dense(adj)
    labels = np.asarray(labels)
    deg = a.sum(axis=1)
    total = 0.0
    for c in np.unique(labels[labels >= 0]):
        inside = labels == c
        cut = a[np.ix_(inside, ~inside)].sum()
        vol = deg[inside].sum()
        total += cut / (vol + 1e-8)
    return float(total)


@pytest.fixture
def mlp_weights():
    """Factory: ``mlp_weights(sizes, seed=0, dtype=torch.float64, density=None)``."""
    return _mlp_weights


@pytest.fixture
def planted_weights():
    """Factory: ``planted_weights(sizes, k, seed=0, strength=4.0) -> (weights, modules)``."""
    return _planted_weights


@pytest.fixture
def dense_adjacency_from_weights():
    return _dense_adjacency_from_weights


@pytest.fixture
def dense_laplacian():
    return _dense_laplacian


@pytest.fixture
def brute_ncut():
    return _brute_ncut


@pytest.fixture
def one_torch_thread():
    """Tiny problems: one thread is faster, and immune to a busy machine's straggling threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _compiled_training_runs(attach, n_steps: int = 7, device: str = "cpu"):
    """A small MLP trained ``n_steps`` SGD steps, eager and inside ``torch.compile`` (a counting
    backend: graphs run as captured, no code generation), with and without what ``attach(model,
    optimizer)`` adds (it returns ``(loss_term, finish)``: a callable added to the loss or
    ``None``, and a callable run after training whose result is compared).

    Returns ``{with_attach: frames compiled}`` after asserting that compiled and eager runs end
    with the same weights and the same ``finish()`` result.
    """
    from torch import nn
    from torch._dynamo.testing import CompileCounter

    def run(with_attach: bool, compiled: bool):
        gen = torch.Generator().manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / 4)
        model.to(device)
        x, y = torch.randn(8, 24, generator=gen).to(device), torch.randint(0, 4, (8,), generator=gen).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        term, finish = attach(model, opt) if with_attach else (None, None)

        def step():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if term is not None:
                loss = loss + term()
            loss.backward()
            opt.step()

        counter = CompileCounter()
        fn = torch.compile(step, backend=counter) if compiled else step
        for _ in range(n_steps):
            fn()
        return model, (finish() if finish is not None else None), counter.frame_count

    frames = {}
    try:
        for with_attach in (False, True):
            torch._dynamo.reset()
            model, result, frames[with_attach] = run(with_attach, compiled=True)
            eager_model, eager_result, _ = run(with_attach, compiled=False)
            for p, q in zip(model.parameters(), eager_model.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            assert result == eager_result, (result, eager_result)
    finally:
        torch._dynamo.reset()
    return frames


@pytest.fixture
def compiled_training_runs():
    """Factory: ``compiled_training_runs(attach, n_steps=7, device="cpu") -> {with_attach: frames compiled}``."""
    return _compiled_training_runs


def _run_processes(fn, args=(), nprocs: int = 2, timeout: float = 180.0, start_method: str = "spawn") -> None:
    """``torch.multiprocessing.start_processes(fn, args, nprocs)`` joined with a deadline: a hung
    worker (gloo's process-group teardown can deadlock on the GIL, a torch bug) fails the test
    instead of blocking the suite, and the workers are killed."""
    import time

    import torch.multiprocessing as tmp

    context = tmp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{nprocs} worker processes did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


@pytest.fixture
def run_processes():
    """Factory: ``run_processes(fn, args=(), nprocs=2, timeout=180, start_method="spawn")``."""
    return _run_processes
