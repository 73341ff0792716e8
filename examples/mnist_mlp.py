"""Shared pieces of the MNIST examples: the research MLP and a plain Adam training loop.

Imported by the example scripts in this folder (run them as scripts: ``python examples/demo.py``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

PAPER_MLP = (784, 256, 256, 256, 256, 10)


def make_mlp(sizes=PAPER_MLP) -> nn.Sequential:
    """Flatten, then Linear layers with ReLU between them (the research code's MLP)."""
    layers = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, x, y, epochs: int, seed: int, batch_size: int = 128, lr: float = 1e-3,
          schedule=None, penalty: Optional[Callable[[], torch.Tensor]] = None,
          attach: Sequence[Callable] = (), log: Callable[[str], None] = print) -> torch.optim.Optimizer:
    """Adam training; the data order comes from a private generator seeded with ``seed``.

    Args:
        schedule: a ``PolynomialSparsity`` attached to the optimizer for the run (masks are
            updated after every step); without it existing prune masks stay fixed.
        penalty: a callable added to the loss at every step (e.g. a ``SpectralRegularizer``).
        attach: callables such as ``monitor.attach`` that hook onto the optimizer and return
            a handle; the handles are removed at the end.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)  # a fresh optimizer, as the research code re-compiled
    handles = [hook(opt) for hook in ([schedule.attach] if schedule is not None else []) + list(attach)]
    loss_fn = nn.CrossEntropyLoss()
    try:
        for epoch in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            total = 0.0
            for start in range(0, len(x), batch_size):
                idx = perm[start:start + batch_size]
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                if penalty is not None:
                    loss = loss + penalty()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            log(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}")
    finally:
        for handle in handles:
            handle.remove()
    return opt
