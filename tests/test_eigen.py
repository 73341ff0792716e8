"""The torch block eigensolver (``torch_modularity.eigen``) against dense numpy ``eigh`` oracles."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_modularity.eigen import (
    EigResult,
    GramOperator,
    NormalizedAdjacency,
    chebyshev_eigs,
    layer_coloring,
    subspace_eigs,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZES = [40, 24, 24, 16, 10]


def _blocks(weights):
    return [(l, l + 1, w.abs()) for l, w in enumerate(weights)]


def _subspace_error(x: np.ndarray, v: np.ndarray) -> float:
    """Norm of the part of the columns of ``x`` outside span(``v``) (both orthonormal)."""
    return float(np.linalg.norm(x - v @ (v.T @ x)))


@pytest.mark.parametrize("bipartite", ["auto", False])
def test_eigenpairs_match_dense_eigh_float64(planted_weights, dense_adjacency_from_weights, dense_laplacian, bipartite):
    weights, _ = planted_weights(SIZES, k=3, seed=1)
    lap = dense_laplacian(dense_adjacency_from_weights(weights))
    vals, vecs = np.linalg.eigh(lap)
    k = 6
    res = chebyshev_eigs(SIZES, _blocks(weights), k, tol=1e-12, seed=0, bipartite=bipartite)
    assert isinstance(res, EigResult) and res.converged
    assert res.method == ("gram" if bipartite == "auto" else "generic")
    assert res.eigenvalues.dtype == torch.float64
    np.testing.assert_allclose(res.eigenvalues.numpy(), vals[:k], atol=1e-11)
    x = res.eigenvectors.numpy()
    assert x.shape == (sum(SIZES), k)
    np.testing.assert_allclose(x.T @ x, np.eye(k), atol=1e-12)
    assert _subspace_error(x, vecs[:, :k]) < 1e-9  # lambda_6 < lambda_7 here
    # Each vector is an eigenvector of L with its eigenvalue.
    np.testing.assert_allclose(lap @ x, x * res.eigenvalues.numpy()[None, :], atol=1e-10)


def test_float32(planted_weights, dense_adjacency_from_weights, dense_laplacian):
    weights, _ = planted_weights(SIZES, k=3, seed=2)
    vals = np.linalg.eigvalsh(dense_laplacian(dense_adjacency_from_weights(weights)))
    res = chebyshev_eigs(SIZES, _blocks([w.float() for w in weights]), 5, seed=0)
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.dtype == torch.float32
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues.double().numpy(), vals[:5], atol=2e-6)
    x = res.eigenvectors.double().numpy()
    np.testing.assert_allclose(x.T @ x, np.eye(5), atol=1e-5)


def test_random_init_mlp_float32_bulk_spectrum(dense_adjacency_from_weights, dense_laplacian):
    """Random weights: a few isolated top eigenvalues above a dense bulk (the float32 hard case)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [200, 64, 64, 64, 10]
    weights = [torch.empty(b, a).uniform_(-a ** -0.5, a ** -0.5, generator=gen) for a, b in zip(sizes[:-1], sizes[1:])]
    vals = np.linalg.eigvalsh(dense_laplacian(dense_adjacency_from_weights(weights)))
    res = chebyshev_eigs(sizes, _blocks(weights), 8, degree=8, max_iter=500, seed=0)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues.double().numpy(), vals[:8], atol=1e-5)


def test_operators_match_dense(planted_weights, dense_adjacency_from_weights):
    weights, _ = planted_weights(SIZES, k=3, seed=3)
    a = dense_adjacency_from_weights(weights)
    d = a.sum(axis=1)
    m_dense = a / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]
    gen = torch.Generator().manual_seed(0)
    for prescale in (True, False):
        adj = NormalizedAdjacency(SIZES, _blocks(weights), prescale=prescale)
        np.testing.assert_allclose(adj.to_dense().numpy(), m_dense, atol=1e-14)
        np.testing.assert_allclose(adj.degrees.numpy(), d, rtol=1e-14)
        gram = GramOperator(adj)
        # Small side: layers 1 and 3 (24 + 16 = 40 < 40 + 24 + 10).
        assert gram.small_layers == [1, 3] and gram.n == 40 and gram.n_large == 74
        z = torch.randn(gram.n, 3, generator=gen, dtype=torch.float64)
        x = gram.to_full(z, torch.zeros(gram.n_large, 3, dtype=torch.float64)).numpy()
        bz = (m_dense @ x)
        np.testing.assert_allclose(gram.to_full(torch.zeros_like(z), gram.forward(z)).numpy(), bz, atol=1e-14)
        gz = m_dense @ (m_dense @ x)
        np.testing.assert_allclose(gram.to_full(gram.matmat(z), torch.zeros(gram.n_large, 3, dtype=torch.float64)).numpy(),
                                   gz, atol=1e-14)
        zz, yy = gram.split(torch.from_numpy(x))
        np.testing.assert_allclose(zz.numpy(), z.numpy())
        assert float(yy.abs().max()) == 0.0


def test_non_bipartite_graph_uses_generic_path(dense_laplacian):
    gen = torch.Generator().manual_seed(4)
    sizes = [12, 10, 8]
    blocks = [(0, 1, torch.rand(10, 12, generator=gen, dtype=torch.float64)),
              (1, 2, torch.rand(8, 10, generator=gen, dtype=torch.float64)),
              (0, 2, torch.rand(8, 12, generator=gen, dtype=torch.float64))]  # skip connection: odd cycle
    assert layer_coloring(3, [(s, d) for s, d, _ in blocks]) is None
    n = sum(sizes)
    off = np.concatenate([[0], np.cumsum(sizes)])
    a = np.zeros((n, n))
    for s, d, w in blocks:
        a[off[d]:off[d + 1], off[s]:off[s + 1]] = w.numpy()
        a[off[s]:off[s + 1], off[d]:off[d + 1]] = w.numpy().T
    vals = np.linalg.eigvalsh(dense_laplacian(a))
    res = chebyshev_eigs(sizes, blocks, 4, tol=1e-12)
    assert res.method == "generic" and res.converged
    np.testing.assert_allclose(res.eigenvalues.numpy(), vals[:4], atol=1e-11)
    with pytest.raises(ValueError, match="not 2-colourable"):
        chebyshev_eigs(sizes, blocks, 4, bipartite=True)


def test_warm_start_converges_in_fewer_iterations(planted_weights):
    weights, _ = planted_weights(SIZES, k=3, seed=5)
    cold = chebyshev_eigs(SIZES, _blocks(weights), 6, tol=1e-10, degree=4, seed=0)
    gen = torch.Generator().manual_seed(1)
    moved = [w * (1 + 1e-3 * torch.randn(w.shape, generator=gen, dtype=w.dtype)) for w in weights]
    cold2 = chebyshev_eigs(SIZES, _blocks(moved), 6, tol=1e-10, degree=4, seed=0)
    warm = chebyshev_eigs(SIZES, _blocks(moved), 6, tol=1e-10, degree=4, warm_start=cold)
    assert warm.converged and cold2.converged
    assert warm.iterations < cold2.iterations
    assert warm.work < cold2.work
    np.testing.assert_allclose(warm.eigenvalues.numpy(), cold2.eigenvalues.numpy(), atol=1e-10)
    # A bare block works too, and a block of the wrong size is ignored (cold start).
    bare = chebyshev_eigs(SIZES, _blocks(moved), 6, tol=1e-10, degree=4, warm_start=cold.block)
    assert bare.converged and bare.iterations <= cold2.iterations
    wrong = chebyshev_eigs(SIZES, _blocks(moved), 6, tol=1e-10, degree=4, warm_start=torch.ones(7, 3, dtype=torch.float64))
    assert wrong.converged


def test_seeded_reproducibility_and_global_rng_untouched(planted_weights):
    weights, _ = planted_weights(SIZES, k=3, seed=6)
    state = torch.random.get_rng_state()
    a = chebyshev_eigs(SIZES, _blocks(weights), 5, seed=3, max_iter=2, tol=0.0)
    b = chebyshev_eigs(SIZES, _blocks(weights), 5, seed=3, max_iter=2, tol=0.0)
    c = chebyshev_eigs(SIZES, _blocks(weights), 5, generator=torch.Generator().manual_seed(3), max_iter=2, tol=0.0)
    d = chebyshev_eigs(SIZES, _blocks(weights), 5, seed=4, max_iter=2, tol=0.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.block, b.block) and torch.equal(a.block, c.block)
    assert not torch.equal(a.block, d.block)
    assert not a.converged and a.iterations == 2


def test_isolated_nodes_are_masked(dense_adjacency_from_weights, dense_laplacian):
    gen = torch.Generator().manual_seed(7)
    w1 = torch.rand(6, 5, generator=gen, dtype=torch.float64)
    w2 = torch.rand(4, 6, generator=gen, dtype=torch.float64)
    w1[2] = 0.0  # hidden unit 2 has no edges at all
    w2[:, 2] = 0.0
    res = chebyshev_eigs([5, 6, 4], _blocks([w1, w2]), 3, tol=1e-12)
    assert res.num_isolated == 1
    assert torch.isfinite(res.eigenvalues).all() and torch.isfinite(res.eigenvectors).all()
    keep = np.ones(15, dtype=bool)
    keep[5 + 2] = False
    a = dense_adjacency_from_weights([w1, w2])[np.ix_(keep, keep)]
    vals = np.linalg.eigvalsh(dense_laplacian(a))
    np.testing.assert_allclose(res.eigenvalues.numpy(), vals[:3], atol=1e-11)
    assert float(res.eigenvectors[5 + 2].abs().max()) < 1e-12


def test_subspace_eigs_generic_operator():
    gen = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    spectrum = torch.linspace(-1, 1, 60, dtype=torch.float64)
    spectrum[-3:] = torch.tensor([0.995, 0.998, 1.0], dtype=torch.float64)
    mat = q @ torch.diag(spectrum) @ q.T
    res = subspace_eigs(lambda v: mat @ v, 60, 3, lower=-1.0, upper=1.0, tol=1e-12, degree=8)
    assert res.converged
    np.testing.assert_allclose(res.values[:3].numpy(), [1.0, 0.998, 0.995], atol=1e-12)


def test_bad_inputs(planted_weights):
    weights, _ = planted_weights([5, 4, 3], k=2, seed=9)
    with pytest.raises(ValueError, match="cannot compute"):
        chebyshev_eigs([5, 4, 3], _blocks(weights), 13)
    with pytest.raises(ValueError, match="shape"):
        chebyshev_eigs([5, 4, 3], [(0, 1, weights[0].abs().T)], 2)
    with pytest.raises(ValueError, match="at least one"):
        NormalizedAdjacency([5, 4], [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_blocks_device(planted_weights):
    weights, _ = planted_weights(SIZES, k=3, seed=10)
    cpu = chebyshev_eigs(SIZES, _blocks(weights), 5, tol=1e-12)
    gpu = chebyshev_eigs(SIZES, [(s, d, w.cuda()) for s, d, w in _blocks(weights)], 5, tol=1e-12)
    assert gpu.eigenvalues.device.type == "cuda" and gpu.eigenvectors.device.type == "cuda"
    np.testing.assert_allclose(gpu.eigenvalues.cpu().numpy(), cpu.eigenvalues.numpy(), atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_staged_filter_matches_dense_with_fewer_calls(dense_adjacency_from_weights, dense_laplacian, dtype, tol):
    """split="stages" (all columns per call, degree split by orthonormalizations) finds the same
    eigenpairs as the grouped filter on the float32-hard random-init spectrum, in fewer calls."""
    gen = torch.Generator().manual_seed(0)
    sizes = [200, 64, 64, 64, 10]
    weights = [torch.empty(b, a, dtype=dtype).uniform_(-a ** -0.5, a ** -0.5, generator=gen)
               for a, b in zip(sizes[:-1], sizes[1:])]
    lam = np.linalg.eigvalsh(dense_laplacian(dense_adjacency_from_weights(weights)))
    k = 8
    gram = GramOperator(NormalizedAdjacency(sizes, _blocks(weights)))
    runs = {}
    for split in ("groups", "stages"):
        res = subspace_eigs(gram.matmat, gram.n, k, lower=0.0, upper=1.0, degree=8, tol=tol, max_iter=500, seed=0,
                            dtype=dtype, first_column=gram.trivial_vector(), split=split)
        assert res.converged
        np.testing.assert_allclose(res.values[:k].double().numpy(), (1.0 - lam[:k]) ** 2, atol=10 * tol)
        runs[split] = res
    assert runs["stages"].matvecs < runs["groups"].matvecs
