"""Command line: ``torch-modularity measure CHECKPOINT`` (also ``python -m torch_modularity``)."""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from typing import List, Optional

import torch
from torch import nn

from .graph import WeightGraph
from .measure import clusterability
from .shuffle import SHUFFLE_METHODS

__all__ = ["main", "load_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint could not be turned into a weight graph."""


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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        if not trust:
            raise CheckpointError(
                f"{path} is not a plain state_dict: it holds pickled objects (such as a whole nn.Module), which "
                f"torch.load refuses with weights_only=True ({type(err).__name__}). Loading it runs code from the "
                f"file: if you trust it, pass --trust-checkpoint; or save model.state_dict() instead."
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:  # a corrupt file: say so instead of a traceback
            raise CheckpointError(f"could not read checkpoint {path}: {err2}") from None
    except Exception as err:
        raise CheckpointError(f"could not read checkpoint {path}: {err}") from None
    if isinstance(obj, nn.Module):
        return WeightGraph.from_module(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if isinstance(obj, nn.Module):
            return WeightGraph.from_module(obj)
        return WeightGraph.from_state_dict(dict(obj))
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not an nn.Module or a state_dict")


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
    m.add_argument("--json", action="store_true", help="print the full result as JSON")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a pickled whole module (unpickling runs code from the file)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``torch-modularity`` console script."""
    args = _build_parser().parse_args(argv)
    try:
        graph = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        result = clusterability(
            graph,
            n_clusters=args.n_clusters,
            n_shuffles=args.shuffles,
            shuffle=args.shuffle,
            seed=args.seed,
            n_workers=args.workers,
            progress=not args.json,
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
