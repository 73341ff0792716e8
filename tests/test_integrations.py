"""Lightning and Hugging Face integrations, run with the real libraries on CPU (issue 6).

Each test skips, with the extra to install in the reason, when its library is missing.
"""
from __future__ import annotations

import csv
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_modularity import SpectralRegularizer

K = 3


def _tiny_net(seed: int = 0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net


class StubRegularizer:
    """Duck-typed regularizer (not the library's): a differentiable scalar, eigenvalues(), state."""

    def __init__(self, net, weight=1e-2):
        self.net = net
        self.weight = weight
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.weight * sum(m.weight.abs().sum() for m in self.net if isinstance(m, nn.Linear))

    def eigenvalues(self):
        return torch.tensor([0.1, 0.2])

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    ea.Reload()
    return ea


def _data(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)


@pytest.mark.parametrize("extra,package", [("lightning", "lightning"), ("huggingface", "transformers")])
def test_missing_library_names_the_extra(monkeypatch, extra, package):
    # make `import <package>` fail as if it were not installed
    for name in list(sys.modules):
        if name == package or name.startswith(package + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.delitem(sys.modules, f"torch_modularity.integrations.{extra}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'torch_modularity\[{extra}\]'"):
        importlib.import_module(f"torch_modularity.integrations.{extra}")


# --------------------------------------------------------------------------- Lightning
def test_lightning_trainer_produces_the_curve_and_resumes(tmp_path):
    L = pytest.importorskip("lightning.pytorch", reason="lightning is not installed: pip install 'torch_modularity[lightning]'")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from torch_modularity.integrations.lightning import ClusterabilityCallback

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _tiny_net()
            self.reg = StubRegularizer(self.net)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y) + self.reg()  # the documented one-liner

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def fit(lit, cb, max_steps, ckpt_path=None):
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=[cb],
                            logger=[TensorBoardLogger(tmp_path, name="tb", version=0),
                                    CSVLogger(tmp_path, name="csv", version=0)],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            log_every_n_steps=50)
        trainer.fit(lit, DataLoader(TensorDataset(*_data()), batch_size=4), ckpt_path=ckpt_path)
        return trainer

    lit = Lit()
    cb = ClusterabilityCallback(every=2, n_clusters=K, module="net", figure_every=4, regularizer=lit.reg)
    trainer = fit(lit, cb, 6)
    assert [h["step"] for h in cb.history] == [2, 4, 6]
    assert "clusterability/ncut" in trainer.callback_metrics
    ea = _events(tmp_path / "tb" / "version_0")
    for tag in ("ncut", "n_components", "n_isolated", "regularizer", "eigs/0"):
        assert [e.step for e in ea.Scalars(f"clusterability/{tag}")] == [2, 4, 6], tag
    assert [e.step for e in ea.Histograms("clusterability/cluster_sizes")] == [2, 4, 6]
    assert [e.step for e in ea.Images("clusterability/adjacency")] == [4]
    # other loggers get the scalars at the measured step, whatever log_every_n_steps says
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("clusterability/ncut")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]

    # state_dict / state_key: a checkpointed run resumes its curve
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][cb.state_key]
    assert [h["step"] for h in saved["history"]] == [2, 4, 6]
    cb2 = ClusterabilityCallback(every=2, n_clusters=K, module="net")
    assert cb2.state_key == cb.state_key
    fit(Lit(), cb2, 8, ckpt_path=ckpt)
    assert [h["step"] for h in cb2.history] == [2, 4, 6, 8]
    assert cb.monitor.closed and cb2.monitor.closed


def test_lightning_bf16_mixed_precision_with_the_real_regularizer(tmp_path):
    """``Trainer(precision="bf16-mixed")`` runs ``training_step`` inside ``torch.autocast``: the
    documented one-liner with the library's regularizer trains there, and every step's penalty
    (logged) equals the same regularizer's value on the same weights outside autocast."""
    L = pytest.importorskip("lightning.pytorch", reason="lightning is not installed: pip install 'torch_modularity[lightning]'")
    from torch.utils.data import DataLoader, TensorDataset

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _tiny_net()
            self.reg = SpectralRegularizer(self.net, n_eigs=2)
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            assert torch.is_autocast_enabled("cpu")  # the region the penalty must not be changed by
            penalty = self.reg()
            check = SpectralRegularizer(self.net, n_eigs=2, backend="torch", tol=1e-7)
            with torch.autocast("cpu", enabled=False):
                self.seen.append((float(penalty.detach()), float(check().detach())))
            return F.mse_loss(self.net(x).float(), y) + penalty

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    lit = Lit()
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(lit, DataLoader(TensorDataset(*_data()), batch_size=4))
    assert lit.reg.steps == 5 and len(lit.seen) == 5
    for penalty, fresh in lit.seen:
        assert penalty == pytest.approx(fresh, rel=1e-5)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in lit.net.parameters())


# --------------------------------------------------------------------------- Hugging Face
class _TinyHF(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _tiny_net(1)

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_huggingface_trainer_logs_metric_and_regularized_trainer_adds_penalty(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install 'torch_modularity[huggingface]'")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install 'torch_modularity[huggingface]'")
    from transformers import Trainer, TrainingArguments

    from torch_modularity.integrations import huggingface as hf

    model = _TinyHF()
    reg = StubRegularizer(model.net)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=0.05,
                             report_to=["tensorboard"], use_cpu=True, logging_steps=3, save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    cb = hf.ClusterabilityCallback(every=2, n_clusters=K, model=model.net, figure_every=4, regularizer=reg)
    RegTrainer = hf.with_regularizer(Trainer)
    assert hf.with_regularizer(Trainer) is RegTrainer and hf.RegularizedTrainer is RegTrainer
    assert issubclass(RegTrainer, hf.RegularizedTrainerMixin) and issubclass(RegTrainer, Trainer)
    trainer = RegTrainer(model=model, args=args, train_dataset=_DictDataset(*_data()), regularizer=reg,
                         callbacks=[cb])

    # compute_loss: loss + regularizer() in training mode, the plain loss in eval mode
    x, y = _data(8, seed=1)
    batch = {"x": x, "labels": y}
    model.train()
    with torch.no_grad():
        plain = F.mse_loss(model.net(x), y)
        penalty = reg()
    loss = trainer.compute_loss(model, batch)
    assert loss.requires_grad
    loss = loss.detach()
    assert float(loss) == pytest.approx(float(plain + penalty), rel=1e-6)
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert float(loss.detach()) == pytest.approx(float(plain + penalty), rel=1e-6) and "logits" in outputs
    model.eval()
    with torch.no_grad():
        assert float(trainer.compute_loss(model, batch)) == pytest.approx(float(plain), rel=1e-6)
    model.train()
    calls = reg.calls

    trainer.train()
    assert reg.calls == calls + 6  # once per training step; the monitor restored its counter
    entries = [e for e in trainer.state.log_history if "clusterability/ncut" in e]
    assert [e["step"] for e in entries] == [2, 4, 6]
    assert {"clusterability/n_components", "clusterability/regularizer", "clusterability/eigs/1"} <= set(entries[0])
    assert [h["step"] for h in cb.history] == [2, 4, 6]
    assert any("regularizer" in e and "loss" in e for e in trainer.state.log_history)
    ea = _events(tmp_path / "runs" / "clusterability")
    assert [e.step for e in ea.Scalars("clusterability/ncut")] == [2, 4, 6]
    assert [e.step for e in ea.Images("clusterability/adjacency")] == [4]
    assert cb.monitor.closed
