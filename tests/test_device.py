"""Where the work runs: the weights' device for the engine's block solver and the regularizer.

The CUDA tests run only where a GPU is present (they are skipped, not passed, elsewhere);
the CPU tests check the same routing on the CPU.
"""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from torch_modularity import (
    ClusterabilityMonitor,
    SpectralRegularizer,
    WeightGraph,
    clusterability,
    path_flow,
    spectral_clustering,
    spectral_embedding,
)
from torch_modularity import spectral

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _planted(sizes, k, seed=0):
    rng = np.random.default_rng(seed)
    modules = [rng.integers(0, k, n) for n in sizes]
    ws = []
    for i in range(len(sizes) - 1):
        w = rng.uniform(0.0, 0.1, (sizes[i + 1], sizes[i]))
        w[modules[i + 1][:, None] == modules[i][None, :]] += 1.0
        ws.append(torch.from_numpy(w))
    return ws, np.concatenate(modules)


def _dense_laplacian_eigs(graph, k):
    a = graph.adjacency().toarray()
    d = a.sum(axis=1)
    vals, vecs = np.linalg.eigh(np.eye(len(d)) - a / np.sqrt(np.outer(d, d)))
    return vals[:k], vecs[:, :k]


def _check_embedding(emb, graph, k):
    ref_vals, ref_vecs = _dense_laplacian_eigs(graph, k)
    np.testing.assert_allclose(emb.eigenvalues, ref_vals, atol=1e-3)
    # Same invariant subspace: all principal angles ~0.
    assert np.linalg.svd(ref_vecs.T @ emb.eigenvectors, compute_uv=False).min() > 0.999


def test_graph_device_is_the_weights_device():
    ws, _ = _planted([20, 30, 10], 3)
    assert WeightGraph.from_weights(ws).device == torch.device("cpu")
    csr = WeightGraph([20, 30], [(0, 1, sp.random(30, 20, density=0.5, random_state=0, format="csr"))])
    assert csr.device == torch.device("cpu")


def test_bad_device_is_a_clear_error():
    ws, _ = _planted([20, 30, 10], 3)
    with pytest.raises(ValueError, match="not a torch device"):
        clusterability(ws, n_clusters=3, n_shuffles=0, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            spectral_clustering(WeightGraph.from_weights(ws), n_clusters=3, device="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            spectral_clustering(WeightGraph.from_weights(ws), n_clusters=3, device=f"cuda:{torch.cuda.device_count()}")


def test_explicit_cpu_device_gives_the_default_result(monkeypatch):
    monkeypatch.setattr(spectral, "_BLOCK_SOLVER_MIN", 10)  # route through the block solver
    ws, _ = _planted([60, 80, 80, 40], 4)
    graph = WeightGraph.from_weights(ws)
    a = clusterability(graph, n_clusters=4, n_shuffles=3, n_workers=1)
    b = clusterability(graph, n_clusters=4, n_shuffles=3, n_workers=1, device="cpu")
    assert a.ncut == b.ncut and np.array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.shuffled_ncuts, b.shuffled_ncuts)


@needs_cuda
@pytest.mark.parametrize("sparse", [False, True])
def test_block_solver_on_cuda_matches_dense_eigh(monkeypatch, sparse):
    monkeypatch.setattr(spectral, "_BLOCK_SOLVER_MIN", 10)
    k = 4
    ws, planted = _planted([60, 80, 80, 40], k)
    graph = WeightGraph.from_weights([w.cuda() for w in ws])
    assert graph.device.type == "cuda"
    if sparse:  # pruned layers: CSR blocks, moved to the GPU as sparse CSR tensors
        for w in ws:
            w[w < 0.05] = 0.0
        graph = WeightGraph([60, 80, 80, 40], [(i, i + 1, sp.csr_matrix(w.numpy())) for i, w in enumerate(ws)])
        emb = spectral_embedding(graph, k, dtype=np.float64, device="cuda")
    else:
        emb = spectral_embedding(graph, k, dtype=np.float64)  # default: the weights' device
    assert emb.method == "bipartite-gram"
    _check_embedding(emb, graph, k)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(planted, spectral_clustering(graph, n_clusters=k, seed=0)) > 0.95


@needs_cuda
def test_clusterability_of_cuda_weights_does_not_depend_on_workers(monkeypatch):
    monkeypatch.setattr(spectral, "_BLOCK_SOLVER_MIN", 10)
    ws, _ = _planted([60, 80, 80, 40], 4)
    graph = WeightGraph.from_weights([w.cuda() for w in ws])
    one = clusterability(graph, n_clusters=4, n_shuffles=4, n_workers=1)
    two = clusterability(graph, n_clusters=4, n_shuffles=4, n_workers=2)
    assert one.ncut == two.ncut and np.array_equal(one.labels, two.labels)
    np.testing.assert_array_equal(one.shuffled_ncuts, two.shuffled_ncuts)
    cpu = clusterability(WeightGraph.from_weights(ws), n_clusters=4, n_shuffles=4, n_workers=1)
    # Planted modules: the same partition on both devices (float64 engine).
    assert one.ncut == pytest.approx(cpu.ncut, rel=1e-6)
    assert np.all(np.isfinite(one.shuffled_ncuts))


@needs_cuda
def test_cuda_model_measure_flow_and_monitor():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    cpu = clusterability(model, n_clusters=4, n_shuffles=3, n_workers=1)
    flow_cpu = path_flow(model)
    model.cuda()
    gpu = clusterability(model, n_clusters=4, n_shuffles=3, n_workers=1)
    assert gpu.ncut == pytest.approx(cpu.ncut, rel=1e-9)
    np.testing.assert_allclose(path_flow(model), flow_cpu, rtol=1e-5)
    monitor = ClusterabilityMonitor(model, every=1, n_clusters=4, n_shuffles=2, n_workers=1)
    record = monitor.step()
    monitor.close()
    assert record["ncut"] == pytest.approx(clusterability(model, n_clusters=4, n_shuffles=2, n_workers=1).ncut)


def _bn_cnn(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    ).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model


@needs_cuda
def test_regularizer_on_a_cuda_cnn_matches_the_cpu():
    example = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    cpu_model = _bn_cnn(0)
    reg_cpu = SpectralRegularizer(cpu_model, n_eigs=3, weight=1.0, tol=1e-12, example_input=example,
                                  include_dense=True)
    value_cpu = reg_cpu()
    value_cpu.backward()
    gpu_model = _bn_cnn(0).cuda()
    reg_gpu = SpectralRegularizer(gpu_model, n_eigs=3, weight=1.0, tol=1e-12, example_input=example.cuda(),
                                  include_dense=True)
    value_gpu = reg_gpu()
    assert value_gpu.device.type == "cuda"
    assert value_gpu.item() == pytest.approx(value_cpu.item(), rel=1e-9)
    value_gpu.backward()
    for (name, p_cpu), p_gpu in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        if p_cpu.grad is None:
            assert p_gpu.grad is None, name
            continue
        assert p_gpu.grad.device.type == "cuda", name
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-7, atol=1e-10, msg=name)


# The tests below take the device as a parameter: their CPU instance runs everywhere and proves
# the test itself; the CUDA instance runs where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _planted_chain(dtype=torch.float64):
    weights, _ = _planted([40, 32, 32, 24, 10], k=3, seed=5)
    layers = []
    for i, w in enumerate(weights):
        lin = nn.Linear(w.shape[1], w.shape[0], dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w.to(dtype))
            lin.bias.zero_()
        layers += [lin, nn.ReLU()] if i < len(weights) - 1 else [lin]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("device", DEVICES)
def test_warm_started_chain_training_on_the_device_matches_the_cpu(device):
    """Ten Adam steps of a regularized chain in float64 with the torch step (the path every GPU
    user runs: warm starts, extrapolation, the host-side QR and eigh) on ``device``, against the
    same training on the CPU: the same weights and eigenvalues to rounding."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 40, generator=gen, dtype=torch.float64)

    def train(dev):
        model = _planted_chain().to(dev)
        reg = SpectralRegularizer(model, n_eigs=3, backend="torch")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(10):
            opt.zero_grad()
            (model(x.to(dev)).square().mean() + reg()).backward()
            opt.step()
        return [p.detach().cpu() for p in model.parameters()], reg.eigenvalues().cpu(), reg.last_result.method

    ref_params, ref_eigs, _ = train("cpu")
    params, eigs, method = train(device)
    assert method == "gram"  # the warm chain step ran, not a full solve
    torch.testing.assert_close(eigs, ref_eigs, rtol=1e-8, atol=1e-10)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_inside_autocast_on_the_device_equals_the_full_precision_one(device):
    """A bf16 autocast training step on ``device``: the penalty computed inside the region equals
    a fresh regularizer's value on the same weights outside it, step after step."""
    model = _planted_chain(torch.float32).to(device)
    reg = SpectralRegularizer(model, n_eigs=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(1)).to(device)
    for _ in range(4):
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(x)
            penalty = reg()
        assert out.dtype == torch.bfloat16 and penalty.dtype == torch.float32
        fresh = SpectralRegularizer(model, n_eigs=3, backend="torch", tol=1e-7)().item()
        assert penalty.item() == pytest.approx(fresh, rel=1e-5)
        (out.float().square().mean() + penalty).backward()
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_in_a_compiled_step_on_the_device(device, compiled_training_runs):
    def attach(model, opt):
        reg = SpectralRegularizer(model, n_eigs=3)
        return reg, lambda: [round(v, 6) for v in reg.eigenvalues().tolist()]

    frames = compiled_training_runs(attach, device=device)
    assert frames[True] <= frames[False] + 2, frames
