"""Pruning, and whether a pruned network is more clusterable than chance.

The research finding: networks pruned by weight magnitude are more clusterable than
"chance". Chance has several honest meanings, and they give different answers, so this
module measures them side by side:

- **random-pruned, trained values** (:func:`random_prune_like` with ``values="trained"``):
  random masks with exactly the pruned net's per-layer number of kept weights, applied to
  the trained *unpruned* weights. Holds fixed: the per-layer sparsity and the trained weights.
- **random-pruned, matched values** (``values="matched"``): the same random masks carrying
  the pruned net's own surviving values, permuted. Holds fixed: the per-layer sparsity and
  each layer's multiset of surviving values (a random mask keeps mostly small weights, a
  magnitude mask keeps the large ones, and n-cut is sensitive to that).
- **shuffles of the pruned net** (``"layer"``: the mask moves; ``"layer_nonzero"``: the exact
  mask is kept), as in :func:`torch_modularity.clusterability`.

Unstructured pruning uses ``torch.nn.utils.prune`` masks (:func:`magnitude_prune`,
:class:`PolynomialSparsity`, :func:`finalize`); structured (channel) pruning goes through
torch-pruning (:func:`structured_prune`, :func:`layer_ratios`). :func:`compare` runs the whole
experiment and returns a :class:`PruningComparison`.

Nothing here reads or reseeds the caller's global torch/numpy random state: every random
choice comes from a ``torch.Generator`` or runs inside ``torch.random.fork_rng()``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from ._torch_modes import eager_under_compile
from .checkpoint import load_model_or_state_dict
from .graph import WeightGraph
from .measure import ClusterabilityResult, baseline_stats, clusterability
from .spectral import check_seed

__all__ = [
    "magnitude_prune",
    "PolynomialSparsity",
    "finalize",
    "layer_sparsity",
    "random_prune_like",
    "structured_prune",
    "layer_ratios",
    "compare",
    "PruningComparison",
    "Baseline",
    "NetStats",
    "module_from_state_dict",
    "load_module",
    "add_cli",
    "run_cli",
]

# Layers whose weights are pruned (unstructured); biases and normalisation layers never are.
_PRUNABLE = (nn.Linear, nn.Conv2d)
_SCOPES = ("global", "layer")
_VALUES = ("trained", "matched")
_IMPORTANCES = ("magnitude", "random")

# What each baseline holds fixed, for the report (keys are PruningComparison.baselines keys).
_BASELINE_INFO = types.MappingProxyType({
    "random_trained": ("random mask, trained values",
                       "per-layer kept count; the unpruned net's trained weights"),
    "random_matched": ("random mask, matched values",
                       "per-layer kept count; the pruned net's surviving values, permuted"),
    "shuffle_layer": ("shuffle 'layer'",
                      "each layer's values incl. zeros; the mask moves"),
    "shuffle_layer_nonzero": ("shuffle 'layer_nonzero'",
                              "the exact mask; surviving values permuted per layer"),
})

ModuleRef = Union[str, nn.Module]


# --------------------------------------------------------------------------- helpers
def _check_fraction(value: float, name: str) -> float:
    """A fraction in [0, 1): pruning everything would leave no graph to measure."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1) (the fraction of weights removed), got {value}")
    return value


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def _is_masked(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is re-parametrised by ``torch.nn.utils.prune``."""
    return hasattr(module, name + "_orig") and isinstance(getattr(module, name + "_mask", None), torch.Tensor)


def _layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every Linear and Conv2d of ``model`` in registration order, with its module path."""
    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, _PRUNABLE)]


def _resolve(model: nn.Module, include: Optional[Union[ModuleRef, Iterable[ModuleRef]]]) -> List[Tuple[str, nn.Module]]:
    """The layers to prune: all Linear/Conv2d, or the ``include`` ones, in model order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if include is None:
        layers = _layers(model)
    else:
        if isinstance(include, (str, nn.Module)):
            include = [include]
        by_name = dict(model.named_modules())
        name_of = {id(m): (n or "<root>") for n, m in model.named_modules()}
        chosen = {}
        for i, item in enumerate(include):
            if isinstance(item, str):
                if item not in by_name:
                    known = ", ".join(repr(n) for n, _ in _layers(model)[:8])
                    raise ValueError(f"include[{i}]: {type(model).__name__} has no module named {item!r} "
                                     f"(its Linear/Conv2d layers: {known or 'none'})")
                module, name = by_name[item], item or "<root>"
            elif isinstance(item, nn.Module):
                if id(item) not in name_of:
                    raise ValueError(f"include[{i}] ({type(item).__name__}) is not a submodule of the model")
                module, name = item, name_of[id(item)]
            else:
                raise TypeError(f"include[{i}] must be a module or a module name, got {type(item).__name__}")
            if not isinstance(module, _PRUNABLE):
                raise TypeError(f"include[{i}] {name!r} is a {type(module).__name__}; only nn.Linear and "
                                f"nn.Conv2d weights are pruned")
            chosen[id(module)] = (name, module)
        order = {id(m): k for k, (_, m) in enumerate(model.named_modules())}
        layers = sorted(chosen.values(), key=lambda nm: order[id(nm[1])])
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layers: nothing to prune")
    return layers


def _raw_weight(module: nn.Module) -> torch.Tensor:
    """The unmasked weight values (``weight_orig`` when masked)."""
    return module.weight_orig if _is_masked(module) else module.weight


def _kept(module: nn.Module) -> torch.Tensor:
    """Boolean tensor of the kept weights: the mask if there is one, else the non-zeros."""
    if _is_masked(module):
        return module.weight_mask != 0
    return module.weight.detach() != 0


def _set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Install ``mask`` on ``module.weight`` (a new prune re-parametrisation, or update one)."""
    mask = mask.to(device=_raw_weight(module).device, dtype=_raw_weight(module).dtype)
    if _is_masked(module):
        # Updating the buffer in place keeps the parameter object ``weight_orig`` (an
        # optimizer built earlier still trains it) and avoids stacking PruningContainers.
        with torch.no_grad():
            module.weight_mask.copy_(mask)
        # The pre-hook recomputes ``weight`` only at the next forward: refresh it now so that
        # readers of ``module.weight`` (graphs, counts) see the new mask immediately.
        setattr(module, "weight", module.weight_orig * module.weight_mask)
    else:
        prune.custom_from_mask(module, "weight", mask)


def _mask_from_scores(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Flat 0/1 mask pruning the ``n_prune`` lowest scores (already-pruned entries score -1)."""
    # Masks only grow: everything already pruned stays pruned even for a lower target.
    n_prune = max(int(n_prune), int((scores < 0).sum()))
    mask = torch.ones_like(scores)
    if n_prune:
        # A stable sort makes ties (e.g. exact zeros) deterministic: lower index first.
        order = torch.argsort(scores, stable=True)
        mask[order[:n_prune]] = 0
    return mask


def _n_prune(sparsity: float, numel: int) -> int:
    # Python's round, as torch.nn.utils.prune uses for a float amount.
    return int(round(sparsity * numel))


def _fork_devices(module: Optional[nn.Module]) -> List[int]:
    """CUDA devices whose RNG a forked section may touch (the model's), for fork_rng."""
    if module is None or not torch.cuda.is_available():
        return []
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on models carrying prune masks.

    A masked module holds ``weight = weight_orig * weight_mask`` as a non-leaf tensor, which
    ``copy.deepcopy`` refuses; it is swapped for a detached view during the copy (the copy's
    pre-hook recomputes it at its next forward) and restored on the original.
    """
    saved = []
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                t = getattr(m, hook._tensor_name, None)
                if isinstance(t, torch.Tensor) and not t.is_leaf:
                    saved.append((m, hook._tensor_name, t))
                    setattr(m, hook._tensor_name, t.detach())
    try:
        return copy.deepcopy(model)
    finally:
        for m, name, t in saved:
            setattr(m, name, t)


def _child_seed(seed: int, index: int) -> int:
    """Seed of random-pruned net ``index``: depends on (seed, index) only."""
    state = np.random.SeedSequence(seed, spawn_key=(0x7072, index)).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


# --------------------------------------------------------------------------- unstructured
def magnitude_prune(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    include: Optional[Union[ModuleRef, Iterable[ModuleRef]]] = None,
) -> nn.Module:
    """Unstructured L1-magnitude pruning of Linear and Conv2d weights, with prune masks.

    Installs ``torch.nn.utils.prune`` masks (``weight_orig`` + ``weight_mask``) so pruning can
    continue during training; biases and BatchNorm are untouched. Calling it again with a
    higher sparsity (a schedule) keeps every weight already pruned pruned: masks only grow,
    and a target below the current sparsity leaves the masks as they are. Exact count: a
    layer (``scope="layer"``) or the whole set of layers (``"global"``) ends with
    ``round(sparsity * n_weights)`` pruned weights. Ties are broken by position.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> net = magnitude_prune(net, 0.5, scope="layer")
        >>> [int((m.weight == 0).sum()) for m in (net[0], net[2])]
        [24, 9]

    Args:
        model: the network, pruned in place.
        sparsity: fraction of weights to remove, in ``[0, 1)``.
        scope: ``"global"`` ranks all included weights together (per-layer sparsities
            differ); ``"layer"`` prunes each layer to ``sparsity`` (what tfmot, and so the
            research code, did).
        include: modules or module names to prune; default every Linear and Conv2d, the
            first and the last layer included (as the research code).

    Returns:
        ``model``.
    """
    sparsity = _check_fraction(sparsity, "sparsity")
    _check_choice(scope, "scope", _SCOPES)
    layers = _resolve(model, include)
    with torch.no_grad():
        scores = []
        for _, m in layers:
            s = _raw_weight(m).detach().abs().flatten().float()
            if _is_masked(m):
                s = torch.where(m.weight_mask.flatten() == 0, torch.full_like(s, -1.0), s)
            scores.append(s)
        if scope == "layer":
            masks = [_mask_from_scores(s, _n_prune(sparsity, s.numel())) for s in scores]
        else:
            device = scores[0].device
            flat = torch.cat([s.to(device) for s in scores])
            flat_mask = _mask_from_scores(flat, _n_prune(sparsity, flat.numel()))
            masks = list(torch.split(flat_mask, [s.numel() for s in scores]))
    for (_, m), mask in zip(layers, masks):
        _set_mask(m, mask.view_as(_raw_weight(m)))
    return model


def finalize(model: nn.Module) -> nn.Module:
    """Make every ``torch.nn.utils.prune`` mask permanent (``prune.remove``), zeros kept.

    Afterwards the state_dict is plain (``weight``, no ``weight_orig`` / ``weight_mask``) and
    loads into a fresh model of the same class.

    Example:
        >>> net = magnitude_prune(nn.Sequential(nn.Linear(4, 4)), 0.5)
        >>> sorted(finalize(net).state_dict())
        ['0.bias', '0.weight']

    Args:
        model: the network, changed in place; modules without masks are left alone.

    Returns:
        ``model``.
    """
    for module in model.modules():
        names = [h._tensor_name for h in list(module._forward_pre_hooks.values())
                 if isinstance(h, prune.BasePruningMethod)]
        for name in names:
            prune.remove(module, name)
    return model


def layer_sparsity(model: nn.Module) -> Dict[str, float]:
    """Fraction of zero weights in every Linear and Conv2d layer (masks respected).

    Example:
        >>> net = magnitude_prune(nn.Sequential(nn.Linear(10, 10)), 0.3)
        >>> layer_sparsity(net)
        {'0': 0.3}

    Args:
        model: any network.

    Returns:
        ``{module path: sparsity}`` in registration order.
    """
    return {name: float((~_kept(m)).sum()) / m.weight.numel() for name, m in _layers(model)}


class PolynomialSparsity:
    """Polynomial-decay sparsity schedule for pruning during fine-tuning (tfmot's PolynomialDecay).

    ``s(t) = final + (initial - final) * (1 - (t - begin_step) / (end_step - begin_step)) ** power``
    for ``begin_step <= t <= end_step``. The target is updated only at the steps
    ``begin_step, begin_step + frequency, ...`` (and at ``end_step``) and held in between;
    before ``begin_step`` it is 0, so it jumps to ``initial`` at ``begin_step``. The research
    recipe: ``initial=0.5, final=0.9, begin_step=0, end_step=469 * 20, frequency=10, power=3``,
    per-layer scope. Unlike tfmot, ``end_step`` is always an update step, so ``final`` is
    reached even when ``end_step - begin_step`` is not a multiple of ``frequency``.

    Call :meth:`step` once per training step (it prunes the attached model with
    :func:`magnitude_prune` when an update is due, then advances its own counter), or let
    :meth:`attach` do it after every ``optimizer.step()``.

    Example:
        >>> net = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> schedule = PolynomialSparsity(net, end_step=100)
        >>> handle = schedule.attach(opt)
        >>> for _ in range(101):
        ...     opt.zero_grad(); net(torch.ones(1, 20)).sum().backward(); opt.step()
        >>> round(schedule.sparsity(0), 3), round(schedule.sparsity(100), 3), schedule.current_step
        (0.5, 0.9, 101)
        >>> layer_sparsity(net)
        {'0': 0.9, '2': 0.9}

    Args:
        model: the network to prune (optional: without it the object is just the schedule).
        initial: sparsity at ``begin_step``.
        final: sparsity from ``end_step`` on; ``0 <= initial <= final < 1``.
        begin_step, end_step: the pruning window, in training steps.
        frequency: steps between mask updates.
        power: exponent of the decay (tfmot default 3).
        scope: ``"layer"`` (default; tfmot prunes each layer to the schedule) or ``"global"``.
        include: layers to prune, as in :func:`magnitude_prune`.
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        *,
        initial: float = 0.5,
        final: float = 0.9,
        begin_step: int = 0,
        end_step: int,
        frequency: int = 10,
        power: float = 3,
        scope: str = "layer",
        include: Optional[Union[ModuleRef, Iterable[ModuleRef]]] = None,
    ) -> None:
        initial = _check_fraction(initial, "initial")
        final = _check_fraction(final, "final")
        if final < initial:
            raise ValueError(f"final sparsity {final} is below initial {initial}; masks only grow")
        begin_step = _check_int(begin_step, "begin_step", 0)
        end_step = _check_int(end_step, "end_step", begin_step + 1)
        frequency = _check_int(frequency, "frequency", 1)
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
            raise ValueError(f"power must be a positive number, got {power!r}")
        _check_choice(scope, "scope", _SCOPES)
        if model is not None:
            _resolve(model, include)  # fail now, not at the first step
        self.model = model
        self.initial, self.final, self.power = initial, final, float(power)
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.scope, self.include = scope, include
        self.current_step = 0

    def is_update_step(self, step: int) -> bool:
        """Whether the masks are updated at ``step``."""
        return self.begin_step <= step <= self.end_step and (
            (step - self.begin_step) % self.frequency == 0 or step == self.end_step)

    def sparsity(self, step: int) -> float:
        """Target sparsity in effect at ``step``: that of the last update step ``<= step``."""
        if step < self.begin_step:
            return 0.0
        if step >= self.end_step:
            last = self.end_step
        else:
            last = self.begin_step + (step - self.begin_step) // self.frequency * self.frequency
        progress = (last - self.begin_step) / (self.end_step - self.begin_step)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** self.power

    @eager_under_compile  # called from a compiled training step: runs eagerly, untraced
    def step(self) -> float:
        """Prune the model if an update is due at the current step, then advance the counter.

        Returns:
            The target sparsity in effect at the step just taken.
        """
        t = self.current_step
        target = self.sparsity(t)
        if self.model is not None and self.is_update_step(t):
            magnitude_prune(self.model, target, scope=self.scope, include=self.include)
        self.current_step = t + 1
        return target

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Run :meth:`step` after every ``optimizer.step()``.

        Returns:
            The hook handle; ``handle.remove()`` detaches the schedule.
        """
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    def state_dict(self) -> Dict[str, Any]:
        """The schedule's settings and step counter (not the model or ``include``)."""
        return {"initial": self.initial, "final": self.final, "begin_step": self.begin_step,
                "end_step": self.end_step, "frequency": self.frequency, "power": self.power,
                "scope": self.scope, "current_step": self.current_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the masks live in the model's own state_dict)."""
        for key in ("initial", "final", "begin_step", "end_step", "frequency", "power", "scope", "current_step"):
            if key in state:
                setattr(self, key, state[key])

    def __repr__(self) -> str:
        return (f"PolynomialSparsity(initial={self.initial}, final={self.final}, begin_step={self.begin_step}, "
                f"end_step={self.end_step}, frequency={self.frequency}, power={self.power:g}, "
                f"scope={self.scope!r}, current_step={self.current_step})")


def _match_layers(model: nn.Module, reference: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """Pair the Linear/Conv2d layers of two nets by order; raise naming the first mismatch."""
    ours, theirs = _layers(model), _layers(reference)
    if not ours:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layers: nothing to prune")
    if len(ours) != len(theirs):
        raise ValueError(f"model has {len(ours)} Linear/Conv2d layers but reference has {len(theirs)}: "
                         f"the reference must be a pruned copy of the same architecture")
    pairs = []
    for (name, m), (ref_name, r) in zip(ours, theirs):
        if type(m) is not type(r) or tuple(m.weight.shape) != tuple(r.weight.shape):
            raise ValueError(
                f"layer {name!r} ({type(m).__name__}, weight {tuple(m.weight.shape)}) does not match reference "
                f"layer {ref_name!r} ({type(r).__name__}, weight {tuple(r.weight.shape)})")
        pairs.append((name, m, r))
    return pairs


def random_prune_like(
    model: nn.Module,
    reference: nn.Module,
    seed: int = 0,
    values: str = "trained",
) -> nn.Module:
    """A copy of ``model`` with random masks keeping exactly the reference's per-layer counts.

    For every Linear/Conv2d layer that the reference has pruned (a prune mask, or exact
    zeros), a mask with exactly the same number of kept weights *in that layer* is drawn
    uniformly at random from ``torch.Generator().manual_seed(seed)``; the global RNG is not
    used. Layers are paired by order and must have the same shapes. The copy carries
    ``torch.nn.utils.prune`` masks, so fine-tuning it keeps the masks fixed.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> pruned = magnitude_prune(copy.deepcopy(net), 0.75)
        >>> rand = random_prune_like(net, pruned, seed=1)
        >>> [int((m.weight != 0).sum()) for m in (rand[0], rand[2])] == [int((m.weight != 0).sum()) for m in (pruned[0], pruned[2])]
        True

    Args:
        model: the network whose copy is pruned (normally the trained, unpruned net). Only
            the pruned layers' weights change; biases and other parameters are ``model``'s.
        reference: the pruned network whose per-layer kept counts are matched.
        seed: seed of the masks (and of the value permutation).
        values: ``"trained"`` keeps ``model``'s weight values under the random mask;
            ``"matched"`` puts the reference's surviving values, randomly permuted, at the
            random positions (same per-layer value distribution as the pruned net).

    Returns:
        The randomly pruned copy (with prune masks; :func:`finalize` makes them permanent).
    """
    _check_choice(values, "values", _VALUES)
    seed = check_seed(seed)
    pairs = _match_layers(model, reference)
    for name, m, _ in pairs:
        if _is_masked(m):
            raise ValueError(f"model layer {name!r} already carries a pruning mask: pass the unpruned model "
                             f"(the pruned one is the reference), or finalize() it first")
    out = _deepcopy(model)
    out_layers = dict(_layers(out))
    gen = torch.Generator().manual_seed(seed)
    for name, m, ref in pairs:
        keep_ref = _kept(ref).flatten()
        numel, k = keep_ref.numel(), int(keep_ref.sum())
        if k == numel and not _is_masked(ref):
            continue  # the reference did not prune this layer
        target = out_layers[name]
        if values == "trained":
            n_zero = int((m.weight.detach() == 0).sum())
            if numel > k and n_zero >= max(1, (numel - k) // 2):
                warnings.warn(
                    f"model layer {name!r} already has {n_zero} exact zeros (the reference prunes {numel - k}): it "
                    f"looks pruned, so random masks keep some zeros and the copy has fewer non-zero weights than "
                    f"the reference; pass the unpruned model", UserWarning, stacklevel=2)
        positions = torch.randperm(numel, generator=gen)[:k]
        mask = torch.zeros(numel)
        mask[positions] = 1.0
        if values == "matched":
            with torch.no_grad():
                survivors = ref.weight.detach().flatten()[keep_ref.to(ref.weight.device)]
                # ``positions`` is a uniformly random *ordered* k-subset, so writing the values in
                # their stored order to it places a uniformly random permutation of them.
                new = torch.zeros(numel, dtype=survivors.dtype, device=survivors.device)
                new[positions.to(survivors.device)] = survivors
                target.weight.copy_(new.view_as(target.weight).to(target.weight))
        _set_mask(target, mask.view_as(target.weight))
    return out


# --------------------------------------------------------------------------- structured
def _import_tp():
    import torch_pruning as tp  # imported here: torch-pruning is only needed for channel pruning

    return tp


def _to_copy(item: Any, original: nn.Module, copied: nn.Module, what: str) -> nn.Module:
    """Map a module of ``original`` (or a module name) to the same module of its deep copy."""
    by_name = dict(copied.named_modules())
    if isinstance(item, str):
        if item not in by_name:
            raise ValueError(f"{what}: {type(original).__name__} has no module named {item!r}")
        return by_name[item]
    if isinstance(item, nn.Module):
        for name, m in original.named_modules():
            if m is item:
                return by_name[name]
        raise ValueError(f"{what}: {type(item).__name__} is not a submodule of the model")
    raise TypeError(f"{what}: expected a module or a module name, got {type(item).__name__}")


def structured_prune(
    model: nn.Module,
    example_inputs: Any,
    ratio: float,
    importance: str = "magnitude",
    seed: int = 0,
    ignored_layers: Optional[Iterable[ModuleRef]] = None,
    global_pruning: bool = False,
    pruning_ratio_dict: Optional[Mapping[Any, float]] = None,
) -> nn.Module:
    """Channel pruning of a copy of ``model`` with torch-pruning's ``BasePruner``.

    Removes whole output channels / units (and everything coupled to them) physically, so
    the returned model is smaller; ``model`` is not changed. Importance is
    ``GroupMagnitudeImportance(p=2)`` or ``RandomImportance()``; the random run draws from the
    global RNG inside ``torch.random.fork_rng()`` seeded with ``seed``, so the caller's RNG
    state is untouched and runs are reproducible. Models still carrying
    ``torch.nn.utils.prune`` masks are made plain first (on the copy). ``ratio`` is a
    *channel* ratio: parameters shrink roughly as ``1 - (1 - ratio) ** 2``. Save the result
    with ``torch.save(model)`` or ``torch_pruning.state_dict``: its plain state_dict no longer
    fits the original class.

    For a fair random baseline under global pruning, reuse the magnitude run's per-layer
    ratios (both then have identical shapes)::

        mag = structured_prune(net, x, 0.5, global_pruning=True)
        rnd = structured_prune(net, x, 0.5, "random", pruning_ratio_dict=layer_ratios(net, mag))

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> small = structured_prune(net, torch.randn(1, 8), 0.5)
        >>> small[0].out_features, small[2].out_features
        (8, 4)

    Args:
        model: the network (not modified).
        example_inputs: inputs for tracing the dependency graph.
        ratio: channel pruning ratio in ``[0, 1)`` (per layer, or overall with global pruning).
        importance: ``"magnitude"`` or ``"random"``.
        seed: seed of the random importance.
        ignored_layers: modules (of ``model``) or module names to keep whole; default the
            classifier head (the last ``nn.Linear``), so the output size is kept.
        global_pruning: rank channels across layers (per-layer ratios then differ).
        pruning_ratio_dict: per-layer ratios ``{module or name: ratio}``, e.g. from
            :func:`layer_ratios`; these layers are pruned locally at their own ratio.

    Returns:
        The pruned copy.
    """
    ratio = _check_fraction(ratio, "ratio")
    _check_choice(importance, "importance", _IMPORTANCES)
    seed = check_seed(seed)
    tp = _import_tp()
    net = _deepcopy(model)
    finalize(net)  # torch-pruning cannot assign to a prune-reparametrised ``weight``
    if ignored_layers is None:
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        ignored = linears[-1:]
    else:
        ignored = [_to_copy(item, model, net, "ignored_layers") for item in ignored_layers]
    ratio_dict = None
    if pruning_ratio_dict:
        ratio_dict = {}
        for key, value in pruning_ratio_dict.items():
            if isinstance(key, tuple):
                mapped = tuple(_to_copy(k, model, net, "pruning_ratio_dict") for k in key)
            else:
                mapped = _to_copy(key, model, net, "pruning_ratio_dict")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"pruning_ratio_dict[{key!r}] must be a number in [0, 1), got {value!r}")
            ratio_dict[mapped] = float(value)
    imp = tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude" else tp.importance.RandomImportance()
    # Tracing needs autograd and parameters that require grad; restore the flags afterwards.
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    was_training = net.training
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()  # tracing in eval mode: no BatchNorm statistics update, no dropout draws
    with torch.random.fork_rng(devices=_fork_devices(net)), torch.enable_grad():
        torch.manual_seed(seed)
        pruner = tp.pruner.BasePruner(
            net, example_inputs, importance=imp, pruning_ratio=ratio, global_pruning=bool(global_pruning),
            pruning_ratio_dict=ratio_dict, ignored_layers=ignored)
        pruner.step()
    net.train(was_training)
    for name, p in net.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    return net


def layer_ratios(original: nn.Module, pruned: nn.Module) -> Dict[str, float]:
    """Per-layer channel ratios of a structurally pruned model, as a ``pruning_ratio_dict``.

    Passing the result to :func:`structured_prune` (``pruning_ratio_dict=``) reproduces the
    pruned model's layer widths exactly, e.g. for a random run matching a global magnitude
    run. A ratio is set half a channel below the exact pruned fraction, so that
    torch-pruning's rounding down (``int(C * (1 - ratio))`` channels kept) gives exactly the
    observed width.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> small = structured_prune(net, torch.randn(1, 8), 0.25)
        >>> ratios = layer_ratios(net, small)
        >>> round(ratios["0"], 4), ratios["2"]
        (0.2188, 0.0)

    Args:
        original: the model before pruning.
        pruned: its structurally pruned copy (same module names).

    Returns:
        ``{module name: ratio}`` for every Linear and Conv layer (0.0 where nothing was pruned).
    """
    pruned_modules = dict(pruned.named_modules())
    ratios = {}
    for name, m in original.named_modules():
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        other = pruned_modules.get(name)
        if other is None or type(other) is not type(m):
            raise ValueError(f"layer {name!r} ({type(m).__name__}) has no counterpart in the pruned model")
        before = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        after = other.out_features if isinstance(other, nn.Linear) else other.out_channels
        if after > before:
            raise ValueError(f"layer {name!r} has {after} outputs in the pruned model but only {before} before")
        ratios[name or "<root>"] = 0.0 if after == before else 1.0 - (after + 0.5) / before
    if not ratios:
        raise ValueError(f"{type(original).__name__} has no Linear or Conv layers")
    return ratios


# --------------------------------------------------------------------------- comparison
def _nan_to_none(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


@dataclass
class NetStats:
    """What was measured on one network.

    Attributes:
        ncut: n-cut of its spectral partition (isolated nodes removed).
        live_ncut: n-cut of the live subgraph only (``clusterability(..., exclude_dead=True)``:
            units whose input-to-output path flow is below 1e-3 of their layer's maximum are
            removed); equals ``ncut`` when every dead unit is isolated anyway; NaN when fewer
            than ``n_clusters`` live units are left.
        n_isolated: units without any non-zero weight (removed before clustering).
        n_dead: dead units by :func:`torch_modularity.flow.dead_units` (isolated included).
        num_nodes: all units of the graph.
        n_weights: non-zero weights of the graph's layers.
    """

    ncut: float
    live_ncut: float
    n_isolated: int
    n_dead: int
    num_nodes: int
    n_weights: int

    def to_dict(self) -> Dict[str, Any]:
        return {"ncut": _nan_to_none(float(self.ncut)), "live_ncut": _nan_to_none(float(self.live_ncut)),
                "n_isolated": int(self.n_isolated), "n_dead": int(self.n_dead),
                "num_nodes": int(self.num_nodes), "n_weights": int(self.n_weights)}


@dataclass
class Baseline:
    """The pruned net's n-cut against one baseline distribution. Lower n-cut = more clusterable.

    Attributes:
        name: ``"random_trained"``, ``"random_matched"``, ``"shuffle_layer"`` or ``"shuffle_layer_nonzero"``.
        label: a short human-readable name.
        holds_fixed: what the baseline nets share with the pruned net.
        ncut: the pruned net's n-cut.
        ncuts: the baseline nets' n-cuts.
        n_isolated: isolated units of each baseline net.
        mean, std: mean and population standard deviation of ``ncuts``.
        z: ``(ncut - mean) / std`` (NaN when ``std`` is 0).
        p_value: ``(1 + #{ncuts < ncut}) / (n + 1)``, one-sided, at least ``1 / (n + 1)``.
    """

    name: str
    label: str
    holds_fixed: str
    ncut: float
    ncuts: np.ndarray
    n_isolated: np.ndarray
    mean: float = field(init=False)
    std: float = field(init=False)
    z: float = field(init=False)
    p_value: float = field(init=False)

    def __post_init__(self) -> None:
        self.ncuts = np.asarray(self.ncuts, dtype=np.float64)
        self.n_isolated = np.asarray(self.n_isolated, dtype=np.int64)
        self.mean, self.std, self.z, self.p_value = baseline_stats(self.ncut, self.ncuts)

    @property
    def n(self) -> int:
        return int(self.ncuts.size)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "label": self.label, "holds_fixed": self.holds_fixed, "n": self.n,
                "ncut": _nan_to_none(float(self.ncut)), "mean": _nan_to_none(self.mean),
                "std": _nan_to_none(self.std), "z": _nan_to_none(float(self.z)),
                "p_value": _nan_to_none(self.p_value), "ncuts": [_nan_to_none(float(x)) for x in self.ncuts],
                "n_isolated": [int(x) for x in self.n_isolated]}


@dataclass
class PruningComparison:
    """Result of :func:`compare`: a pruned net's n-cut against random-pruned and shuffled nets.

    ``str()`` gives a table; :meth:`to_dict` a JSON-serializable dict; :meth:`plot` a figure.

    Attributes:
        n_clusters, seed: the clustering settings (the same for every net).
        sparsity, scope: the one-shot pruning settings (None when a pruned model was given).
        achieved_sparsity: fraction of zero weights of the pruned net (over its Linear and Conv2d layers).
        layer_names: the pruned layers; layer_weights / layer_kept: their sizes and kept counts.
        finetuned: whether the random-pruned copies were fine-tuned before measuring.
        unpruned, pruned: the two nets' :class:`NetStats`.
        random_trained, random_matched: :class:`NetStats` of each random-pruned net per variant.
        baselines: the pruned net against each baseline (:class:`Baseline`), keyed
            ``random_trained``, ``random_matched``, ``shuffle_layer``, ``shuffle_layer_nonzero``.
        shuffle_results: the :class:`ClusterabilityResult` of the pruned net per shuffle
            method (labels, eigenvalues, ...); not part of :meth:`to_dict`.
        notes: warnings worth reading (e.g. layers with no weight left).
    """

    n_clusters: int
    seed: int
    sparsity: Optional[float]
    scope: Optional[str]
    achieved_sparsity: float
    layer_names: List[str]
    layer_weights: List[int]
    layer_kept: List[int]
    finetuned: bool
    unpruned: NetStats
    pruned: NetStats
    random_trained: List[NetStats]
    random_matched: List[NetStats]
    baselines: Dict[str, Baseline]
    shuffle_results: Dict[str, ClusterabilityResult] = field(default_factory=dict, repr=False)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serializable summary (NaN becomes None)."""
        return {
            "n_clusters": int(self.n_clusters),
            "seed": int(self.seed),
            "sparsity": self.sparsity,
            "scope": self.scope,
            "achieved_sparsity": float(self.achieved_sparsity),
            "layers": [{"name": n, "weights": int(w), "kept": int(k)}
                       for n, w, k in zip(self.layer_names, self.layer_weights, self.layer_kept)],
            "finetuned": bool(self.finetuned),
            "unpruned": self.unpruned.to_dict(),
            "pruned": self.pruned.to_dict(),
            "random_trained": [s.to_dict() for s in self.random_trained],
            "random_matched": [s.to_dict() for s in self.random_matched],
            "baselines": {k: b.to_dict() for k, b in self.baselines.items()},
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """The comparison as a text table."""

        def f(x: float, fmt: str = "{:.3f}") -> str:
            return "n/a" if x is None or not math.isfinite(x) else fmt.format(x)

        def mean(values: Sequence[float]) -> float:
            vals = [v for v in values if math.isfinite(v)]
            return float(np.mean(vals)) if vals else float("nan")

        how = (f"one-shot magnitude pruning to {self.sparsity:g} ({self.scope} scope)"
               if self.sparsity is not None else "given pruned model")
        lines = [f"Pruned vs random-pruned vs shuffled nets: k={self.n_clusters}, seed {self.seed}; {how}; "
                 f"achieved sparsity {self.achieved_sparsity:.3f}"
                 + ("; random-pruned copies fine-tuned (masks fixed)" if self.finetuned else "")]
        nets = [("unpruned", self.unpruned.ncut, self.unpruned.live_ncut, self.unpruned.n_isolated,
                 self.unpruned.n_dead),
                ("pruned", self.pruned.ncut, self.pruned.live_ncut, self.pruned.n_isolated, self.pruned.n_dead)]
        for key, stats in (("random_trained", self.random_trained), ("random_matched", self.random_matched)):
            if stats:
                nets.append((f"{_BASELINE_INFO[key][0]} (mean of {len(stats)})", mean([s.ncut for s in stats]),
                             mean([s.live_ncut for s in stats]), mean([s.n_isolated for s in stats]),
                             mean([s.n_dead for s in stats])))
        w = max(len(n[0]) for n in nets)
        lines.append("")
        lines.append(f"{'net':<{w}}  {'n-cut':>7}  {'live n-cut':>10}  {'isolated':>8}  {'dead':>7}")
        for name, nc, live, iso, dead in nets:
            lines.append(f"{name:<{w}}  {f(nc):>7}  {f(live):>10}  {f(iso, '{:g}'):>8}  {f(dead, '{:g}'):>7}")
        rows = [(b.label, str(b.n), f(b.mean), f(b.std), f(b.z, "{:.2f}"), f(b.p_value, "{:.4f}"), b.holds_fixed)
                for b in self.baselines.values()]
        head = ("pruned net vs baseline", "n", "mean", "std", "z", "p", "holds fixed")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(6)]
        lines.append("")
        fmt_row = lambda r: "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 6)] + [r[6]])
        lines.append(fmt_row(head))
        lines.extend(fmt_row(r) for r in rows)
        lines.append("(lower n-cut = more clusterable; z < 0 and small p: the pruned net is more clusterable than "
                     "the baseline)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    __str__ = summary

    def plot(self, path: str) -> str:
        """Save a figure of each baseline's n-cut distribution with the pruned net's n-cut.

        Needs matplotlib (``pip install matplotlib``, or the package's ``plot`` extra);
        pyplot and the global backend are not touched.

        Args:
            path: output file; the format follows its suffix (png, pdf, svg, ...).

        Returns:
            ``path``.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("PruningComparison.plot needs matplotlib: pip install matplotlib "
                              "(or pip install 'torch_modularity[plot]')") from None
        baselines = [b for b in self.baselines.values() if b.n]
        fig = Figure(figsize=(8, 1.2 + 0.8 * max(1, len(baselines))))
        ax = fig.add_subplot(1, 1, 1)
        rng = np.random.default_rng(0)  # jitter only; a private generator
        for row, b in enumerate(baselines):
            y = row + rng.uniform(-0.15, 0.15, size=b.n)
            ax.scatter(b.ncuts, y, s=14, alpha=0.6)
            ax.plot([b.mean, b.mean], [row - 0.3, row + 0.3], color="black", linewidth=1)
        ax.axvline(self.pruned.ncut, color="tab:red", label=f"pruned ({self.pruned.ncut:.3f})")
        ax.axvline(self.unpruned.ncut, color="tab:gray", linestyle="--", label=f"unpruned ({self.unpruned.ncut:.3f})")
        ax.set_yticks(range(len(baselines)))
        ax.set_yticklabels([f"{b.label}\n(z={b.z:.2f}, p={b.p_value:.3f})" for b in baselines], fontsize=8)
        ax.set_xlabel(f"n-cut (k={self.n_clusters}; lower = more clusterable)")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        return path


def _layer_weights(net: nn.Module) -> List[torch.Tensor]:
    """The effective (masked) weights of every Linear/Conv2d layer; checks the model has a weight graph."""
    WeightGraph.from_module(net)  # raises (naming the module) when the graph cannot be built
    return [m.weight.detach().cpu() for _, m in _layers(net)]


def _net_stats(net: nn.Module, result: ClusterabilityResult, n_clusters: int, seed: int, n_init: int,
               refine: bool) -> NetStats:
    weights = _layer_weights(net)
    live_ncut = float(result.ncut)
    if result.n_dead and result.n_dead > result.n_isolated:
        # Dead units that are not isolated could form clusters of their own: measure the
        # live subgraph with the same settings (clusterability's own dead-unit rule).
        try:
            live_ncut = float(clusterability(net, n_clusters=n_clusters, n_shuffles=0, seed=seed, n_init=n_init,
                                             refine=refine, exclude_dead=True).ncut)
        except ValueError:
            live_ncut = float("nan")  # fewer live units than clusters
    return NetStats(ncut=float(result.ncut), live_ncut=live_ncut, n_isolated=int(result.n_isolated),
                    n_dead=int(result.n_dead or 0), num_nodes=int(result.num_nodes),
                    n_weights=int(sum(int((w != 0).sum()) for w in weights)))


def _run_finetune(net: nn.Module, finetune: Callable[[nn.Module], Any], seed: int, what: str) -> None:
    """Fine-tune ``net`` in place with the global RNG forked and seeded identically for every net."""
    masks = {name: m.weight_mask.clone() for name, m in _layers(net) if _is_masked(m)}
    with torch.random.fork_rng(devices=_fork_devices(net)):
        # Same seed for every net: identical data order / dropout, and the caller's RNG is restored.
        torch.manual_seed(seed)
        finetune(net)
    now = dict(_layers(net))
    for name, mask in masks.items():
        m = now.get(name)
        if m is None or not _is_masked(m) or not torch.equal(m.weight_mask, mask):
            raise ValueError(f"finetune changed the pruning mask of layer {name!r} of the {what}: fine-tune with the "
                             f"masks fixed (no pruning inside finetune), so that every net keeps its own mask")


def compare(
    model: nn.Module,
    pruned_model: Optional[nn.Module] = None,
    sparsity: float = 0.9,
    n_random: int = 10,
    n_shuffles: int = 50,
    n_clusters: int = 12,
    seed: int = 0,
    scope: str = "global",
    finetune: Optional[Callable[[nn.Module], Any]] = None,
    n_workers: Optional[int] = None,
    executor: Any = None,
    n_init: int = 3,
    refine: bool = True,
    progress: bool = False,
) -> PruningComparison:
    """Is a pruned network more clusterable than random-pruned and shuffled networks?

    Prunes a deep copy of ``model`` by magnitude (unless ``pruned_model`` is given), draws
    ``n_random`` random masks with exactly the pruned net's per-layer kept counts and builds
    two random-pruned nets from each (:func:`random_prune_like` with ``values="trained"``
    and ``"matched"``, sharing the mask), optionally fine-tunes them, and measures every
    net with :func:`clusterability` (same ``n_clusters``, ``seed``, ``n_init``, ``refine``). The
    pruned net is also compared with ``n_shuffles`` shuffles of its own weights, both
    ``"layer"`` and ``"layer_nonzero"``. Dead units (on no input-to-output path) are counted
    for every net and the live subgraph's n-cut reported, so disconnected units cannot pass
    for modules. The caller's RNG state is untouched.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
        >>> res = compare(net, sparsity=0.5, n_random=3, n_shuffles=3, n_clusters=3, n_workers=1)
        >>> sorted(res.baselines), res.baselines["random_trained"].n
        (['random_matched', 'random_trained', 'shuffle_layer', 'shuffle_layer_nonzero'], 3)

    Args:
        model: the trained, unpruned network: an MLP, CNN or DAG that :func:`clusterability`
            reads (every Linear and Conv2d is pruned; the graph is the model's default
            :meth:`WeightGraph.from_module` graph, e.g. conv channels only for a CNN); not
            modified. Dead units are counted (and the live n-cut measured) for chain graphs only.
        pruned_model: the pruned network (e.g. magnitude-pruned while fine-tuning); default a
            one-shot :func:`magnitude_prune` of a copy of ``model`` to ``sparsity``.
        sparsity, scope: settings of the one-shot pruning (unused with ``pruned_model``).
        n_random: random-pruned nets per variant.
        n_shuffles: shuffles of the pruned net per shuffle method (0 skips them).
        n_clusters: number of clusters k.
        seed: root of every random choice (masks, shuffles, clustering).
        finetune: optional ``finetune(net)`` that trains ``net`` in place with its prune masks
            fixed. It is applied identically (global RNG forked and seeded the same way each
            time) to every random-pruned copy, in the order net 0 with trained values, net 0
            with matched values, net 1 with trained values, ...; and first to the
            one-shot-pruned net when ``pruned_model`` is not given (a given ``pruned_model``
            is taken as already fine-tuned). Changing a mask inside it is an error.
        n_workers, executor: parallelism of the shuffles, as in :func:`clusterability`.
        n_init, refine: clustering settings, as in :func:`clusterability`.
        progress: show progress bars for the shuffles.

    Returns:
        A :class:`PruningComparison`.
    """
    n_random = _check_int(n_random, "n_random", 1)
    n_shuffles = _check_int(n_shuffles, "n_shuffles", 0)
    seed = check_seed(seed)
    if finetune is not None and not callable(finetune):
        raise TypeError(f"finetune must be a callable finetune(net), got {type(finetune).__name__}")
    masked = [name for name, m in _layers(model) if _is_masked(m)]
    if masked:
        raise ValueError(f"model already carries pruning masks (layer {masked[0]!r}): pass the unpruned model as "
                         f"`model` and the pruned one as `pruned_model`")
    if pruned_model is None:
        sparsity = _check_fraction(sparsity, "sparsity")
        _check_choice(scope, "scope", _SCOPES)
        pruned = magnitude_prune(_deepcopy(model), sparsity, scope=scope)
        if finetune is not None:
            _run_finetune(pruned, finetune, seed, "pruned net")
        used_sparsity, used_scope = sparsity, scope
    else:
        pruned = pruned_model
        used_sparsity, used_scope = None, None
    pairs = _match_layers(model, pruned)
    kept = [int(_kept(r).sum()) for _, _, r in pairs]
    sizes = [int(r.weight.numel()) for _, _, r in pairs]
    if pruned_model is not None and all(k == s for k, s in zip(kept, sizes)):
        raise ValueError("pruned_model has no pruned weights (no masks and no exact zeros in its Linear/Conv2d layers)")
    notes = [f"layer {name!r} of the pruned net has no weight left: the layers after it see a constant"
             for (name, _, _), k in zip(pairs, kept) if k == 0]

    def measure(net: nn.Module, shuffles: int = 0, shuffle: str = "layer") -> ClusterabilityResult:
        return clusterability(net, n_clusters=n_clusters, n_shuffles=shuffles, shuffle=shuffle, seed=seed,
                              executor=executor, n_workers=n_workers, n_init=n_init, refine=refine,
                              progress=progress and shuffles > 0)

    stats_args = (n_clusters, seed, n_init, refine)
    unpruned_res = measure(model)
    unpruned = _net_stats(model, unpruned_res, *stats_args)
    shuffle_results = {"layer": measure(pruned, n_shuffles, "layer"),
                       "layer_nonzero": measure(pruned, n_shuffles, "layer_nonzero")}
    pruned_stats = _net_stats(pruned, shuffle_results["layer"], *stats_args)

    random_stats: Dict[str, List[NetStats]] = {"trained": [], "matched": []}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * n_random, desc="random-pruned nets", unit="net", file=sys.stderr, delay=1.0)
    try:
        for i in range(n_random):
            mask_seed = _child_seed(seed, i)  # both variants of net i share its mask
            for values in _VALUES:
                net = random_prune_like(model, pruned, seed=mask_seed, values=values)
                if finetune is not None:
                    _run_finetune(net, finetune, seed, f"random-pruned net {i} ({values} values)")
                try:
                    res = measure(net)
                except ValueError as err:
                    raise ValueError(f"random-pruned net {i} ({values} values): {err}") from err
                random_stats[values].append(_net_stats(net, res, *stats_args))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    ncut = pruned_stats.ncut
    baselines = {}
    for key, stats in (("random_trained", random_stats["trained"]), ("random_matched", random_stats["matched"])):
        label, fixed = _BASELINE_INFO[key]
        baselines[key] = Baseline(key, label, fixed, ncut, [s.ncut for s in stats], [s.n_isolated for s in stats])
    for method in ("layer", "layer_nonzero"):
        key = f"shuffle_{method}"
        label, fixed = _BASELINE_INFO[key]
        res = shuffle_results[method]
        baselines[key] = Baseline(key, label, fixed, ncut, res.shuffled_ncuts, res.shuffled_isolated)

    weights = _layer_weights(pruned)
    total = sum(w.numel() for w in weights)
    achieved = 1.0 - sum(int((w != 0).sum()) for w in weights) / total
    return PruningComparison(
        n_clusters=int(n_clusters), seed=seed, sparsity=used_sparsity, scope=used_scope, achieved_sparsity=achieved,
        layer_names=[name for name, _, _ in pairs], layer_weights=sizes, layer_kept=kept,
        finetuned=finetune is not None, unpruned=unpruned, pruned=pruned_stats,
        random_trained=random_stats["trained"], random_matched=random_stats["matched"], baselines=baselines,
        shuffle_results=shuffle_results, notes=notes)


# --------------------------------------------------------------------------- checkpoints and CLI
def module_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> nn.Sequential:
    """Rebuild a Linear chain (``nn.Sequential`` of Linear + ReLU) from its state_dict.

    2-D ``weight`` entries are taken in order, each with its ``bias`` when present;
    ``weight_orig`` / ``weight_mask`` pairs (``torch.nn.utils.prune``) are multiplied into a
    plain weight. A state_dict does not record activations: ReLU is assumed between layers,
    which matters for forward passes only, never for the weight graph.

    Example:
        >>> sd = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).state_dict()
        >>> module_from_state_dict(sd)
        Sequential(
          (0): Linear(in_features=4, out_features=3, bias=True)
          (1): ReLU()
          (2): Linear(in_features=3, out_features=2, bias=True)
        )

    Args:
        state_dict: mapping from parameter names to tensors of a chain of Linear layers.

    Returns:
        The rebuilt model, with the weights and biases copied.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (a dict of tensors), got {type(state_dict).__name__}")
    layers: List[Tuple[str, torch.Tensor]] = []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry '{key}' is a {type(value).__name__}, not a tensor")
        path, _, leaf = key.rpartition(".")
        if leaf in ("bias", "bias_orig", "bias_mask", "weight_mask") or key.endswith("num_batches_tracked"):
            continue
        if leaf in ("weight", "weight_orig") and value.dim() == 2:
            if leaf == "weight_orig":
                mask = state_dict.get(f"{path}.weight_mask" if path else "weight_mask")
                value = value * mask if mask is not None else value
            layers.append((path, value))
            continue
        raise TypeError(f"state_dict entry '{key}' with shape {tuple(value.shape)} is not a Linear weight or bias; only "
                        f"chains of Linear layers can be rebuilt from a state_dict (save the whole module instead)")
    if not layers:
        raise ValueError("the state_dict holds no 2-D weight matrices: no Linear layers to rebuild")
    modules: List[nn.Module] = []
    for i, (path, w) in enumerate(layers):
        if i and w.shape[1] != layers[i - 1][1].shape[0]:
            raise ValueError(f"weights do not chain: {layers[i - 1][0]!r} has {layers[i - 1][1].shape[0]} outputs but "
                             f"{path!r} has {w.shape[1]} inputs")
        prefix = f"{path}." if path else ""
        bias = state_dict.get(prefix + "bias")
        if bias is None and (prefix + "bias_orig") in state_dict:
            bias = state_dict[prefix + "bias_orig"] * state_dict.get(prefix + "bias_mask", 1)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        if modules:
            modules.append(nn.ReLU())
        modules.append(lin)
    return nn.Sequential(*modules)


def load_module(path: str, trust: bool = False) -> nn.Module:
    """The model of a ``torch.save`` file: a whole module, or a Linear chain's state_dict.

    The file is read with ``weights_only=True`` first; a pickled whole module is only loaded
    when ``trust`` is set, because unpickling can run code from the file. State dicts
    (also under a ``state_dict`` / ``model_state_dict`` / ``model`` key) are rebuilt with
    :func:`module_from_state_dict`.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "mlp.pt")
        >>> torch.save(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).state_dict(), path)
        >>> load_module(path)[2].out_features
        2

    Args:
        path: the checkpoint file.
        trust: allow unpickling arbitrary objects (needed for whole modules).

    Returns:
        The model.
    """
    obj = load_model_or_state_dict(path, trust)
    if isinstance(obj, nn.Module):
        return obj
    return module_from_state_dict(obj)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prune-compare`` subcommand to an ``argparse`` subparsers object.

    The parser's default ``func`` is :func:`run_cli`.

    Example:
        >>> parser = argparse.ArgumentParser(prog="torch-modularity")
        >>> _ = add_cli(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["prune-compare", "mlp.pt", "--sparsity", "0.8"])
        >>> args.command, args.sparsity, args.scope, args.random
        ('prune-compare', 0.8, 'global', 10)

    Args:
        subparsers: the result of ``parser.add_subparsers()``.

    Returns:
        The new subparser.
    """
    p = subparsers.add_parser(
        "prune-compare",
        help="n-cut of a magnitude-pruned net versus random-pruned and shuffled nets",
        description="Prune CHECKPOINT by weight magnitude (or take --pruned) and compare its n-cut with random-pruned "
                    "nets of the same per-layer sparsity (trained values and matched values) and with shuffles of "
                    "the pruned net ('layer' and 'layer_nonzero').")
    p.add_argument("checkpoint", help="the unpruned model: a state_dict of a Linear chain, or a whole module")
    p.add_argument("--pruned", default=None, metavar="CHECKPOINT",
                   help="an already pruned version of the same model (default: prune CHECKPOINT one-shot)")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights to prune (default 0.9)")
    p.add_argument("--scope", choices=_SCOPES, default="global", help="magnitude ranking scope (default global)")
    p.add_argument("--random", type=int, default=10, help="random-pruned nets per variant (default 10)")
    p.add_argument("--shuffles", type=int, default=50, help="shuffles of the pruned net per method (default 50)")
    p.add_argument("--n-clusters", type=int, default=12, help="number of clusters k (default 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="worker processes for the shuffles (default: all CPUs)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="also save a figure of the distributions (matplotlib)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a pickled whole module (unpickling runs code from the file)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``prune-compare`` with parsed arguments; print the table (or JSON).

    Returns:
        The exit status: 0 on success, 2 on bad input.
    """
    try:
        model = load_module(args.checkpoint, trust=args.trust_checkpoint)
        pruned = load_module(args.pruned, trust=args.trust_checkpoint) if args.pruned else None
        result = compare(model, pruned_model=pruned, sparsity=args.sparsity, n_random=args.random,
                         n_shuffles=args.shuffles, n_clusters=args.n_clusters, seed=args.seed, scope=args.scope,
                         n_workers=args.workers, progress=not args.json)
        if args.plot:
            result.plot(args.plot)
    except (ValueError, TypeError, ImportError) as err:
        print(f"torch-modularity: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"checkpoint  {args.checkpoint}" + (f"\npruned      {args.pruned}" if args.pruned else ""))
        print(result.summary())
        if args.plot:
            print(f"figure      {args.plot}")
    return 0
