"""Lightning integration: :class:`ClusterabilityCallback` (``pip install 'torch_modularity[lightning]'``).

::

    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch_modularity.integrations.lightning import ClusterabilityCallback

    trainer = L.Trainer(max_steps=5000, logger=TensorBoardLogger("runs"),
                        callbacks=[ClusterabilityCallback(every=100, n_clusters=12, module="net")])
    trainer.fit(lit_model, loader)

The callback measures after every ``every``-th optimizer step (``trainer.global_step``, so
gradient accumulation counts optimizer steps, not batches) and logs:

* to every ``TensorBoardLogger`` of the trainer: straight into its ``SummaryWriter``
  (``logger.experiment``) at the measured step: the scalars, the cluster-size histogram and
  the adjacency image, with the tags of :class:`torch_modularity.ClusterabilityMonitor`;
* to every other logger (CSV, W&B, MLflow, ...): the scalars via ``logger.log_metrics(metrics,
  step=measured_step)``. This is used instead of ``pl_module.log``, which only reaches the
  loggers every ``log_every_n_steps`` steps and is not allowed in ``on_train_end``, where the
  last background measurements are flushed;
* and, during training, with ``pl_module.log(..., logger=False)`` into
  ``trainer.callback_metrics``, so ``EarlyStopping``/``ModelCheckpoint`` can monitor e.g.
  ``"clusterability/ncut"``.

Only global rank 0 measures. The callback is stateful (``state_dict``/``state_key``): a run
resumed with ``trainer.fit(..., ckpt_path=...)`` continues its curve and history.

The regularizer in a LightningModule is one line in ``training_step``::

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_mlp()
            self.reg = SpectralRegularizer(self.net)             # a plain attribute, not a submodule

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y) + self.reg()   # <- the one-liner

Pass ``regularizer=lit.reg`` to the callback to also log its value and eigenvalues.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Union

from torch import nn

from . import _missing

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError as _err:  # pragma: no cover - exercised only without lightning
    raise _missing("lightning", "lightning", _err) from _err

from ..monitor import ClusterabilityMonitor

__all__ = ["ClusterabilityCallback"]


class _LightningSink:
    """SummaryWriter-like target of the monitor that fans out to the trainer's loggers."""

    def __init__(self, callback: "ClusterabilityCallback", trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._callback = callback
        self._pl_module = pl_module
        self._writers: List[Any] = []
        self._others: List[Any] = []
        for logger in trainer.loggers:
            experiment = logger.experiment if isinstance(logger, TensorBoardLogger) else None
            if experiment is not None and hasattr(experiment, "add_scalar"):
                self._writers.append(experiment)
            else:
                self._others.append(logger)
        self._metrics: Dict[int, Dict[str, float]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self._writers:
            w.add_scalar(tag, value, step)
        self._metrics.setdefault(int(step), {})[tag] = float(value)
        if self._callback._in_batch_hook and self._callback.log_to_callback_metrics:
            self._pl_module.log(tag, float(value), on_step=True, on_epoch=False, logger=False, prog_bar=False,
                                batch_size=1)

    def add_histogram(self, tag: str, values, step: int) -> None:
        for w in self._writers:
            w.add_histogram(tag, values, step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        for w in self._writers:
            w.add_image(tag, image, step, dataformats=dataformats)

    def flush(self) -> None:
        for step in sorted(self._metrics):
            for logger in self._others:
                logger.log_metrics(self._metrics[step], step=step)
        self._metrics.clear()
        for w in self._writers:
            if hasattr(w, "flush"):
                w.flush()


class ClusterabilityCallback(Callback):
    """A Lightning ``Callback`` running a :class:`~torch_modularity.ClusterabilityMonitor`.

    Args:
        every, n_clusters, n_shuffles, seed, figure_every, background, regularizer, prefix,
        **clusterability_kwargs: as for :class:`~torch_modularity.ClusterabilityMonitor`.
        module: what to measure: ``None`` (the LightningModule itself, which then must hold
            only the Linear chain), an attribute path of the LightningModule (``"net"``,
            ``"model.encoder"``), an ``nn.Module``, or a function ``pl_module -> nn.Module``.
        log_to_callback_metrics: also ``pl_module.log(..., logger=False)`` the scalars, so
            other callbacks can monitor them.

    Attributes:
        monitor: the :class:`~torch_modularity.ClusterabilityMonitor` (created in ``setup``).
        history: the monitor's history (also kept after training ends).
    """

    def __init__(
        self,
        every: int = 100,
        n_clusters: int = 12,
        n_shuffles: int = 0,
        seed: int = 0,
        figure_every: Optional[int] = None,
        background: bool = False,
        regularizer=None,
        prefix: str = "clusterability",
        module: Union[None, str, nn.Module, Callable[[Any], nn.Module]] = None,
        log_to_callback_metrics: bool = True,
        **clusterability_kwargs,
    ) -> None:
        super().__init__()
        self._config = dict(every=every, n_clusters=n_clusters, n_shuffles=n_shuffles, seed=seed,
                            figure_every=figure_every, background=background, regularizer=regularizer, prefix=prefix,
                            **clusterability_kwargs)
        self.module = module
        self.log_to_callback_metrics = bool(log_to_callback_metrics)
        self.monitor: Optional[ClusterabilityMonitor] = None
        self._state: Optional[Dict[str, Any]] = None  # loaded before the monitor exists
        self._last_global_step: Optional[int] = None
        self._in_batch_hook = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self._config["prefix"], every=self._config["every"],
                                        n_clusters=self._config["n_clusters"])

    @property
    def history(self) -> List[Dict[str, Any]]:
        if self.monitor is not None:
            return self.monitor.history
        return list((self._state or {}).get("history", []))

    def _target(self, pl_module) -> nn.Module:
        m = self.module
        if m is None:
            return pl_module
        if isinstance(m, nn.Module):
            return m
        if isinstance(m, str):
            target = pl_module
            for part in m.split("."):
                target = getattr(target, part)
            return target
        return m(pl_module)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if self.monitor is not None and not self.monitor.closed:
            return
        if self.monitor is not None:  # a second fit() with the same callback: carry the curve over
            self._state = self.monitor.state_dict()
        try:
            target = self._target(pl_module)
            self.monitor = ClusterabilityMonitor(target, writer=_LightningSink(self, trainer, pl_module), **self._config)
        except TypeError as err:
            if self.module is None:
                raise TypeError(f"{err}\nHint: pass ClusterabilityCallback(module='net') to measure only the "
                                f"LightningModule's network attribute") from err
            raise
        if self._state:
            self.monitor.load_state_dict(self._state)
            self._state = None
        self._last_global_step = None

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch, batch_idx) -> None:
        if self.monitor is None or self.monitor.closed:
            return
        step = int(trainer.global_step)
        if step == self._last_global_step:  # gradient accumulation: no optimizer step in this batch
            return
        self._last_global_step = step
        self._in_batch_hook = True
        try:
            self.monitor.step(global_step=step)
        finally:
            self._in_batch_hook = False

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.flush()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self.monitor is not None:
            try:
                self.monitor.close()
            except Exception as exc:  # keep the original exception in charge
                warnings.warn(f"ClusterabilityCallback: closing the monitor failed: {exc!r}", RuntimeWarning)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        if self.monitor is not None:
            return self.monitor.state_dict()  # waits for pending background measurements
        return dict(self._state or {})

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.load_state_dict(state_dict)
        else:
            self._state = dict(state_dict)
