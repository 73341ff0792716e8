"""Path flow through the units of a layered network, and the dead units it reveals.

A unit can sit in its own tight cluster simply because it was cut off from the computation:
the spectral regularizer may find it cheaper to disconnect an unused unit than to split the
network into real modules. Such units carry (almost) no input-to-output signal, which the path
flow measures directly:

``flow(u) = (sum over input->u paths of prod |w|) * (sum over u->output paths of prod |w|)``

i.e. the total weight of all input-to-output paths through ``u``. It is computed layer by layer
with matrix-vector products: a forward pass ``f_{l+1} = |W_l| f_l`` from ``f_0 = 1`` and a
backward pass ``b_l = |W_l|^T b_{l+1}`` from ``b_L = 1``, then ``flow_l = f_l * b_l``. Every
input-to-output path crosses each layer exactly once, so every layer's flows add up to the same
total ``P`` (the summed weight of all paths). The vectors are rescaled to a maximum of 1 after
each layer (the logarithms of the scales are kept), so deep or large-weight nets neither
overflow nor underflow.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import scipy.sparse as sp
import torch

from .graph import GraphLike, WeightGraph, as_graph

__all__ = ["path_flow", "dead_units", "remove_dead"]


def _chain_blocks(g: WeightGraph):
    n_layers = len(g.layer_sizes)
    by_pair = {}
    for b in g.blocks:
        if b.dst != b.src + 1 or (b.src, b.dst) in by_pair:
            raise ValueError(
                f"path flow needs a chain graph (one block from each layer to the next); got a block "
                f"{g.layer_names[b.src]} -> {g.layer_names[b.dst]} ({b.src} -> {b.dst})"
            )
        by_pair[(b.src, b.dst)] = b
    missing = [l for l in range(n_layers - 1) if (l, l + 1) not in by_pair]
    if missing:
        raise ValueError(f"path flow needs a chain graph; no block from layer {missing[0]} to layer {missing[0] + 1}")
    mats = []
    for l in range(n_layers - 1):
        w = by_pair[(l, l + 1)].weight
        # CSR blocks (pruned graphs) stay sparse: only products with vectors are needed.
        # The blocks' own precision (float32 for large graphs): no float64 copy of the weights;
        # the per-layer rescaling keeps the vectors in range.
        mats.append(w if sp.issparse(w) else w.detach().cpu().numpy())
    return mats


def _flow_parts(g: WeightGraph):
    """Per-layer scaled forward / backward vectors and their log-scales."""
    mats = _chain_blocks(g)
    n_layers = len(g.layer_sizes)
    fwd, fwd_log = [np.ones(g.layer_sizes[0])], [0.0]
    for w in mats:
        v = np.asarray(w @ fwd[-1].astype(w.dtype, copy=False), dtype=np.float64).ravel()
        top = float(v.max()) if v.size else 0.0
        if top > 0:
            fwd.append(v / top)
            fwd_log.append(fwd_log[-1] + np.log(top))
        else:
            fwd.append(v)
            fwd_log.append(-np.inf)
    bwd, bwd_log = [None] * n_layers, [0.0] * n_layers
    bwd[-1] = np.ones(g.layer_sizes[-1])
    for l in range(n_layers - 2, -1, -1):
        v = np.asarray(mats[l].T @ bwd[l + 1].astype(mats[l].dtype, copy=False), dtype=np.float64).ravel()
        top = float(v.max()) if v.size else 0.0
        if top > 0:
            bwd[l] = v / top
            bwd_log[l] = bwd_log[l + 1] + np.log(top)
        else:
            bwd[l] = v
            bwd_log[l] = -np.inf
    return fwd, fwd_log, bwd, bwd_log


def path_flow(graph_or_model: GraphLike, normalize: bool = True) -> np.ndarray:
    """Input-to-output path flow through every unit of a chain network.

    Example:
        >>> import torch
        >>> g = WeightGraph.from_weights([torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [0.0]])])
        >>> path_flow(g).tolist()   # shares of the path weight 3 + 6 = 9, per layer
        [0.3333333333333333, 0.6666666666666666, 1.0, 1.0, 0.0]
        >>> [round(v, 9) for v in path_flow(g, normalize=False).tolist()]
        [3.0, 6.0, 9.0, 9.0, 0.0]

    Args:
        graph_or_model: a chain :class:`WeightGraph` (blocks ``(l, l+1)``), an ``nn.Module``
            chain of Linear layers, a state_dict or a list of weight matrices.
        normalize: ``True`` (default): each unit's share of the total path weight ``P`` (every
            layer then sums to 1; computed without overflow for any depth or weight scale).
            ``False``: the absolute flow (``P`` times the share), which can overflow to ``inf``
            or underflow to 0 for deep nets.

    Returns:
        A float64 numpy array with one entry per node, in node order. A network without any
        input-to-output path gets all zeros.

    Raises:
        ValueError: the graph is not a chain of consecutive layers.
    """
    g = as_graph(graph_or_model)
    fwd, fwd_log, bwd, bwd_log = _flow_parts(g)
    out = []
    # Shares: flow_l / P. With f_l = F_l e^{a_l}, b_l = B_l e^{c_l}, flow_l = F_l B_l e^{a_l + c_l};
    # P = sum(flow_l) is the same for every layer, so share_l = F_l B_l / sum(F_l B_l).
    total_log = None
    for l in range(len(g.layer_sizes)):
        prod = fwd[l] * bwd[l]
        s = float(prod.sum())
        if s <= 0 or not np.isfinite(fwd_log[l] + bwd_log[l]):
            return np.zeros(g.num_nodes)
        if normalize:
            out.append(prod / s)
        else:
            if total_log is None:
                total_log = fwd_log[l] + bwd_log[l] + np.log(s)
            out.append(prod / s * np.exp(total_log))
    return np.concatenate(out)


def dead_units(graph_or_model: GraphLike, threshold: float = 1e-3) -> np.ndarray:
    """Units whose path flow is below ``threshold`` times the largest flow of their layer.

    Such units take no real part in the input-to-output computation (their weights were
    driven to ~0, or a neighbouring layer cut them off), so a cluster made of them is not a
    module. Input and output units are judged the same way (an input pixel whose outgoing
    weights all vanished is dead too). Isolated (degree-0) units always count as dead.

    Example:
        >>> import torch
        >>> w1 = torch.tensor([[1.0, 1.0], [1e-6, 1e-6]])     # hidden unit 1 barely fed
        >>> w2 = torch.tensor([[1.0, 1.0]])
        >>> dead_units(WeightGraph.from_weights([w1, w2])).tolist()
        [False, False, False, True, False]

    Args:
        graph_or_model: as for :func:`path_flow`.
        threshold: relative flow below which a unit is dead (per layer).

    Returns:
        A boolean numpy mask with one entry per node, in node order (``np.nonzero`` gives the
        node ids; :meth:`WeightGraph.node_info` names them).
    """
    threshold = float(threshold)
    if not (threshold >= 0 and np.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    g = as_graph(graph_or_model)
    share = path_flow(g, normalize=True)
    off = g.layer_offsets
    dead = np.zeros(g.num_nodes, dtype=bool)
    for l in range(len(g.layer_sizes)):
        part = share[off[l]:off[l + 1]]
        top = part.max() if part.size else 0.0
        dead[off[l]:off[l + 1]] = part < threshold * top if top > 0 else True
    return dead


def remove_dead(graph_or_model: GraphLike, threshold: float = 1e-3) -> Tuple[WeightGraph, np.ndarray]:
    """The live subgraph: the graph without its :func:`dead_units`, and the original id of each kept node.

    Layers left without nodes are dropped (as in :meth:`WeightGraph.remove_isolated`); node
    names (:meth:`WeightGraph.node_info`) still refer to the original units. Measure it with
    :func:`torch_modularity.clusterability` to get the n-cut of the live network.

    Example:
        >>> import torch
        >>> w1 = torch.tensor([[1.0, 1.0], [1e-6, 1e-6]])
        >>> live, kept = remove_dead(WeightGraph.from_weights([w1, torch.tensor([[1.0, 1.0]])]))
        >>> live.layer_sizes, kept.tolist()
        ((2, 1, 1), [0, 1, 2, 4])
    """
    g = as_graph(graph_or_model)
    keep = ~dead_units(g, threshold)
    if not keep.any():
        raise ValueError("every unit is dead: the network has no input-to-output path")
    return g.subgraph(keep)
