"""ClusterabilityMonitor: TensorBoard events read back, hook removal, schedule, background mode,
state_dict resume, regularizer logging, DDP rank 0 only (issue 6)."""
from __future__ import annotations

import concurrent.futures as cf
import gc
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from torch_modularity import WeightGraph, clusterability
from torch_modularity.monitor import (
    BackgroundMeasurementError,
    ClusterabilityMonitor,
    _mp_context,
    adjacency_image,
)

K = 3
TAGS = ["ncut", "n_components", "n_isolated", "n_dead", "live_ncut"]
SHUFFLE_TAGS = ["shuffle_mean", "shuffle_std", "z", "p_value"]


def _tiny_model(seed: int = 0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _train(model, opt, steps, seed=0, after_step=None):
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=gen)).square().mean().backward()
        opt.step()
        if after_step is not None:
            after_step(i)


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    ea.Reload()
    return ea


def _no_hooks_left(model, opt):
    assert len(opt._optimizer_step_post_hooks) == 0
    assert len(opt._optimizer_step_pre_hooks) == 0
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


class StubRegularizer:
    """Duck-typed regularizer: __call__, eigenvalues(), state_dict()/load_state_dict()."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return sum(p.abs().sum() for p in self.model.parameters()) * 1e-3

    def eigenvalues(self):
        return torch.tensor([0.25, 0.5]) * self.calls

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


# --------------------------------------------------------------------------- TensorBoard
def test_tensorboard_events_tags_and_steps(tmp_path):
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reg = StubRegularizer(model)
    logdir = tmp_path / "run"
    monitor = ClusterabilityMonitor(model, every=2, writer=str(logdir), n_clusters=K, n_shuffles=3, seed=1,
                                    figure_every=4, regularizer=reg, n_workers=1)
    with monitor, monitor.attach(opt):
        _train(model, opt, 8)
    assert [h["step"] for h in monitor.history] == [2, 4, 6, 8]
    # one run: no sub-run directories (add_scalars/add_hparams would create them)
    assert [p.name for p in logdir.iterdir() if p.is_dir()] == []
    ea = _events(logdir)
    expected = {f"clusterability/{t}" for t in TAGS + SHUFFLE_TAGS + ["regularizer", "eigs/0", "eigs/1"]}
    assert set(ea.Tags()["scalars"]) == expected
    for tag in expected:
        assert [e.step for e in ea.Scalars(tag)] == [2, 4, 6, 8], tag
    ncut = [e.value for e in ea.Scalars("clusterability/ncut")]
    np.testing.assert_allclose(ncut, [h["ncut"] for h in monitor.history], rtol=1e-6)
    assert ea.Tags()["histograms"] == ["clusterability/cluster_sizes"]
    assert [e.step for e in ea.Histograms("clusterability/cluster_sizes")] == [2, 4, 6, 8]
    assert ea.Tags()["images"] == ["clusterability/adjacency"]
    assert [e.step for e in ea.Images("clusterability/adjacency")] == [4, 8]
    # the regularizer was evaluated at the measured weights, and its state restored afterwards
    assert reg.calls == 0
    assert [e.value for e in ea.Scalars("clusterability/eigs/1")] == pytest.approx([0.5] * 4)
    h = monitor.history[-1]
    with torch.no_grad():
        assert h["regularizer"] == pytest.approx(float(StubRegularizer(model)()), rel=1e-5)
    assert sum(h["cluster_sizes"]) + h["n_isolated"] == h["num_nodes"] == 25
    assert h["n_shuffles"] == 3 and 0 < h["p_value"] <= 1


def test_user_writer_is_flushed_not_closed_and_history_matches_library(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    model = _tiny_model(1)
    writer = SummaryWriter(str(tmp_path))
    monitor = ClusterabilityMonitor(model, every=1, writer=writer, n_clusters=K, prefix="mod")
    rec = monitor.step()
    monitor.close()
    writer.add_scalar("after/close", 1.0, 0)  # still open
    writer.close()
    assert rec == monitor.history[0]
    assert rec["ncut"] == pytest.approx(clusterability(model, n_clusters=K, n_shuffles=0, seed=0).ncut, abs=1e-12)
    tags = set(_events(tmp_path).Tags()["scalars"])
    assert tags == {"mod/ncut", "mod/n_components", "mod/n_isolated", "mod/n_dead", "mod/live_ncut", "after/close"}


def test_no_writer_records_history_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monitor = ClusterabilityMonitor(_tiny_model(), every=1, n_clusters=K)
    monitor.step()
    monitor.close()
    assert len(monitor.history) == 1 and list(tmp_path.iterdir()) == []


def test_adjacency_image_shows_planted_blocks(planted_weights):
    weights, modules = planted_weights([30, 30, 30], k=3, seed=0, strength=8.0)
    graph = WeightGraph.from_weights(weights)
    img = adjacency_image(graph, modules, max_size=256)
    assert img.shape == (90, 90, 3) and img.dtype == np.uint8
    small = adjacency_image(graph, modules, max_size=30)
    assert small.shape == (30, 30, 3)
    # sorted by module: darker (stronger) inside the diagonal blocks than off them
    gray = img[:, :, 1].astype(float)
    inside = np.kron(np.eye(3), np.ones((30, 30))).astype(bool)
    assert gray[inside].mean() < gray[~inside].mean() - 20


# --------------------------------------------------------------------------- hooks
def test_hooks_removed_by_handle_context_exception_and_close():
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = ClusterabilityMonitor(model, every=1000, n_clusters=K)

    handle = monitor.attach(opt)
    _train(model, opt, 2)
    assert monitor.global_step == 2
    handle.remove()
    handle.remove()  # idempotent
    _no_hooks_left(model, opt)
    _train(model, opt, 1)
    assert monitor.global_step == 2  # detached: not counted

    with monitor.attach(opt) as h:  # repeated attach
        assert h.attached
        with pytest.raises(RuntimeError, match="already attached"):
            monitor.attach(opt)
        _train(model, opt, 1)
    assert not h.attached
    _no_hooks_left(model, opt)
    assert monitor.global_step == 3

    with pytest.raises(KeyError):
        with monitor.attach(opt):
            _train(model, opt, 1)
            raise KeyError("boom")
    _no_hooks_left(model, opt)
    assert monitor.global_step == 4

    # a monitor referenced only through its hook stays alive and keeps counting
    handle = ClusterabilityMonitor(model, every=1000, n_clusters=K).attach(opt)
    gc.collect()
    _train(model, opt, 2)
    assert handle.monitor.global_step == 2
    handle.monitor.close()
    _no_hooks_left(model, opt)

    monitor.attach(opt)
    monitor.close()  # close removes what is still attached
    _no_hooks_left(model, opt)
    with pytest.raises(RuntimeError, match="closed"):
        monitor.step()


def test_schedule_manual_steps_and_foreground_error():
    model = _tiny_model()
    monitor = ClusterabilityMonitor(model, every=3, n_clusters=K)
    assert monitor.step(0) is not None  # the initial weights
    for _ in range(7):
        monitor.step()
    assert [h["step"] for h in monitor.history] == [0, 3, 6]
    monitor.step(global_step=6)  # the same step again: not measured twice
    monitor.step(global_step=30)
    assert [h["step"] for h in monitor.history] == [0, 3, 6, 30]
    assert monitor.measure(31)["step"] == 31
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.raises(ValueError):  # no edges left: clusterability() refuses, from inside optimizer.step()
        monitor.step(33)
    monitor.close()


def test_bad_arguments():
    model = _tiny_model()
    with pytest.raises(TypeError, match="unexpected keyword"):
        ClusterabilityMonitor(model, n_cluster=3)
    with pytest.raises(ValueError, match="every"):
        ClusterabilityMonitor(model, every=0)
    with pytest.raises(TypeError, match="LSTM"):
        ClusterabilityMonitor(nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3)))
    with pytest.raises(ValueError, match="executor"):
        ClusterabilityMonitor(model, background=True, executor=object())


# --------------------------------------------------------------------------- background
def test_background_logs_every_step_in_order_from_snapshots(tmp_path):
    model = _tiny_model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = {}

    def remember_then_perturb(i):
        # the weights the measurement of step i+1 must see; then change them in place at once
        seen[i + 1] = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
        with torch.no_grad():
            model[0].weight[:, i % 6].mul_(0.1)
            model[2].weight[i % 8].mul_(0.1)

    logdir = tmp_path / "bg"
    monitor = ClusterabilityMonitor(model, every=1, writer=str(logdir), n_clusters=K, n_shuffles=2, seed=5,
                                    background=True, max_pending=3, figure_every=2)
    with monitor, monitor.attach(opt):
        _train(model, opt, 6, after_step=remember_then_perturb)
        assert monitor.pending <= 3
    assert monitor.pending == 0 and monitor.closed
    assert [h["step"] for h in monitor.history] == [1, 2, 3, 4, 5, 6]
    for h in monitor.history:
        ref = clusterability(seen[h["step"]], n_clusters=K, n_shuffles=2, seed=5, n_workers=1)
        assert h["ncut"] == pytest.approx(ref.ncut, abs=1e-9)
        assert h["shuffle_mean"] == pytest.approx(ref.mean, abs=1e-9)
    ea = _events(logdir)
    for tag in TAGS + SHUFFLE_TAGS:
        assert [e.step for e in ea.Scalars(f"clusterability/{tag}")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in ea.Images("clusterability/adjacency")] == [2, 4, 6]


def test_background_failure_is_reraised_with_context_and_close_loses_nothing():
    model = _tiny_model(3)
    saved = [p.detach().clone() for p in model.parameters()]

    def zero():  # a snapshot without edges: the worker's clusterability() raises
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

    def restore():
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)

    monitor = ClusterabilityMonitor(model, every=1, n_clusters=K, background=True)
    monitor.step()  # 1
    zero()
    monitor.step()  # 2 fails in the worker
    restore()
    cf.wait([future for _, future, _ in monitor._pending])
    with pytest.raises(BackgroundMeasurementError) as info:
        monitor.step()  # 3: the next step() re-raises, after submitting its own measurement
    assert monitor.pending == 1
    monitor.flush()
    assert info.value.step == 2
    assert isinstance(info.value.__cause__, ValueError)
    assert "step 2" in str(info.value) and "ValueError" in str(info.value)

    monitor.step()  # 4: the monitor goes on
    zero()
    monitor.step()  # 5 fails
    restore()
    # Step 6 re-raises step 5's failure if the worker has finished it by then, else close() does:
    # either way exactly once, after step 6 was submitted (a race the test must not depend on).
    try:
        monitor.step()  # 6
    except BackgroundMeasurementError as err:
        assert err.step == 5
        monitor.close()
    else:
        with pytest.raises(BackgroundMeasurementError, match="step 5"):
            monitor.close()  # raises only after logging everything else and closing
    assert monitor.closed and monitor.pending == 0
    assert [h["step"] for h in monitor.history] == [1, 3, 4, 6]


def test_atexit_handler_flushes_background_results(tmp_path):
    model = _tiny_model()
    monitor = ClusterabilityMonitor(model, every=1, writer=str(tmp_path), n_clusters=K, background=True)
    for _ in range(3):
        monitor.step()
    monitor._atexit()  # what interpreter exit runs
    assert monitor.closed and [h["step"] for h in monitor.history] == [1, 2, 3]
    assert [e.step for e in _events(tmp_path).Scalars("clusterability/ncut")] == [1, 2, 3]


def test_interpreter_exit_without_close_loses_nothing(tmp_path):
    # One subprocess for two checks (each costs a fresh torch import): importing the core
    # package never imports an optional integration, and atexit flushes pending measurements.
    script = textwrap.dedent(f"""
        import sys
        import torch
        from torch import nn
        import torch_modularity
        from torch_modularity.monitor import ClusterabilityMonitor
        if __name__ == "__main__":
            optional = ("lightning", "pytorch_lightning", "transformers", "accelerate", "torch_modularity.integrations")
            print("optional imported:", [m for m in optional if m in sys.modules])
            model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
            monitor = ClusterabilityMonitor(model, every=1, writer={str(tmp_path)!r}, n_clusters=3, background=True)
            for _ in range(4):
                monitor.step()
            print("pending", monitor.pending)
            # no close(): the atexit handler must wait for and log the pending measurements
    """)
    path = tmp_path / "script.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "optional imported: []" in out.stdout
    assert "pending 0" not in out.stdout  # something really was left for exit
    assert [e.step for e in _events(tmp_path).Scalars("clusterability/ncut")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- state
def test_state_dict_round_trip_continues_the_curve(tmp_path):
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logdir = tmp_path / "run"
    first = ClusterabilityMonitor(model, every=2, writer=str(logdir), n_clusters=K)
    with first, first.attach(opt):
        _train(model, opt, 5)
    torch.save({"monitor": first.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()},
               tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2 = _tiny_model(9)
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    opt2.load_state_dict(ckpt["opt"])
    second = ClusterabilityMonitor(model2, every=2, writer=str(logdir), n_clusters=K)
    second.load_state_dict(ckpt["monitor"])
    assert second.global_step == 5
    with second, second.attach(opt2):
        _train(model2, opt2, 3, seed=1)
    assert [h["step"] for h in second.history] == [2, 4, 6, 8]
    assert second.history[:2] == first.history
    assert [e.step for e in _events(logdir).Scalars("clusterability/ncut")] == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="state_dict"):
        second.load_state_dict({"step": 3})


# --------------------------------------------------------------------------- DDP
def _ddp_rank(rank, out_dir):
    model = nn.parallel.DistributedDataParallel(_tiny_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reg = StubRegularizer(model.module)
    monitor = ClusterabilityMonitor(model, every=1, writer=os.path.join(out_dir, f"rank{rank}"), n_clusters=3,
                                    regularizer=reg)
    with monitor, monitor.attach(opt):
        _train(model, opt, 3, seed=rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"history": len(monitor.history), "step": monitor.global_step, "reg_calls": reg.calls}, fh)


def _ddp_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # The DDP model (held by the monitor too) dies before the process group: dropped afterwards,
        # the reducer's last reference destroys the group while holding the GIL, which deadlocked
        # (gloo's worker thread needed the GIL to free a finished all-reduce).
        _ddp_rank(rank, out_dir)
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_ddp_two_process_gloo_only_rank0_measures_and_writes(tmp_path, run_processes):
    _mp_context()  # let the forkserver preload torch_modularity before it starts
    run_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="forkserver")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == {"history": 3, "step": 3, "reg_calls": 0}
    assert r1 == {"history": 0, "step": 3, "reg_calls": 0}  # counted, but nothing measured
    assert not (tmp_path / "rank1").exists()  # no writer, no event file on rank 1
    assert [e.step for e in _events(tmp_path / "rank0").Scalars("clusterability/ncut")] == [1, 2, 3]


def test_dead_units_and_live_ncut_are_logged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6))
    with torch.no_grad():
        model[2].weight[:, :4] *= 1e-7  # hidden units 0-3 feed nothing forward: dead, not isolated
    monitor = ClusterabilityMonitor(model, every=1, n_clusters=3)
    monitor.step(0)
    record = monitor.history[-1]
    assert record["n_dead"] == 4 and record["n_isolated"] == 0
    live = clusterability(model, n_clusters=3, n_shuffles=0, seed=0, exclude_dead=True)
    assert record["live_ncut"] == pytest.approx(live.ncut, abs=1e-12)


def test_monitor_hook_inside_a_compiled_training_step(compiled_training_runs):
    """Attached to an optimizer whose step runs inside ``torch.compile``: the measurement runs
    eagerly (untraced: tracing into it compiled ~100 frames) and logs what the eager run logs."""

    def attach(model, opt):
        monitor = ClusterabilityMonitor(model, every=2, n_clusters=3, n_shuffles=0, writer=None)
        monitor.attach(opt)
        return None, lambda: [(r["step"], r["ncut"]) for r in monitor.history]

    frames = compiled_training_runs(attach)
    assert frames[True] <= frames[False] + 2, frames
