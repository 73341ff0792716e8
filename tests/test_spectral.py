"""Spectral embedding and clustering (method.md 2.1) against dense eigh and scikit-learn."""
from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
import pytest
import torch
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score

from torch_modularity import WeightGraph, clusterability, ncut, spectral_clustering, spectral_embedding


# --------------------------------------------------------------------------- embedding
def _check_embedding(graph, k, dense_laplacian, seed=0, reference=None, dtype=None, tol=1e-8):
    """Eigenpairs of ``spectral_embedding`` versus dense ``numpy.linalg.eigh`` of L_sym.

    ``reference`` may pass ``(lap, ref_vals, ref_vecs)`` computed earlier for the same graph.
    ``tol`` is the eigenvalue tolerance (1e-8 for the float64 engine); vectors get 10x.
    """
    emb = spectral_embedding(graph, k, seed=seed) if dtype is None else spectral_embedding(graph, k, seed=seed, dtype=dtype)
    if reference is None:
        lap = dense_laplacian(graph.adjacency())
        ref_vals, ref_vecs = np.linalg.eigh(lap)
    else:
        lap, ref_vals, ref_vecs = reference
    vals = np.asarray(emb.eigenvalues)
    u = np.asarray(emb.eigenvectors)
    assert vals.shape == (k,)
    assert u.shape == (graph.num_nodes, k)
    # the k smallest eigenvalues, ascending
    np.testing.assert_allclose(vals, ref_vals[:k], rtol=0, atol=tol)
    # orthonormal eigenvectors with small residual
    u = u.astype(np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(k), rtol=0, atol=10 * tol)
    np.testing.assert_allclose(lap @ u, u * vals[None, :], rtol=0, atol=10 * tol)
    # the subspace: inside the span of the reference eigenvectors with eigenvalue <= lambda_k
    # (ties at the boundary included, so degenerate eigenvalues are handled)
    span = ref_vecs[:, ref_vals <= ref_vals[k - 1] + 1e-9]
    smallest_sv = np.linalg.svd(span.T @ u, compute_uv=False).min()
    assert smallest_sv == pytest.approx(1.0, abs=10 * tol)
    return emb, ref_vals


def test_embedding_small_mlp_dense_path(mlp_weights, dense_laplacian):
    g = WeightGraph.from_weights(mlp_weights([10, 20, 15, 5], seed=0))
    _, ref_vals = _check_embedding(g, 4, dense_laplacian)
    assert ref_vals[4] - ref_vals[3] > 1e-6  # the k-subspace is well defined here
    _check_embedding(g, 12, dense_laplacian)


LANCZOS_SIZES = [220, 420, 200]  # colour classes {0, 2} and {1}: 420 nodes each


def test_embedding_larger_mlp_lanczos_path(mlp_weights, dense_laplacian):
    # both colour classes have 420 > 400 nodes: above the size where the small side's Gram
    # matrix is decomposed densely, so the iterative (Lanczos) solver runs
    g = WeightGraph.from_weights(mlp_weights(LANCZOS_SIZES, seed=1))
    lap = dense_laplacian(g.adjacency())
    ref_vals, ref_vecs = np.linalg.eigh(lap)
    reference = (lap, ref_vals, ref_vecs)
    for seed in (0, 3):  # the start vector must not matter
        _check_embedding(g, 12, dense_laplacian, seed=seed, reference=reference, dtype=np.float64)
    # the default engine precision may be float32 for a graph of this size (176k weights):
    # still the right eigenpairs, to float32 accuracy
    _check_embedding(g, 12, dense_laplacian, seed=0, reference=reference, tol=1e-4)


def test_embedding_k_larger_than_small_side(mlp_weights, dense_laplacian):
    # the small colour class (layer 1) has 3 nodes < k = 5: L has only 3 eigenvalues below 1,
    # then eigenvalue 1 with multiplicity 54 (handled by the tie-aware subspace check)
    g = WeightGraph.from_weights(mlp_weights([30, 3, 30], seed=2))
    _check_embedding(g, 5, dense_laplacian)


def test_embedding_non_bipartite_graph(dense_laplacian):
    # a skip block 0 -> 2 makes an odd cycle of layers: the generic path
    gen = torch.Generator().manual_seed(3)
    blocks = [(0, 1, torch.rand(15, 20, generator=gen)), (1, 2, torch.rand(10, 15, generator=gen)),
              (0, 2, torch.rand(10, 20, generator=gen))]
    g = WeightGraph([20, 15, 10], blocks)
    assert g.layer_coloring() is None
    _check_embedding(g, 4, dense_laplacian)


def test_embedding_large_non_bipartite_graph(dense_laplacian):
    gen = torch.Generator().manual_seed(4)
    blocks = [(0, 1, torch.rand(150, 200, generator=gen)), (1, 2, torch.rand(100, 150, generator=gen)),
              (0, 2, torch.rand(100, 200, generator=gen))]
    g = WeightGraph([200, 150, 100], blocks)
    _check_embedding(g, 6, dense_laplacian)


def test_embedding_of_disconnected_graph_has_two_zero_eigenvalues(dense_laplacian):
    g, _ = _two_disjoint_mlps()
    emb, _ = _check_embedding(g, 4, dense_laplacian)
    np.testing.assert_allclose(emb.eigenvalues[:2], 0.0, atol=1e-8)
    assert emb.eigenvalues[2] > 1e-3


def test_embedding_rejects_isolated_nodes():
    w = torch.ones(3, 4)
    w[:, 0] = 0
    with pytest.raises(ValueError, match="isolated"):
        spectral_embedding(WeightGraph.from_weights([w, torch.ones(2, 3)]), 2)


# --------------------------------------------------------------------------- clustering: basic contract
def _assert_exactly_k(labels, k, num_nodes):
    labels = np.asarray(labels)
    assert labels.shape == (num_nodes,)
    assert np.issubdtype(labels.dtype, np.integer)
    kept = labels[labels >= 0]
    assert sorted(np.unique(kept).tolist()) == list(range(k))


def test_clustering_returns_exactly_k_nonempty_clusters(mlp_weights):
    g = WeightGraph.from_weights(mlp_weights([8, 6, 5], seed=0))  # 19 nodes
    for k in (2, 3, 7, 12, 17, 18, 19):
        _assert_exactly_k(spectral_clustering(g, k, seed=0), k, g.num_nodes)


def test_clustering_with_identical_units_still_gives_k_clusters():
    # all-ones weights: every unit of a layer is identical (duplicate rows in the embedding)
    g = WeightGraph.from_weights([torch.ones(4, 3), torch.ones(2, 4)])
    for k in range(2, 10):
        _assert_exactly_k(spectral_clustering(g, k, seed=1), k, 9)
    # duplicated units inside a random net
    gen = torch.Generator().manual_seed(5)
    w0 = torch.rand(10, 12, generator=gen)
    w0[5:] = w0[:5]
    w1 = torch.rand(6, 10, generator=gen)
    w1[:, 5:] = w1[:, :5]
    g = WeightGraph.from_weights([w0, w1])
    for k in (2, 5, 10, 20, 27, 28):
        _assert_exactly_k(spectral_clustering(g, k, seed=0), k, 28)


def test_clustering_labels_isolated_nodes_minus_one(mlp_weights):
    ws = mlp_weights([12, 10, 4], seed=2)
    ws[0][:, :3] = 0  # input units 0..2 isolated
    ws[0][2] = 0
    ws[1][:, 2] = 0  # hidden unit 2 isolated
    g = WeightGraph.from_weights(ws)
    isolated = np.asarray(g.adjacency().sum(axis=1)).ravel() == 0
    assert list(np.nonzero(isolated)[0]) == [0, 1, 2, 14]
    labels = spectral_clustering(g, 5, seed=0)
    np.testing.assert_array_equal(labels == -1, isolated)
    _assert_exactly_k(labels, 5, g.num_nodes)
    _assert_exactly_k(spectral_clustering(g, 22, seed=0), 22, g.num_nodes)  # all 22 non-isolated
    with pytest.raises(ValueError, match="non-isolated"):
        spectral_clustering(g, 23, seed=0)


@pytest.mark.parametrize("k", [1, 0, -3])
def test_too_few_clusters_raise(mlp_weights, k):
    with pytest.raises(ValueError, match="at least 2"):
        spectral_clustering(WeightGraph.from_weights(mlp_weights([4, 3], seed=0)), k)


def test_too_many_clusters_raise(mlp_weights):
    with pytest.raises(ValueError, match="non-isolated"):
        spectral_clustering(WeightGraph.from_weights(mlp_weights([4, 3], seed=0)), 8)


def test_same_seed_same_labels(mlp_weights):
    g = WeightGraph.from_weights(mlp_weights([20, 16, 10], seed=3))
    for seed in (0, 1, 2):
        first = spectral_clustering(g, 6, seed=seed)
        np.testing.assert_array_equal(first, spectral_clustering(g, 6, seed=seed))
        _assert_exactly_k(first, 6, g.num_nodes)  # any seed gives a valid partition


def test_same_seed_same_labels_on_lanczos_path(mlp_weights):
    g = WeightGraph.from_weights(mlp_weights(LANCZOS_SIZES, seed=1))
    np.testing.assert_array_equal(spectral_clustering(g, 12, seed=4), spectral_clustering(g, 12, seed=4))


def test_clustering_does_not_touch_global_rngs(mlp_weights):
    g = WeightGraph.from_weights(mlp_weights([20, 16, 10], seed=3))
    torch_state = torch.random.get_rng_state().clone()
    np_state = np.random.get_state()
    spectral_clustering(g, 5, seed=0)
    spectral_embedding(g, 5, seed=0)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0]
    np.testing.assert_array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]


# --------------------------------------------------------------------------- quality vs scikit-learn
def _sklearn_labels(adjacency, k, seed):
    model = SpectralClustering(n_clusters=k, affinity="precomputed", eigen_solver="arpack",
                               assign_labels="kmeans", n_init=10, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's own warnings are not under test
        return model.fit(adjacency).labels_


def test_ncut_not_worse_than_sklearn_on_random_mlp_graphs(mlp_weights):
    # Both run the same pipeline (normalized-Laplacian embedding, trivial vector kept, rows
    # scaled by 1/sqrt(degree), k-means++ with 10 restarts); they differ only in random
    # choices (eigensolver start vector, k-means seeding), which move k-means to different
    # local optima. On unstructured graphs those optima differ by a few hundredths of n-cut
    # (out of ~k - 1), so 0.05 on the 3-seed mean is the noise allowance.
    ours, theirs = [], []
    for seed in range(3):
        g = WeightGraph.from_weights(mlp_weights([16, 24, 24, 8], seed=seed))
        a = g.adjacency()
        ours.append(ncut(g, spectral_clustering(g, 4, seed=seed)))
        theirs.append(ncut(g, _sklearn_labels(a, 4, seed)))
    assert np.mean(ours) <= np.mean(theirs) + 0.05, (ours, theirs)


def test_planted_modules_recovered_like_sklearn(planted_weights):
    for seed in range(2):
        ws, modules = planted_weights([24, 36, 36, 12], 3, seed=seed, strength=4.0)
        g = WeightGraph.from_weights(ws)
        ours = spectral_clustering(g, 3, seed=seed)
        theirs = _sklearn_labels(g.adjacency(), 3, seed)
        assert adjusted_rand_score(modules, theirs) >= 0.9  # the planting is recoverable
        assert adjusted_rand_score(modules, ours) >= 0.9
        assert ncut(g, ours) <= ncut(g, modules) + 1e-9  # and ours is at least as good a cut


def test_planted_modules_recovered_with_more_clusters(planted_weights):
    ws, modules = planted_weights([32, 48, 48, 16], 4, seed=7, strength=5.0)
    g = WeightGraph.from_weights(ws)
    assert adjusted_rand_score(modules, spectral_clustering(g, 4, seed=0)) >= 0.9


# --------------------------------------------------------------------------- disconnected graphs
def _two_disjoint_mlps():
    """Two MLPs (6-8-4 and 5-7-3) side by side in one layered graph, and the component of each node."""
    gen = torch.Generator().manual_seed(9)
    a0, a1 = torch.rand(8, 6, generator=gen) + 0.1, torch.rand(4, 8, generator=gen) + 0.1
    b0, b1 = torch.rand(7, 5, generator=gen) + 0.1, torch.rand(3, 7, generator=gen) + 0.1
    w0 = torch.block_diag(a0, b0)  # (15, 11)
    w1 = torch.block_diag(a1, b1)  # (7, 15)
    g = WeightGraph([11, 15, 7], [(0, 1, w0), (1, 2, w1)])
    component = np.concatenate([[0] * 6 + [1] * 5, [0] * 8 + [1] * 7, [0] * 4 + [1] * 3])
    return g, component


def test_disconnected_graph_clusters_into_its_components():
    g, component = _two_disjoint_mlps()
    assert nx.number_connected_components(nx.from_scipy_sparse_array(g.adjacency())) == 2
    labels = spectral_clustering(g, 2, seed=0)
    assert adjusted_rand_score(component, labels) == 1.0
    # no edge is cut; the weights are float32, so allow float32 rounding of the volumes
    assert ncut(g, labels) == pytest.approx(0.0, abs=1e-6)
    for k in (3, 5, 9):
        _assert_exactly_k(spectral_clustering(g, k, seed=0), k, g.num_nodes)


def test_disconnected_graph_clusterability_reports_components():
    g, _ = _two_disjoint_mlps()
    result = clusterability(g, n_clusters=3, n_shuffles=2, n_workers=1)
    assert result.n_components == 2
    _assert_exactly_k(result.labels, 3, g.num_nodes)


# --------------------------------------------------------------------------- k-means
def _inertia(x, labels):
    return sum(float(((x[labels == c] - x[labels == c].mean(axis=0)) ** 2).sum()) for c in np.unique(labels))


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_kmeans_recovers_separated_blobs_like_sklearn(backend):
    from sklearn.cluster import KMeans

    from torch_modularity.spectral import kmeans

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10.0, size=(6, 4))
    truth = rng.integers(0, 6, 900)
    x = centres[truth] + rng.normal(size=(900, 4))
    ours = kmeans(x, 6, 3, np.random.default_rng(1), backend=backend)
    ref = KMeans(6, n_init=3, random_state=1).fit(x).labels_
    assert adjusted_rand_score(truth, ref) == pytest.approx(1.0)
    assert adjusted_rand_score(truth, ours) == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_kmeans_inertia_like_sklearn_on_structureless_data(backend):
    # No true clusters: both find local optima; ours (incrementally updated cluster sums,
    # GEMM assignment) must be as good on average and close on each draw.
    from sklearn.cluster import KMeans

    from torch_modularity.spectral import kmeans

    ours, ref = [], []
    for seed in range(6):
        x = np.random.default_rng(seed).standard_normal((1500, 12))
        labels = kmeans(x, 12, 3, np.random.default_rng(seed), backend=backend)
        assert np.bincount(labels, minlength=12).min() > 0
        ours.append(_inertia(x, labels))
        ref.append(KMeans(12, n_init=3, random_state=seed).fit(x).inertia_)
    ours, ref = np.array(ours), np.array(ref)
    assert np.all(ours <= 1.02 * ref)
    assert ours.mean() <= 1.005 * ref.mean()


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_kmeans_is_a_fixed_point_of_lloyd(backend):
    # The returned partition assigns every point to its nearest cluster mean (Lloyd converged),
    # i.e. the incremental sums did not drift from the true cluster means.
    from torch_modularity.spectral import kmeans

    x = np.random.default_rng(3).standard_normal((3000, 8))
    for change_tol, agree in ((0.0, 0.999), (1e-3, 0.995)):  # strict, and the default early stop
        labels = kmeans(x, 10, 2, np.random.default_rng(0), change_tol=change_tol, backend=backend)
        means = np.stack([x[labels == c].mean(axis=0) for c in range(10)])
        nearest = ((x[:, None, :] - means[None]) ** 2).sum(axis=2).argmin(axis=1)
        assert np.mean(nearest == labels) > agree


@pytest.mark.parametrize("n_init,change_tol", [(1, 1e-3), (3, 1e-3), (3, 0.03), (2, 0.0)])
def test_native_and_numpy_kmeans_agree(n_init, change_tol):
    # The C kernel draws the same random numbers and computes the same steps: on generic data
    # (no ties) the labels are equal and the generator is left in the same state.
    from torch_modularity.spectral import kmeans

    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        centres = rng.normal(scale=3.0, size=(8, 6))
        x = centres[rng.integers(0, 8, 700)] + rng.normal(size=(700, 6))
        r_native, r_numpy = np.random.default_rng(seed), np.random.default_rng(seed)
        a = kmeans(x, 9, n_init, r_native, change_tol=change_tol, backend="native")
        b = kmeans(x, 9, n_init, r_numpy, change_tol=change_tol, backend="numpy")
        np.testing.assert_array_equal(a, b)
        assert r_native.bit_generator.state == r_numpy.bit_generator.state


def test_native_kmeans_degenerate_seeding_falls_back_to_the_same_draws():
    # Two distinct points (each repeated) and k = 3: after two centres every point sits on one,
    # the k-means++ potential is zero and the numpy version draws a distinct point at random;
    # the native path rewinds the generator and runs it, so both give the same labels.
    from torch_modularity.spectral import kmeans

    x = np.repeat(np.array([[0.0, 0.0], [1.0, 2.0]]), 20, axis=0)
    r_native, r_numpy = np.random.default_rng(5), np.random.default_rng(5)
    a = kmeans(x, 3, 2, r_native, backend="native")
    b = kmeans(x, 3, 2, r_numpy, backend="numpy")
    np.testing.assert_array_equal(a, b)
    assert r_native.bit_generator.state == r_numpy.bit_generator.state
    assert sorted(set(a.tolist())) == [0, 1, 2]
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 3, 2, np.random.default_rng(0), backend="fortran")


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_kmeans_rejects_non_finite_points(backend):
    from torch_modularity.spectral import kmeans

    x = np.random.default_rng(0).normal(size=(30, 3))
    x[4, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        kmeans(x, 3, 2, np.random.default_rng(0), backend=backend)


def test_lloyd_reseeding_never_empties_another_cluster():
    # The point farthest from its centre is alone in its cluster: moving it to the empty
    # cluster would empty that one (a NaN centre before). The farthest point of a cluster with
    # other members is taken instead; every centre stays finite.
    from torch_modularity.spectral import _lloyd

    x = np.array([[0.0], [0.0], [0.0], [2.0], [2.0], [20.0]])
    x_aug = np.hstack([x, np.ones((6, 1))])
    centres = np.array([[1.0], [10.0], [1000.0]])
    labels, final, inertia, dist = _lloyd(x_aug, (x ** 2).sum(axis=1), centres, 50, 0.0)
    assert np.isfinite(final).all() and np.isfinite(inertia)
    assert np.bincount(labels, minlength=3).min() > 0


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_kmeans_with_many_duplicate_points(backend):
    # Few distinct points, clusters close to their number: exactly k non-empty clusters, finite
    # (the suite turns RuntimeWarnings such as a 0/0 centre into errors), same on both backends.
    from torch_modularity.spectral import kmeans

    rng = np.random.default_rng(4)
    for k in (3, 5, 7):
        x = np.round(rng.normal(size=(40, 2)) * 0.6)
        labels = kmeans(x, k, 3, np.random.default_rng(k), backend=backend)
        assert sorted(set(labels.tolist())) == list(range(k))
        other = kmeans(x, k, 3, np.random.default_rng(k), backend="numpy" if backend == "native" else "native")
        np.testing.assert_array_equal(labels, other)


def test_lloyd_reseeds_an_empty_cluster_and_keeps_its_sums_exact():
    # A centre far from every point gets none in the first assignment: it is re-seeded with the
    # point farthest from its centre, and the incrementally kept sums stay the true cluster sums.
    from torch_modularity.spectral import _lloyd

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(size=(50, 3)), rng.normal(size=(50, 3)) + 6.0])
    x_aug = np.hstack([x, np.ones((100, 1))])
    centres = np.array([[0.0, 0, 0], [6.0, 6, 6], [100.0, 100, 100]])
    labels, final, inertia, dist = _lloyd(x_aug, (x ** 2).sum(axis=1), centres, 100, 0.0)
    assert np.bincount(labels, minlength=3).min() > 0
    assert np.all(final[2] < 50)  # the far centre moved to the data
    means = np.stack([x[labels == c].mean(axis=0) for c in range(3)])
    np.testing.assert_allclose(final, means, atol=1e-9)
    assert inertia == pytest.approx(_inertia(x, labels), rel=1e-9)


@pytest.mark.parametrize("n_init", [1, 3])
def test_kmeans_on_coincident_points_and_k_equal_n(n_init):
    # Seeding runs out of distinct far points (every remaining point sits on a centre): the
    # remaining centres are distinct random points; k == n gives one point per cluster.
    from torch_modularity.spectral import kmeans

    x = np.zeros((20, 3))
    x[0] = 1.0
    labels = kmeans(x, 5, n_init, np.random.default_rng(0))
    assert np.bincount(labels, minlength=5).min() == 1 and labels[0] != labels[1]
    y = np.random.default_rng(1).normal(size=(13, 4))
    assert sorted(kmeans(y, 13, n_init, np.random.default_rng(0)).tolist()) == list(range(13))
