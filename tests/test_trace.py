"""Weight graphs of CNNs and DAGs by tracing (torch_modularity.trace).

Every expected graph here is written out by hand with numpy from the module weights: kernel
norms with ``np.abs(k).sum()``, ``np.linalg.norm(k, 'fro')`` and ``np.linalg.norm(k, 1)``
slice by slice, BatchNorm scales as ``|gamma| / sqrt(var + eps)``, and the N x N adjacency
assembled from explicitly placed blocks. None of the oracles calls the library's tracer.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torch_modularity
from torch_modularity import WeightGraph
from torch_modularity.trace import (
    UnsupportedModuleError,
    conv_edge_weights,
    graph_from_module,
    trace_module,
    transformer_mlp_graphs,
)


# ----------------------------------------------------------------------------- oracles
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def slice_norms(conv: nn.Conv2d, norm: str = "l1") -> np.ndarray:
    """(out, in) matrix of kernel-slice norms, group structure included, by loops over numpy slices."""
    w = _np(conv.weight)
    out_c, in_g = w.shape[:2]
    g = conv.groups
    out_g = out_c // g
    m = np.zeros((out_c, in_g * g))
    for o in range(out_c):
        grp = o // out_g
        for j in range(in_g):
            k = w[o, j]
            if norm == "l1":
                v = np.abs(k).sum()
            elif norm == "fro":
                v = np.linalg.norm(k, "fro")
            else:
                v = np.linalg.norm(k, 1)
            m[o, grp * in_g + j] = v
    return m


def bn_scale(bn: nn.BatchNorm2d) -> np.ndarray:
    return np.abs(_np(bn.weight)) / np.sqrt(_np(bn.running_var) + bn.eps)


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    """Trained-looking BN: signed gammas, non-trivial running statistics."""
    with torch.no_grad():
        bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(0.25 + 2 * torch.rand(bn.num_features, generator=gen))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))


def adjacency(sizes, blocks) -> np.ndarray:
    """Dense symmetric adjacency from (src, dst, (n_dst, n_src) matrix) blocks."""
    off = np.concatenate([[0], np.cumsum(sizes)])
    a = np.zeros((off[-1], off[-1]))
    for s, d, m in blocks:
        a[off[d]:off[d + 1], off[s]:off[s + 1]] += m
        a[off[s]:off[s + 1], off[d]:off[d + 1]] += m.T
    return a


def assert_graph(g: WeightGraph, sizes, names, blocks, rtol=1e-6) -> None:
    assert g.layer_sizes == tuple(sizes)
    assert g.layer_names == tuple(names)
    np.testing.assert_allclose(g.adjacency().toarray(), adjacency(sizes, blocks), rtol=rtol, atol=1e-7)


# ----------------------------------------------------------------------------- kernel norms
def test_kernel_norms_match_numpy_slice_by_slice():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, 3, 2, generator=gen)  # kh != kw: catches a swapped axis in the induced norm
    conv = nn.Conv2d(3, 5, (3, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    for norm in ("l1", "fro", "induced_l1"):
        np.testing.assert_allclose(_np(conv_edge_weights(w, 1, norm)), slice_norms(conv, norm), rtol=1e-12)
    # method.md 1.3: on the 3x3 kernel 1..9, induced-1 = 18 and elementwise L1 = 45.
    k = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    assert conv_edge_weights(k, kernel_norm="induced_l1").item() == 18.0
    assert conv_edge_weights(k, kernel_norm="l1").item() == 45.0
    assert conv_edge_weights(k, kernel_norm="fro").item() == pytest.approx(np.sqrt((np.arange(1, 10) ** 2).sum()))
    with pytest.raises(ValueError, match="kernel_norm"):
        conv_edge_weights(k, kernel_norm="l2")


def test_grouped_and_depthwise_convs_join_only_their_group():
    gen = torch.Generator().manual_seed(1)
    for conv in (nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(3, 6, 3, groups=3)):
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        g = graph_from_module(nn.Sequential(conv), include_input=True)
        expected = slice_norms(conv)
        assert_graph(g, (conv.in_channels, conv.out_channels), ("input", "0"), [(0, 1, expected)])
    # Depth multiplier 2 (3 -> 6, groups=3): output channel o reads input channel o // 2 only.
    block = g.adjacency().toarray()[3:, :3]
    assert np.array_equal(block > 0, np.arange(6)[:, None] // 2 == np.arange(3)[None, :])
    # groups=2, 4 -> 6: outputs 0-2 read inputs 0-1, outputs 3-5 read inputs 2-3.
    m = conv_edge_weights(torch.ones(6, 2, 1, 1), groups=2)
    assert m.tolist() == [[1, 1, 0, 0]] * 3 + [[0, 0, 1, 1]] * 3


# ----------------------------------------------------------------------------- small CNN
def small_cnn(seed: int = 0) -> nn.Sequential:
    """conv(1->4)-BN-ReLU-pool-conv(4->6)-BN-ReLU-flatten-linear, for 10x10 inputs (6 x 2 x 2 -> 5)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    )
    randomize_bn(net[1], gen)
    randomize_bn(net[5], gen)
    return net.eval()


@pytest.mark.parametrize("norm", ["l1", "fro", "induced_l1"])
def test_small_cnn_default_graph_is_the_conv_channels(norm):
    net = small_cnn()
    g = graph_from_module(net, kernel_norm=norm)
    # Research-code default: image channel and dense layer excluded, 4 + 6 nodes.
    c2 = slice_norms(net[4], norm) * bn_scale(net[5])[:, None]
    assert_graph(g, (4, 6), ("0", "4"), [(0, 1, c2)])
    assert g.trace_report.excluded == ("input", "8")
    assert g.trace_report.batchnorm == {"1": "incoming", "5": "incoming"}
    assert g.node_info(4 + 3) == ("4", 3)


def test_small_cnn_with_input_and_dense_uses_nchw_flatten_order():
    net = small_cnn(seed=3)
    g = graph_from_module(net, include_input=True, include_dense=True)
    c1 = slice_norms(net[0]) * bn_scale(net[1])[:, None]
    c2 = slice_norms(net[4]) * bn_scale(net[5])[:, None]
    # Hand pooling: the flat index of (c, h, w) in an NCHW tensor is c*H*W + h*W + w.
    lin = np.abs(_np(net[8].weight))
    C, H, W = 6, 2, 2
    dense = np.zeros((5, C))
    for j in range(5):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    dense[j, c] += lin[j, c * H * W + h * W + w]
    assert_graph(g, (1, 4, 6, 5), ("input", "0", "4", "8"), [(0, 1, c1), (1, 2, c2), (2, 3, dense)])
    # That index formula is what torch's flatten does: check it on a tensor marked by channel.
    marked = torch.arange(C).view(1, C, 1, 1).expand(1, C, H, W).flatten(1)[0]
    assert all(marked[c * H * W + h * W + w] == c for c in range(C) for h in range(H) for w in range(W))
    # The example input only adds shape checks: same graph.
    g2 = graph_from_module(net, include_input=True, include_dense=True, example_input=torch.randn(2, 1, 10, 10))
    np.testing.assert_array_equal(g2.adjacency().toarray(), g.adjacency().toarray())


def test_batchnorm_folding_scales_affected_edges_by_four():
    net = small_cnn(seed=5)
    for bn in (net[1], net[5]):
        bn.eps = 0.0  # makes the factor exactly 2 / sqrt(1/4) = 4
    before = graph_from_module(net, include_input=True).adjacency().toarray()
    with torch.no_grad():
        net[5].weight.mul_(2.0)
        net[5].running_var.div_(4.0)
    after = graph_from_module(net, include_input=True).adjacency().toarray()
    into_conv2 = np.zeros_like(before, dtype=bool)
    into_conv2[5:11, 1:5] = into_conv2[1:5, 5:11] = True  # conv1 <-> conv2 edges (nodes 1-4 and 5-10)
    np.testing.assert_allclose(after[into_conv2], 4 * before[into_conv2], rtol=1e-12)
    np.testing.assert_array_equal(after[~into_conv2], before[~into_conv2])
    assert np.count_nonzero(before[into_conv2]) == 2 * 24
    # Switched off: raw kernel norms, the research code's (unfolded) VGG graphs.
    raw = graph_from_module(net, include_input=True, fold_batchnorm=False)
    assert_graph(raw, (1, 4, 6), ("input", "0", "4"), [(0, 1, slice_norms(net[0])), (1, 2, slice_norms(net[4]))])


def test_batchnorm_after_pooling_and_after_activation():
    gen = torch.Generator().manual_seed(7)
    # VGG-style conv -> pool -> BN folds into conv1's incoming edges; conv -> ReLU -> BN
    # cannot, and scales the channels it feeds (the columns of the next conv) instead.
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1)).eval()
    randomize_bn(net[2], gen)
    randomize_bn(net[6], gen)
    g = graph_from_module(net, include_input=True)
    blocks = [(0, 1, slice_norms(net[0]) * bn_scale(net[2])[:, None]),
              (1, 2, slice_norms(net[4])),
              (2, 3, slice_norms(net[7]) * bn_scale(net[6])[None, :])]
    assert_graph(g, (2, 3, 4, 5), ("input", "0", "4", "7"), blocks)
    assert g.trace_report.batchnorm == {"2": "incoming", "6": "outgoing"}


def test_global_average_pooling_before_dense():
    gen = torch.Generator().manual_seed(2)

    class Gap(nn.Module):
        def __init__(self, functional: bool):
            super().__init__()
            self.functional = functional
            self.conv = nn.Conv2d(3, 4, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            x = self.conv(x).relu()
            x = x.mean((2, 3)) if self.functional else self.pool(x).flatten(1)
            return self.fc(x)

    for functional in (False, True):
        net = Gap(functional)
        with torch.no_grad():
            net.fc.weight.copy_(torch.randn(6, 4, generator=gen))
        g = graph_from_module(net, include_dense=True)
        assert_graph(g, (4, 6), ("conv", "fc"), [(0, 1, np.abs(_np(net.fc.weight)))])


# ----------------------------------------------------------------------------- MLPs
def test_mlp_chain_matches_from_module_and_from_weights():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 8), nn.Tanh(),
                        nn.Linear(8, 3))
    g = graph_from_module(mlp)
    ref = WeightGraph.from_weights([mlp[1].weight, mlp[4].weight, mlp[6].weight], layer_names=["input", "1", "4", "6"])
    old = WeightGraph.from_module(mlp)
    for other in (ref, old):
        assert g.layer_sizes == other.layer_sizes == (20, 16, 8, 3)
        assert g.layer_names == other.layer_names
        assert (g.adjacency() != other.adjacency()).nnz == 0
    # A bare Linear is named "model", as before.
    assert graph_from_module(nn.Linear(3, 2)).layer_names == ("input", "model")
    # BatchNorm1d after a Linear folds into its incoming edges too.
    gen = torch.Generator().manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    randomize_bn(net[1], gen)
    blocks = [(0, 1, np.abs(_np(net[0].weight)) * bn_scale(net[1])[:, None]), (1, 2, np.abs(_np(net[3].weight)))]
    assert_graph(graph_from_module(net), (5, 4, 2), ("input", "0", "3"), blocks)


# ----------------------------------------------------------------------------- DAGs
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.down is None else self.down(x)
        return torch.relu(out + skip)


class TinyResNet(nn.Module):
    def __init__(self, downsample: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b1 = BasicBlock(8, 8)
        self.b2 = BasicBlock(8, 16, 2) if downsample else BasicBlock(8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.b2.conv2.out_channels, 10)

    def forward(self, x):
        x = nn.functional.relu(self.bn(self.stem(x)))
        x = self.b2(self.b1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_resnet(downsample: bool = True, seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    net = TinyResNet(downsample)
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m, gen)
    return net.eval()


def test_resnet_blocks_share_output_nodes_and_cluster():
    net = tiny_resnet()
    g = graph_from_module(net)
    b1, b2 = net.b1, net.b2

    def conv_bn(conv, bn):
        return slice_norms(conv) * bn_scale(bn)[:, None]

    # Layers: stem (shared with b1's output), b1.conv1, b2.conv1, b2.conv2 (shared with b2.down).
    blocks = [
        (0, 1, conv_bn(b1.conv1, b1.bn1)), (1, 0, conv_bn(b1.conv2, b1.bn2)),
        (0, 2, conv_bn(b2.conv1, b2.bn1)), (2, 3, conv_bn(b2.conv2, b2.bn2)),
        (0, 3, conv_bn(b2.down[0], b2.down[1])),
    ]
    assert_graph(g, (8, 8, 16, 16), ("stem", "b1.conv1", "b2.conv1", "b2.conv2"), blocks)
    assert g.num_nodes == 48
    report = g.trace_report
    assert report.merged == {"stem": ("stem", "b1.conv2"), "b2.conv2": ("b2.conv2", "b2.down.0")}
    assert report.identity_skips == () and report.unused == ()
    assert g.node_info(8 + 8 + 3) == ("b2.conv1", 3)
    # stem -> b2.conv1 -> b2.conv2 -> stem is a triangle: not bipartite, generic engine path.
    assert g.layer_coloring() is None
    labels = torch_modularity.spectral_clustering(g, n_clusters=3, seed=0)
    assert labels.shape == (48,) and sorted(set(labels.tolist())) == [0, 1, 2]
    res = torch_modularity.clusterability(g, n_clusters=3, n_shuffles=2, n_workers=1)
    assert res.n_shuffles == 2 and 0 <= res.ncut <= 3
    # With dense layers and the input the fc reads the shared b2 nodes after global pooling.
    full = graph_from_module(net, include_dense=True, include_input=True)
    assert full.layer_sizes == (3, 8, 8, 16, 16, 10)
    np.testing.assert_allclose(full.adjacency().toarray()[-10:, -26:-10], np.abs(_np(net.fc.weight)), rtol=1e-6)


def test_identity_resnet_stays_bipartite():
    g = graph_from_module(tiny_resnet(downsample=False))
    # Both identity blocks write back into the stem's nodes: stem <-> conv1 of each block.
    assert g.layer_names == ("stem", "b1.conv1", "b2.conv1") and g.layer_sizes == (8, 8, 8)
    colour = g.layer_coloring()
    assert colour is not None and colour[0] != colour[1] == colour[2]
    labels = torch_modularity.spectral_clustering(g, n_clusters=4, seed=1)
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3]


def test_skip_around_a_single_conv_gives_identity_edges():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 5, 3)
            self.conv = nn.Conv2d(5, 5, 3, padding=1)

        def forward(self, x):
            x = self.stem(x)
            return self.conv(x) + x  # merging would join a layer to itself

    net = Net()
    g, report = trace_module(net)
    assert_graph(g, (5, 5), ("stem", "conv"), [(0, 1, slice_norms(net.conv) + np.eye(5))])
    assert report.identity_skips == ("<root>:add",) and report.merged == {}


def test_concatenation_stacks_channel_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.a = nn.Conv2d(4, 3, 3, padding=1)
            self.b = nn.Conv2d(4, 5, 1)
            self.head = nn.Conv2d(8, 6, 3)
            self.dense = nn.Conv2d(4 + 6, 2, 1)

        def forward(self, x):
            x = self.stem(x)
            y = self.head(torch.cat([self.a(x).relu(), self.b(x)], dim=1))
            # DenseNet style: a feature map concatenated with its own transform.
            return self.dense(torch.cat((nn.functional.max_pool2d(x, 3, 1), y), 1))

    torch.manual_seed(0)
    net = Net()
    g = graph_from_module(net)
    head, dense = slice_norms(net.head), slice_norms(net.dense)
    blocks = [
        (0, 1, slice_norms(net.a)), (0, 2, slice_norms(net.b)),
        (1, 3, head[:, :3]), (2, 3, head[:, 3:]),
        (0, 4, dense[:, :4]), (3, 4, dense[:, 4:]),
    ]
    assert_graph(g, (4, 3, 5, 6, 2), ("stem", "a", "b", "head", "dense"), blocks)
    assert g.num_nodes == 4 + 3 + 5 + 6 + 2
    # Every cycle (stem-a-head-dense-stem, ...) is even: still bipartite, the engine's fast path.
    assert g.layer_coloring().tolist() == [0, 1, 1, 0, 1]
    labels = torch_modularity.spectral_clustering(g, n_clusters=3)
    assert sorted(set(labels.tolist())) == [0, 1, 2]


def test_vgg16_channel_graph_has_4224_nodes():
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers, cin = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    vgg = nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
    g = graph_from_module(vgg)
    assert g.num_nodes == 64 + 64 + 128 + 128 + 3 * 256 + 6 * 512 == 4224
    assert len(g.blocks) == 12 and g.layer_coloring() is not None
    assert g.layer_names[0] == "0.0" and g.node_info(4223) == ("0.40", 511)


# ----------------------------------------------------------------------------- bad input
def test_unsupported_module_is_named_with_its_path():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.rnn = nn.LSTM(8, 8)

        def forward(self, x):
            return self.rnn(self.fc(x))[0]

    with pytest.raises(UnsupportedModuleError, match=r"LSTM at 'rnn'.*Supported modules: .*Conv2d") as err:
        graph_from_module(Net())
    assert isinstance(err.value, TypeError)
    with pytest.raises(UnsupportedModuleError, match=r"TransformerEncoderLayer at '1'.*transformer_mlp_graphs"):
        graph_from_module(nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, 16)))

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x) * torch.sigmoid(self.b(x))

    with pytest.raises(UnsupportedModuleError, match="mul.*several branches"):
        graph_from_module(Gate())
    with pytest.raises(ValueError, match="no edges"):
        graph_from_module(nn.Sequential(nn.Conv2d(1, 2, 3)))  # input excluded: a lone conv has no edges
    with pytest.raises(ValueError, match="do not chain"):
        graph_from_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(3, 2, 3)))
    with pytest.raises(UnsupportedModuleError, match="flatten from dim 0"):
        graph_from_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(0), nn.Linear(8, 2)))


class Dynamic(nn.Module):
    """Python control flow on a tensor value: fx cannot trace this."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = self.bn(self.stem(x)).relu()
        if x.sum() > -1e9:  # always true, but data-dependent
            x = x + self.conv(x).relu()
        return self.fc(x.view(x.size(0), -1))


def test_untraceable_model_falls_back_to_a_forward_pass():
    net = Dynamic()
    gen = torch.Generator().manual_seed(0)
    randomize_bn(net.bn, gen)
    net.train()
    with pytest.raises(UnsupportedModuleError, match="example_input"):
        graph_from_module(net)
    mean_before = net.bn.running_mean.clone()
    g = graph_from_module(net, example_input=torch.randn(2, 2, 3, 3), include_input=True, include_dense=True)
    assert g.trace_report.method == "forward"
    # The forward pass ran in eval mode without touching BatchNorm statistics or modes.
    assert torch.equal(net.bn.running_mean, mean_before) and net.training and net.bn.training
    stem = slice_norms(net.stem) * bn_scale(net.bn)[:, None]
    lin = np.abs(_np(net.fc.weight)).reshape(3, 4, 9).sum(-1)
    blocks = [(0, 1, stem), (1, 2, slice_norms(net.conv) + np.eye(4)), (2, 3, lin)]
    assert_graph(g, (2, 4, 4, 3), ("input", "stem", "conv", "fc"), blocks)
    # An untraceable plain Linear chain still reads in registration order, as before.

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.l2(self.l1(x).relu()) if x.sum() > 0 else self.l2(self.l1(-x))

    chain = graph_from_module(Chain())
    assert chain.layer_names == ("input", "l1", "l2") and chain.trace_report.method == "chain"


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block: in-place ``out += identity`` and in-place ReLUs."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != 4 * width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Untraceable(nn.Module):
    """Wraps a model behind data-dependent control flow, forcing the forward-pass recorder."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) if x.sum() > -1e9 else x


def test_forward_recording_agrees_with_fx_on_in_place_bottlenecks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                        Bottleneck(16, 4), Bottleneck(16, 8, stride=2), Bottleneck(32, 8),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m, gen)
    net.eval()
    g = graph_from_module(net, include_dense=True)
    rec = graph_from_module(Untraceable(net), example_input=torch.randn(2, 3, 12, 12), include_dense=True)
    assert rec.trace_report.method == "forward" and g.trace_report.method == "fx"
    assert rec.layer_names == tuple("net." + n for n in g.layer_names)
    assert rec.layer_sizes == g.layer_sizes
    np.testing.assert_allclose(rec.adjacency().toarray(), g.adjacency().toarray(), rtol=1e-6)
    # Identity skips merge into the stem's nodes; the downsampling block's two branches share nodes.
    assert g.trace_report.merged == {"0": ("0", "3.conv3"), "4.conv3": ("4.conv3", "4.downsample.0", "5.conv3")}
    assert g.num_nodes == 16 + 4 + 4 + 8 + 8 + 32 + 8 + 8 + 10


def test_unused_layers_are_reported_and_isolated():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3)
            self.c2 = nn.Conv2d(4, 5, 3)
            self.probe = nn.Conv2d(4, 2, 1)  # computed, never reaches the output
            self.spare = nn.Conv2d(5, 7, 1)  # never called

        def forward(self, x):
            x = self.c1(x)
            _ = self.probe(x)
            return self.c2(x)

    with pytest.warns(UserWarning, match=r"probe, spare"):
        g = graph_from_module(Net())
    assert g.trace_report.unused == ("probe", "spare")
    assert g.layer_names == ("c1", "probe", "c2", "spare") and g.layer_sizes == (4, 2, 5, 7)
    deg = g.degrees()
    assert np.all(deg[4:6] == 0) and np.all(deg[11:] == 0) and np.all(deg[:4] > 0) and np.all(deg[6:11] > 0)
    small, kept = g.remove_isolated()
    assert small.layer_names == ("c1", "c2") and small.num_nodes == 9


# ----------------------------------------------------------------------------- transformers
def test_transformer_mlp_graphs():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32)
    graphs = transformer_mlp_graphs(layer)
    assert list(graphs) == [""]
    g = graphs[""]
    ref = WeightGraph.from_weights([layer.linear1.weight, layer.linear2.weight])
    assert g.layer_sizes == (16, 32, 16) and g.layer_names == ("input", "linear1", "linear2")
    assert (g.adjacency() != ref.adjacency()).nnz == 0

    class Mlp(nn.Module):  # timm-style
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.drop, self.fc2 = nn.Linear(8, 24), nn.GELU(), nn.Dropout(), nn.Linear(24, 8)

        def forward(self, x):
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            enc = nn.TransformerEncoderLayer(8, 2, 12, batch_first=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.encoder = nn.TransformerEncoder(enc, 2, enable_nested_tensor=False)
            self.mlp = Mlp()
            self.head = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
            self.proj = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # no activation: not an MLP block

    m = Model()
    graphs = transformer_mlp_graphs(m)
    assert list(graphs) == ["encoder.layers.0", "encoder.layers.1", "mlp", "head"]
    assert graphs["encoder.layers.1"].layer_names == ("encoder.layers.1:input", "encoder.layers.1.linear1",
                                                      "encoder.layers.1.linear2")
    assert graphs["mlp"].layer_sizes == (8, 24, 8) and graphs["head"].layer_sizes == (8, 4, 2)
    # Attention projections are not part of any graph.
    assert not any("attn" in n for g in graphs.values() for n in g.layer_names)


class Conv1D(nn.Module):
    """Stand-in for Hugging Face's GPT-2 ``Conv1D``: a Linear whose weight is stored (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_transformer_mlp_graphs_hugging_face_layouts():
    # Same attribute layout as transformers' BertLayer and GPT2MLP (not imported: it takes seconds).
    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.intermediate_act_fn = nn.Linear(8, 20), nn.GELU()

    class Output(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.LayerNorm, self.dropout = nn.Linear(20, 8), nn.LayerNorm(8), nn.Dropout()

    class BertLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2)
            self.intermediate, self.output = Intermediate(), Output()

    class GPT2MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj, self.act = Conv1D(24, 8), Conv1D(8, 24), nn.GELU()

    torch.manual_seed(0)
    model = nn.ModuleDict({"bert": BertLayer(), "gpt": GPT2MLP()})
    graphs = transformer_mlp_graphs(model)
    assert list(graphs) == ["bert", "gpt"]
    bert, gpt = graphs["bert"], graphs["gpt"]
    assert bert.layer_names == ("bert:input", "bert.intermediate.dense", "bert.output.dense")
    ref = WeightGraph.from_weights([model["bert"].intermediate.dense.weight, model["bert"].output.dense.weight])
    assert (bert.adjacency() != ref.adjacency()).nnz == 0
    # GPT-2 stores (in, out): the (out, in) blocks are the transposes.
    assert gpt.layer_sizes == (8, 24, 8)
    ref = WeightGraph.from_weights([model["gpt"].c_fc.weight.t(), model["gpt"].c_proj.weight.t()])
    assert (gpt.adjacency() != ref.adjacency()).nnz == 0
