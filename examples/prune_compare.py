"""Is a magnitude-pruned MNIST MLP more clusterable than random pruning? The fair experiment.

Trains the 784-256-256-256-256-10 MLP of "Clusterability in Neural Networks" (Adam 1e-3,
batch 128), then fine-tunes a copy while pruning it by magnitude with the research schedule
(polynomial 0.5 -> 0.9, every 10 steps, each layer pruned to the schedule). Random-pruned
copies of the trained net, with exactly the pruned net's per-layer kept counts, get the *same*
fine-tuning with their masks fixed, and ``compare`` measures everything (k=12) against
random-pruned nets (trained values and the pruned net's values) and 'layer' /
'layer_nonzero' shuffles of the pruned net. The result is printed whatever it is.

The paper's recipe is 20 + 20 epochs (``--epochs 20 --pruning-epochs 20``); the defaults are
shorter. ``--quick`` (or ``TORCH_MODULARITY_QUICK=1``) is a smoke test on 2000 images.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torch_modularity.datasets import load_mnist
from torch_modularity.pruning import PolynomialSparsity, compare, finalize, layer_sparsity

from mnist_mlp import accuracy, make_mlp, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs before pruning (paper: 20)")
    parser.add_argument("--pruning-epochs", type=int, default=2, help="fine-tuning epochs while pruning (paper: 20)")
    parser.add_argument("--random", type=int, default=5, help="random-pruned nets per variant")
    parser.add_argument("--shuffles", type=int, default=50, help="shuffles of the pruned net per method")
    parser.add_argument("--n-clusters", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/prune_compare")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("TORCH_MODULARITY_QUICK") == "1",
                        help="smoke test: 2000 images, 1 + 1 epochs, 2 random nets, 4 shuffles")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.pruning_epochs, args.random, args.shuffles = 1, 1, 2, 4

    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    if args.quick:
        x_train, y_train = x_train[:2000], y_train[:2000]
    steps_per_epoch = -(-len(x_train) // 128)

    torch.manual_seed(args.seed)  # the example owns its RNG (initialisation); the library never reseeds
    model = make_mlp()
    print(f"Training 784-256-256-256-256-10 on MNIST ({len(x_train)} images, {args.epochs} epochs)")
    t0 = time.time()
    train(model, x_train, y_train, args.epochs, args.seed)
    print(f"  test accuracy {accuracy(model, x_test, y_test):.4f} ({time.time() - t0:.1f} s)\n")

    # Steps are counted from 0, so the last of the pruning epochs' steps is the end step: the
    # final sparsity is reached at the last step (the research code's end_step was one later).
    end_step = max(1, steps_per_epoch * args.pruning_epochs - 1)
    pruned = copy.deepcopy(model)
    schedule = PolynomialSparsity(pruned, initial=0.5, final=0.9, begin_step=0, end_step=end_step,
                                  frequency=10, scope="layer")
    print(f"Fine-tuning with magnitude pruning {schedule} ({args.pruning_epochs} epochs)")
    t0 = time.time()
    # The same seed (data order) as the random-pruned copies' fine-tuning below.
    train(pruned, x_train, y_train, args.pruning_epochs, args.seed + 1, schedule=schedule)
    print(f"  test accuracy {accuracy(pruned, x_test, y_test):.4f} ({time.time() - t0:.1f} s)")
    print("  per-layer sparsity " + ", ".join(f"{k}: {v:.3f}" for k, v in layer_sparsity(pruned).items()) + "\n")

    random_acc = []

    def finetune(net: nn.Module) -> None:
        """The pruned net's fine-tuning, with the random masks held fixed (no schedule)."""
        train(net, x_train, y_train, args.pruning_epochs, args.seed + 1, log=lambda msg: None)
        random_acc.append(accuracy(net, x_test, y_test))

    print(f"Comparing (k={args.n_clusters}): {args.random} random-pruned nets per variant, each fine-tuned the same "
          f"way; {args.shuffles} shuffles of the pruned net per method")
    t0 = time.time()
    result = compare(model, pruned_model=pruned, n_random=args.random, n_shuffles=args.shuffles,
                     n_clusters=args.n_clusters, seed=args.seed, finetune=finetune, progress=True)
    print(f"({time.time() - t0:.1f} s)\n")
    print(result)
    # compare() fine-tunes in the order: net 0 trained values, net 0 matched values, net 1 trained, ...
    print(f"\ntest accuracy after the same fine-tuning: pruned {accuracy(pruned, x_test, y_test):.4f}; random-pruned "
          f"with trained values {np.mean(random_acc[0::2]):.4f}, with matched values {np.mean(random_acc[1::2]):.4f} "
          f"(means of {args.random})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "mlp.pt")
    torch.save(finalize(pruned).state_dict(), out / "pruned.pt")  # plain state_dict, zeros kept
    print(f"Saved {out / 'mlp.pt'} and {out / 'pruned.pt'}. Without the fine-tuning of the random copies, the same "
          f"comparison from the shell:\n  torch-modularity prune-compare {out / 'mlp.pt'} --pruned {out / 'pruned.pt'}")
    try:
        print(f"Figure: {result.plot(str(out / 'compare.png'))}")
    except ImportError as err:
        print(f"(no figure: {err})")


if __name__ == "__main__":
    main()
