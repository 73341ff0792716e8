"""The fast engine: refinement, precision, sparse blocks, degenerate spectra."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from torch_modularity import WeightGraph, clusterability, ncut, shuffle_weights, spectral_clustering, spectral_embedding
from torch_modularity import spectral
from torch_modularity.refine import native_available, refine_partition
from torch_modularity.spectral import _cluster_blocks, _ncut_from_blocks


def _pruned_mlp(sizes, density, seed):
    gen = torch.Generator().manual_seed(seed)
    ws = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        w = (torch.rand(n_out, n_in, generator=gen) * 2 - 1) / n_in ** 0.5
        ws.append(w * (torch.rand(n_out, n_in, generator=gen) < density))
    return WeightGraph.from_weights(ws)


def _as_csr_graph(graph):
    return WeightGraph(graph.layer_sizes, [(b.src, b.dst, sp.csr_matrix(b.weight.numpy())) for b in graph.blocks])


def _dense_laplacian_eigs(graph, k):
    a = graph.adjacency().toarray()
    d = a.sum(axis=1)
    m = a / np.sqrt(np.outer(d, d))
    vals, vecs = np.linalg.eigh(np.eye(len(d)) - m)
    return vals[:k], vecs[:, :k]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_never_raises_the_ncut(seed, monkeypatch):
    graph = _pruned_mlp([60, 80, 80, 10], 1.0, seed)
    blocks, colour = graph.numpy_blocks(), graph.layer_coloring()
    starts = []
    kmeans = spectral.kmeans

    def recording_kmeans(*args, **kwargs):
        starts.append(kmeans(*args, **kwargs))
        return starts[-1]

    monkeypatch.setattr(spectral, "kmeans", recording_kmeans)
    refined = _cluster_blocks(graph.layer_sizes, blocks, colour, 8, np.random.default_rng(seed), 3, refine=True)
    plain = _cluster_blocks(graph.layer_sizes, blocks, colour, 8, np.random.default_rng(seed), 3, refine=False)
    # Refinement may only lower the n-cut of the k-means partition it started from (stopped
    # earlier when refinement follows) ...
    assert refined.ncut <= ncut(graph, starts[0]) + 1e-12
    assert refined.ncut == pytest.approx(ncut(graph, refined.labels), abs=1e-12)
    assert len(np.unique(refined.labels)) == 8
    # ... and, on these graphs, ends below the fully converged k-means partition as well.
    assert refined.ncut <= plain.ncut + 1e-12


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_refine_partition_keeps_every_cluster_and_matches_bruteforce_ncut(backend):
    graph = _pruned_mlp([30, 40, 20], 1.0, 3)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, graph.num_nodes)
    labels[:6] = np.arange(6)  # every cluster non-empty at the start
    new, value = refine_partition(graph.layer_sizes, graph.numpy_blocks(), [[0, 2], [1]], labels, 6, graph.degrees(),
                                  backend=backend)
    assert value < ncut(graph, labels)
    assert value == pytest.approx(ncut(graph, new), abs=1e-10)
    assert np.bincount(new, minlength=6).min() >= 1


def test_native_refinement_kernel_is_built():
    # `pip install` compiles it (setup.py); without a C compiler the numpy version runs instead,
    # but the test environment is expected to have one, so a failed build does not go unnoticed.
    assert native_available(), "torch_modularity/_kernels.c was not built: reinstall with a C compiler"


def _skip_graph(seed):
    """A DAG with a skip connection (not bipartite: every layer is its own group)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [(0, 1, torch.rand(40, 30, generator=gen)), (1, 2, torch.rand(35, 40, generator=gen)),
              (0, 2, torch.rand(35, 30, generator=gen) * (torch.rand(35, 30, generator=gen) < 0.3))]
    return WeightGraph([30, 40, 35], blocks)


@pytest.mark.parametrize("case", ["chain-f32", "chain-f64", "skip-f64", "many-clusters"])
def test_native_and_numpy_refinement_make_the_same_moves(case):
    # The C kernel reproduces the numpy implementation step by step: on graphs with generic
    # weights (no ties) both end at the same labels; values agree to rounding.
    rng = np.random.default_rng(11)
    if case.startswith("chain"):
        graph = _pruned_mlp([50, 60, 60, 12], 1.0, 12)
        groups = [np.nonzero(graph.layer_coloring() == c)[0].tolist() for c in (0, 1)]
        k = 7
    elif case == "skip-f64":
        graph = _skip_graph(13)
        groups = [[0], [1], [2]]
        k = 6
    else:  # 12 clusters on 26 nodes: moves that would empty a cluster are dropped
        graph = _pruned_mlp([10, 12, 4], 1.0, 14)
        groups = [[0, 2], [1]]
        k = 12
    dtype = np.float32 if case == "chain-f32" else np.float64
    blocks = [(s, d, w.astype(dtype)) for s, d, w in graph.numpy_blocks(np.float64)]
    labels = rng.integers(0, k, graph.num_nodes)
    labels[rng.permutation(graph.num_nodes)[:k]] = np.arange(k)  # every cluster non-empty
    deg = graph.degrees()
    native = refine_partition(graph.layer_sizes, blocks, groups, labels, k, deg, return_start=True, backend="native")
    ref = refine_partition(graph.layer_sizes, blocks, groups, labels, k, deg, return_start=True, backend="numpy")
    np.testing.assert_array_equal(native[0], ref[0])
    # (the numpy version sums float32 products in float32, the kernel in float64)
    rel = 1e-6 if dtype == np.float32 else 1e-9
    assert native[1] == pytest.approx(ref[1], rel=rel) and native[2] == pytest.approx(ref[2], rel=rel)
    assert native[1] < native[2]  # it did move nodes
    assert native[1] == pytest.approx(ncut(graph, native[0]), rel=1e-5 if dtype == np.float32 else 1e-9)
    assert np.bincount(native[0], minlength=k).min() >= 1


def test_pipeline_without_the_compiled_kernels_gives_the_same_partition(monkeypatch):
    # An install without a C compiler runs the numpy versions: same labels, same n-cut.
    from torch_modularity import _native

    graph = _pruned_mlp([80, 60, 60, 10], 1.0, 17)
    with_kernels = clusterability(graph, n_clusters=6, n_shuffles=3, n_workers=1, seed=2)
    monkeypatch.setattr(_native, "kernels", lambda: None)
    assert not native_available()
    without = clusterability(graph, n_clusters=6, n_shuffles=3, n_workers=1, seed=2)
    np.testing.assert_array_equal(with_kernels.labels, without.labels)
    assert with_kernels.ncut == pytest.approx(without.ncut, rel=1e-9)
    np.testing.assert_allclose(with_kernels.shuffled_ncuts, without.shuffled_ncuts, rtol=1e-9)


def test_refinement_backends_on_many_small_random_graphs():
    # Random layer sizes (1-24 nodes), densities, cluster counts up to 14, float32/float64, with
    # and without a skip connection: both backends return exactly their reported n-cut (against
    # the float64 oracle), never worse than the start, with every cluster non-empty, and agree
    # on the labels except where gains tie within rounding (over 1200 graphs: 4 differed, 3 of
    # them float32, where the numpy version sums its products in float32).
    rng = np.random.default_rng(2024)
    agree = 0
    n_cases = 60
    for _ in range(n_cases):
        n_layers = int(rng.integers(2, 6))
        sizes = [int(v) for v in rng.integers(1, 25, n_layers)]
        dtype = np.float32 if rng.random() < 0.5 else np.float64
        dens = rng.uniform(0.2, 1.0)
        blocks = [(l, l + 1, (rng.random((sizes[l + 1], sizes[l])) * (rng.random((sizes[l + 1], sizes[l])) < dens)
                              + 1e-3).astype(dtype)) for l in range(n_layers - 1)]
        skip = n_layers >= 3 and rng.random() < 0.3
        if skip:
            blocks.append((0, 2, (rng.random((sizes[2], sizes[0])) * (rng.random((sizes[2], sizes[0])) < 0.5)).astype(dtype)))
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        n = int(offsets[-1])
        deg = np.zeros(n)
        for s, d, w in blocks:
            deg[offsets[d]:offsets[d + 1]] += w.sum(axis=1, dtype=np.float64)
            deg[offsets[s]:offsets[s + 1]] += w.sum(axis=0, dtype=np.float64)
        k = int(rng.integers(2, min(n, 14) + 1)) if n >= 2 else 1
        if n < 3:
            continue
        labels = rng.integers(0, k, n)
        labels[rng.permutation(n)[:k]] = np.arange(k)
        groups = [[l] for l in range(n_layers)] if skip else [list(range(0, n_layers, 2)), list(range(1, n_layers, 2))]
        start = _ncut_from_blocks(offsets, blocks, deg, labels, k)
        tol = 1e-5 if dtype == np.float32 else 1e-9
        results = []
        for backend in ("native", "numpy"):
            new, value = refine_partition(sizes, blocks, groups, labels, k, deg, backend=backend)
            exact = _ncut_from_blocks(offsets, blocks, deg, new, k)
            assert value == pytest.approx(exact, rel=tol, abs=tol)
            assert exact <= start + tol
            assert np.bincount(new, minlength=k).min() >= 1
            results.append(new)
        agree += bool(np.array_equal(*results))
    assert agree >= 0.9 * n_cases


def test_native_refinement_takes_dense_blocks_only():
    graph = _pruned_mlp([40, 50, 10], 0.3, 15)
    blocks = [(s, d, sp.csr_matrix(w) if s == 0 else w) for s, d, w in graph.numpy_blocks(np.float64)]
    labels = np.arange(graph.num_nodes) % 5
    with pytest.raises(RuntimeError, match="dense"):
        refine_partition(graph.layer_sizes, blocks, [[0, 2], [1]], labels, 5, graph.degrees(), backend="native")
    auto = refine_partition(graph.layer_sizes, blocks, [[0, 2], [1]], labels, 5, graph.degrees())  # numpy path
    ref = refine_partition(graph.layer_sizes, blocks, [[0, 2], [1]], labels, 5, graph.degrees(), backend="numpy")
    np.testing.assert_array_equal(auto[0], ref[0])
    with pytest.raises(ValueError, match="backend"):
        refine_partition(graph.layer_sizes, blocks, [[0, 2], [1]], labels, 5, graph.degrees(), backend="c")


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_refine_partition_rejects_inconsistent_inputs(backend):
    # The C kernel indexes with these without checks: bad ones must fail in Python, clearly.
    graph = _pruned_mlp([20, 30, 10], 1.0, 16)
    blocks, deg = graph.numpy_blocks(np.float64), graph.degrees()
    labels = np.arange(graph.num_nodes) % 4
    sizes = graph.layer_sizes
    with pytest.raises(ValueError, match="0..3"):
        refine_partition(sizes, blocks, [[0, 2], [1]], np.where(labels == 3, 4, labels), 4, deg, backend=backend)
    with pytest.raises(ValueError, match="0..3"):
        refine_partition(sizes, blocks, [[0, 2], [1]], labels - 1, 4, deg, backend=backend)
    with pytest.raises(ValueError, match="one entry per node"):
        refine_partition(sizes, blocks, [[0, 2], [1]], labels[:-1], 4, deg, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        refine_partition(sizes, [(0, 1, blocks[0][2].T), blocks[1]], [[0, 2], [1]], labels, 4, deg, backend=backend)
    with pytest.raises(ValueError, match="outside"):
        refine_partition(sizes, [(0, 3, blocks[0][2])], [[0, 2], [1]], labels, 4, deg, backend=backend)
    with pytest.raises(ValueError, match="distinct layers"):
        refine_partition(sizes, blocks, [[0, 2], [1, 2]], labels, 4, deg, backend=backend)
    with pytest.raises(ValueError, match="finite"):
        refine_partition(sizes, blocks, [[0, 2], [1]], labels, 4, np.where(np.arange(len(deg)) == 3, np.nan, deg),
                         backend=backend)


def test_sparse_and_dense_blocks_agree():
    dense = _pruned_mlp([200, 300, 300, 10], 0.2, 4)
    csr = _as_csr_graph(dense)
    assert any(sp.issparse(w) for _, _, w in csr.numpy_blocks())
    emb_d = spectral_embedding(dense, 6, seed=0, dtype=np.float64)
    emb_s = spectral_embedding(csr, 6, seed=0, dtype=np.float64)
    np.testing.assert_allclose(emb_d.eigenvalues, emb_s.eigenvalues, atol=1e-8)
    ref_vals, _ = _dense_laplacian_eigs(dense, 6)
    np.testing.assert_allclose(emb_s.eigenvalues, ref_vals, atol=1e-8)
    # Shuffles of the two representations are drawn identically, so whole results agree.
    res_d = clusterability(dense, n_clusters=6, n_shuffles=3, n_workers=1, dtype=np.float64)
    res_s = clusterability(csr, n_clusters=6, n_shuffles=3, n_workers=1, dtype=np.float64)
    assert res_d.ncut == pytest.approx(res_s.ncut, abs=1e-6)
    np.testing.assert_allclose(res_d.shuffled_ncuts, res_s.shuffled_ncuts, atol=1e-6)


def test_auto_sparse_choice_for_pruned_dense_layers():
    graph = _pruned_mlp([400, 400, 10], 0.05, 5)
    kinds = [sp.issparse(w) for _, _, w in graph.numpy_blocks()]
    assert kinds == [True, False]  # the 400x400 layer is large and sparse; the 10x400 one is small


def test_float32_engine_agrees_with_float64():
    graph = _pruned_mlp([100, 120, 120, 10], 1.0, 6)
    e64 = spectral_embedding(graph, 8, dtype=np.float64)
    e32 = spectral_embedding(graph, 8, dtype=np.float32)
    np.testing.assert_allclose(e32.eigenvalues, e64.eigenvalues, atol=2e-5)
    # Same subspace up to float32 accuracy.
    s = np.linalg.svd(e64.eigenvectors.T @ e32.eigenvectors.astype(np.float64), compute_uv=False)
    assert s.min() > 1 - 1e-3


def test_many_isolated_nodes_and_components():
    # Two disjoint chains plus isolated units: clustered per component, isolated units -1.
    gen = torch.Generator().manual_seed(7)
    w1 = torch.rand(20, 30, generator=gen)
    w2 = torch.rand(10, 20, generator=gen)
    w1[:, 25:] = 0  # five isolated input units
    blocks = [(0, 1, w1), (1, 2, w2), (3, 4, torch.rand(15, 12, generator=gen))]
    graph = WeightGraph([30, 20, 10, 12, 15], blocks)
    res = clusterability(graph, n_clusters=6, n_shuffles=2, n_workers=1)
    assert res.n_isolated == 5 and res.n_components == 2
    assert (res.labels[25:30] == -1).all() and len(set(res.labels[res.labels >= 0])) == 6
    assert np.isfinite(res.shuffled_ncuts).all()


def test_k_close_to_number_of_nodes():
    graph = _pruned_mlp([6, 5, 3], 1.0, 8)
    labels = spectral_clustering(graph, n_clusters=13, seed=0)
    assert sorted(set(labels.tolist())) == list(range(13))
    assert 0 <= ncut(graph, labels) <= 13


def test_degenerate_spectrum_is_handled():
    # All-equal weights: the normalized adjacency has massively repeated eigenvalues.
    graph = WeightGraph.from_weights([torch.ones(40, 30), torch.ones(20, 40)])
    emb = spectral_embedding(graph, 5, dtype=np.float64)
    ref_vals, _ = _dense_laplacian_eigs(graph, 5)
    np.testing.assert_allclose(emb.eigenvalues, ref_vals, atol=1e-8)
    labels = spectral_clustering(graph, n_clusters=5)
    assert len(set(labels.tolist())) == 5 and np.isfinite(ncut(graph, labels))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_computed_in_float32(dtype):
    gen = torch.Generator().manual_seed(9)
    ws = [torch.rand(30, 20, generator=gen).to(dtype), torch.rand(5, 30, generator=gen).to(dtype)]
    graph = WeightGraph.from_weights(ws)
    ref = WeightGraph.from_weights([w.float() for w in ws])
    assert graph.blocks[0].weight.dtype == torch.float32
    np.testing.assert_allclose(spectral_embedding(graph, 4).eigenvalues, spectral_embedding(ref, 4).eigenvalues)


def test_layer_shuffle_of_csr_matches_dense():
    w = np.random.default_rng(0).random((30, 40))
    w[w < 0.7] = 0
    for method in ("layer", "layer_nonzero"):
        a = shuffle_weights([w], method, np.random.default_rng(1))[0]
        b = shuffle_weights([sp.csr_matrix(w)], method, np.random.default_rng(1))[0]
        np.testing.assert_array_equal(a, b.toarray())


def test_block_solver_path_matches_dense(monkeypatch):
    import torch_modularity.spectral as spectral

    # Planted modules: the top-k eigenvalues stand clear of the bulk, so the block solver's
    # residual tolerance (1e-3) pins the subspace down.
    rng = np.random.default_rng(0)
    sizes, k = [60, 80, 80, 40], 4
    modules = [rng.integers(0, k, n) for n in sizes]
    ws = []
    for i in range(3):
        w = rng.uniform(0.0, 0.1, (sizes[i + 1], sizes[i]))
        w[modules[i + 1][:, None] == modules[i][None, :]] += 1.0
        ws.append(torch.from_numpy(w))
    graph = WeightGraph.from_weights(ws)
    monkeypatch.setattr(spectral, "_BLOCK_SOLVER_MIN", 10)
    emb = spectral_embedding(graph, k, dtype=np.float64)
    ref_vals, ref_vecs = _dense_laplacian_eigs(graph, k)
    np.testing.assert_allclose(emb.eigenvalues, ref_vals, atol=1e-3)
    s = np.linalg.svd(ref_vecs.T @ emb.eigenvectors, compute_uv=False)
    assert s.min() > 0.999
    labels = spectral_clustering(graph, n_clusters=k, seed=0)
    planted = np.concatenate(modules)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(planted, labels) > 0.95


def test_all_zero_weights_give_a_clear_error():
    with pytest.raises(ValueError, match="isolated"):
        clusterability([torch.zeros(3, 4), torch.zeros(2, 3)], n_clusters=2, n_shuffles=0)


def test_exclude_dead_measures_the_live_subgraph():
    gen = torch.Generator().manual_seed(11)
    w1 = torch.rand(20, 30, generator=gen)
    w2 = torch.rand(10, 20, generator=gen)
    w2[:, :5] *= 1e-7  # hidden units 0-4 feed (almost) nothing forward: dead
    graph = WeightGraph.from_weights([w1, w2])
    full = clusterability(graph, n_clusters=4, n_shuffles=3, n_workers=1)
    live = clusterability(graph, n_clusters=4, n_shuffles=3, n_workers=1, exclude_dead=True)
    dead_ids = 30 + np.arange(5)
    assert full.n_dead == live.n_dead == 5 and not full.exclude_dead and live.exclude_dead
    assert (live.labels[dead_ids] == -1).all() and (live.labels >= 0).sum() == graph.num_nodes - 5
    # The same as measuring the hand-made live subgraph (same seed, same pipeline).
    keep = np.ones(graph.num_nodes, dtype=bool)
    keep[dead_ids] = False
    by_hand = clusterability(graph.subgraph(keep)[0], n_clusters=4, n_shuffles=3, n_workers=1)
    assert live.ncut == pytest.approx(by_hand.ncut, abs=1e-12)
    np.testing.assert_allclose(live.shuffled_ncuts, by_hand.shuffled_ncuts, atol=1e-12)
    assert ncut(graph, live.labels) >= 0


def test_exclude_dead_needs_a_chain():
    blocks = [(0, 1, torch.rand(4, 3)), (1, 2, torch.rand(2, 4)), (0, 2, torch.rand(2, 3))]
    graph = WeightGraph([3, 4, 2], blocks)
    assert clusterability(graph, n_clusters=2, n_shuffles=0).n_dead is None
    with pytest.raises(ValueError, match="chain"):
        clusterability(graph, n_clusters=2, n_shuffles=0, exclude_dead=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_solver_and_clustering_ignore_an_autocast_region(monkeypatch, dtype):
    """A measurement made inside ``torch.autocast`` (e.g. from a mixed-precision training step)
    gives the same embedding and labels as outside: the block solver's torch products stay in
    their own dtype (without the guard the float32 products ran in bfloat16 and the result could not
    be read back; autocast leaves float64 alone)."""
    import torch_modularity.spectral as spectral

    monkeypatch.setattr(spectral, "_BLOCK_SOLVER_MIN", 10)
    gen = torch.Generator().manual_seed(3)
    graph = WeightGraph.from_weights([torch.rand(40, 60, generator=gen), torch.rand(50, 40, generator=gen),
                                      torch.rand(30, 50, generator=gen)])
    plain = spectral_embedding(graph, 6, dtype=dtype)
    labels = spectral_clustering(graph, n_clusters=6, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = spectral_embedding(graph, 6, dtype=dtype)
        labels_inside = spectral_clustering(graph, n_clusters=6, seed=0)
    np.testing.assert_array_equal(plain.eigenvectors, inside.eigenvectors)
    np.testing.assert_array_equal(labels, labels_inside)
