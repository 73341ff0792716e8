"""Clusterability as a training curve: :class:`ClusterabilityMonitor`.

One line in an ordinary training loop::

    monitor = ClusterabilityMonitor(model, every=100, writer="runs/exp1", n_clusters=12)
    with monitor, monitor.attach(optimizer):      # hook removed and results flushed on exit
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()                         # every 100th step measures the weights

Every ``every`` optimizer steps the model's current weights are copied off the training path
(to the CPU, detached) and measured with :func:`torch_modularity.clusterability`; the result
is written to TensorBoard under hierarchical ``add_scalar`` tags (never ``add_scalars`` or
``add_hparams``, which create extra runs)::

    clusterability/ncut            n-cut of the k-way spectral partition (lower = more modular)
    clusterability/shuffle_mean    \\
    clusterability/shuffle_std      |  only with n_shuffles > 0
    clusterability/z                |
    clusterability/p_value         /
    clusterability/n_components    connected components of the non-isolated graph
    clusterability/n_isolated      isolated (degree-0) units left out
    clusterability/n_dead          units on no input-to-output path (path flow; chains only)
    clusterability/live_ncut       n-cut of the live subgraph (dead units removed; chains only)
    clusterability/cluster_sizes   histogram of the k cluster sizes
    clusterability/adjacency       image: |W| adjacency sorted by cluster (every figure_every steps)
    clusterability/regularizer     value of the regularizer passed, at the measured weights
    clusterability/eigs/{i}        its eigenvalues (i = 0, 1, ...: position in ``eigenvalues()``)

``background=True`` measures in a worker process while training goes on; results are still
logged with the step they belong to, in step order, and ``close()`` (also called by ``with
monitor:``, on exceptions, and at interpreter exit) waits for the last ones. Under
``torch.distributed`` only rank 0 measures and logs; the other ranks only count steps.
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import copy
import functools
import inspect
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
import weakref
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ._torch_modes import eager_under_compile
from .graph import WeightGraph, unwrap_model as _unwrap
from .measure import ClusterabilityResult, clusterability
from .spectral import check_seed

__all__ = [
    "ClusterabilityMonitor",
    "MonitorHandle",
    "BackgroundMeasurementError",
    "adjacency_image",
    "is_rank_zero",
]

# Keyword arguments of clusterability() a monitor passes through (everything but the graph and
# the three it names itself).
_CLUSTERABILITY_KWARGS = frozenset(inspect.signature(clusterability).parameters) - {
    "model_or_graph", "n_clusters", "n_shuffles", "seed",
}

# A snapshot: (layer_sizes, layer_names, [(src, dst, CPU numpy array or scipy CSR), ...]).
_Snapshot = Tuple[Tuple[int, ...], Tuple[str, ...], List[Tuple[int, int, Any]]]


class BackgroundMeasurementError(RuntimeError):
    """A measurement in the background worker failed; ``step`` is the training step it was for.

    The worker's exception (with its remote traceback) is the ``__cause__``.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def is_rank_zero() -> bool:
    """True outside ``torch.distributed`` and on global rank 0 inside it."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0




def _snapshot(model: nn.Module) -> _Snapshot:
    """The weight graph's blocks, copied to CPU numpy arrays: nothing shared with training."""
    with torch.no_grad():
        graph = WeightGraph.from_module(model)
        blocks = []
        for b in graph.blocks:
            w = b.weight
            if sp.issparse(w):
                w = w.copy()
            else:
                w = w.detach().to(device="cpu", copy=True).numpy()
            blocks.append((b.src, b.dst, w))
    return graph.layer_sizes, graph.layer_names, blocks


def _graph_of(snapshot: _Snapshot) -> WeightGraph:
    sizes, names, blocks = snapshot
    return WeightGraph(sizes, blocks, names)


def adjacency_image(graph: WeightGraph, labels: np.ndarray, max_size: int = 256) -> np.ndarray:
    """The |W| adjacency with nodes sorted by cluster (then layer), as an ``(H, W, 3)`` uint8 image.

    Dark = strong edges on a white background; thin red lines separate the clusters, isolated
    nodes (label -1) come last. Graphs with more than ``max_size`` nodes are downsampled by
    averaging square bins of the sorted adjacency (built from the sparse matrix, never dense
    N x N), so the image is at most ``max_size`` pixels wide. Pure numpy/scipy.

    Args:
        graph: the measured graph.
        labels: cluster of every node (``ClusterabilityResult.labels``).
        max_size: largest image side in pixels.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = graph.num_nodes
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels, got shape {labels.shape}")
    if n == 0:
        return np.full((1, 1, 3), 255, dtype=np.uint8)
    key = np.where(labels < 0, np.iinfo(np.int64).max, labels)
    order = np.lexsort((np.arange(n), graph.layer_of_nodes(), key))
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    size = int(min(n, max(1, max_size)))
    bins = pos * size // n
    binning = sp.csr_matrix((np.ones(n), (np.arange(n), bins)), shape=(n, size))
    adj = graph.adjacency()
    sums = np.asarray((binning.T @ adj @ binning).todense(), dtype=np.float64)
    counts = np.bincount(bins, minlength=size).astype(np.float64)
    mean = sums / np.outer(counts, counts)
    nonzero = mean[mean > 0]
    scale = float(np.percentile(nonzero, 99)) if nonzero.size else 1.0
    x = np.sqrt(np.clip(mean / (scale if scale > 0 else 1.0), 0.0, 1.0))
    gray = np.round(255.0 * (1.0 - x)).astype(np.uint8)
    img = np.repeat(gray[:, :, None], 3, axis=2)
    sorted_labels = key[order]
    changes = np.nonzero(np.diff(sorted_labels))[0] + 1  # first sorted position of each new cluster
    red = np.array([220, 30, 30], dtype=np.float64)
    for b in np.unique(changes * size // n):
        img[b, :, :] = (0.5 * img[b, :, :] + 0.5 * red).astype(np.uint8)
        img[:, b, :] = (0.5 * img[:, b, :] + 0.5 * red).astype(np.uint8)
    return img


def _worker_init() -> None:
    """Background worker: one BLAS/torch thread (training keeps the cores), ignore Ctrl-C (the
    parent decides when to stop; pending measurements are finished and logged by close())."""
    try:
        from ._threads import limit_threads

        limit_threads(1)
    except Exception:  # pragma: no cover - best effort
        torch.set_num_threads(1)
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _measure_job(snapshot: _Snapshot, n_clusters: int, n_shuffles: int, seed: int, kwargs: Dict[str, Any],
                 figure: bool, figure_size: int) -> Tuple[ClusterabilityResult, Optional[np.ndarray], float, float]:
    """Measure one snapshot (in the worker process or in-process): result, optional image,
    seconds, and the live-subgraph n-cut (the same as the n-cut when no dead unit is left in)."""
    t0 = time.perf_counter()
    graph = _graph_of(snapshot)
    result = clusterability(graph, n_clusters=n_clusters, n_shuffles=n_shuffles, seed=seed, **kwargs)
    live_ncut = float(result.ncut)
    if result.n_dead and result.n_dead > result.n_isolated and not result.exclude_dead:
        # Dead units can pass for modules: also report the n-cut of the live subgraph.
        live_kwargs = {k: v for k, v in kwargs.items() if k not in ("exclude_dead", "progress", "executor")}
        try:
            live_ncut = float(clusterability(graph, n_clusters=n_clusters, n_shuffles=0, seed=seed,
                                             exclude_dead=True, **live_kwargs).ncut)
        except ValueError:
            live_ncut = float("nan")  # fewer live units than clusters
    image = adjacency_image(graph, result.labels, figure_size) if figure else None
    return result, image, time.perf_counter() - t0, live_ncut


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where the platform has it, else spawn; never fork.

    Forking the training process is unsafe: it has threads (TensorBoard's event-writer thread,
    DataLoader pin-memory threads, OpenMP pools) whose locks a forked child inherits in an
    arbitrary state. forkserver forks workers from a clean single-threaded server instead; the
    server preloads this module (torch included), so each new worker starts in well under a
    second. Like spawn it re-imports the main module in the worker: training scripts need the
    usual ``if __name__ == "__main__":`` guard.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        try:  # add our module to the server's preload list, only if the server is not running yet
            from multiprocessing import forkserver

            server = getattr(forkserver, "_forkserver", None)
            running = server is not None and getattr(server, "_forkserver_pid", None) is not None
            if not running:
                current = list(getattr(server, "_preload_modules", ["__main__"]))
                if __name__ not in current:
                    ctx.set_forkserver_preload(current + [__name__])
        except Exception:  # pragma: no cover - private details changed; preloading is only an optimization
            pass
        return ctx
    return multiprocessing.get_context("spawn")


def _atexit_close(target) -> None:
    monitor = target() if isinstance(target, weakref.ReferenceType) else target
    if monitor is None:
        return
    try:
        monitor.close()
    except Exception as exc:  # at exit there is nobody to catch it: report and go on
        print(f"torch_modularity: ClusterabilityMonitor.close() at exit failed: {exc!r}", file=sys.stderr)


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


class MonitorHandle:
    """Returned by :meth:`ClusterabilityMonitor.attach`: ``remove()`` detaches the optimizer hook.

    Also a context manager: the hook is removed when the block exits, exceptions included.
    """

    def __init__(self, monitor: "ClusterabilityMonitor", optimizer: torch.optim.Optimizer, handle) -> None:
        self._monitor = weakref.ref(monitor)
        self._optimizer = weakref.ref(optimizer)
        self._handle = handle

    @property
    def attached(self) -> bool:
        return self._handle is not None

    @property
    def monitor(self) -> Optional["ClusterabilityMonitor"]:
        """The monitor (kept alive by the optimizer while attached)."""
        return self._monitor()

    def remove(self) -> None:
        """Detach the hook (idempotent)."""
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        monitor = self._monitor()
        if monitor is not None and self in monitor._handles:
            monitor._handles.remove(self)

    def __enter__(self) -> "MonitorHandle":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"MonitorHandle(attached={self.attached})"


class ClusterabilityMonitor:
    """Measure and log a model's clusterability every ``every`` training steps.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = ClusterabilityMonitor(model, every=2, n_clusters=3)   # writer=None: history only
        >>> with monitor.attach(opt):
        ...     for _ in range(4):
        ...         opt.zero_grad(); model(torch.ones(2, 8)).sum().backward(); opt.step()
        >>> [h["step"] for h in monitor.history]
        [2, 4]
        >>> monitor.close()

    Args:
        model: an ``nn.Module`` that :meth:`WeightGraph.from_module` reads (a chain of Linear
            layers; DDP / DataParallel / ``torch.compile`` wrappers are unwrapped). Checked now.
        every: measure when the step counter is a multiple of ``every``.
        writer: ``None`` (no TensorBoard; :attr:`history` only), a log directory (a
            ``SummaryWriter`` is created there on rank 0 at the first measurement and closed
            by :meth:`close`), or a ``SummaryWriter``-like object with ``add_scalar`` (and
            optionally ``add_histogram``, ``add_image``, ``flush``), which is flushed but not
            closed.
        n_clusters, n_shuffles, seed: passed to :func:`clusterability` (``n_shuffles=0``: no
            baseline, so no shuffle/z/p tags). The same seed is used at every step, so
            identical weights give identical measurements; no global RNG is touched.
        figure_every: also log the cluster-sorted adjacency image at measured steps that are a
            multiple of ``figure_every`` (``None``: never).
        background: measure in a worker process (forkserver, else spawn; see
            :func:`_mp_context`) on a snapshot of the weights while training goes on. Such a
            monitor holds a process: :meth:`close` it (``with monitor:``); until then it is
            kept alive, and interpreter exit closes it.
        regularizer: an object called as ``regularizer()`` returning a scalar tensor and,
            optionally, with ``eigenvalues()`` (e.g. ``SpectralRegularizer``). At each
            measurement it is evaluated under ``torch.no_grad()`` at the measured weights, on
            rank 0 only; when it has ``state_dict()``/``load_state_dict()`` its state (call
            counter, warm start) is restored afterwards, so monitoring does not change its
            schedule or make DDP ranks diverge.
        prefix: tag prefix (``"clusterability"``).
        max_pending: background mode only: when this many measurements are still running,
            :meth:`step` waits for the oldest (bounds memory if measuring is slower than training).
        figure_size: largest side of the adjacency image in pixels (larger graphs are binned).
        **clusterability_kwargs: more keyword arguments of :func:`clusterability` (``shuffle``,
            ``n_workers``, ``n_init``, ``refine``, ``dtype``, ``executor``, ``progress``).
            ``progress`` defaults to ``sys.stderr.isatty()`` in the foreground (a bar on an
            interactive terminal for long shuffle runs, nothing in logs) and to ``False`` in
            the background; ``n_workers`` defaults to 1 in the background (one core for the
            worker). ``executor`` cannot be combined with ``background=True``.

    Attributes:
        history: one dict per logged measurement, in step order (``step``, ``ncut``,
            ``n_components``, ``n_isolated``, ``n_dead``, ``live_ncut``, ``num_nodes``,
            ``cluster_sizes``, ``seconds``;
            ``n_shuffles``, ``shuffle_mean``, ``shuffle_std``, ``z``, ``p_value`` with shuffles;
            ``regularizer``, ``eigenvalues`` with a regularizer).
        last_result: the last :class:`ClusterabilityResult` logged (labels included).
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 100,
        writer=None,
        n_clusters: int = 12,
        n_shuffles: int = 0,
        seed: int = 0,
        figure_every: Optional[int] = None,
        background: bool = False,
        regularizer=None,
        prefix: str = "clusterability",
        *,
        max_pending: int = 4,
        figure_size: int = 256,
        **clusterability_kwargs,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        for name, value, low in (("every", every, 1), ("n_clusters", n_clusters, 2), ("n_shuffles", n_shuffles, 0),
                                 ("max_pending", max_pending, 1), ("figure_size", figure_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if figure_every is not None and (isinstance(figure_every, bool) or not isinstance(figure_every, (int, np.integer))
                                         or figure_every < 1):
            raise ValueError(f"figure_every must be None or a positive int, got {figure_every!r}")
        unknown = set(clusterability_kwargs) - _CLUSTERABILITY_KWARGS
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}; ClusterabilityMonitor passes only "
                            f"{sorted(_CLUSTERABILITY_KWARGS)} on to clusterability()")
        if background and clusterability_kwargs.get("executor") is not None:
            raise ValueError("executor= cannot be sent to the background worker; use background=False with an executor")
        if regularizer is not None and not callable(regularizer):
            raise TypeError(f"regularizer must be callable (regularizer() -> scalar tensor), got {type(regularizer).__name__}")
        if writer is not None and not isinstance(writer, (str, os.PathLike)) and not hasattr(writer, "add_scalar"):
            raise TypeError(f"writer must be None, a log directory or a SummaryWriter-like object, got {type(writer).__name__}")

        self.model = model
        self._module = _unwrap(model)
        WeightGraph.from_module(self._module)  # fail now, not at step 100, on an unsupported model
        self.every = int(every)
        self.n_clusters = int(n_clusters)
        self.n_shuffles = int(n_shuffles)
        self.seed = check_seed(seed)
        self.figure_every = None if figure_every is None else int(figure_every)
        self.background = bool(background)
        self.regularizer = regularizer
        self.prefix = str(prefix).rstrip("/")
        self.max_pending = int(max_pending)
        self.figure_size = int(figure_size)
        kwargs = dict(clusterability_kwargs)
        if kwargs.get("progress") is None:
            kwargs["progress"] = (not self.background) and _isatty(sys.stderr)
        if self.background:
            kwargs.setdefault("n_workers", 1)
        self.clusterability_kwargs = kwargs

        self._writer_arg = writer
        self._writer = None if isinstance(writer, (str, os.PathLike)) else writer
        self._owns_writer = isinstance(writer, (str, os.PathLike))
        self.history: List[Dict[str, Any]] = []
        self.last_result: Optional[ClusterabilityResult] = None
        self._step = 0
        self._last_measured: Optional[int] = None
        self._handles: List[MonitorHandle] = []
        self._pending: Deque[Tuple[int, cf.Future, Dict[str, Any]]] = collections.deque()
        self._pool: Optional[cf.ProcessPoolExecutor] = None
        self._closed = False
        # A background monitor is a resource like a process pool: the atexit registry keeps it
        # alive until close(), so pending measurements are never dropped with the last reference.
        # A foreground one has nothing pending (its writer is flushed after every record) and is
        # only referenced weakly, so it can be garbage-collected.
        target = self if self.background else weakref.ref(self)
        self._atexit = functools.partial(_atexit_close, target)
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ public
    @property
    def global_step(self) -> int:
        """The step counter: optimizer steps seen (or the last ``global_step`` given to :meth:`step`)."""
        return self._step

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Background measurements submitted but not yet logged."""
        return len(self._pending)

    def attach(self, optimizer: torch.optim.Optimizer) -> MonitorHandle:
        """Call :meth:`step` after every ``optimizer.step()`` (``Optimizer.register_step_post_hook``).

        Returns a :class:`MonitorHandle`; ``handle.remove()`` or ``with monitor.attach(opt): ...``
        detaches it. Attach to the one optimizer stepped once per training iteration (each
        attached optimizer's step counts as a step). :meth:`close` removes every hook still
        attached.

        Raises:
            RuntimeError: the monitor is closed, or already attached to this optimizer.
        """
        self._check_open()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for h in self._handles:
            if h.attached and h._optimizer() is optimizer:
                raise RuntimeError("this monitor is already attached to that optimizer; remove the first handle "
                                   "before attaching again (a second hook would count every step twice)")
        monitor = self  # the optimizer keeps an attached monitor alive: `Monitor(...).attach(opt)` works

        def _post_step_hook(opt, args, kwargs):
            monitor.step()

        handle = MonitorHandle(self, optimizer, optimizer.register_step_post_hook(_post_step_hook))
        self._handles.append(handle)
        return handle

    @eager_under_compile  # called from a compiled training step: runs eagerly, untraced
    def step(self, global_step: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Count a training step (or set the counter to ``global_step``) and measure if it is due.

        A measurement is due when the counter is a multiple of ``every`` and that step was not
        measured yet; ``monitor.step(0)`` before training therefore logs the initial weights.
        Also logs background results that have finished, and re-raises a background failure.

        Returns:
            The new :attr:`history` entry in the foreground, else ``None``.

        Raises:
            BackgroundMeasurementError: a background measurement failed (the next step's call
                raises it; later measurements go on).
        """
        self._check_open()
        if global_step is None:
            self._step += 1
        else:
            if isinstance(global_step, bool) or not isinstance(global_step, (int, np.integer)):
                raise TypeError(f"global_step must be an int, got {type(global_step).__name__}")
            self._step = int(global_step)
        if not is_rank_zero():
            return None
        error: Optional[BackgroundMeasurementError] = None
        try:
            self._collect(block=False)
        except BackgroundMeasurementError as exc:  # raise it, but not at the cost of this step's measurement
            error = exc
        record = None
        if self._step % self.every == 0 and self._step != self._last_measured:
            record = self.measure(self._step)
        if error is not None:
            raise error
        return record

    @eager_under_compile  # called from a compiled training step: runs eagerly, untraced
    def measure(self, step: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Measure now, whatever the schedule, and log it at ``step`` (default: the counter).

        Returns the :attr:`history` entry in the foreground, ``None`` in the background and on
        ranks other than 0.
        """
        self._check_open()
        if not is_rank_zero():
            return None
        step = self._step if step is None else int(step)
        self._last_measured = step
        figure = self.figure_every is not None and step % self.figure_every == 0
        snapshot = _snapshot(self._module)
        extra = self._regularizer_values()
        args = (snapshot, self.n_clusters, self.n_shuffles, self.seed, self.clusterability_kwargs, figure,
                self.figure_size)
        if not self.background:
            result, image, seconds, live_ncut = _measure_job(*args)
            return self._log(step, result, image, seconds, dict(extra, live_ncut=live_ncut))
        error: Optional[BackgroundMeasurementError] = None
        while len(self._pending) >= self.max_pending:
            try:
                self._collect(block=True, limit=1)
            except BackgroundMeasurementError as exc:
                error = error or exc
        self._pending.append((step, self._executor().submit(_measure_job, *args), extra))
        if error is not None:
            raise error
        return None

    def flush(self) -> None:
        """Wait for every background measurement, log them in order, flush the writer."""
        if not self._closed and is_rank_zero():
            self._collect(block=True)
            if self._writer is not None and hasattr(self._writer, "flush"):
                self._writer.flush()

    def close(self) -> None:
        """Remove the hooks, wait for and log every pending measurement, close an owned writer.

        Idempotent; also run by ``with monitor:`` and at interpreter exit. A background failure
        is raised after everything else was logged and closed.
        """
        if self._closed:
            return
        for h in list(self._handles):
            h.remove()
        error: Optional[BaseException] = None
        try:
            while self._pending:
                try:
                    self._collect(block=True)
                except BackgroundMeasurementError as exc:
                    error = error or exc
        finally:
            self._closed = True
            atexit.unregister(self._atexit)
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            if self._writer is not None:
                if self._owns_writer:
                    self._writer.close()
                elif hasattr(self._writer, "flush"):
                    self._writer.flush()
        if error is not None:
            raise error

    def __enter__(self) -> "ClusterabilityMonitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the exception that is already propagating
            self.close()
        except Exception as close_exc:
            warnings.warn(f"ClusterabilityMonitor.close() failed while handling {exc_type.__name__}: {close_exc!r}",
                          RuntimeWarning, stacklevel=2)

    def state_dict(self) -> Dict[str, Any]:
        """Step counter and history, so that a resumed run continues its curve.

        Waits for pending background measurements first, so the history is complete.
        """
        self.flush()
        return {
            "version": 1,
            "step": self._step,
            "last_measured": self._last_measured,
            "every": self.every,
            "n_clusters": self.n_clusters,
            "n_shuffles": self.n_shuffles,
            "seed": self.seed,
            "prefix": self.prefix,
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the counter and history continue from there.

        Events already written to TensorBoard are not written again.
        """
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a ClusterabilityMonitor state_dict (missing or unknown 'version')")
        if self._pending:
            raise RuntimeError("cannot load a state_dict while background measurements are pending; call flush() first")
        self._step = int(state["step"])
        last = state.get("last_measured")
        self._last_measured = None if last is None else int(last)
        self.history = copy.deepcopy(list(state.get("history", [])))

    def __repr__(self) -> str:
        return (f"ClusterabilityMonitor(every={self.every}, n_clusters={self.n_clusters}, n_shuffles={self.n_shuffles}, "
                f"background={self.background}, step={self._step}, logged={len(self.history)}, pending={len(self._pending)})")

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ClusterabilityMonitor is closed")

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=_mp_context(), initializer=_worker_init)
        return self._pool

    def _collect(self, block: bool, limit: Optional[int] = None) -> None:
        """Log finished background results, oldest first (stops at the first unfinished one
        unless ``block``). A failed one is dropped and raised as BackgroundMeasurementError."""
        done = 0
        while self._pending and (limit is None or done < limit):
            step, future, extra = self._pending[0]
            if not block and not future.done():
                return
            self._pending.popleft()
            done += 1
            try:
                result, image, seconds, live_ncut = future.result()
            except BaseException as exc:
                if isinstance(exc, cf.process.BrokenProcessPool) and self._pool is not None:
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None  # a fresh worker for the next measurement
                raise BackgroundMeasurementError(
                    f"background clusterability measurement of step {step} failed: {type(exc).__name__}: {exc}", step
                ) from exc
            self._log(step, result, image, seconds, dict(extra, live_ncut=live_ncut))

    def _regularizer_values(self) -> Dict[str, Any]:
        reg = self.regularizer
        if reg is None:
            return {}
        state = None
        if hasattr(reg, "state_dict") and hasattr(reg, "load_state_dict"):
            state = reg.state_dict()
        try:
            with torch.no_grad():
                value = float(torch.as_tensor(reg()).detach().float().cpu())
                eigs = None
                if hasattr(reg, "eigenvalues"):
                    eigs = [float(x) for x in torch.as_tensor(reg.eigenvalues()).detach().flatten().cpu().tolist()]
        finally:
            if state is not None:
                reg.load_state_dict(state)
        out: Dict[str, Any] = {"regularizer": value}
        if eigs is not None:
            out["eigenvalues"] = eigs
        return out

    def _get_writer(self):
        if self._writer is None and self._owns_writer:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=os.fspath(self._writer_arg))
        return self._writer

    def _log(self, step: int, result: ClusterabilityResult, image: Optional[np.ndarray], seconds: float,
             extra: Dict[str, Any]) -> Dict[str, Any]:
        sizes = np.bincount(result.labels[result.labels >= 0], minlength=result.n_clusters)
        record: Dict[str, Any] = {
            "step": int(step),
            "ncut": float(result.ncut),
            "n_components": int(result.n_components),
            "n_isolated": int(result.n_isolated),
            "n_dead": None if result.n_dead is None else int(result.n_dead),
            "num_nodes": int(result.num_nodes),
            "cluster_sizes": [int(s) for s in sizes],
        }
        if result.n_shuffles:
            record.update(n_shuffles=result.n_shuffles, shuffle_mean=float(result.mean), shuffle_std=float(result.std),
                          z=float(result.z), p_value=float(result.p_value))
        record.update(extra)
        record["seconds"] = float(seconds)
        self.history.append(record)
        self.last_result = result

        writer = self._get_writer()
        if writer is not None:
            p = self.prefix
            scalars = [("ncut", record["ncut"])]
            if result.n_shuffles:
                scalars += [(k, record[k]) for k in ("shuffle_mean", "shuffle_std", "z", "p_value")]
            scalars += [("n_components", record["n_components"]), ("n_isolated", record["n_isolated"])]
            if record["n_dead"] is not None:
                scalars += [("n_dead", record["n_dead"]), ("live_ncut", record["live_ncut"])]
            if "regularizer" in record:
                scalars.append(("regularizer", record["regularizer"]))
            scalars += [(f"eigs/{i}", v) for i, v in enumerate(record.get("eigenvalues", []))]
            for name, value in scalars:
                if _finite(value):
                    writer.add_scalar(f"{p}/{name}", value, step)
            if hasattr(writer, "add_histogram") and sizes.size:
                writer.add_histogram(f"{p}/cluster_sizes", sizes.astype(np.float64), step)
            if image is not None and hasattr(writer, "add_image"):
                writer.add_image(f"{p}/adjacency", image, step, dataformats="HWC")
            if hasattr(writer, "flush"):
                writer.flush()
        return record


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False
