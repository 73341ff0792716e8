"""SpectralRegularizer on CNN channel graphs (BatchNorm folded) and DAGs (residual adds, concatenation).

Oracles: the eigenvalues of a dense ``numpy.linalg.eigh`` of the normalized Laplacian of
``WeightGraph.from_module(model)`` (isolated nodes removed), and central finite differences of
that eigenvalue sum with respect to single conv weights and BatchNorm gammas.
"""
import numpy as np
import pytest
import torch
from torch import nn

from torch_modularity import SpectralRegularizer, WeightGraph, clusterability


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus an identity skip."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.block1, self.block2 = Block(6), Block(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.head(x.mean(dim=(2, 3)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(2, 4, 1)
        self.c = nn.Conv2d(9, 7, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)

    def forward(self, x):
        return self.bn(self.c(torch.cat([self.a(x).relu(), self.b(x).relu()], dim=1)))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=gen, dtype=m.weight.dtype) * 1.5 + 0.25)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=m.running_var.dtype) + 0.5)
    return model


def _models():
    torch.manual_seed(0)
    return {
        "resnet": _randomize(TinyResNet().double(), 1),
        "concat": _randomize(Concat().double(), 2),
        "cnn_dense": _randomize(nn.Sequential(
            nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 5),
        ).double(), 3),
    }


GRAPH_OPTIONS = {"resnet": {}, "concat": {"include_input": True}, "cnn_dense": {"include_dense": True, "include_input": True}}


def _eig_sum_dense(model: nn.Module, n_eigs: int, **options):
    """Sorted eigenvalues of the normalized Laplacian of the model's graph (isolated nodes removed)."""
    g, _ = WeightGraph.from_module(model, **options).remove_isolated()
    a = g.adjacency().toarray() if hasattr(g.adjacency(), "toarray") else np.asarray(g.adjacency())
    d = a.sum(axis=1)
    s = 1.0 / np.sqrt(d)
    lap = np.eye(len(d)) - s[:, None] * a * s[None, :]
    return np.linalg.eigvalsh(lap)


@pytest.mark.parametrize("name", ["resnet", "concat", "cnn_dense"])
def test_eigenvalues_and_penalty_match_dense_eigh(name):
    model = _models()[name]
    opts = GRAPH_OPTIONS[name]
    n_eigs = 4
    reg = SpectralRegularizer(model, n_eigs=n_eigs, weight=0.5, tol=1e-12, cold_iter=500, **opts)
    penalty = reg()
    ref = _eig_sum_dense(model, n_eigs, **opts)
    np.testing.assert_allclose(reg.eigenvalues().numpy(), ref[1:n_eigs + 1], atol=1e-9)
    assert float(penalty.detach()) == pytest.approx(0.5 * ref[1:n_eigs + 1].sum(), abs=1e-9)
    assert penalty.dtype == torch.float64 and penalty.dim() == 0


def _fd_targets(model: nn.Module):
    """A few (parameter, index) pairs: conv weights, a Linear weight and BatchNorm gammas."""
    out = []
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            continue
        flat = p.detach().view(-1)
        for idx in (0, flat.numel() // 2):
            out.append((name, p, idx))
    return out


@pytest.mark.parametrize("name", ["resnet", "concat", "cnn_dense"])
def test_gradient_matches_finite_differences(name):
    model = _models()[name]
    opts = GRAPH_OPTIONS[name]
    n_eigs = 3
    ref = _eig_sum_dense(model, n_eigs, **opts)
    assert ref[n_eigs + 1] - ref[n_eigs] > 1e-3  # a clear gap: the eigenvalue sum is differentiable here
    reg = SpectralRegularizer(model, n_eigs=n_eigs, weight=1.0, tol=1e-12, cold_iter=500, **opts)
    model.zero_grad()
    reg().backward()
    h = 1e-6
    checked = 0
    for pname, p, idx in _fd_targets(model):
        grad = p.grad.view(-1)[idx].item() if p.grad is not None else 0.0
        with torch.no_grad():
            orig = p.view(-1)[idx].item()
            p.view(-1)[idx] = orig + h
            up = _eig_sum_dense(model, n_eigs, **opts)[1:n_eigs + 1].sum()
            p.view(-1)[idx] = orig - h
            down = _eig_sum_dense(model, n_eigs, **opts)[1:n_eigs + 1].sum()
            p.view(-1)[idx] = orig
        fd = (up - down) / (2 * h)
        assert grad == pytest.approx(fd, rel=1e-5, abs=1e-8), (pname, idx, grad, fd)
        checked += abs(fd) > 1e-6
    assert checked >= 4  # the check saw real gradients, including through BatchNorm gammas
    bn_grads = [m.weight.grad for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in bn_grads)  # gradients flow through folding


def test_regularized_training_on_resnet_lowers_the_penalty_and_leaves_bn_statistics_alone():
    torch.manual_seed(0)
    model = TinyResNet()
    _randomize(model, 4)
    reg = SpectralRegularizer(model, n_eigs=3, weight=1.0)
    running = [m.running_var.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = reg()
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert float(reg().detach()) < 0.7 * first
    after = [m.running_var for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))
    # every parameter that enters the graph got a gradient; the head does not enter it (CNN default)
    assert model.block1.conv1.weight.grad is not None and model.block2.bn2.weight.grad is not None
    assert model.stem.weight.grad is None  # its incoming edges come from the input, not in the CNN graph
    assert model.head.weight.grad is None


def test_state_dict_round_trip_on_a_dag():
    model = _models()["concat"]
    reg = SpectralRegularizer(model, n_eigs=3, include_input=True)
    reg()
    other = SpectralRegularizer(model, n_eigs=3, include_input=True)
    other.load_state_dict(reg.state_dict())
    assert other.steps == 1
    assert torch.allclose(other(), reg(), atol=1e-8)


def test_clusterability_and_regularizer_run_on_resnet_and_concat():
    for name in ("resnet", "concat"):
        model = _models()[name]
        res = clusterability(model, n_clusters=3, n_shuffles=3, n_workers=1)
        assert np.isfinite(res.ncut) and len(res.shuffled_ncuts) == 3
        reg = SpectralRegularizer(model, n_eigs=2, **GRAPH_OPTIONS[name])
        assert reg.layer_sizes == WeightGraph.from_module(model, **GRAPH_OPTIONS[name]).layer_sizes
        assert torch.isfinite(reg())


def test_nonfinite_conv_weight_is_named():
    model = _models()["resnet"]
    reg = SpectralRegularizer(model, n_eigs=2)
    with torch.no_grad():
        model.block1.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"block1\.conv2\.weight"):
        reg()
