"""``clusterability``: n-cut of a network's spectral partition versus shuffled baselines."""
from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._threads import limit_threads
from .graph import GraphLike, WeightGraph, as_graph, expand_labels
from .shuffle import check_shuffle_method, shuffle_weights
from .spectral import _cluster_blocks, _uses_block_solver, check_seed, resolve_device

__all__ = ["ClusterabilityResult", "clusterability"]


def baseline_stats(value: float, baseline) -> Tuple[float, float, float, float]:
    """``(mean, std, z, p)`` of ``value`` against a baseline sample (NaN for an empty one).

    ``std`` is the population SD (ddof 0) and ``p = (1 + #{baseline < value}) / (n + 1)``, the
    one-sided Monte-Carlo p-value, as in the research code; ``z`` is NaN when ``std`` is 0.
    """
    s = np.asarray(baseline, dtype=np.float64)
    if s.size == 0:
        return (float("nan"),) * 4
    mean, std = float(s.mean()), float(s.std())
    z = (float(value) - mean) / std if std > 0 else float("nan")
    return mean, std, z, float((1 + np.sum(s < value)) / (s.size + 1))


@dataclass
class ClusterabilityResult:
    """What :func:`clusterability` measured. Lower n-cut = more clusterable.

    Attributes:
        ncut: n-cut of the network's partition (sum over clusters, in ``[0, n_clusters]``).
        labels: cluster per node of the original graph; -1 for removed (isolated) nodes.
        shuffled_ncuts: n-cut of each shuffled network, in shuffle order.
        mean, std: mean and population standard deviation of ``shuffled_ncuts``.
        z: ``(ncut - mean) / std``; negative = more clusterable than the shuffles.
        p_value: ``(1 + #{shuffled < ncut}) / (n_shuffles + 1)``, the one-sided Monte-Carlo
            p-value (the research code's "percentile"); at least ``1 / (n_shuffles + 1)``.
        n_clusters, shuffle, seed: the settings used.
        num_nodes: nodes of the original graph; n_isolated: degree-0 nodes removed.
        n_components: connected components of the graph that was clustered.
        eigenvalues: the ``n_clusters`` smallest normalized-Laplacian eigenvalues.
        shuffled_isolated: isolated nodes removed from each shuffled network.
        layer_names, layer_sizes: the node layers, to map labels back to units.
        n_dead: units of the original graph on no input-to-output path worth the name
            (:func:`torch_modularity.flow.dead_units`; isolated units included); ``None`` for
            graphs that are not chains. A low n-cut made of dead units is not modularity.
        exclude_dead: whether dead units were removed before measuring (the live subgraph;
            they are labelled -1).
    """

    ncut: float
    labels: np.ndarray
    shuffled_ncuts: np.ndarray
    n_clusters: int
    shuffle: str
    seed: int
    num_nodes: int
    n_isolated: int
    n_components: int
    eigenvalues: np.ndarray
    shuffled_isolated: np.ndarray
    layer_names: Tuple[str, ...] = ()
    layer_sizes: Tuple[int, ...] = ()
    n_dead: Optional[int] = None
    exclude_dead: bool = False
    mean: float = field(init=False)
    std: float = field(init=False)
    z: float = field(init=False)
    p_value: float = field(init=False)

    def __post_init__(self) -> None:
        self.shuffled_ncuts = np.asarray(self.shuffled_ncuts, dtype=np.float64)
        self.mean, self.std, self.z, self.p_value = baseline_stats(self.ncut, self.shuffled_ncuts)

    @property
    def n_shuffles(self) -> int:
        return int(self.shuffled_ncuts.size)

    def clusters_by_layer(self) -> np.ndarray:
        """``(n_layers, n_clusters)`` counts: how many units of each layer are in each cluster."""
        layer = np.repeat(np.arange(len(self.layer_sizes)), self.layer_sizes)
        counts = np.zeros((len(self.layer_sizes), self.n_clusters), dtype=np.int64)
        keep = self.labels >= 0
        np.add.at(counts, (layer[keep], self.labels[keep]), 1)
        return counts

    def to_dict(self) -> Dict:
        """JSON-serializable summary (NaN becomes None)."""

        def num(x):
            return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

        return {
            "ncut": num(float(self.ncut)),
            "n_clusters": int(self.n_clusters),
            "n_shuffles": self.n_shuffles,
            "shuffle": self.shuffle,
            "seed": int(self.seed),
            "mean": num(self.mean),
            "std": num(self.std),
            "z": num(float(self.z)),
            "p_value": num(self.p_value),
            "shuffled_ncuts": [float(x) for x in self.shuffled_ncuts],
            "num_nodes": int(self.num_nodes),
            "n_isolated": int(self.n_isolated),
            "n_components": int(self.n_components),
            "n_dead": None if self.n_dead is None else int(self.n_dead),
            "exclude_dead": bool(self.exclude_dead),
            "eigenvalues": [float(x) for x in self.eigenvalues],
            "shuffled_isolated_mean": num(float(self.shuffled_isolated.mean())) if self.shuffled_isolated.size else None,
            "layer_names": list(self.layer_names),
            "layer_sizes": [int(s) for s in self.layer_sizes],
            "labels": [int(x) for x in self.labels],
        }

    def summary(self) -> str:
        """A short human-readable table."""

        def f(x, fmt="{:.4f}"):
            return "n/a" if x is None or not math.isfinite(x) else fmt.format(x)

        rows = [
            (f"n-cut (k={self.n_clusters})", f(self.ncut)),
            ("shuffles", f"{self.n_shuffles} ({self.shuffle})"),
            ("shuffle mean", f(self.mean)),
            ("shuffle std", f(self.std)),
            ("z", f(self.z, "{:.2f}")),
            ("p (percentile)", f(self.p_value)),
            ("nodes", f"{self.num_nodes} ({self.n_isolated} isolated removed)"),
            ("dead units", "n/a (not a chain)" if self.n_dead is None else
             f"{self.n_dead}" + (" (excluded: live subgraph measured)" if self.exclude_dead else "")),
            ("components", str(self.n_components)),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

    __str__ = summary


# --------------------------------------------------------------------------- workers
def _dead_mask(graph: WeightGraph, threshold: float) -> Optional[np.ndarray]:
    """Dead-unit mask of a chain graph; ``None`` for graphs path flow is not defined on."""
    from .flow import dead_units

    try:
        return dead_units(graph, threshold)
    except ValueError as err:
        if "chain" in str(err):
            return None
        raise


def _shuffle_seeds(seed: int, index: int) -> Tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent (permutation, clustering) seeds of shuffle ``index``: depend on (seed, index) only."""
    perm, clus = np.random.SeedSequence(seed, spawn_key=(index,)).spawn(2)
    return perm, clus


def _run_shuffles(payload, indices: Sequence[int], method: str, k: int, seed: int, n_init: int, refine: bool,
                  device=None):
    """Worker task: n-cut of the shuffles ``indices`` of the graph in ``payload``."""
    sizes, names, blocks = payload
    out = []
    for i in indices:
        perm_seed, clus_seed = _shuffle_seeds(seed, i)
        shuffled = shuffle_weights([w for _, _, w in blocks], method, np.random.default_rng(perm_seed))
        # Shuffled values of a checked graph are still non-negative and finite.
        g = WeightGraph._from_checked(sizes, [(s, d, w) for (s, d, _), w in zip(blocks, shuffled)], names)
        small, _, degrees = g._remove_isolated_with_degrees()
        if small.num_nodes < k:
            raise ValueError(
                f"shuffle {i} left only {small.num_nodes} connected nodes, fewer than n_clusters={k}; "
                f"use fewer clusters or the 'layer_nonzero' shuffle"
            )
        part = _cluster_blocks(small.layer_sizes, small.numpy_blocks(blocks[0][2].dtype), small.layer_coloring(), k,
                               np.random.default_rng(clus_seed), n_init, refine, device=device, degrees=degrees)
        out.append((i, part.ncut, g.num_nodes - small.num_nodes))
    return out


def _pool_initializer() -> None:
    limit_threads(1)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _make_pool(n_workers: int) -> cf.Executor:
    # fork shares the already-imported modules (no 2 s torch import per worker); elsewhere spawn.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return cf.ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context(method), initializer=_pool_initializer)


# --------------------------------------------------------------------------- public
def clusterability(
    model_or_graph: GraphLike,
    n_clusters: int = 12,
    n_shuffles: int = 50,
    shuffle: str = "layer",
    seed: int = 0,
    executor: Optional[cf.Executor] = None,
    n_workers: Optional[int] = None,
    n_init: int = 3,
    refine: bool = True,
    progress: bool = False,
    dtype=None,
    exclude_dead: bool = False,
    dead_threshold: float = 1e-3,
    device=None,
) -> ClusterabilityResult:
    """How clusterable is a network's weight graph, and is that more than chance?

    Removes isolated nodes, partitions the graph by spectral clustering, scores the
    partition by its n-cut and compares it with ``n_shuffles`` networks whose weight blocks
    were shuffled (isolated nodes removed again after each shuffle, same pipeline and
    settings). Every shuffle draws its randomness from ``(seed, shuffle index)`` only, so the
    result does not depend on the number of workers or on the executor.

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> res = clusterability(mlp, n_clusters=4, n_shuffles=4, n_workers=1)
        >>> res.n_shuffles, 0 <= res.ncut <= 4, res.p_value >= 1 / 5
        (4, True, True)

    Args:
        model_or_graph: an ``nn.Module`` chain, a :class:`WeightGraph`, a state_dict or a
            list of weight matrices.
        n_clusters: number of clusters ``k`` (the paper uses 12).
        n_shuffles: number of shuffled baselines (0 skips the baseline).
        shuffle: ``"layer"`` (permute all entries of each matrix) or ``"layer_nonzero"``
            (permute non-zero values, keep the sparsity mask).
        seed: root of every random choice; the caller's global RNGs are not touched.
        executor: any ``concurrent.futures.Executor`` (e.g. Dask's ``client.get_executor()``)
            to run the shuffles on; it is not shut down.
        n_workers: size of the local process pool when no executor is given (default: the
            usable CPUs; 1 runs in this process). Workers use one BLAS thread each.
        n_init: k-means++ restarts per clustering.
        refine: greedy n-cut refinement of every partition (the network's and each
            shuffle's alike); ``False`` gives the plain research-code pipeline.
        progress: show a progress bar on stderr.
        dtype: engine precision, ``numpy.float64`` or ``numpy.float32``; default float64 for
            graphs up to 131k weight entries, float32 above (``WeightGraph.engine_dtype``).
        exclude_dead: measure the live subgraph only: units whose input-to-output path flow
            is below ``dead_threshold`` x their layer's maximum are removed first, and the
            shuffles are shuffles of the live subgraph. Dead units are always counted
            (``n_dead``) for chain graphs.
        dead_threshold: relative path flow below which a unit is dead.
        device: where the block eigensolver of large graphs (6000+ nodes on the smaller
            side of a bipartite graph) runs; default the weights' device
            (``WeightGraph.device``). k-means and refinement run on the CPU. When a large
            graph is solved on an accelerator, its shuffles run one after another in this
            process on that device (``n_workers`` and ``executor`` are then not used), so
            the result still does not depend on the number of workers.

    Returns:
        A :class:`ClusterabilityResult`.
    """
    check_shuffle_method(shuffle)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
        raise TypeError(f"n_clusters must be an int, got {type(n_clusters).__name__}")
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be at least 2, got {n_clusters}")
    if n_shuffles < 0:
        raise ValueError(f"n_shuffles must be >= 0, got {n_shuffles}")
    seed = check_seed(seed)
    graph = as_graph(model_or_graph)
    dead = _dead_mask(graph, dead_threshold)
    measured, kept_live = graph, np.arange(graph.num_nodes)
    if exclude_dead:
        if dead is None:
            raise ValueError("exclude_dead=True needs a chain graph (path flow is defined layer to layer); "
                             "this graph has skip connections")
        if dead.all():
            raise ValueError("every unit is dead: the network has no input-to-output path")
        measured, kept_live = graph.subgraph(~dead)
    small, kept, degrees = measured._remove_isolated_with_degrees()
    kept = kept_live[kept]
    if small.num_nodes < n_clusters:
        raise ValueError(
            f"n_clusters={n_clusters} is larger than the number of non-isolated nodes ({small.num_nodes} of "
            f"{graph.num_nodes}); use fewer clusters"
        )
    blocks = small.numpy_blocks(dtype)
    colour = small.layer_coloring()
    device = resolve_device(device, graph)
    if device.type != "cpu" and not _uses_block_solver(small.layer_sizes, colour):
        device = torch.device("cpu")  # nothing would run there: keep the process pool for the shuffles
    on_accelerator = device.type != "cpu"

    def measure_network():
        return (_cluster_blocks(small.layer_sizes, blocks, colour, int(n_clusters),
                                np.random.default_rng(np.random.SeedSequence(seed)), n_init, refine, device=device,
                                degrees=degrees),
                small.connected_components()[0])

    payload = (small.layer_sizes, small.layer_names, blocks)
    ncuts = np.full(n_shuffles, np.nan)
    isolated = np.zeros(n_shuffles, dtype=np.int64)
    if not n_shuffles:
        part, n_components = measure_network()
    else:
        workers = n_workers or _default_workers()
        own_pool = None
        if on_accelerator:
            executor = None  # forked workers cannot use CUDA; the device runs the solves one by one
        elif executor is None and workers > 1 and n_shuffles > 1:
            executor = own_pool = _make_pool(min(workers, n_shuffles))
        chunks = np.array_split(np.arange(n_shuffles), min(n_shuffles, 4 * workers))
        bar = None
        try:
            futures = []
            if executor is not None:
                # The shuffles start first; the network itself is measured here meanwhile.
                futures = [executor.submit(_run_shuffles, payload, c.tolist(), shuffle, int(n_clusters), seed, n_init,
                                           refine) for c in chunks]
            try:
                part, n_components = measure_network()
            except BaseException:
                for fut in futures:  # a caller's executor would otherwise run them for nothing
                    fut.cancel()
                raise
            if progress:
                from tqdm.auto import tqdm

                # delay: no bar at all when the shuffles finish within a second
                bar = tqdm(total=n_shuffles, desc="shuffles", unit="shuffle", file=sys.stderr, delay=1.0)
            results = []
            if executor is None:
                for chunk in chunks:
                    results.append(_run_shuffles(payload, chunk.tolist(), shuffle, int(n_clusters), seed, n_init, refine,
                                                 device))
                    if bar is not None:
                        bar.update(len(chunk))
            else:
                for fut in cf.as_completed(futures):
                    results.append(fut.result())
                    if bar is not None:
                        bar.update(len(results[-1]))
        finally:
            if bar is not None:
                bar.close()
            if own_pool is not None:
                own_pool.shutdown(wait=True, cancel_futures=True)
        for chunk_result in results:
            for i, value, n_iso in chunk_result:
                ncuts[i] = value
                isolated[i] = n_iso

    return ClusterabilityResult(
        ncut=part.ncut,
        labels=expand_labels(part.labels, kept, graph.num_nodes),
        shuffled_ncuts=ncuts,
        n_clusters=int(n_clusters),
        shuffle=shuffle,
        seed=int(seed),
        num_nodes=graph.num_nodes,
        n_isolated=measured.num_nodes - small.num_nodes,
        n_components=n_components,
        eigenvalues=part.eigenvalues,
        shuffled_isolated=isolated,
        layer_names=graph.layer_names,
        layer_sizes=graph.layer_sizes,
        n_dead=None if dead is None else int(dead.sum()),
        exclude_dead=bool(exclude_dead),
    )
