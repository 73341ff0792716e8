"""The weight graph of a network: nodes are units (or channels), edges are |weights|.

The graph is stored as per-layer blocks, never as an N x N matrix: node layer ``l`` has
``layer_sizes[l]`` nodes, and each edge block ``(src, dst, W)`` holds a non-negative
``(layer_sizes[dst], layer_sizes[src])`` matrix in torch layout (rows are the receiving
units). A plain MLP is the chain ``(0, 1), (1, 2), ...``; the block list is general enough
for skip connections and channel graphs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

__all__ = ["WeightGraph", "EdgeBlock"]

ArrayLike = Union[torch.Tensor, np.ndarray]

# Graphs with more weight-matrix entries than this are computed in float32.
_FLOAT64_LIMIT = 1 << 17
# Blocks with at least this many entries and under this density are handled as CSR.
_SPARSE_MIN_ENTRIES = 1 << 16
_SPARSE_DENSITY = 0.25


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DataParallel / DistributedDataParallel / ``torch.compile`` wrappers."""
    for _ in range(8):  # wrappers can nest (compile of DDP, ...); never loop forever
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _block_matvec(w, v: np.ndarray, transpose: bool) -> np.ndarray:
    """``w @ v`` (or ``w.T @ v``) of a torch or scipy block with a 0/1 vector, as numpy."""
    if sp.issparse(w):
        vec = v.astype(w.dtype)
        return np.asarray((w.T @ vec) if transpose else (w @ vec))
    vec = torch.from_numpy(v).to(device=w.device, dtype=w.dtype)
    out = (w.T @ vec) if transpose else (w @ vec)
    return out.cpu().numpy()


def _sums(w, axis: int) -> np.ndarray:
    """Row (axis=1) or column (axis=0) sums of a dense tensor or CSR block, float64."""
    if sp.issparse(w):
        return np.asarray(w.sum(axis=axis, dtype=np.float64)).ravel()
    w = w.detach()
    if w.device.type == "cpu":
        # numpy casts in small buffers: float64 accumulation without a float64 copy of w.
        return w.numpy().sum(axis=axis, dtype=np.float64)
    return w.sum(dim=axis, dtype=torch.float64).cpu().numpy()


@dataclass(frozen=True)
class EdgeBlock:
    """One block of edges: ``weight[j, i]`` links unit ``i`` of layer ``src`` to unit ``j`` of ``dst``."""

    src: int
    dst: int
    weight: Union[torch.Tensor, sp.csr_matrix]  # dense tensor, or scipy CSR for sparse graphs

    @property
    def is_sparse(self) -> bool:
        return sp.issparse(self.weight)


def _as_sparse(w, name: str) -> sp.csr_matrix:
    """A scipy CSR copy of a sparse block with |values|, after checking them."""
    if isinstance(w, torch.Tensor):  # torch sparse (COO/CSR/...) -> scipy
        w = w.detach().cpu().to_sparse_coo().coalesce()
        idx = w.indices().numpy()
        vals = w.values()
        if vals.dtype in (torch.float16, torch.bfloat16):
            vals = vals.float()
        w = sp.coo_matrix((vals.numpy(), (idx[0], idx[1])), shape=tuple(w.shape))
    w = sp.csr_matrix(w)
    if not np.issubdtype(w.dtype, np.floating) or w.dtype == np.float16:
        w = w.astype(np.float32)
    if not np.all(np.isfinite(w.data)):
        bad = int((~np.isfinite(w.data)).sum())
        raise ValueError(f"{name} has {bad} non-finite (NaN/Inf) weights; fix or mask them before measuring")
    w = abs(w)
    w.eliminate_zeros()
    w.sort_indices()
    return w


def _as_tensor(w: ArrayLike, name: str) -> torch.Tensor:
    if sp.issparse(w) or (isinstance(w, torch.Tensor) and w.layout != torch.strided):
        return _as_sparse(w, name)
    if isinstance(w, np.ndarray):
        w = torch.from_numpy(np.ascontiguousarray(w))
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(w).__name__}")
    w = w.detach()
    if not (w.is_floating_point() or w.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name}: weights must be real numbers, got dtype {w.dtype}")
    if w.dtype in (torch.float16, torch.bfloat16) or not w.is_floating_point():
        # Half precision would lose small edges when degrees are summed; compute in float32.
        w = w.float()
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name} has {bad} non-finite (NaN/Inf) weights; fix or mask them before measuring")
    return w


class WeightGraph:
    """Undirected weighted graph of a network's units, kept as per-layer |W| blocks.

    Nodes are ordered layer by layer (input layer first); the id of unit ``i`` of layer
    ``l`` is ``layer_offsets[l] + i``. Edge weights are absolute values of the weights.

    Example:
        >>> import torch
        >>> g = WeightGraph.from_weights([torch.ones(3, 4), torch.ones(2, 3)])
        >>> g.num_nodes, g.layer_sizes
        (9, (4, 3, 2))
        >>> g.adjacency().shape
        (9, 9)

    Args:
        layer_sizes: number of nodes in each node layer.
        blocks: edge blocks ``(src, dst, weight)`` with ``weight`` of shape
            ``(layer_sizes[dst], layer_sizes[src])``; absolute values are taken.
        layer_names: one name per node layer (defaults to ``layer0``, ``layer1``, ...).
        unit_index: for each layer, the original unit index of each node (used after
            nodes were removed, so that :meth:`node_info` still names the right unit).
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        blocks: Iterable[Union[EdgeBlock, Tuple[int, int, ArrayLike]]],
        layer_names: Optional[Sequence[str]] = None,
        unit_index: Optional[Sequence[np.ndarray]] = None,
    ) -> None:
        sizes = tuple(int(s) for s in layer_sizes)
        if len(sizes) == 0:
            raise ValueError("a WeightGraph needs at least one node layer")
        if any(s < 0 for s in sizes):
            raise ValueError(f"layer sizes must be non-negative, got {sizes}")
        names = tuple(layer_names) if layer_names is not None else tuple(f"layer{i}" for i in range(len(sizes)))
        if len(names) != len(sizes):
            raise ValueError(f"got {len(names)} layer names for {len(sizes)} layers")
        checked: List[EdgeBlock] = []
        for b in blocks:
            src, dst, w = (b.src, b.dst, b.weight) if isinstance(b, EdgeBlock) else b
            src, dst = int(src), int(dst)
            if not (0 <= src < len(sizes) and 0 <= dst < len(sizes)) or src == dst:
                raise ValueError(f"edge block ({src}, {dst}) must join two different layers in 0..{len(sizes) - 1}")
            w = _as_tensor(w, f"weights of block {names[src]} -> {names[dst]}")
            if w.ndim != 2 or tuple(w.shape) != (sizes[dst], sizes[src]):
                raise ValueError(
                    f"block {names[src]} -> {names[dst]} has shape {tuple(w.shape)}, expected "
                    f"({sizes[dst]}, {sizes[src]}) = (units of {names[dst]}, units of {names[src]})"
                )
            checked.append(EdgeBlock(src, dst, w if sp.issparse(w) else w.abs()))
        self._sizes = sizes
        self._names = names
        self._blocks = tuple(checked)
        if unit_index is None:
            unit_index = [np.arange(s) for s in sizes]
        self._unit_index = tuple(np.asarray(u, dtype=np.int64) for u in unit_index)
        if [len(u) for u in self._unit_index] != list(sizes):
            raise ValueError("unit_index must give one original index per node")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def _from_checked(cls, sizes, blocks, names, unit_index=None) -> "WeightGraph":
        """A graph from blocks taken from a checked graph (non-negative, finite, right shapes),
        e.g. a subgraph or a shuffle: no second validation pass and no copies (for a 100k-node
        pruned net that pass was ~0.8 s). Dense numpy blocks are wrapped without a copy."""
        for _, _, w in blocks:
            if sp.issparse(w):
                w.sort_indices()  # canonical order, as _as_sparse gives (no-op when sorted)
        g = cls.__new__(cls)
        g._sizes = tuple(int(x) for x in sizes)
        g._names = tuple(names)
        g._blocks = tuple(
            EdgeBlock(int(src), int(dst), torch.from_numpy(w) if isinstance(w, np.ndarray) else w)
            for src, dst, w in blocks
        )
        if unit_index is None:
            unit_index = [np.arange(n) for n in g._sizes]
        g._unit_index = tuple(np.asarray(u, dtype=np.int64) for u in unit_index)
        return g

    @classmethod
    def from_weights(cls, weights: Sequence[ArrayLike], layer_names: Optional[Sequence[str]] = None) -> "WeightGraph":
        """Chain graph from weight matrices in torch layout ``(out_features, in_features)``.

        Example:
            >>> g = WeightGraph.from_weights([torch.randn(16, 8), torch.randn(4, 16)])
            >>> g.layer_sizes
            (8, 16, 4)

        Args:
            weights: 2-D tensors or arrays; ``weights[l].shape[1]`` must equal
                ``weights[l-1].shape[0]``.
            layer_names: optional names of the ``len(weights) + 1`` node layers.

        Returns:
            The graph with the input layer, every hidden layer and the output layer as nodes.
        """
        weights = list(weights)
        if not weights:
            raise ValueError("no weight matrices given: a graph needs at least one layer of weights")
        tensors = []
        for i, w in enumerate(weights):
            t = _as_tensor(w, f"weights[{i}]")
            if t.ndim != 2:
                raise ValueError(f"weights[{i}] has shape {tuple(t.shape)}; expected a 2-D (out_features, in_features) matrix")
            if i and t.shape[1] != tensors[-1].shape[0]:
                raise ValueError(
                    f"shapes do not chain: weights[{i - 1}] has {tensors[-1].shape[0]} outputs but weights[{i}] "
                    f"has {t.shape[1]} inputs (torch layout is (out_features, in_features))"
                )
            tensors.append(t)
        sizes = [tensors[0].shape[1]] + [t.shape[0] for t in tensors]
        blocks = [(i, i + 1, t) for i, t in enumerate(tensors)]
        return cls(sizes, blocks, layer_names=layer_names)

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        *,
        example_input=None,
        kernel_norm: str = "l1",
        fold_batchnorm: bool = True,
        include_dense: Optional[bool] = None,
        include_input: Optional[bool] = None,
    ) -> "WeightGraph":
        """Weight graph of an MLP, CNN or DAG model, read by tracing its forward pass.

        MLPs: every Linear's units are nodes, the input features too. CNNs: each Conv2d
        output channel is a node ("filters as units") and the edge between two channels is a
        norm of the |kernel| slice; BatchNorm is folded in; by default the image channels and
        the dense head are left out, as in the research code. Residual additions and
        concatenations are followed (the graph may then be non-bipartite). See
        :func:`torch_modularity.trace.graph_from_module` for every option and rule.

        Example:
            >>> mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
            >>> WeightGraph.from_module(mlp).layer_sizes
            (784, 64, 10)

        Args:
            model: the network.
            example_input: an input batch, needed only for models fx cannot trace.
            kernel_norm: ``"l1"`` (default), ``"fro"`` or ``"induced_l1"`` (the research code's).
            fold_batchnorm: multiply channels by ``|gamma| / sqrt(running_var + eps)``.
            include_dense: keep Linear layers after convolutions (default: no for CNNs).
            include_input: keep the input units/channels (default: yes for MLPs, no for CNNs).

        Returns:
            The graph; node layers are named after module paths (``graph.node_info(i)``).
        """
        from .trace import graph_from_module  # trace.py builds on this module

        return graph_from_module(model, example_input=example_input, kernel_norm=kernel_norm,
                                 fold_batchnorm=fold_batchnorm, include_dense=include_dense,
                                 include_input=include_input)

    @classmethod
    def from_state_dict(cls, state_dict: dict) -> "WeightGraph":
        """Chain graph from the state_dict of a chain of Linear layers.

        Keys ending in ``weight`` with 2-D values are taken in order; biases are ignored;
        ``weight_orig`` / ``weight_mask`` pairs left by ``torch.nn.utils.prune`` are multiplied.

        Example:
            >>> sd = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).state_dict()
            >>> WeightGraph.from_state_dict(sd).layer_sizes
            (4, 3, 2)

        Args:
            state_dict: mapping from parameter names to tensors.

        Returns:
            The chain graph, with node layers named after the weight keys' module paths.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"expected a state_dict (a dict of tensors), got {type(state_dict).__name__}")
        weights, names = [], ["input"]
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict entry '{key}' is a {type(value).__name__}, not a tensor")
            module_path, _, leaf = key.rpartition(".")
            if leaf in ("bias", "bias_orig", "bias_mask", "weight_mask") or key.endswith("num_batches_tracked"):
                continue
            if leaf in ("weight", "weight_orig") and value.dim() == 2:
                if leaf == "weight_orig":
                    mask = state_dict.get(f"{module_path}.weight_mask" if module_path else "weight_mask")
                    value = value * mask if mask is not None else value
                weights.append(value)
                names.append(module_path or key)
                continue
            raise TypeError(
                f"state_dict entry '{key}' with shape {tuple(value.shape)} is not a Linear weight or bias; only "
                f"chains of Linear layers can be loaded from a state_dict (save the whole module for other models)"
            )
        if not weights:
            raise ValueError("the state_dict holds no 2-D weight matrices, so there is no weight graph to measure")
        return cls.from_weights(weights, layer_names=names)

    # ------------------------------------------------------------------ properties
    @property
    def layer_sizes(self) -> Tuple[int, ...]:
        return self._sizes

    @property
    def layer_names(self) -> Tuple[str, ...]:
        return self._names

    @property
    def blocks(self) -> Tuple[EdgeBlock, ...]:
        return self._blocks

    @property
    def num_nodes(self) -> int:
        return int(sum(self._sizes))

    @property
    def layer_offsets(self) -> np.ndarray:
        """Id of the first node of each layer (length ``len(layer_sizes) + 1``)."""
        return np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)

    @property
    def num_edges(self) -> int:
        """Number of non-zero edges."""
        return int(sum(b.weight.nnz if b.is_sparse else int(torch.count_nonzero(b.weight)) for b in self._blocks))

    def __repr__(self) -> str:
        return f"WeightGraph(layer_sizes={self._sizes}, num_nodes={self.num_nodes}, blocks={len(self._blocks)})"

    def node_info(self, node: int) -> Tuple[str, int]:
        """``(layer name, unit index)`` of a node, the unit index as in the original model.

        Example:
            >>> WeightGraph.from_weights([torch.ones(3, 4)]).node_info(5)
            ('layer1', 1)
        """
        node = int(node)
        if not 0 <= node < self.num_nodes:
            raise IndexError(f"node {node} out of range for a graph of {self.num_nodes} nodes")
        layer = int(np.searchsorted(self.layer_offsets, node, side="right") - 1)
        return self._names[layer], int(self._unit_index[layer][node - self.layer_offsets[layer]])

    def layer_of_nodes(self) -> np.ndarray:
        """Layer number of every node."""
        return np.repeat(np.arange(len(self._sizes)), self._sizes)

    @property
    def device(self) -> torch.device:
        """Where the dense blocks live: the first non-CPU device among them, else the CPU.

        The spectral engine's block eigensolver (large graphs) runs there; sparse (CSR)
        blocks always live on the CPU.
        """
        for b in self._blocks:
            if not b.is_sparse and b.weight.device.type != "cpu":
                return b.weight.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ numerics
    def engine_dtype(self) -> np.dtype:
        """Precision of the numerical engine: float64 for graphs up to 131k matrix entries
        (exact enough for tests and cheap), float32 above (half the memory traffic)."""
        entries = sum(b.weight.nnz if b.is_sparse else b.weight.numel() for b in self._blocks)
        return np.dtype(np.float64 if entries <= _FLOAT64_LIMIT else np.float32)

    def numpy_blocks(self, dtype=None, sparse: Optional[bool] = None) -> List[Tuple[int, int, np.ndarray]]:
        """The edge blocks as numpy arrays or scipy CSR matrices, on the CPU.

        Args:
            dtype: numpy dtype; default :meth:`engine_dtype`.
            sparse: ``True`` gives every block as CSR, ``False`` every block dense, ``None``
                (default) CSR for large blocks under 25% density (pruned layers), where
                sparse products are faster, and dense otherwise.
        """
        dtype = np.dtype(dtype or self.engine_dtype())
        out = []
        for b in self._blocks:
            w = b.weight
            if b.is_sparse:
                nnz, size = w.nnz, w.shape[0] * w.shape[1]
            else:
                w = w.detach().cpu().numpy()
                size = w.size
                nnz = int(np.count_nonzero(w)) if sparse is None and size >= _SPARSE_MIN_ENTRIES else size
            use_sparse = sparse if sparse is not None else (size >= _SPARSE_MIN_ENTRIES and nnz < _SPARSE_DENSITY * size)
            if use_sparse:
                w = sp.csr_matrix(w, dtype=dtype)
            elif sp.issparse(w):
                w = w.toarray().astype(dtype, copy=False)
            else:
                w = w.astype(dtype, copy=False)
            out.append((b.src, b.dst, w))
        return out

    def degrees(self) -> np.ndarray:
        """Weighted degree (sum of incident |w|) of every node, float64."""
        deg = np.zeros(self.num_nodes)
        off = self.layer_offsets
        for b in self._blocks:
            deg[off[b.dst]:off[b.dst + 1]] += _sums(b.weight, axis=1)
            deg[off[b.src]:off[b.src + 1]] += _sums(b.weight, axis=0)
        return deg

    def adjacency(self) -> sp.csr_matrix:
        """Symmetric N x N adjacency as a ``scipy.sparse.csr_matrix`` (float64).

        Meant for users and test oracles; the library's own algorithms work on the blocks.
        """
        n = self.num_nodes
        off = self.layer_offsets
        rows, cols, vals = [], [], []
        for src, dst, w in self.numpy_blocks(np.float64, sparse=True):
            w = w.tocoo()
            r, c, v = w.row, w.col, w.data
            rows += [r + off[dst], c + off[src]]
            cols += [c + off[src], r + off[dst]]
            vals += [v, v]
        if not rows:
            return sp.csr_matrix((n, n))
        a = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
        return a.tocsr()

    def layer_coloring(self) -> Optional[np.ndarray]:
        """A 2-colouring of the node layers such that every block joins two colours, or None.

        When it exists the graph is bipartite (a chain always is), which the spectral
        engine exploits.
        """
        from .eigen import layer_coloring  # the one implementation, shared with the torch solver

        colour = layer_coloring(len(self._sizes), [(b.src, b.dst) for b in self._blocks])
        return None if colour is None else np.asarray(colour, dtype=np.int64)

    def connected_components(self) -> Tuple[int, np.ndarray]:
        """Number of connected components and the component id of every node."""
        from scipy.sparse.csgraph import connected_components

        n = self.num_nodes
        if self._fully_connected_blocks() or self._reaches_everything():
            return 1, np.zeros(n, dtype=np.int32)
        # Only the nonzero pattern matters: one direction per edge, weak connectivity.
        off = self.layer_offsets
        rows, cols = [], []
        for b in self._blocks:
            if b.is_sparse:
                coo = b.weight.tocoo()
                keep = coo.data != 0
                r, c = coo.row[keep], coo.col[keep]
            else:
                r, c = np.nonzero(b.weight.detach().cpu().numpy())
            rows.append(r + off[b.dst])
            cols.append(c + off[b.src])
        if not rows:
            return n, np.arange(n, dtype=np.int32)
        r, c = np.concatenate(rows), np.concatenate(cols)
        pattern = sp.csr_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(n, n))
        count, labels = connected_components(pattern, directed=True, connection="weak")
        return int(count), labels

    def _fully_connected_blocks(self) -> bool:
        """A cheap proof of connectedness, for dense blocks (trained or shuffled layers).

        A dense block with one row and one column free of zeros connects all nodes of its two
        layers (every source reaches that row's node, every target that column's node, and
        those two are joined). If such blocks join all layers, the graph is connected. A few
        candidate rows/columns are tried (an exactly-zero weight is rare but happens).
        """
        sizes = self._sizes
        if not self._blocks or any(s == 0 for s in sizes):
            return False
        parent = list(range(len(sizes)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for b in self._blocks:
            if b.is_sparse:
                continue
            w = b.weight
            rows, cols = w.shape
            full_row = any(bool((w[i] != 0).all()) for i in range(0, rows, max(1, rows // 4)))
            if full_row and any(bool((w[:, j] != 0).all()) for j in range(0, cols, max(1, cols // 4))):
                parent[find(b.src)] = find(b.dst)
        return len({find(l) for l in range(len(sizes))}) == 1

    def _reaches_everything(self) -> bool:
        """Whether every node is reachable from node 0, by sweeps of block matrix-vector products.

        Each sweep propagates the reached set through every block in both directions (a
        product of the non-negative block with a 0/1 vector is positive exactly at the
        neighbours); blocks whose two layers are fully reached are skipped. A layered graph is
        usually covered after one or two sweeps, i.e. a few passes over the weights.
        """
        sizes = self._sizes
        if not self._blocks or self.num_nodes == 0:
            return False
        first = next(l for l, s in enumerate(sizes) if s > 0)
        reach = [np.zeros(s, dtype=bool) for s in sizes]
        reach[first][0] = True
        changed = True
        while changed:
            changed = False
            for b in self._blocks:
                for src, dst, transpose in ((b.src, b.dst, False), (b.dst, b.src, True)):
                    if not reach[src].any() or reach[dst].all():
                        continue
                    hit = _block_matvec(b.weight, reach[src], transpose) > 0
                    if (hit & ~reach[dst]).any():
                        reach[dst] |= hit
                        changed = True
        return all(r.all() for r in reach)

    def remove_isolated(self) -> Tuple["WeightGraph", np.ndarray]:
        """The graph without degree-0 nodes, and the original id of each kept node.

        Layers left without nodes are dropped. Use :func:`expand_labels` to map labels of
        the smaller graph back to the original nodes (removed nodes get label -1).

        Example:
            >>> g = WeightGraph.from_weights([torch.tensor([[1.0, 0.0], [2.0, 0.0]])])
            >>> small, kept = g.remove_isolated()
            >>> small.num_nodes, kept.tolist()
            (3, [0, 2, 3])
        """
        small, kept, _ = self._remove_isolated_with_degrees()
        return small, kept

    def _remove_isolated_with_degrees(self) -> Tuple["WeightGraph", np.ndarray, np.ndarray]:
        """:meth:`remove_isolated` and the kept nodes' degrees (unchanged by removing isolated
        nodes), so that the engine need not sum every block again (0.1 s on a 20k-node MLP)."""
        deg = self.degrees()
        keep = deg > 0
        if keep.all():
            return self, np.arange(self.num_nodes), deg
        if not keep.any():
            raise ValueError(
                f"all {self.num_nodes} nodes are isolated (every weight is zero): there is no graph to measure; "
                f"check that the model is trained/loaded and not pruned to 100%"
            )
        small, kept = self.subgraph(keep)
        return small, kept, deg[kept]

    def subgraph(self, keep: np.ndarray) -> Tuple["WeightGraph", np.ndarray]:
        """The graph induced by the nodes where ``keep`` is True, and their original ids.

        Layers left without nodes are dropped; :meth:`node_info` still names the original units.

        Example:
            >>> g = WeightGraph.from_weights([torch.ones(2, 3)])
            >>> sub, kept = g.subgraph(np.array([True, False, True, True, True]))
            >>> sub.layer_sizes, kept.tolist()
            ((2, 2), [0, 2, 3, 4])
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.num_nodes,):
            raise ValueError(f"keep must be a boolean mask with one entry per node ({self.num_nodes})")
        if not keep.any():
            raise ValueError("the subgraph would have no nodes")
        off = self.layer_offsets
        masks = [keep[off[l]:off[l + 1]] for l in range(len(self._sizes))]
        new_layer = -np.ones(len(self._sizes), dtype=np.int64)
        sizes, names, units = [], [], []
        for l, m in enumerate(masks):
            if m.any():
                new_layer[l] = len(sizes)
                sizes.append(int(m.sum()))
                names.append(self._names[l])
                units.append(self._unit_index[l][m])
        blocks = []
        for b in self._blocks:
            if new_layer[b.src] < 0 or new_layer[b.dst] < 0:
                continue
            rows, cols = np.nonzero(masks[b.dst])[0], np.nonzero(masks[b.src])[0]
            if b.is_sparse:
                w = b.weight[rows][:, cols]
            else:
                dev = b.weight.device
                w = b.weight.index_select(0, torch.from_numpy(rows).to(dev)).index_select(1, torch.from_numpy(cols).to(dev))
            blocks.append((int(new_layer[b.src]), int(new_layer[b.dst]), w))
        return WeightGraph._from_checked(sizes, blocks, names, units), np.nonzero(keep)[0]

    def with_blocks(self, weights: Sequence[ArrayLike]) -> "WeightGraph":
        """Same layers and block structure, new block weights (e.g. shuffled)."""
        if len(weights) != len(self._blocks):
            raise ValueError(f"expected {len(self._blocks)} blocks, got {len(weights)}")
        return WeightGraph(self._sizes, [(b.src, b.dst, w) for b, w in zip(self._blocks, weights)], self._names, self._unit_index)


def expand_labels(labels: np.ndarray, kept: np.ndarray, num_nodes: int) -> np.ndarray:
    """Labels for all ``num_nodes`` original nodes; nodes not in ``kept`` get -1."""
    full = -np.ones(num_nodes, dtype=np.int64)
    full[kept] = labels
    return full


GraphLike = Union[WeightGraph, nn.Module, Sequence[ArrayLike]]


def as_graph(obj: GraphLike) -> WeightGraph:
    """Accept a WeightGraph, a model or a list of weight matrices."""
    if isinstance(obj, WeightGraph):
        return obj
    if isinstance(obj, nn.Module):
        return WeightGraph.from_module(obj)
    if isinstance(obj, dict):
        return WeightGraph.from_state_dict(obj)
    if isinstance(obj, (list, tuple)):
        return WeightGraph.from_weights(obj)
    raise TypeError(f"expected a WeightGraph, an nn.Module, a state_dict or a list of weight matrices, got {type(obj).__name__}")
