"""The main job: train the research MLP on real MNIST, then measure its clusterability.

Trains the 784-256-256-256-256-10 MLP of "Clusterability in Neural Networks" (Adam 1e-3,
batch 128) for a few epochs, saves its state_dict to ``runs/demo/mlp.pt`` and measures it
with k=12 clusters against 50 'layer' shuffles, exactly as the command line would::

    torch-modularity measure runs/demo/mlp.pt --n-clusters 12 --shuffles 50

Run with ``make demo``. ``--quick`` (or ``TORCH_MODULARITY_QUICK=1``) trains on a subset for a
smoke test.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from torch_modularity import clusterability
from torch_modularity.datasets import load_mnist

from mnist_mlp import accuracy, make_mlp, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--shuffles", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("TORCH_MODULARITY_QUICK") == "1",
                        help="tiny run for smoke tests: 1 epoch on 5000 images, 10 shuffles")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.shuffles = 1, 10

    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    if args.quick:
        x_train, y_train = x_train[:5000], y_train[:5000]

    torch.manual_seed(args.seed)  # the demo script owns its RNG; the library never reseeds
    model = make_mlp()
    print(f"Training 784-256-256-256-256-10 on MNIST ({len(x_train)} images, {args.epochs} epochs)")
    t0 = time.time()
    train(model, x_train, y_train, args.epochs, args.seed)
    acc = accuracy(model, x_test, y_test)
    print(f"  test accuracy {acc:.4f} ({time.time() - t0:.1f} s)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "mlp.pt"
    torch.save(model.state_dict(), ckpt)
    print(f"Saved {ckpt}\n")

    print(f"Measuring clusterability (k=12, {args.shuffles} 'layer' shuffles)")
    t0 = time.time()
    result = clusterability(model, n_clusters=12, n_shuffles=args.shuffles, seed=args.seed,
                            progress=sys.stderr.isatty())
    print(result.summary())
    print(f"({time.time() - t0:.1f} s)\n")
    verdict = "more" if result.p_value <= 0.05 and result.z < 0 else "not significantly more"
    print(f"The trained network is {verdict} clusterable than its shuffles (z = {result.z:.2f}, p = {result.p_value:.4f}).")
    print(f"Same measurement from the shell: torch-modularity measure {ckpt} --shuffles {args.shuffles}")


if __name__ == "__main__":
    main()
