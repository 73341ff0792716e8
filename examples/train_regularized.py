"""Train the MNIST MLP with and without the spectral clusterability regularizer, then measure both.

Both runs start from the same initial weights and see the same batches (same seed). The
regularized one adds one line to the loss::

    reg = SpectralRegularizer(model)          # library defaults: n_eigs=11, weight=0.05
    loss = criterion(model(x), y) + reg()

Each trained network is measured with ``clusterability`` (k=12 clusters, 50 'layer' shuffles)
twice: on the whole weight graph ("raw") and on its live subgraph (``exclude_dead=True``:
without the units whose input-to-output path flow is below 1e-3 of their layer's maximum,
``dead_units``; the shuffles are shuffles of the live subgraph):
the regularizer can lower the eigenvalues by cutting unused units off, and clusters of such
dead units are not modules. Prints accuracy, n-cut and z for both networks, raw and live,
the dead units per layer and the per-layer make-up of each cluster, and writes
``results.json`` and the two state_dicts to ``--out``.

Run ``python examples/train_regularized.py`` (20 epochs; several minutes per network on two
CPU cores) or ``--quick`` for a smoke test (1 epoch on 5000 images, 5 shuffles).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torch_modularity import clusterability
from torch_modularity.datasets import load_mnist
from torch_modularity.flow import dead_units
from torch_modularity.graph import WeightGraph
from torch_modularity.regularizer import DEFAULT_N_EIGS, DEFAULT_WEIGHT, SpectralRegularizer

from mnist_mlp import accuracy, make_mlp

SIZES = (784, 256, 256, 256, 256, 10)


def train(model, x, y, epochs: int, seed: int, reg=None, batch_size: int = 128, lr: float = 1e-3, log=print):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        ce_sum, pen_sum, t0 = 0.0, 0.0, time.time()
        for start in range(0, len(x), batch_size):
            idx = perm[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            ce = loss_fn(model(x[idx]), y[idx])
            loss = ce
            if reg is not None:
                pen = reg()
                loss = ce + pen
                pen_sum += float(pen.detach()) * len(idx)
            loss.backward()
            opt.step()
            ce_sum += float(ce.detach()) * len(idx)
        msg = f"    epoch {epoch + 1}/{epochs}: cross-entropy {ce_sum / len(x):.4f}"
        if reg is not None:
            eig = reg.eigenvalues()
            msg += f", penalty {pen_sum / len(x):.4f} (lambda_2 {float(eig[0]):.4f} .. lambda_{reg.n_eigs + 1} {float(eig[-1]):.4f})"
        log(msg + f" [{time.time() - t0:.0f} s]")
    model.eval()


def measure(model: nn.Module, n_shuffles: int, seed: int, threshold: float = 1e-3) -> dict:
    graph = WeightGraph.from_module(model)
    raw = clusterability(graph, n_clusters=12, n_shuffles=n_shuffles, seed=seed, dead_threshold=threshold)
    live = clusterability(graph, n_clusters=12, n_shuffles=n_shuffles, seed=seed, exclude_dead=True,
                          dead_threshold=threshold)
    dead = dead_units(graph, threshold)
    off = graph.layer_offsets
    dead_per_layer = [int(dead[off[l]:off[l + 1]].sum()) for l in range(len(graph.layer_sizes))]
    # Clusters of the raw partition that consist mostly of dead units.
    labels = raw.labels
    dead_clusters = [int(c) for c in range(12) if (labels == c).any() and np.mean(dead[labels == c]) > 0.5]

    def summary(res):
        return {"ncut": res.ncut, "z": res.z, "p": res.p_value, "shuffled_mean": res.mean, "shuffled_std": res.std,
                "nodes": int((res.labels >= 0).sum()), "clusters_by_layer": res.clusters_by_layer().tolist()}

    return {"raw": {**summary(raw), "dead_clusters": dead_clusters}, "live": summary(live),
            "dead_per_layer": dead_per_layer, "n_dead": int(dead.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--shuffles", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight", type=float, default=DEFAULT_WEIGHT)
    parser.add_argument("--n-eigs", type=int, default=DEFAULT_N_EIGS)
    parser.add_argument("--normalize-relu", action="store_true")
    parser.add_argument("--no-control", action="store_true", help="train only the regularized network")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="runs/regularized")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("TORCH_MODULARITY_QUICK") == "1",
                        help="smoke test: 1 epoch on 5000 images, 5 shuffles")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.shuffles = 1, 5
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_train, y_train = load_mnist("train", flatten=True)
    x_test, y_test = load_mnist("test", flatten=True)
    if args.quick:
        x_train, y_train = x_train[:5000], y_train[:5000]

    runs = [] if args.no_control else [("control", None)]
    runs.append(("regularized", dict(n_eigs=args.n_eigs, weight=args.weight, normalize_relu=args.normalize_relu)))
    results = {"settings": {k: v for k, v in vars(args).items()}}
    for name, reg_kwargs in runs:
        torch.manual_seed(args.seed)  # the example owns its RNG: identical initial weights for both runs
        model = make_mlp()
        reg = SpectralRegularizer(model, **reg_kwargs) if reg_kwargs is not None else None
        print(f"{name}: training 784-256x4-10 on MNIST ({len(x_train)} images, {args.epochs} epochs)"
              + (f" with {reg}" if reg is not None else ""), flush=True)
        t0 = time.time()
        train(model, x_train, y_train, args.epochs, args.seed, reg, log=lambda m: print(m, flush=True))
        train_s = time.time() - t0
        if reg is not None:
            reg.remove()
        acc = accuracy(model, x_test, y_test)
        torch.save(model.state_dict(), out / f"{name}.pt")
        t1 = time.time()
        m = measure(model, args.shuffles, args.seed)
        res = {"test_accuracy": acc, "train_seconds": train_s, "measure_seconds": time.time() - t1, **m}
        if reg is not None:
            res["eigenvalues"] = reg.eigenvalues().tolist()
            res["disconnected"] = reg.disconnected
        results[name] = res
        print(f"  test accuracy {acc:.4f}; trained in {train_s:.0f} s; n-cut raw {m['raw']['ncut']:.3f} "
              f"(z {m['raw']['z']:.1f}), live {m['live']['ncut']:.3f} (z {m['live']['z']:.1f}); "
              f"dead units per layer {m['dead_per_layer']}", flush=True)

    print("\nnetwork       accuracy   n-cut raw   z raw   n-cut live   z live   dead units")
    for name in ("control", "regularized"):
        if name in results:
            r = results[name]
            print(f"{name:12s}  {100 * r['test_accuracy']:7.2f} %  {r['raw']['ncut']:9.3f}  {r['raw']['z']:6.1f}  "
                  f"{r['live']['ncut']:10.3f}  {r['live']['z']:6.1f}   {r['n_dead']:4d} {r['dead_per_layer']}")
    if "control" in results:
        c, r = results["control"], results["regularized"]
        print(f"\naccuracy cost {100 * (c['test_accuracy'] - r['test_accuracy']):+.2f} points; n-cut lower by "
              f"{c['raw']['ncut'] - r['raw']['ncut']:.2f} (raw) and {c['live']['ncut'] - r['live']['ncut']:.2f} (live)")
    for name in ("control", "regularized"):
        if name in results:
            print(f"\n{name}: units of each layer (rows: input, hidden 1-4, output) in each of the 12 clusters")
            for which in ("raw", "live"):
                print(f"  {which}:")
                for row in results[name][which]["clusters_by_layer"]:
                    print("    " + " ".join(f"{v:4d}" for v in row))
    with open(out / "results.json", "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
