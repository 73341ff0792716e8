"""n-cut (method.md 2.2) against networkx, a dense brute force and hand-derived values."""
from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
import pytest
import torch

from torch_modularity import WeightGraph, ncut


# --------------------------------------------------------------------------- networkx (2-way)
@pytest.mark.parametrize("sizes, seed", [([6, 8, 5], 0), ([10, 12, 12, 4], 1), ([7, 9, 9, 9, 3], 2)])
def test_two_way_ncut_equals_networkx_on_mlp_graphs(mlp_weights, sizes, seed):
    g = WeightGraph.from_weights(mlp_weights(sizes, seed=seed))
    G = nx.from_scipy_sparse_array(g.adjacency())
    rng = np.random.default_rng(seed)
    for _ in range(3):
        labels = rng.integers(0, 2, g.num_nodes)
        labels[:2] = [0, 1]  # both sides non-empty
        S = set(np.nonzero(labels == 1)[0].tolist())
        expected = nx.normalized_cut_size(G, S, weight="weight")
        assert ncut(g, labels) == pytest.approx(expected, rel=1e-7)


def test_two_way_ncut_equals_networkx_on_dense_random_graph():
    """The original test: G(20, 0.8) with random weights, even/odd bipartition.

    A general graph is a WeightGraph with one node per layer and a 1x1 block per edge.
    The networkx graph is built from the edge list directly, not from our adjacency.
    """
    G = nx.gnp_random_graph(20, 0.8, seed=42)
    rng = np.random.default_rng(0)
    for u, v in G.edges():
        G[u][v]["weight"] = float(rng.uniform(0.1, 2.0))
    blocks = [(u, v, torch.tensor([[G[u][v]["weight"]]], dtype=torch.float64)) for u, v in G.edges()]
    g = WeightGraph([1] * 20, blocks)
    assert g.layer_coloring() is None  # genuinely non-bipartite
    labels = np.arange(20) % 2
    expected = nx.normalized_cut_size(G, set(range(0, 20, 2)), set(range(1, 20, 2)), weight="weight")
    assert ncut(g, labels) == pytest.approx(expected, rel=1e-7)
    # and the adjacency we hand to oracles is this very graph
    np.testing.assert_allclose(g.adjacency().toarray(), nx.to_numpy_array(G, nodelist=range(20)), rtol=0, atol=0)


# --------------------------------------------------------------------------- brute force (k-way)
@pytest.mark.parametrize("k", [3, 5, 12])
def test_k_way_ncut_equals_brute_force(mlp_weights, brute_ncut, k):
    g = WeightGraph.from_weights(mlp_weights([15, 20, 20, 8], seed=k, density=0.7))
    a = g.adjacency()
    rng = np.random.default_rng(k)
    for _ in range(3):
        labels = rng.integers(0, k, g.num_nodes)
        assert ncut(g, labels) == pytest.approx(brute_ncut(a, labels), rel=1e-10)


def test_k_way_ncut_of_float32_weights_equals_brute_force(mlp_weights, brute_ncut):
    # torch's default dtype: the oracle sums the same float32 values in float64, so the
    # library may differ only by float32 rounding
    g = WeightGraph.from_weights(mlp_weights([15, 20, 20, 8], seed=11, dtype=torch.float32))
    labels = np.random.default_rng(11).integers(0, 6, g.num_nodes)
    assert ncut(g, labels) == pytest.approx(brute_ncut(g.adjacency(), labels), rel=1e-6)


def test_k_way_ncut_with_ignored_nodes_equals_brute_force(mlp_weights, brute_ncut):
    g = WeightGraph.from_weights(mlp_weights([10, 14, 6], seed=5))
    rng = np.random.default_rng(5)
    labels = rng.integers(-1, 4, g.num_nodes)  # about a fifth of the nodes are -1
    assert (labels == -1).sum() > 3
    assert ncut(g, labels) == pytest.approx(brute_ncut(g.adjacency(), labels), rel=1e-10)


def test_ncut_is_invariant_to_cluster_ids(mlp_weights):
    g = WeightGraph.from_weights(mlp_weights([8, 10, 4], seed=6))
    labels = np.random.default_rng(6).integers(0, 3, g.num_nodes)
    renamed = np.array([17, 3, 42])[labels]  # non-contiguous, permuted ids
    assert ncut(g, renamed) == pytest.approx(ncut(g, labels), rel=1e-12)


def test_ncut_lies_in_zero_k(mlp_weights):
    g = WeightGraph.from_weights(mlp_weights([12, 12, 12], seed=7))
    rng = np.random.default_rng(7)
    for k in (2, 4, 9):
        for _ in range(4):
            labels = rng.integers(0, k, g.num_nodes)
            value = ncut(g, labels)
            assert 0.0 <= value <= len(np.unique(labels))


def test_ncut_of_a_partition_that_cuts_nothing_is_zero_not_negative(mlp_weights):
    # The documented range is [0, k]. Computing cut_c as vol_c - internal_c by subtraction
    # can round to a tiny negative number; a partition that cuts no edge must give 0.
    g = WeightGraph.from_weights(mlp_weights([12, 12, 12], seed=7))
    one_cluster = ncut(g, np.zeros(g.num_nodes, dtype=int))
    assert one_cluster == pytest.approx(0.0, abs=1e-12)
    assert one_cluster >= 0.0


# --------------------------------------------------------------------------- hand-derived fixtures
# A 2-2-2 net. Node ids: inputs 0, 1; hidden 2, 3; outputs 4, 5.
#   W0 (hidden x input) = [[1, 2], [3, 4]]   edges 2-0:1, 2-1:2, 3-0:3, 3-1:4
#   W1 (output x hidden) = [[5, -6], [7, 8]] edges 4-2:5, 4-3:6 (|w|), 5-2:7, 5-3:8
# Degrees: d0 = 1+3 = 4, d1 = 2+4 = 6, d2 = 1+2+5+7 = 15, d3 = 3+4+6+8 = 21,
#          d4 = 5+6 = 11, d5 = 7+8 = 15 (total 72 = 2 * (1+...+8)).
W_222 = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, -6.0], [7.0, 8.0]])]


def test_hand_derived_222_alternating_labels():
    # clusters {0, 2, 4} and {1, 3, 5}
    # cut_0 = edges 0-3 (3) + 2-1 (2) + 2-5 (7) + 4-3 (6) = 18 = cut_1
    # vol_0 = 4 + 15 + 11 = 30, vol_1 = 6 + 21 + 15 = 42
    # n-cut = 18/30 + 18/42 = 3/5 + 3/7 = 36/35
    assert ncut(WeightGraph.from_weights(W_222), [0, 1, 0, 1, 0, 1]) == pytest.approx(36 / 35, rel=1e-8)


def test_hand_derived_222_layer_split():
    # clusters {0, 1, 2, 3} and {4, 5}: the cut is all of W1: 5 + 6 + 7 + 8 = 26
    # vol_0 = 4 + 6 + 15 + 21 = 46, vol_1 = 11 + 15 = 26; n-cut = 26/46 + 26/26 = 36/23
    assert ncut(WeightGraph.from_weights(W_222), [0, 0, 0, 0, 1, 1]) == pytest.approx(36 / 23, rel=1e-8)


def test_hand_derived_222_ignored_nodes_count_as_cut():
    g = WeightGraph.from_weights(W_222)
    # hidden layer ignored: cluster {0,1} loses all of W0 (10) with vol 10; {4,5} all of W1 (26)
    # with vol 26. Edges to the ignored nodes are cut: 10/10 + 26/26 = 2.
    assert ncut(g, [0, 0, -1, -1, 1, 1]) == pytest.approx(2.0, rel=1e-8)
    # only node 3 ignored, everything else one cluster: cut = d3 = 21, vol = 72 - 21 = 51
    # -> 21/51 = 7/17; node 3 itself is not scored.
    assert ncut(g, [0, 0, 0, -1, 0, 0]) == pytest.approx(7 / 17, rel=1e-8)
    # nothing scored -> empty sum
    assert ncut(g, [-1] * 6) == 0.0


def test_hand_derived_disjoint_edges():
    # eye(2): edges 0-2 and 1-3 of weight 1. {0,2},{1,3} cuts nothing; {0,1},{2,3} cuts
    # both edges: 2/2 + 2/2 = 2.
    g = WeightGraph.from_weights([torch.eye(2)])
    assert ncut(g, [0, 1, 0, 1]) == 0.0
    assert ncut(g, [0, 0, 1, 1]) == pytest.approx(2.0, rel=1e-8)


def test_ncut_accepts_weight_lists_and_float_integral_labels():
    value = ncut(W_222, np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert value == pytest.approx(36 / 35, rel=1e-8)


# --------------------------------------------------------------------------- bad labels
def test_wrong_length_labels_raise():
    g = WeightGraph.from_weights(W_222)
    with pytest.raises(ValueError, match="one entry per node"):
        ncut(g, [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="one entry per node"):
        ncut(g, [0, 1, 0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="one entry per node"):
        ncut(g, np.zeros((6, 1), dtype=int))


def test_labels_below_minus_one_raise():
    with pytest.raises(ValueError, match=">= -1"):
        ncut(WeightGraph.from_weights(W_222), [0, 1, -2, 1, 0, 1])


@pytest.mark.parametrize("bad", [0.5, float("nan")])
def test_non_integer_labels_raise(bad):
    with pytest.raises(ValueError, match="integer"):
        ncut(WeightGraph.from_weights(W_222), [0, 1, bad, 1, 0, 1])


def test_infinite_label_raises_clean_value_error():
    # An infinite label must give the library's ValueError, not a numpy RuntimeWarning
    # ("invalid value encountered in remainder"); setup.cfg turns RuntimeWarnings from
    # torch_modularity into errors, and users should not see numpy internals either.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="integer"):
            ncut(WeightGraph.from_weights(W_222), [0, 1, np.inf, 1, 0, 1])


def test_string_labels_raise_an_error_naming_labels():
    # Text cluster names are not cluster ids: the error must say so, not leak a numpy ufunc error.
    with pytest.raises((ValueError, TypeError), match="(?i)label"):
        ncut(WeightGraph.from_weights(W_222), ["a", "b", "a", "b", "a", "b"])
