"""The main job: measure, regularize, monitor and prune the paper's MNIST MLP, end to end.

1. Trains the 784-256-256-256-256-10 MLP of "Clusterability in Neural Networks" (Adam 1e-3,
   batch 128) twice from the same initialization and data order: plain, and with
   ``SpectralRegularizer`` in the loss. A ``ClusterabilityMonitor`` logs both n-cut curves to
   TensorBoard under ``runs/demo/tb/``.
2. Prunes a copy of the plain net to 90% sparsity with the research schedule (polynomial
   0.5 -> 0.9, every 10 steps, each layer) while fine-tuning it, then runs
   ``pruning.compare`` against random-pruned nets with the same per-layer kept counts and
   against shuffles of the pruned net.
3. Prints one table (accuracy, n-cut, live n-cut, dead units, shuffle mean/std, z, p for the
   plain, regularized, pruned and random-pruned nets), writes it to ``runs/demo/report.md``
   with a figure ``runs/demo/report.png``, and prints the TensorBoard command.

k = 12 clusters and 50 'layer' shuffles throughout. Run with ``make demo``; ``--quick`` (or
``TORCH_MODULARITY_QUICK=1``) is a smoke test on a subset.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from torch_modularity import ClusterabilityMonitor, clusterability
from torch_modularity.datasets import load_mnist
from torch_modularity.pruning import PolynomialSparsity, compare, finalize
from torch_modularity.regularizer import SpectralRegularizer

from mnist_mlp import accuracy, make_mlp, train

K = 12


def fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def measure(model, shuffles: int, seed: int):
    """Raw and live-subgraph clusterability of a model (same seed and settings)."""
    raw = clusterability(model, n_clusters=K, n_shuffles=shuffles, seed=seed, progress=sys.stderr.isatty())
    live = clusterability(model, n_clusters=K, n_shuffles=0, seed=seed, exclude_dead=True) if raw.n_dead else raw
    return raw, live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of each net")
    parser.add_argument("--pruning-epochs", type=int, default=2, help="fine-tuning epochs while pruning")
    parser.add_argument("--shuffles", type=int, default=50)
    parser.add_argument("--random", type=int, default=4, help="random-pruned nets per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("TORCH_MODULARITY_QUICK") == "1",
                        help="smoke test: 3000 images, 1 + 1 epochs, 10 shuffles, 2 random nets")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.pruning_epochs, args.shuffles, args.random = 1, 1, 10, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    if args.quick:
        x_train, y_train = x_train[:3000], y_train[:3000]
    steps_per_epoch = math.ceil(len(x_train) / 128)

    # 1. plain and regularized training, same initialization and data order
    torch.manual_seed(args.seed)  # the script owns its RNG; the library never reseeds
    plain = make_mlp()
    regularized = copy.deepcopy(plain)
    nets = {}
    for name, model in (("plain", plain), ("regularized", regularized)):
        reg = SpectralRegularizer(model) if name == "regularized" else None
        monitor = ClusterabilityMonitor(model, every=max(1, steps_per_epoch // 4), writer=str(out / "tb" / name),
                                        n_clusters=K, seed=args.seed, regularizer=reg)
        print(f"[{time.time() - t_start:5.0f} s] training the {name} MLP ({len(x_train)} images, {args.epochs} epochs)"
              + (f": loss = cross-entropy + {reg.weight} x sum of the {reg.n_eigs} smallest non-trivial "
                 f"Laplacian eigenvalues" if reg else ""), flush=True)
        monitor.step(0)  # the curves start at the initial weights
        with monitor:  # closes the TensorBoard writer, also on errors
            train(model, x_train, y_train, args.epochs, args.seed, penalty=reg, attach=[monitor.attach],
                  log=lambda m: print(m, flush=True))
        if reg is not None:
            reg.remove()
        nets[name] = model
        torch.save(model.state_dict(), out / f"{name}.pt")

    # 2. prune the plain net while fine-tuning, then compare with random pruning and shuffles
    print(f"[{time.time() - t_start:5.0f} s] pruning the plain MLP to 90% while fine-tuning "
          f"({args.pruning_epochs} epochs)", flush=True)
    pruned = copy.deepcopy(plain)
    schedule = PolynomialSparsity(pruned, initial=0.5, final=0.9, begin_step=0,
                                  end_step=steps_per_epoch * args.pruning_epochs - 1, frequency=10)
    train(pruned, x_train, y_train, args.pruning_epochs, args.seed + 1, schedule=schedule,
          log=lambda m: print(m, flush=True))
    finalize(pruned)
    torch.save(pruned.state_dict(), out / "pruned.pt")
    print(f"[{time.time() - t_start:5.0f} s] measuring (k={K}, {args.shuffles} shuffles each)", flush=True)
    comparison = compare(plain, pruned_model=pruned, n_random=args.random, n_shuffles=args.shuffles,
                         n_clusters=K, seed=args.seed)

    # 3. one table
    rows = []
    for name in ("plain", "regularized"):
        raw, live = measure(nets[name], args.shuffles, args.seed)
        rows.append((name, accuracy(nets[name], x_test, y_test), raw.ncut, live.ncut, raw.n_dead, raw.mean, raw.std,
                     raw.z, raw.p_value))
    shuffled = comparison.shuffle_results["layer"]
    rows.append(("pruned (90%)", accuracy(pruned, x_test, y_test), comparison.pruned.ncut, comparison.pruned.live_ncut,
                 comparison.pruned.n_dead, shuffled.mean, shuffled.std, shuffled.z, shuffled.p_value))
    for variant, stats in (("trained", comparison.random_trained), ("matched", comparison.random_matched)):
        base = comparison.baselines[f"random_{variant}"]
        rows.append((f"random-pruned, {variant} values (mean of {base.n})", None, base.mean,
                     float(np.mean([s.live_ncut for s in stats])), float(np.mean([s.n_dead for s in stats])),
                     None, None, None, None))
    head = ["net", "test acc", f"n-cut (k={K})", "live n-cut", "dead units", "shuffle mean", "shuffle std", "z", "p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r[0], fmt(r[1], ".4f"), fmt(r[2]), fmt(r[3]), fmt(r[4], ".0f"), fmt(r[5]),
                                        fmt(r[6], ".4f"), fmt(r[7], ".2f"), fmt(r[8], ".4f")]) + " |")
    table = "\n".join(lines)
    elapsed = time.time() - t_start
    report = (f"# torch_modularity demo\n\nMNIST, 784-256-256-256-256-10 MLP, {args.epochs} epochs"
              f"{' (quick mode: 3000 images)' if args.quick else ''}; pruning {args.pruning_epochs} epochs of "
              f"polynomial 0.5 -> 0.9 magnitude pruning. k = {K}, {args.shuffles} 'layer' shuffles, seed {args.seed}. "
              f"Lower n-cut = more clusterable; z < 0 and small p = more clusterable than the net's own shuffles. "
              f"'live n-cut' measures the subgraph without dead units (on no input-to-output path).\n\n{table}\n\n"
              f"Pruned net against each baseline:\n\n```\n{comparison}\n```\n\nTotal time {elapsed:.0f} s.\n")
    (out / "report.md").write_text(report)
    try:
        comparison.plot(str(out / "report.png"))
        figure = f"{out / 'report.png'}"
    except ImportError as err:
        figure = f"(no figure: {err})"
    print("\n" + table + "\n")
    print(comparison)
    print(f"\nReport: {out / 'report.md'}, figure: {figure}; done in {elapsed:.0f} s.")
    print(f"Curves: tensorboard --logdir {out / 'tb'}")


if __name__ == "__main__":
    main()
