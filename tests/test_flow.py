"""Path flow and dead units, against brute-force enumeration of every input-to-output path."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from torch_modularity.flow import dead_units, path_flow, remove_dead
from torch_modularity.graph import WeightGraph


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brute_flow(weights):
    """flow(u) = sum over all input->output paths through u of prod |w|, by enumeration."""
    mats = [np.abs(w.detach().double().numpy()) for w in weights]
    sizes = [mats[0].shape[1]] + [m.shape[0] for m in mats]
    off = np.concatenate([[0], np.cumsum(sizes)])
    flow = np.zeros(off[-1])
    for path in itertools.product(*[range(s) for s in sizes]):
        weight = 1.0
        for l, m in enumerate(mats):
            weight *= m[path[l + 1], path[l]]
        for l, unit in enumerate(path):
            flow[off[l] + unit] += weight
    return flow


def test_path_flow_matches_brute_force_enumeration(mlp_weights):
    weights = mlp_weights([3, 4, 3, 2], seed=0)  # signed weights: |w| must be taken
    brute = _brute_flow(weights)
    np.testing.assert_allclose(path_flow(weights, normalize=False), brute, rtol=1e-12)
    shares = path_flow(WeightGraph.from_weights(weights))
    np.testing.assert_allclose(shares, brute / brute[:3].sum(), rtol=1e-12)
    off = np.concatenate([[0], np.cumsum([3, 4, 3, 2])])
    for l in range(4):
        assert abs(shares[off[l]:off[l + 1]].sum() - 1.0) < 1e-12  # every path crosses each layer once


def test_path_flow_of_a_model_with_zeros(mlp_weights):
    weights = mlp_weights([4, 5, 3], seed=1, density=0.6)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight.copy_(weights[0])
        model[2].weight.copy_(weights[1])
    np.testing.assert_allclose(path_flow(model, normalize=False), _brute_flow(weights), rtol=1e-6)


def test_no_overflow_in_deep_large_weight_nets():
    gen = torch.Generator().manual_seed(2)
    weights = [1e3 * torch.rand(8, 8, generator=gen, dtype=torch.float64) for _ in range(60)]
    shares = path_flow(weights)
    assert np.isfinite(shares).all() and abs(shares[:8].sum() - 1.0) < 1e-12
    absolute = path_flow(weights, normalize=False)  # ~1e180 x 8^60: overflows, as documented
    assert np.isinf(absolute).any() or np.isfinite(absolute).all()
    tiny = [1e-3 * w for w in weights]
    np.testing.assert_allclose(path_flow(tiny), shares, rtol=1e-9)  # shares are scale-free


def test_dead_units_threshold_and_isolated():
    w1 = torch.tensor([[1.0, 1.0, 1.0], [1e-5, 1e-5, 1e-5], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    w2 = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    g = WeightGraph.from_weights([w1, w2])
    dead = dead_units(g)
    assert dead.dtype == bool and dead.shape == (g.num_nodes,)
    assert np.nonzero(dead)[0].tolist() == [4, 5]  # hidden 1 (flow 1e-5 of the max) and hidden 2 (isolated)
    assert np.nonzero(dead_units(g, threshold=1e-6))[0].tolist() == [5]
    assert dead_units(g, threshold=0.0).sum() == 0
    # A unit that receives input but has no way to the output is dead as well.
    w2b = w2.clone()
    w2b[:, 3] = 0.0
    assert 6 in np.nonzero(dead_units([w1, w2b]))[0].tolist()
    with pytest.raises(ValueError, match="threshold"):
        dead_units(g, threshold=-1.0)


def test_remove_dead_gives_the_live_subgraph():
    w1 = torch.tensor([[1.0, 2.0], [1e-7, 1e-7], [3.0, 1.0]])
    w2 = torch.tensor([[1.0, 1.0, 2.0]])
    g = WeightGraph.from_weights([w1, w2], layer_names=["in", "hidden", "out"])
    live, kept = remove_dead(g)
    assert live.layer_sizes == (2, 2, 1)
    assert kept.tolist() == [0, 1, 2, 4, 5]
    assert live.node_info(3) == ("hidden", 2)  # original unit index kept
    np.testing.assert_allclose(live.blocks[0].weight.numpy(), [[1.0, 2.0], [3.0, 1.0]])
    np.testing.assert_allclose(live.blocks[1].weight.numpy(), [[1.0, 2.0]])


def test_all_dead_and_non_chain_graphs():
    zero = [torch.zeros(3, 2), torch.ones(1, 3)]
    assert (path_flow(zero) == 0).all() and dead_units(zero).all()
    with pytest.raises(ValueError, match="every unit is dead"):
        remove_dead(zero)
    skip = WeightGraph([2, 3, 2], [(0, 1, torch.ones(3, 2)), (1, 2, torch.ones(2, 3)), (0, 2, torch.ones(2, 2))])
    with pytest.raises(ValueError, match="chain"):
        path_flow(skip)
    gap = WeightGraph([2, 3, 2], [(0, 1, torch.ones(3, 2))])
    with pytest.raises(ValueError, match="chain"):
        dead_units(gap)
