"""The README's Python quickstarts run as printed.

Every ```python block of README.md is executed, in order, in one namespace, the way a reader
pastes them one after another. The names a block takes from the reader's own code (an
optimizer, a data loader, a ResNet, a training function) are defined by small stand-ins before
that block runs, and the one placeholder line of the pruning quickstart (``...  # your
fine-tuning loop``) is replaced by a few training steps. Nothing else of the printed code is
changed, so a renamed function, argument or attribute fails here. (The README's shell commands
run on the demo's own checkpoints in ``tests/test_demo.py``.)
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
FINETUNE_PLACEHOLDER = re.compile(r"^\.\.\.\s+# your fine-tuning loop$", re.M)


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _batches(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 784, generator=gen), torch.randint(0, 10, (32,), generator=gen)) for _ in range(n)]


class _Residual(nn.Module):
    """A ResNet in miniature: a conv stem, one conv-BN layer with an identity skip, a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn, self.head = nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head((torch.relu(self.bn(self.conv(x))) + x).mean(dim=(2, 3)))


def _stand_ins(ns: dict, source: str) -> None:
    """Defines what ``source`` uses but the README leaves to the reader's own code."""
    if "optimizer" in source and "optimizer" not in ns:
        ns["optimizer"] = torch.optim.SGD(ns["model"].parameters(), lr=0.01)
    if "unpruned" in source and "unpruned" not in ns:
        ns["unpruned"] = copy.deepcopy(ns["model"])
    if "loader" in source:
        ns.setdefault("loader", _batches(3, seed=1))
        ns.setdefault("criterion", nn.CrossEntropyLoss())
        ns.setdefault("opt", torch.optim.Adam(ns["model"].parameters(), lr=1e-3))
    if "resnet" in source:
        ns.setdefault("resnet", _Residual())
    if "cnn" in source:
        ns.setdefault("cnn", nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                           nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 5)))
    if "train(" in source:
        def train(*_):
            model, optimizer = ns["model"], ns["optimizer"]
            for x, y in _batches(100, seed=2):  # the monitor's every=100 measures once
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        ns.setdefault("train", train)


def _finetune_steps(n: int) -> str:
    return (f"for _x, _y in __batches({n}, seed=3):\n"
            "    optimizer.zero_grad(); nn.functional.cross_entropy(model(_x), _y).backward(); optimizer.step()")


def test_readme_has_the_four_quickstarts():
    text = README.read_text()
    for title in ("## Quickstart: measure", "## Quickstart: prune and compare", "## Quickstart: regularize",
                  "## Quickstart: monitor"):
        assert title in text, title
    blocks = _python_blocks()
    assert len(blocks) >= 4
    assert sum(bool(FINETUNE_PLACEHOLDER.search(b)) for b in blocks) == 1


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write compare.png and runs/exp1 into the working directory
    pytest.importorskip("matplotlib")  # report.plot needs the `plot` extra, which `make test` installs
    ns: dict = {"__name__": "readme", "nn": nn, "__batches": _batches}
    for i, source in enumerate(_python_blocks()):
        _stand_ins(ns, source)
        # The schedule prunes from its first step (initial=0.5) and then every 10 steps.
        runnable = FINETUNE_PLACEHOLDER.sub(_finetune_steps(12), source)
        exec(compile(runnable, f"README.md python block {i}", "exec"), ns)

    # What the blocks claim, checked on what they left behind.
    assert ns["result"].n_shuffles == 50 and ns["labels"].shape[0] == ns["graph"].num_nodes
    assert (tmp_path / "compare.png").is_file()
    assert ns["report"].pruned.n_weights < 0.55 * ns["report"].unpruned.n_weights  # pruned while "fine-tuning"
    eigs = ns["reg"].eigenvalues()
    assert eigs.shape == (11,) and torch.isfinite(eigs).all()
    assert len(ns["monitor"].history) == 1 and "ncut" in ns["monitor"].history[0]
    assert list((tmp_path / "runs" / "exp1").glob("events.out.tfevents.*"))
    assert all(p.grad is not None for p in ns["model"].parameters())  # reg() reached the weights
