"""Command line: ``torch-modularity measure|prune-compare CHECKPOINT`` (also ``python -m torch_modularity``)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch
from torch import nn

from .checkpoint import load_model_or_state_dict
from .graph import WeightGraph
from .measure import clusterability
from .shuffle import SHUFFLE_METHODS

__all__ = ["main", "load_checkpoint"]


def load_checkpoint(path: str, trust: bool = False) -> WeightGraph:
    """Weight graph of a ``torch.save`` file holding a module or a Linear-chain state_dict.

    The file is read with ``weights_only=True``; a pickled whole module is only loaded when
    ``trust`` is set, because unpickling can execute arbitrary code.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "mlp.pt")
        >>> torch.save(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).state_dict(), path)
        >>> load_checkpoint(path).layer_sizes
        (4, 3, 2)

    Args:
        path: the checkpoint file.
        trust: allow unpickling arbitrary objects (needed for whole modules).

    Returns:
        The :class:`WeightGraph` of the checkpoint.
    """
    obj = load_model_or_state_dict(path, trust)
    if isinstance(obj, nn.Module):
        return WeightGraph.from_module(obj)
    return WeightGraph.from_state_dict(obj)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch-modularity", description="Measure the modularity of PyTorch networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="n-cut clusterability of a checkpoint versus shuffled baselines")
    m.add_argument("checkpoint", help="file saved with torch.save: a state_dict of a Linear chain, or a whole module")
    m.add_argument("--n-clusters", type=int, default=12, help="number of clusters k (default 12)")
    m.add_argument("--shuffles", type=int, default=50, help="number of shuffled baselines (default 50)")
    m.add_argument("--shuffle", choices=SHUFFLE_METHODS, default="layer", help="shuffle method (default layer)")
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    m.add_argument("--workers", type=int, default=None, help="worker processes for the shuffles (default: all CPUs)")
    m.add_argument("--exclude-dead", action="store_true",
                   help="measure the live subgraph: drop units on no input-to-output path first")
    m.add_argument("--device", default=None,
                   help="where the block eigensolver of large graphs runs, e.g. cuda (default: cpu)")
    m.add_argument("--json", action="store_true", help="print the full result as JSON")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a pickled whole module (unpickling runs code from the file)")
    from .pruning import add_cli as add_prune_compare_cli

    add_prune_compare_cli(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``torch-modularity`` console script."""
    args = _build_parser().parse_args(argv)
    if args.command == "prune-compare":
        from .pruning import run_cli

        return run_cli(args)
    try:
        graph = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        result = clusterability(
            graph,
            n_clusters=args.n_clusters,
            n_shuffles=args.shuffles,
            shuffle=args.shuffle,
            seed=args.seed,
            n_workers=args.workers,
            exclude_dead=args.exclude_dead,
            device=args.device,
            progress=not args.json and sys.stderr.isatty(),  # a bar in a terminal, quiet in logs
        )
    except (ValueError, TypeError) as err:
        print(f"torch-modularity: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"checkpoint      {args.checkpoint}")
        print(f"layers          {'-'.join(str(s) for s in graph.layer_sizes)}")
        print(result.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
