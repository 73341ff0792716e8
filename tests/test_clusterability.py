"""clusterability(): statistics (method.md 3.3), reproducibility across executors, bad input."""
from __future__ import annotations

import concurrent.futures as cf
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from torch_modularity import ClusterabilityResult, WeightGraph, clusterability, ncut

K = 4
N_SHUFFLES = 6


def _result(ncut_value, shuffled):
    """A ClusterabilityResult with only the statistics inputs mattering."""
    return ClusterabilityResult(
        ncut=ncut_value, labels=np.zeros(4, dtype=np.int64), shuffled_ncuts=np.asarray(shuffled, dtype=float),
        n_clusters=2, shuffle="layer", seed=0, num_nodes=4, n_isolated=0, n_components=1,
        eigenvalues=np.zeros(2), shuffled_isolated=np.zeros(len(shuffled), dtype=np.int64),
        layer_names=("a", "b"), layer_sizes=(2, 2),
    )


@pytest.fixture
def small_graph(mlp_weights):
    return WeightGraph.from_weights(mlp_weights([12, 16, 16, 6], seed=0))


@pytest.fixture
def reference_result(small_graph):
    """The in-process run (n_workers=1) every executor must reproduce exactly."""
    return clusterability(small_graph, n_clusters=K, n_shuffles=N_SHUFFLES, seed=3, n_workers=1)


def _assert_same_result(a, b):
    assert a.ncut == b.ncut
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.shuffled_ncuts, b.shuffled_ncuts)
    np.testing.assert_array_equal(a.shuffled_isolated, b.shuffled_isolated)
    assert (a.z, a.p_value) == (b.z, b.p_value)


# --------------------------------------------------------------------------- statistics
def test_p_value_edge_cases_of_the_original_tests():
    # compute_pvalue(0, arange(100)) = 1/101; (1, ...) = 2/101; (101, ...) = 1
    shuffled = np.arange(100)
    assert _result(0.0, shuffled).p_value == pytest.approx(1 / 101)
    assert _result(1.0, shuffled).p_value == pytest.approx(2 / 101)
    assert _result(101.0, shuffled).p_value == pytest.approx(1.0)
    # ties do not count as "below": 50 values (0..49) are < 50
    assert _result(50.0, shuffled).p_value == pytest.approx(51 / 101)


def test_mean_std_z_use_population_std():
    shuffled = np.arange(100.0)
    r = _result(0.0, shuffled)
    # mean 49.5; population variance of 0..99 is (100^2 - 1) / 12 = 833.25
    assert r.mean == pytest.approx(49.5)
    assert r.std == pytest.approx(math.sqrt(833.25))
    assert r.z == pytest.approx((0.0 - 49.5) / math.sqrt(833.25))
    assert r.n_shuffles == 100


def test_zero_spread_gives_no_finite_z_and_valid_json():
    r = _result(1.0, [2.0, 2.0, 2.0])
    assert r.std == 0.0
    assert not math.isfinite(r.z)  # no spread: z is undefined, never a made-up number
    assert r.p_value == pytest.approx(1 / 4)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["z"] is None


def test_statistics_match_the_shuffled_ncuts(reference_result):
    r = reference_result
    s = np.asarray(r.shuffled_ncuts)
    assert s.shape == (N_SHUFFLES,)
    assert np.all(np.isfinite(s)) and np.all((s >= 0) & (s <= K))
    assert r.n_shuffles == N_SHUFFLES
    assert r.mean == pytest.approx(float(np.mean(s)), rel=1e-12)
    assert r.std == pytest.approx(float(np.std(s, ddof=0)), rel=1e-12)
    assert r.z == pytest.approx((r.ncut - np.mean(s)) / np.std(s), rel=1e-9)
    assert r.p_value == pytest.approx((1 + np.sum(s < r.ncut)) / (N_SHUFFLES + 1))
    assert 1 / (N_SHUFFLES + 1) <= r.p_value <= 1.0
    assert (r.n_clusters, r.shuffle, r.seed) == (K, "layer", 3)


def test_zero_shuffles_give_nan_statistics_and_json(small_graph):
    r = clusterability(small_graph, n_clusters=K, n_shuffles=0, n_workers=1)
    assert r.n_shuffles == 0
    for x in (r.mean, r.std, r.z, r.p_value):
        assert math.isnan(x)
    assert 0.0 <= r.ncut <= K
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["shuffled_ncuts"] == []
    assert d["mean"] is None and d["z"] is None and d["p_value"] is None


def test_to_dict_is_json_and_matches_the_result(reference_result):
    r = reference_result
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["ncut"] == r.ncut
    assert d["shuffled_ncuts"] == r.shuffled_ncuts.tolist()
    assert d["n_clusters"] == K and d["n_shuffles"] == N_SHUFFLES and d["shuffle"] == "layer" and d["seed"] == 3
    assert d["mean"] == pytest.approx(r.mean) and d["std"] == pytest.approx(r.std)
    assert d["z"] == pytest.approx(r.z) and d["p_value"] == pytest.approx(r.p_value)
    assert d["labels"] == r.labels.tolist()
    assert d["num_nodes"] == 50 and d["n_isolated"] == 0 and d["n_components"] == 1


# --------------------------------------------------------------------------- the network's partition
def test_network_ncut_equals_independent_ncut_of_its_labels(small_graph, reference_result, brute_ncut):
    r = reference_result
    assert r.labels.shape == (small_graph.num_nodes,)
    assert sorted(np.unique(r.labels).tolist()) == list(range(K))
    assert r.ncut == pytest.approx(ncut(small_graph, r.labels), rel=1e-9)
    assert r.ncut == pytest.approx(brute_ncut(small_graph.adjacency(), r.labels), rel=1e-9)


def test_clusters_by_layer_counts_units(small_graph, reference_result):
    counts = reference_result.clusters_by_layer()
    assert counts.shape == (4, K)
    np.testing.assert_array_equal(counts.sum(axis=1), small_graph.layer_sizes)
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(reference_result.labels, minlength=K))


def test_accepts_module_state_dict_and_weight_list():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 5))
    via_graph = clusterability(WeightGraph.from_module(model), n_clusters=3, n_shuffles=3, n_workers=1)
    for obj in (model, model.state_dict(), [model[0].weight, model[2].weight]):
        _assert_same_result(clusterability(obj, n_clusters=3, n_shuffles=3, n_workers=1), via_graph)


# --------------------------------------------------------------------------- pruned graphs
def _pruned_graph():
    """40-30-10 net with 12 isolated units and a very sparse first layer.

    Isolated: inputs 30..39 (zero columns), hidden unit 29 (zero row of W0 and zero column
    of W1), output unit 9 (zero row of W1). The other 30 inputs feed hidden units 0..28
    through 30 + 10 non-zero weights, so a 'layer' shuffle of that block leaves some units
    without edges.
    """
    rng = np.random.default_rng(21)
    w0 = np.zeros((30, 40))
    w0[np.arange(30) % 29, np.arange(30)] = rng.uniform(0.5, 1.0, 30)
    extra_rows, extra_cols = rng.integers(0, 29, 10), rng.integers(0, 30, 10)
    w0[extra_rows, extra_cols] = rng.uniform(0.5, 1.0, 10)
    w1 = rng.uniform(0.1, 1.0, (10, 30))
    w1[:, 29] = 0
    w1[9, :] = 0
    return WeightGraph.from_weights([w0, w1])


def test_pruned_graph_isolated_nodes_and_shuffle_baseline(brute_ncut):
    g = _pruned_graph()
    isolated = np.asarray(g.adjacency().sum(axis=1)).ravel() == 0
    assert isolated.sum() == 12
    r = clusterability(g, n_clusters=K, n_shuffles=N_SHUFFLES, shuffle="layer", seed=1, n_workers=1)
    assert r.num_nodes == 80
    assert r.n_isolated == 12
    np.testing.assert_array_equal(r.labels == -1, isolated)
    assert r.ncut == pytest.approx(brute_ncut(g.adjacency(), r.labels), rel=1e-9)
    # 'layer' moves the sparse mask: shuffles of the 68-node graph lose units of their own
    iso = np.asarray(r.shuffled_isolated)
    assert iso.shape == (N_SHUFFLES,)
    assert iso.min() >= 0 and iso.max() <= 68 - K
    assert iso.sum() > 0
    assert r.to_dict()["shuffled_isolated_mean"] == pytest.approx(iso.mean())
    # clusters_by_layer counts only the kept units of each layer
    kept_per_layer = [int((~isolated[a:b]).sum()) for a, b in [(0, 40), (40, 70), (70, 80)]]
    assert kept_per_layer == [30, 29, 9]
    np.testing.assert_array_equal(r.clusters_by_layer().sum(axis=1), kept_per_layer)


def test_pruned_graph_layer_nonzero_keeps_mask_so_no_new_isolated_nodes():
    r = clusterability(_pruned_graph(), n_clusters=K, n_shuffles=N_SHUFFLES, shuffle="layer_nonzero", seed=1, n_workers=1)
    assert r.n_isolated == 12
    assert r.shuffle == "layer_nonzero"
    np.testing.assert_array_equal(r.shuffled_isolated, np.zeros(N_SHUFFLES))
    assert np.all(np.isfinite(r.shuffled_ncuts))


# --------------------------------------------------------------------------- reproducibility
def test_each_shuffle_depends_only_on_seed_and_index(small_graph, reference_result):
    fewer = clusterability(small_graph, n_clusters=K, n_shuffles=4, seed=3, n_workers=1)
    assert fewer.ncut == reference_result.ncut
    np.testing.assert_array_equal(fewer.shuffled_ncuts, reference_result.shuffled_ncuts[:4])
    other_seed = clusterability(small_graph, n_clusters=K, n_shuffles=N_SHUFFLES, seed=4, n_workers=1)
    assert not np.array_equal(other_seed.shuffled_ncuts, reference_result.shuffled_ncuts)


def test_same_result_for_one_and_two_workers(small_graph, reference_result):
    again = clusterability(small_graph, n_clusters=K, n_shuffles=N_SHUFFLES, seed=3, n_workers=1)
    _assert_same_result(again, reference_result)
    two = clusterability(small_graph, n_clusters=K, n_shuffles=N_SHUFFLES, seed=3, n_workers=2)
    _assert_same_result(two, reference_result)


def test_same_result_with_a_user_thread_pool(small_graph, reference_result):
    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        threaded = clusterability(small_graph, n_clusters=K, n_shuffles=N_SHUFFLES, seed=3, executor=pool)
        # the executor is the user's: it must still be usable afterwards
        assert pool.submit(sum, [1, 2]).result() == 3
    _assert_same_result(threaded, reference_result)


def test_global_rng_state_untouched(small_graph):
    torch_state = torch.random.get_rng_state().clone()
    np_state = np.random.get_state()
    clusterability(small_graph, n_clusters=K, n_shuffles=3, seed=0, n_workers=1)
    clusterability(small_graph, n_clusters=K, n_shuffles=3, seed=0, n_workers=2)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()
    np.testing.assert_array_equal(after[1], np_state[1])
    assert after[0] == np_state[0] and after[2:] == np_state[2:]


def test_dask_distributed_executor_matches_local_pool(small_graph, reference_result):
    from distributed import Client, LocalCluster

    # the local process pool first: forking is safest before Dask starts its threads
    local_pool = clusterability(small_graph, n_clusters=K, n_shuffles=N_SHUFFLES, seed=3, n_workers=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            on_dask = clusterability(small_graph, n_clusters=K, n_shuffles=N_SHUFFLES, seed=3,
                                     executor=client.get_executor())
    _assert_same_result(on_dask, local_pool)
    _assert_same_result(on_dask, reference_result)


# --------------------------------------------------------------------------- bad input
def test_unknown_shuffle_raises(small_graph):
    with pytest.raises(ValueError, match="shuffle"):
        clusterability(small_graph, n_clusters=K, n_shuffles=2, shuffle="columns", n_workers=1)


@pytest.mark.parametrize("k", [1, 0, -2])
def test_too_few_clusters_raise(small_graph, k):
    with pytest.raises(ValueError, match="at least 2"):
        clusterability(small_graph, n_clusters=k, n_shuffles=2, n_workers=1)


def test_more_clusters_than_non_isolated_nodes_raise():
    g = _pruned_graph()  # 80 nodes, 68 non-isolated
    with pytest.raises(ValueError, match="non-isolated") as info:
        clusterability(g, n_clusters=69, n_shuffles=2, n_workers=1)
    assert "68" in str(info.value)


def test_negative_shuffles_raise(small_graph):
    with pytest.raises(ValueError, match="n_shuffles"):
        clusterability(small_graph, n_clusters=K, n_shuffles=-1, n_workers=1)


def test_non_integer_cluster_count_raises(small_graph):
    with pytest.raises((TypeError, ValueError), match="n_clusters"):
        clusterability(small_graph, n_clusters=2.5, n_shuffles=2, n_workers=1)


@pytest.mark.parametrize("seed", [None, -1, 1.5, "0", True])
def test_every_entry_point_refuses_a_seed_that_is_not_a_non_negative_int(seed):
    """``seed=None`` used to draw fresh OS entropy in ``spectral_clustering`` (a result nobody can
    reproduce) and fail with an unrelated message elsewhere; floats were truncated silently."""
    from torch_modularity import ClusterabilityMonitor, SpectralRegularizer, spectral_clustering, spectral_embedding

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    graph = WeightGraph.from_weights([torch.rand(10, 12, generator=gen), torch.rand(4, 10, generator=gen)])
    calls = [
        lambda: clusterability(graph, n_clusters=3, n_shuffles=2, seed=seed),
        lambda: spectral_clustering(graph, n_clusters=3, seed=seed),
        lambda: spectral_embedding(graph, 3, seed=seed),
        lambda: SpectralRegularizer(model, n_eigs=2, seed=seed),
        lambda: ClusterabilityMonitor(model, n_clusters=3, seed=seed, writer=None),
    ]
    for call in calls:
        with pytest.raises((TypeError, ValueError), match="seed must be a non-negative int"):
            call()
    assert clusterability(graph, n_clusters=3, n_shuffles=2, seed=np.int64(3)).seed == 3  # numpy ints are ints
