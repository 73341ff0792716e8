"""WeightGraph construction (method.md section 1.1-1.2) and its input validation."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn.utils import prune

from torch_modularity import WeightGraph
from torch_modularity.graph import expand_labels


# --------------------------------------------------------------------------- from_weights
def test_from_weights_layout_and_adjacency_blocks(mlp_weights):
    ws = mlp_weights([5, 4, 3, 2], seed=1)  # torch layout (out, in); signed entries
    g = WeightGraph.from_weights(ws)
    assert g.layer_sizes == (5, 4, 3, 2)
    assert g.num_nodes == 14
    assert list(g.layer_offsets) == [0, 5, 9, 12, 14]

    a = g.adjacency()
    assert isinstance(a, sp.csr_matrix)
    assert a.shape == (14, 14)
    a = a.toarray()
    off = [0, 5, 9, 12, 14]
    for l, w in enumerate(ws):
        absw = w.abs().numpy()
        # rows of W are the receiving layer l+1, columns the sending layer l
        np.testing.assert_array_equal(a[off[l + 1]:off[l + 2], off[l]:off[l + 1]], absw)
        np.testing.assert_array_equal(a[off[l]:off[l + 1], off[l + 1]:off[l + 2]], absw.T)
    # nothing outside the blocks of consecutive layers
    for i in range(4):
        for j in range(4):
            if abs(i - j) != 1:
                assert not a[off[i]:off[i + 1], off[j]:off[j + 1]].any(), (i, j)
    np.testing.assert_array_equal(a, a.T)
    np.testing.assert_array_equal(np.diag(a), 0)
    assert (a >= 0).all()


def test_from_weights_accepts_numpy_and_matches_hand_built_matrix(mlp_weights, dense_adjacency_from_weights):
    ws = mlp_weights([6, 7, 3], seed=2)
    g_t = WeightGraph.from_weights(ws)
    g_np = WeightGraph.from_weights([w.numpy() for w in ws])
    expected = dense_adjacency_from_weights(ws)
    np.testing.assert_array_equal(g_t.adjacency().toarray(), expected)
    np.testing.assert_array_equal(g_np.adjacency().toarray(), expected)


def test_node_order_and_node_info():
    # node id = (sum of earlier widths) + unit index, input layer first
    g = WeightGraph.from_weights([torch.ones(3, 4), torch.ones(2, 3)], layer_names=["in", "hid", "out"])
    assert g.layer_names == ("in", "hid", "out")
    assert [g.node_info(i) for i in range(9)] == (
        [("in", i) for i in range(4)] + [("hid", i) for i in range(3)] + [("out", i) for i in range(2)]
    )
    assert list(g.layer_of_nodes()) == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(IndexError):
        g.node_info(9)


def test_single_edge_lands_at_the_right_position():
    # W[j, i] joins input unit i to output unit j: node ids i and 3 + j
    w = torch.zeros(2, 3)
    w[1, 2] = -2.5
    a = WeightGraph.from_weights([w]).adjacency().toarray()
    expected = np.zeros((5, 5))
    expected[2, 4] = expected[4, 2] = 2.5
    np.testing.assert_array_equal(a, expected)


def test_degrees_equal_adjacency_row_sums(mlp_weights):
    g = WeightGraph.from_weights(mlp_weights([8, 6, 6, 3], seed=3, density=0.6))
    a = g.adjacency()
    np.testing.assert_allclose(g.degrees(), np.asarray(a.sum(axis=1)).ravel(), rtol=1e-12, atol=0)


def test_num_edges_counts_nonzero_weights(mlp_weights):
    ws = mlp_weights([8, 6, 3], seed=4, density=0.5)
    g = WeightGraph.from_weights(ws)
    assert g.num_edges == sum(int((w != 0).sum()) for w in ws)
    assert g.adjacency().nnz == 2 * g.num_edges


# --------------------------------------------------------------------------- from_module
def test_from_module_sequential_with_flatten_relu_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3, bias=False),
    )
    g = WeightGraph.from_module(model)
    assert g.layer_sizes == (12, 8, 5, 3)
    assert g.layer_names[0] == "input"
    assert g.layer_names[1:] == ("1", "4", "6")
    for block, lin in zip(g.blocks, [model[1], model[4], model[6]]):
        torch.testing.assert_close(block.weight, lin.weight.detach().abs(), rtol=0, atol=0)


def test_from_module_nested_containers_follow_registration_order():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(6, 5), nn.GELU())
    deeper = nn.Sequential(nn.Sequential(nn.Linear(5, 4)), nn.Identity(), nn.PReLU())
    model = nn.Sequential(inner, deeper, nn.Dropout(), nn.Linear(4, 2))
    g = WeightGraph.from_module(model)
    assert g.layer_sizes == (6, 5, 4, 2)
    assert g.layer_names == ("input", "0.0", "1.0.0", "3")
    expected = [inner[0].weight, deeper[0][0].weight, model[3].weight]
    for block, w in zip(g.blocks, expected):
        torch.testing.assert_close(block.weight, w.detach().abs(), rtol=0, atol=0)


def test_from_module_reads_prune_masked_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    gen = torch.Generator().manual_seed(7)
    mask = (torch.rand(8, 10, generator=gen) < 0.5).float()
    prune.custom_from_mask(model[0], "weight", mask)
    assert hasattr(model[0], "weight_orig")  # really pruned through torch.nn.utils.prune
    g = WeightGraph.from_module(model)
    expected = (model[0].weight_orig.detach() * mask).abs()
    torch.testing.assert_close(g.blocks[0].weight, expected, rtol=0, atol=0)
    a = g.adjacency().toarray()
    # masked entries give no edge: block (hidden, input) is zero exactly where the mask is
    np.testing.assert_array_equal(a[10:18, 0:10] != 0, (mask != 0).numpy() & (model[0].weight_orig.detach() != 0).numpy())


def test_from_state_dict_plain_and_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    plain = WeightGraph.from_state_dict(model.state_dict())
    np.testing.assert_array_equal(plain.adjacency().toarray(), WeightGraph.from_module(model).adjacency().toarray())
    assert plain.layer_sizes == (10, 8, 6, 3)

    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(6, 8, generator=gen) < 0.4).float()
    prune.custom_from_mask(model[2], "weight", mask)
    sd = model.state_dict()
    assert "2.weight_orig" in sd and "2.weight_mask" in sd
    g = WeightGraph.from_state_dict(sd)
    assert g.layer_sizes == (10, 8, 6, 3)
    torch.testing.assert_close(g.blocks[1].weight, (sd["2.weight_orig"] * mask).abs(), rtol=0, atol=0)
    np.testing.assert_array_equal(g.adjacency().toarray(), WeightGraph.from_module(model).adjacency().toarray())


# --------------------------------------------------------------------------- remove_isolated
def _graph_with_isolated_units():
    # input 5 - hidden 4 - output 3; isolated: input unit 1 (zero column of w0),
    # hidden unit 2 (zero row of w0 and zero column of w1), output unit 0 (zero row of w1)
    gen = torch.Generator().manual_seed(11)
    w0 = torch.rand(4, 5, generator=gen) + 0.1
    w1 = torch.rand(3, 4, generator=gen) + 0.1
    w0[:, 1] = 0
    w0[2, :] = 0
    w1[:, 2] = 0
    w1[0, :] = 0
    return WeightGraph.from_weights([w0, w1], layer_names=["in", "hid", "out"])


def test_remove_isolated_index_map_and_subgraph():
    g = _graph_with_isolated_units()
    a = g.adjacency().toarray()
    expected_kept = np.nonzero(a.sum(axis=1) > 0)[0]
    assert list(expected_kept) == [0, 2, 3, 4, 5, 6, 8, 10, 11]  # ids 1, 7 (=5+2), 9 (=5+4+0) removed
    small, kept = g.remove_isolated()
    np.testing.assert_array_equal(kept, expected_kept)
    assert small.layer_sizes == (4, 3, 2)
    assert small.layer_names == ("in", "hid", "out")
    np.testing.assert_array_equal(small.adjacency().toarray(), a[np.ix_(kept, kept)])
    assert (small.degrees() > 0).all()
    # node_info keeps the original unit index
    for new_id, old_id in enumerate(kept):
        assert small.node_info(new_id) == g.node_info(old_id)
    assert small.node_info(4) == ("hid", 0) and small.node_info(6) == ("hid", 3)


def test_remove_isolated_without_isolated_nodes_keeps_everything(mlp_weights):
    g = WeightGraph.from_weights(mlp_weights([4, 3, 2], seed=0))
    small, kept = g.remove_isolated()
    np.testing.assert_array_equal(kept, np.arange(9))
    np.testing.assert_array_equal(small.adjacency().toarray(), g.adjacency().toarray())


def test_expand_labels_gives_minus_one_to_removed_nodes():
    g = _graph_with_isolated_units()
    small, kept = g.remove_isolated()
    small_labels = np.arange(small.num_nodes) % 3
    full = expand_labels(small_labels, kept, g.num_nodes)
    assert full.shape == (g.num_nodes,)
    assert list(np.nonzero(full == -1)[0]) == [1, 7, 9]
    np.testing.assert_array_equal(full[kept], small_labels)


def test_remove_isolated_drops_empty_output_layer():
    gen = torch.Generator().manual_seed(0)
    g = WeightGraph.from_weights([torch.rand(3, 4, generator=gen) + 0.1, torch.zeros(2, 3)])
    small, kept = g.remove_isolated()
    assert small.layer_sizes == (4, 3)
    assert small.layer_names == ("layer0", "layer1")
    np.testing.assert_array_equal(kept, np.arange(7))
    np.testing.assert_array_equal(small.adjacency().toarray(), g.adjacency().toarray()[:7, :7])


def test_remove_isolated_drops_empty_middle_layer_and_remaps_blocks():
    # layers 0 (3 units), 1 (2 units), 2 (4 units); a skip block 0 -> 2 carries all edges
    gen = torch.Generator().manual_seed(1)
    skip = torch.rand(4, 3, generator=gen) + 0.1
    g = WeightGraph([3, 2, 4], [(0, 1, torch.zeros(2, 3)), (1, 2, torch.zeros(4, 2)), (0, 2, skip)], ["a", "b", "c"])
    small, kept = g.remove_isolated()
    assert small.layer_sizes == (3, 4)
    assert small.layer_names == ("a", "c")
    np.testing.assert_array_equal(kept, [0, 1, 2, 5, 6, 7, 8])
    np.testing.assert_array_equal(small.adjacency().toarray(), g.adjacency().toarray()[np.ix_(kept, kept)])
    assert small.node_info(3) == ("c", 0)


# --------------------------------------------------------------------------- layer colouring
def test_layer_coloring_of_a_chain_alternates(mlp_weights):
    g = WeightGraph.from_weights(mlp_weights([3, 4, 5, 4, 2], seed=0))
    colour = g.layer_coloring()
    assert colour is not None
    assert list(colour) == [0, 1, 0, 1, 0] or list(colour) == [1, 0, 1, 0, 1]


def test_layer_coloring_none_for_odd_cycle_of_layers():
    g = WeightGraph([2, 2, 2], [(0, 1, torch.ones(2, 2)), (1, 2, torch.ones(2, 2)), (0, 2, torch.ones(2, 2))])
    assert g.layer_coloring() is None


def test_layer_coloring_with_even_skip_is_valid_two_colouring():
    g = WeightGraph([2, 3, 2, 3], [(0, 1, torch.ones(3, 2)), (1, 2, torch.ones(2, 3)),
                                   (2, 3, torch.ones(3, 2)), (0, 3, torch.ones(3, 2))])
    colour = g.layer_coloring()
    assert colour is not None
    for b in g.blocks:
        assert colour[b.src] != colour[b.dst]


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_accepted_and_computed_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.rand(4, 6, generator=gen).to(dtype)
    w1 = (-torch.rand(3, 4, generator=gen)).to(dtype)
    # one large and many small edges on one node: a half-precision sum would lose the small ones
    w1[0, :] = torch.tensor([2048.0, 1.0, 1.0, 1.0], dtype=dtype)
    g = WeightGraph.from_weights([w0, w1])
    assert all(b.weight.dtype == torch.float32 for b in g.blocks)
    ref = [w0.float().numpy().astype(np.float64), w1.float().numpy().astype(np.float64)]
    np.testing.assert_array_equal(g.adjacency().toarray()[6:10, 0:6], np.abs(ref[0]))
    np.testing.assert_array_equal(g.adjacency().toarray()[10:13, 6:10], np.abs(ref[1]))
    assert g.degrees()[10] == 2051.0


def test_integer_weights_are_accepted():
    g = WeightGraph.from_weights([np.array([[1, -2], [0, 3]], dtype=np.int64)])
    np.testing.assert_array_equal(g.adjacency().toarray()[2:4, 0:2], [[1, 2], [0, 3]])


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_raise(bad):
    w = torch.ones(3, 4)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        WeightGraph.from_weights([w, torch.ones(2, 3)])
    with pytest.raises(ValueError, match="non-finite"):
        WeightGraph.from_weights([torch.ones(3, 4), w.T.numpy()[:3, :3]])


def test_non_finite_half_precision_weights_raise():
    w = torch.ones(2, 2, dtype=torch.bfloat16)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        WeightGraph.from_weights([w])


def test_non_finite_weights_in_module_raise():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        WeightGraph.from_module(model)


def test_shapes_not_chaining_raise():
    with pytest.raises(ValueError, match="chain") as info:
        WeightGraph.from_weights([torch.ones(3, 4), torch.ones(2, 5)])
    assert "3" in str(info.value) and "5" in str(info.value)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="chain"):
        WeightGraph.from_module(model)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_non_2d_weights_raise(shape):
    with pytest.raises(ValueError, match="2-D"):
        WeightGraph.from_weights([torch.ones(*shape)])


def test_empty_weight_list_raises():
    with pytest.raises(ValueError, match="no weight matrices"):
        WeightGraph.from_weights([])


def test_model_without_linear_raises():
    with pytest.raises(ValueError, match="no nn.Linear"):
        WeightGraph.from_module(nn.Sequential(nn.ReLU(), nn.Flatten()))


@pytest.mark.parametrize(
    "model, path, name",
    [
        (nn.Sequential(nn.Linear(3, 3), nn.Conv2d(1, 1, 3)), "'1'", "Conv2d"),
        (nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), nn.Linear(3, 2)), "'1.1'", "LayerNorm"),
        (nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3), nn.Linear(3, 2)), "'1'", "LSTM"),
    ],
)
def test_unsupported_module_raises_naming_module_and_path(model, path, name):
    with pytest.raises(TypeError) as info:
        WeightGraph.from_module(model)
    assert name in str(info.value)
    assert path in str(info.value)


@pytest.mark.parametrize("bad", ["not a model", [torch.ones(2, 2)], 3])
def test_from_module_rejects_non_modules(bad):
    with pytest.raises(TypeError, match="nn.Module"):
        WeightGraph.from_module(bad)


@pytest.mark.parametrize("bad", ["abc", [[1.0, 2.0]], None])
def test_from_weights_rejects_non_tensors(bad):
    with pytest.raises(TypeError, match="weights\\[0\\]"):
        WeightGraph.from_weights([bad])


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_from_weights_rejects_non_real_dtypes(dtype):
    with pytest.raises(TypeError, match="real"):
        WeightGraph.from_weights([torch.ones(2, 2, dtype=dtype)])


def test_from_state_dict_bad_inputs():
    with pytest.raises(TypeError, match="state_dict"):
        WeightGraph.from_state_dict([torch.ones(2, 2)])
    with pytest.raises(ValueError, match="no 2-D weight"):
        WeightGraph.from_state_dict({})
    with pytest.raises(TypeError, match=r"'1\.(weight|running_mean)'"):  # the BatchNorm entry
        WeightGraph.from_state_dict(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).state_dict())
    with pytest.raises(TypeError, match="'epoch'"):
        WeightGraph.from_state_dict({"0.weight": torch.ones(3, 4), "epoch": 3})


def test_constructor_checks_block_shapes_and_layers():
    with pytest.raises(ValueError, match="shape"):
        WeightGraph([3, 2], [(0, 1, torch.ones(3, 2))])  # should be (2, 3)
    with pytest.raises(ValueError):
        WeightGraph([3, 2], [(0, 0, torch.ones(3, 3))])
    with pytest.raises(ValueError):
        WeightGraph([3, 2], [(0, 2, torch.ones(2, 3))])


@pytest.mark.parametrize("density", [1.0, 0.3, 0.02, 0.005])
def test_connected_components_match_networkx(density):
    """The dense-block certificate, the reachability sweeps and the pattern path agree with networkx's count and partition."""
    import networkx as nx

    gen = torch.Generator().manual_seed(3)
    sizes = [30, 40, 25, 10]
    ws = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        w = torch.rand(b, a, generator=gen, dtype=torch.float64) + 0.1
        if density < 1:
            w = w * (torch.rand(b, a, generator=gen, dtype=torch.float64) < density)
        ws.append(w)
    for g in (WeightGraph.from_weights(ws), WeightGraph.from_weights([sp.csr_matrix(w.numpy()) for w in ws])):
        count, labels = g.connected_components()
        ref = list(nx.connected_components(nx.from_scipy_sparse_array(g.adjacency())))
        assert count == len(ref)
        for comp in ref:  # the same partition of the nodes
            assert len({int(labels[i]) for i in comp}) == 1
        assert len(set(labels.tolist())) == count
    if density >= 0.3:
        assert count == 1  # certificate (1.0) or reachability sweeps (0.3: no zero-free row)
    else:
        assert count > 1  # the exact pattern path


def test_connected_components_certificate_needs_connected_layers():
    # Two fully dense blocks that do not share a layer: 2 components although no weight is zero.
    g = WeightGraph([2, 3, 2, 2], [(0, 1, torch.ones(3, 2)), (2, 3, torch.ones(2, 2))])
    assert g.connected_components()[0] == 2
