"""Clusterability as a training curve: the paper's MNIST MLP with a ClusterabilityMonitor attached.

Trains the 784-256-256-256-256-10 MLP (Adam 1e-3, batch 128) on MNIST for a couple of epochs
and measures its 12-cluster n-cut every ``--every`` optimizer steps in a background worker
process, so training does not wait. Everything goes to TensorBoard::

    python examples/monitor_mnist.py            # 2 epochs, every 50 steps
    tensorboard --logdir runs/monitor           # clusterability/ncut next to train/loss

Tags: ``clusterability/ncut``, ``/n_components``, ``/n_isolated``, the cluster-size histogram
``/cluster_sizes``, the cluster-sorted adjacency image ``/adjacency`` (every ``--figure-every``
steps), and with ``--shuffles N`` also ``/shuffle_mean``, ``/shuffle_std``, ``/z``,
``/p_value``. ``--quick`` (or ``TORCH_MODULARITY_QUICK=1``) is a smoke test: 1 epoch on 5000
images, measured every 10 steps.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from torch_modularity.datasets import load_mnist
from torch_modularity.monitor import ClusterabilityMonitor

from mnist_mlp import make_mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--every", type=int, default=50, help="measure every N optimizer steps")
    parser.add_argument("--figure-every", type=int, default=200, help="log the adjacency image every N steps")
    parser.add_argument("--clusters", type=int, default=12)
    parser.add_argument("--shuffles", type=int, default=0, help="shuffled baselines per measurement (z, p)")
    parser.add_argument("--foreground", action="store_true", help="measure in the training process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/monitor")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("TORCH_MODULARITY_QUICK") == "1",
                        help="smoke test: 1 epoch on 5000 images, every 10 steps")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.every, args.figure_every = 1, 10, 20

    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    if args.quick:
        x_train, y_train = x_train[:5000], y_train[:5000]

    torch.manual_seed(args.seed)  # the script owns its RNG; the monitor never touches it
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out))  # one run: the loss and the clusterability curves side by side
    monitor = ClusterabilityMonitor(model, every=args.every, writer=writer, n_clusters=args.clusters,
                                    n_shuffles=args.shuffles, seed=args.seed, figure_every=args.figure_every,
                                    background=not args.foreground)
    print(f"Training 784-256-256-256-256-10 on MNIST ({len(x_train)} images, {args.epochs} epochs); "
          f"n-cut (k={args.clusters}) every {args.every} steps -> {out}/")
    t0 = time.time()
    monitor.step(0)  # the initial weights: the curve starts at step 0
    with monitor, monitor.attach(opt):  # on exit: hook removed, pending measurements logged
        step = 0
        for epoch in range(args.epochs):
            perm = torch.randperm(len(x_train), generator=gen)
            for start in range(0, len(x_train), 128):
                idx = perm[start:start + 128]
                opt.zero_grad()
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()  # the monitor counts this step and measures when due
                step += 1
                writer.add_scalar("train/loss", float(loss.detach()), step)
            with torch.no_grad():
                acc = float((model(x_test).argmax(1) == y_test).float().mean())
            writer.add_scalar("test/accuracy", acc, step)
            print(f"  epoch {epoch + 1}/{args.epochs}: test accuracy {acc:.4f} ({time.time() - t0:.1f} s, "
                  f"{monitor.pending} measurements pending)", flush=True)
    writer.close()
    print(f"Done in {time.time() - t0:.1f} s; {len(monitor.history)} measurements:")
    shown = sorted(set(range(0, len(monitor.history), max(1, len(monitor.history) // 8))) | {len(monitor.history) - 1})
    for h in (monitor.history[i] for i in shown):
        print(f"  step {h['step']:5d}  n-cut {h['ncut']:.4f}  components {h['n_components']}  "
              f"isolated {h['n_isolated']}  ({h['seconds']:.2f} s)")
    print(f"View with: tensorboard --logdir {out}")


if __name__ == "__main__":  # required: the background worker process re-imports this file
    main()
