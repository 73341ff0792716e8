"""Hugging Face ``transformers`` integration (``pip install 'torch_modularity[huggingface]'``).

Measuring is a callback; changing the loss is not something callbacks can do ("Callbacks
can't modify the training loop itself"), so the regularizer comes as a Trainer mixin::

    from transformers import Trainer, TrainingArguments
    from torch_modularity.integrations.huggingface import ClusterabilityCallback, with_regularizer

    reg = SpectralRegularizer(model.classifier_mlp)
    RegTrainer = with_regularizer(Trainer)              # or: class T(RegularizedTrainerMixin, Trainer)
    trainer = RegTrainer(model=model, args=args, train_dataset=ds, regularizer=reg,
                         callbacks=[ClusterabilityCallback(every=100, n_clusters=12,
                                                           model=model.classifier_mlp, regularizer=reg)])
    trainer.train()

Where the measurements go (:class:`ClusterabilityCallback`):

* ``trainer.state.log_history``: one entry per measurement, ``{"clusterability/ncut": ...,
  ..., "step": measured_step}``, appended in step order (so it is also in every checkpoint's
  ``trainer_state.json`` and survives resuming, like the Trainer's own logs);
* TensorBoard, when ``"tensorboard"`` is in ``args.report_to`` (or ``tensorboard=`` names a
  directory or a ``SummaryWriter``): its own ``SummaryWriter`` in
  ``$TENSORBOARD_LOGGING_DIR/clusterability`` or ``<output_dir>/runs/clusterability`` gets the
  scalars at the measured step, the cluster-size histogram and the adjacency images. The
  Trainer's ``TensorBoardCallback`` cannot carry them: reporting callbacks run before user
  callbacks and only see what ``Trainer.log`` was given.

The ``on_log`` route (adding keys to ``logs``) is deliberately not used: the Trainer has
already copied ``logs`` into ``log_history`` and called the reporting integrations by then.

Only the world process zero measures (``state.is_world_process_zero``, and the monitor's own
``torch.distributed`` rank check).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Optional, Type

import torch
from torch import nn

from . import _missing

try:
    from transformers.trainer_callback import TrainerCallback
except ImportError as _err:  # pragma: no cover - exercised only without transformers
    raise _missing("huggingface", "transformers", _err) from _err

from ..monitor import ClusterabilityMonitor

__all__ = ["ClusterabilityCallback", "RegularizedTrainerMixin", "with_regularizer", "RegularizedTrainer"]


class _HFSink:
    """SummaryWriter-like target of the monitor: ``state.log_history`` plus an optional TensorBoard writer."""

    def __init__(self, state, writer=None) -> None:
        self._state = state
        self._writer = writer
        self._metrics: Dict[int, Dict[str, float]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._metrics.setdefault(int(step), {})[tag] = float(value)
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def add_histogram(self, tag: str, values, step: int) -> None:
        if self._writer is not None:
            self._writer.add_histogram(tag, values, step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats=dataformats)

    def flush(self) -> None:
        for step in sorted(self._metrics):
            self._state.log_history.append({**self._metrics[step], "step": step})
        self._metrics.clear()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _wants_tensorboard(args) -> bool:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return "tensorboard" in report_to or "all" in report_to


class ClusterabilityCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that measures clusterability in ``on_step_end``.

    Args:
        every, n_clusters, n_shuffles, seed, figure_every, background, regularizer, prefix,
        **clusterability_kwargs: as for :class:`~torch_modularity.ClusterabilityMonitor`.
        model: the ``nn.Module`` to measure (a Linear chain); default: the Trainer's model.
        tensorboard: ``"auto"`` (a writer of our own when ``"tensorboard"`` is in
            ``args.report_to``), ``True``/``False``, a log directory, or a ``SummaryWriter``
            (flushed, not closed).

    Attributes:
        monitor: the :class:`~torch_modularity.ClusterabilityMonitor` (created in ``on_train_begin``).
        history: its history (kept after training).
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
        model: Optional[nn.Module] = None,
        tensorboard: Any = "auto",
        **clusterability_kwargs,
    ) -> None:
        self._config = dict(every=every, n_clusters=n_clusters, n_shuffles=n_shuffles, seed=seed,
                            figure_every=figure_every, background=background, regularizer=regularizer, prefix=prefix,
                            **clusterability_kwargs)
        self._model = model
        self.tensorboard = tensorboard
        self.monitor: Optional[ClusterabilityMonitor] = None
        self._sink: Optional[_HFSink] = None
        self._owns_writer = False

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.monitor.history if self.monitor is not None else []

    def _writer(self, args):
        tb = self.tensorboard
        if tb is None or tb is False or (tb == "auto" and not _wants_tensorboard(args)):
            return None, False
        if hasattr(tb, "add_scalar"):
            return tb, False
        if isinstance(tb, (str, os.PathLike)) and tb != "auto":
            log_dir = os.fspath(tb)
        else:
            base = os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None) \
                or os.path.join(args.output_dir, "runs")
            log_dir = os.path.join(base, "clusterability")
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=log_dir), True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return control
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.close()
        target = self._model if self._model is not None else model
        if target is None:
            raise ValueError("ClusterabilityCallback: no model to measure (pass model=...)")
        writer, owned = self._writer(args)
        self._sink = _HFSink(state, writer)
        self._owns_writer = owned
        self.monitor = ClusterabilityMonitor(target, writer=self._sink, **self._config)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.step(global_step=int(state.global_step))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None and not self.monitor.closed:
            try:
                self.monitor.close()  # waits for background measurements; they land in log_history too
            finally:
                if self._sink is not None:
                    if self._owns_writer:
                        self._sink.close()
                    else:
                        self._sink.flush()
        return control


# ---------------------------------------------------------------------------- regularizer
class RegularizedTrainerMixin:
    """Mixin for ``transformers.Trainer`` (put it first) adding ``regularizer()`` to the training loss.

    ``compute_loss`` returns ``loss + regularizer()`` in training mode with gradients enabled,
    and the plain loss in evaluation/prediction (so eval losses stay comparable and the
    regularizer's call counter only advances on training micro-batches). With gradient
    accumulation the Trainer divides the loss by the number of accumulation steps unless the
    loss was already normalized over the accumulated batch; in that case the penalty is divided
    here, so each optimizer step carries the penalty exactly once. Under DDP every rank adds the
    penalty (the weights are identical), as the gradient average requires.

    ``Trainer.log`` also reports ``"regularizer"``: the penalty of the last training micro-batch
    (undivided), so it reaches every reporting integration.

    Args:
        regularizer: keyword-only: a callable returning a scalar tensor (e.g.
            ``SpectralRegularizer``); ``None`` makes the mixin a no-op.
    """

    def __init__(self, *args, regularizer=None, **kwargs) -> None:
        if regularizer is not None and not callable(regularizer):
            raise TypeError(f"regularizer must be callable, got {type(regularizer).__name__}")
        self.regularizer = regularizer
        self.last_regularizer_value: Optional[float] = None
        super().__init__(*args, **kwargs)

    def _penalty_is_divided_by_trainer(self, num_items_in_batch) -> bool:
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        return not scaled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        reg = self.regularizer
        if reg is None or not model.training or not torch.is_grad_enabled():
            return out
        loss, outputs = out if return_outputs else (out, None)
        penalty = reg()
        self.last_regularizer_value = float(penalty.detach())
        if not self._penalty_is_divided_by_trainer(num_items_in_batch):
            steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            penalty = penalty / steps
        loss = loss + penalty.to(device=loss.device, dtype=loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if self.last_regularizer_value is not None and "loss" in logs:
            logs.setdefault("regularizer", self.last_regularizer_value)
        return super().log(logs, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def with_regularizer(trainer_cls: Type) -> Type:
    """``trainer_cls`` with :class:`RegularizedTrainerMixin` mixed in (cached per class).

    Example: ``with_regularizer(transformers.Trainer)(model=..., args=..., regularizer=reg)``.
    """
    if not isinstance(trainer_cls, type) or not hasattr(trainer_cls, "compute_loss"):
        raise TypeError(f"expected a Trainer class with compute_loss, got {trainer_cls!r}")
    if issubclass(trainer_cls, RegularizedTrainerMixin):
        return trainer_cls
    return type(f"Regularized{trainer_cls.__name__}", (RegularizedTrainerMixin, trainer_cls),
                {"__module__": __name__, "__doc__": f"{trainer_cls.__name__} with a regularizer added to the training loss."})


def __getattr__(name: str):
    # RegularizedTrainer = with_regularizer(transformers.Trainer), built on first use: importing
    # transformers.Trainer is slow, and the callback alone does not need it.
    if name == "RegularizedTrainer":
        from transformers import Trainer

        return with_regularizer(Trainer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
