"""Weight graphs of CNNs and DAG models, by tracing the forward pass.

:func:`graph_from_module` turns a model into a :class:`~torch_modularity.graph.WeightGraph`
whose nodes are units: the output features of ``nn.Linear`` layers and the output channels
("filters as units") of ``nn.Conv2d`` layers, plus optionally the input. The data flow
between the weight layers is read with ``torch.fx.symbolic_trace``; when that fails
(Python control flow on tensor values) it is recorded from one forward pass on
``example_input`` with forward hooks and a ``TorchFunctionMode``.

Construction (``docs/method.md`` 1.3-1.4, without the bugs listed in its section 8):

* **Conv2d**: the edge between input channel ``i`` and output channel ``o`` is a norm of the
  absolute kernel slice ``|W[o, i, :, :]|`` (see :func:`conv_edge_weights`). Grouped and
  depthwise convolutions only join the channels of the same group.
* **Linear**: ``|W|``. After a ``Flatten`` of a conv output (NCHW, channel-major: flat index
  ``c*H*W + h*W + w``) the edge from channel ``c`` to unit ``j`` is the sum of ``|W[j, f]|``
  over the ``H*W`` flat positions ``f`` of channel ``c`` (one position after global pooling).
* **BatchNorm** (``fold_batchnorm=True``) multiplies every edge entering output channel
  ``c`` of the conv/linear it follows by ``|gamma_c| / sqrt(running_var_c + eps)``. "Follows"
  means through ops that commute with a per-channel positive scale (pooling, dropout,
  flatten, another BatchNorm), as in VGG's conv-pool-BN. A BatchNorm elsewhere (after an
  activation, after a residual add: pre-activation ResNets, DenseNets) scales the channels it
  feeds instead: the columns of the next conv/linear, which is exact when nothing nonlinear
  sits between them. One that reaches neither is reported as not folded.
* **Pass-through ops** (activations, dropout, pooling, padding, upsampling, Flatten, Identity,
  ``view``/``reshape``/``flatten``, spatial ``mean``, scaling by a constant) add no nodes.
* **Residual add** ``y = f(x) + x``: the output units of the add are shared nodes. When both
  operands are whole node layers of the same width that are not already joined by an edge
  block, the two layers are *merged*: ``f``'s last conv writes straight into ``x``'s nodes,
  so a stage of identity-skip ResNet blocks shares one node layer (named after its first
  producer; all producers are listed in :attr:`TraceReport.merged`). Otherwise (``y = conv(x)
  + x``, where merging would join a layer to itself, or a skip from a concatenation) the skip
  contributes identity edges of weight 1 into ``f``'s output layer (listed in
  :attr:`TraceReport.identity_skips`).
* **Concatenation** along channels: the channels of the result are the stacked channel blocks
  of the operands, each still a node of its own layer; a consumer's kernel is split
  column-wise into one edge block per source layer. (A new node layer would duplicate the
  operands' nodes, and merging them would join a layer to itself in DenseNet-style
  ``cat([x, f(x)])``.)
* **Unused layers**: Conv2d/Linear layers whose output never reaches the model output, or
  that are never called, keep their nodes with no edges (isolated, removed by
  ``WeightGraph.remove_isolated``), are listed in :attr:`TraceReport.unused`, and trigger a
  ``UserWarning``.

Transformer blocks are not traced (attention mixes tokens, not units);
:func:`transformer_mlp_graphs` gives one graph per Linear-activation-Linear MLP sub-block.
"""
from __future__ import annotations

import builtins
import inspect
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from .graph import WeightGraph, unwrap_model as _unwrap

__all__ = [
    "graph_from_module",
    "trace_module",
    "transformer_mlp_graphs",
    "conv_edge_weights",
    "TraceReport",
    "UnsupportedModuleError",
    "KERNEL_NORMS",
]

#: The kernel norms accepted by :func:`conv_edge_weights` and :func:`graph_from_module`.
KERNEL_NORMS = ("l1", "fro", "induced_l1")


class UnsupportedModuleError(TypeError):
    """A module or op the tracer cannot turn into graph edges (a ``TypeError``, as in
    ``WeightGraph.from_module``). The message names it, its module path and what is supported."""


@dataclass(frozen=True)
class TraceReport:
    """What :func:`trace_module` did beyond the plain layer-by-layer construction.

    Attributes:
        method: ``"fx"`` (symbolic tracing), ``"forward"`` (recorded from a forward pass on
            ``example_input``) or ``"chain"`` (untraceable Linear chain read in registration
            order, the historical ``WeightGraph.from_module`` behaviour).
        unused: module paths of Conv2d/Linear layers that never reach the model output or
            are never called; their nodes are in the graph without edges (isolated).
        merged: for every node layer formed by merging residual-add operands, its name and
            the names of all the layers merged into it.
        identity_skips: module paths (with ``:<op>``) of adds whose skip contributed identity
            edges of weight 1 instead of being merged.
        batchnorm: how each BatchNorm was folded: ``"incoming"`` (edges into the channels of
            the conv/linear it follows), ``"outgoing"`` (columns of the next conv/linear),
            ``"not folded"`` (its output reaches no weight layer, or folding was switched off).
        excluded: names of node layers left out of the graph (the input, or dense layers,
            per ``include_input`` / ``include_dense``).
    """

    method: str
    unused: Tuple[str, ...] = ()
    merged: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    identity_skips: Tuple[str, ...] = ()
    batchnorm: Dict[str, str] = field(default_factory=dict)
    excluded: Tuple[str, ...] = ()


# ----------------------------------------------------------------------------- kernel norms
def conv_edge_weights(weight: torch.Tensor, groups: int = 1, kernel_norm: str = "l1") -> torch.Tensor:
    """Channel-to-channel edge weights of a 2-D convolution, shape ``(out_channels, in_channels)``.

    Entry ``[o, i]`` is a norm of the absolute kernel slice ``|W[o, i', :, :]|`` when input
    channel ``i`` is in output channel ``o``'s group (``i' = i mod in_channels/groups``), and
    0 otherwise, so grouped and depthwise convolutions only join channels of one group.

    The default ``"l1"`` (sum of ``|w|`` over the kernel) is the total absolute weight from
    ``i`` to ``o``: it is additive over kernel positions, so it matches Linear edges (a 1x1
    conv gives exactly ``|W|``) and the flatten-to-dense rule (a sum of ``|w|`` over spatial
    positions), and like every norm here it scales linearly with the weights, so a folded
    per-channel rescaling (BatchNorm) multiplies the edge exactly. ``"induced_l1"`` reproduces the research code's numbers (numpy's matrix 1-norm of the
    ``kh x kw`` slice: the largest column sum, ``max over kw of sum over kh``), which ignores
    all but one kernel column; ``"fro"`` is the elementwise 2-norm.

    Example:
        >>> w = torch.arange(8.0).reshape(2, 1, 2, 2) - 4   # 2 filters on 1 channel
        >>> conv_edge_weights(w).tolist()
        [[10.0], [6.0]]
        >>> conv_edge_weights(w, kernel_norm="induced_l1").tolist()
        [[6.0], [4.0]]

    Args:
        weight: the conv weight, ``(out_channels, in_channels/groups, kh, kw)``.
        groups: the conv's ``groups``.
        kernel_norm: ``"l1"``, ``"fro"`` or ``"induced_l1"``.

    Returns:
        A float64 tensor of non-negative edge weights, on ``weight``'s device.
    """
    if kernel_norm not in KERNEL_NORMS:
        raise ValueError(f"kernel_norm must be one of {KERNEL_NORMS}, got {kernel_norm!r}")
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-D Conv2d weight (out, in/groups, kh, kw), got shape {tuple(weight.shape)}")
    return _conv_edges(weight.detach().to(torch.float64), groups, kernel_norm)


def _conv_edges(weight: torch.Tensor, groups: int, kernel_norm: str) -> torch.Tensor:
    """:func:`conv_edge_weights` in ``weight``'s dtype, differentiable when ``weight`` is."""
    a = weight.abs()
    if kernel_norm == "l1":
        n = a.sum(dim=(2, 3))
    elif kernel_norm == "fro":
        sq = a.square().sum(dim=(2, 3))
        # sqrt has an infinite derivative at 0 (an all-zero, e.g. pruned, slice): keep it at 0.
        n = torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))
    else:
        # numpy.linalg.norm(k, 1) of a (kh, kw) matrix: max over columns (kw) of the column sum.
        n = a.sum(dim=2).amax(dim=-1)
    out_c = n.shape[0]
    if groups == 1:
        return n
    if out_c % groups:
        raise ValueError(f"out_channels={out_c} is not divisible by groups={groups}")
    # Group g maps input channels [g*in_g, (g+1)*in_g) to output channels [g*out_g, (g+1)*out_g).
    return torch.block_diag(*n.split(out_c // groups, dim=0))


# ----------------------------------------------------------------------------- op vocabulary
# Modules and ops, by what they do to the channel/unit map. "fresh" means: the value is still
# a weight layer's output up to a per-channel positive factor, so a BatchNorm on it can be
# folded into that layer's incoming edges.
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax,
)
_IDENTITY_MODULES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.ZeroPad2d, nn.ConstantPad2d,
    nn.ReflectionPad2d, nn.ReplicationPad2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_WEIGHT_MODULES = (nn.Conv2d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)

_ACTIVATION_OPS = {
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardtanh",
    "hardswish", "hardsigmoid", "softplus", "softsign", "sigmoid", "tanh", "softmax", "log_softmax",
    "logsigmoid", "tanhshrink",
}
_IDENTITY_OPS = {
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "contiguous", "clone", "detach", "to", "float", "double", "half", "bfloat16", "cpu", "cuda", "type_as",
}
_SPATIAL_OPS = {
    "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "pad", "interpolate",
}
_FLATTEN_OPS = {"flatten", "view", "reshape", "squeeze"}
_REDUCE_OPS = {"mean", "sum", "amax"}
_ADD_OPS = {"add", "sub"}
_SCALE_OPS = {"mul", "div"}
# Ops whose result is not a tensor of units (sizes, dtypes) or a constant built from a shape.
_NON_UNIT_OPS = {
    "size", "dim", "numel", "nelement", "ndimension", "getattr", "len", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones", "new_full",
    "new_empty", "new_tensor", "is_contiguous", "get_device",
}


def _function_names() -> Dict[Any, str]:
    """Canonical names of the Python callables fx and TorchFunctionMode report."""
    table = {
        operator.add: "add", operator.iadd: "add", torch.add: "add",
        operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
        operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
        operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
        operator.getitem: "getitem", builtins.getattr: "getattr", builtins.len: "len",
        torch.cat: "cat", torch.concat: "cat", torch.flatten: "flatten", torch.reshape: "reshape",
        torch.squeeze: "squeeze", torch.mean: "mean", torch.sum: "sum", torch.amax: "amax",
        torch.relu: "relu", torch.relu_: "relu", torch.sigmoid: "sigmoid", torch.tanh: "tanh",
        torch.softmax: "softmax", torch.log_softmax: "log_softmax", torch.clone: "clone",
        torch.zeros_like: "zeros_like", torch.ones_like: "ones_like", torch.empty_like: "empty_like",
        torch.full_like: "full_like", torch.rand_like: "rand_like", torch.randn_like: "randn_like",
    }
    for name in ("concatenate",):
        if hasattr(torch, name):
            table[getattr(torch, name)] = "cat"
    for name in sorted(_ACTIVATION_OPS | _IDENTITY_OPS | _SPATIAL_OPS) + ["relu_"]:
        fn = getattr(F, name, None)
        if callable(fn):
            table[fn] = name.rstrip("_")
    return table


_FUNCTIONS = _function_names()
_DUNDER = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add", "__sub__": "sub", "__rsub__": "sub",
    "__isub__": "sub", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "__truediv__": "div",
    "__itruediv__": "div", "__div__": "div", "__getitem__": "getitem",
}


def _method_name(name: str) -> str:
    """Canonical name of a Tensor method: ``relu_`` -> ``relu``, ``__iadd__`` -> ``add``."""
    if name in _DUNDER:
        return _DUNDER[name]
    if name.endswith("_") and not name.startswith("_"):
        return name[:-1]
    return name


def _supported_text() -> str:
    mods = sorted({c.__name__ for c in _WEIGHT_MODULES + _BATCHNORMS + (nn.Flatten,)
                   + _ACTIVATION_MODULES + _IDENTITY_MODULES + _SPATIAL_MODULES})
    return (
        "Supported modules: " + ", ".join(mods) + ". Supported ops: activations ("
        + ", ".join(sorted(_ACTIVATION_OPS)) + "), dropout, pooling, pad, interpolate, add/sub of two "
        "branches (residual), cat along channels, flatten/view/reshape/squeeze to (N, -1), mean/sum/amax "
        "over spatial dims, mul/div by a constant, size/shape queries."
    )


# ----------------------------------------------------------------------------- IR
@dataclass(frozen=True)
class _Ref:
    """Reference to the output of op ``index`` inside an op's args."""

    index: int


_CONST = object()  # a tensor the recorder never saw being produced (a parameter, a constant)


@dataclass
class _Op:
    kind: str  # "input" | "module" | "call" | "other" | "output"
    name: str  # canonical op name ("call"), placeholder name ("input"), class name ("module")
    path: str  # module path of the module ("module") or of the module whose forward made the call
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    module: Optional[nn.Module] = None
    label: str = ""  # what the user wrote, for messages
    shape: Optional[Tuple[int, ...]] = None  # output shape when an example input was run


def _refs(obj) -> List[int]:
    """Indices of all ``_Ref`` in a nested args structure."""
    if isinstance(obj, _Ref):
        return [obj.index]
    if isinstance(obj, (list, tuple)):
        return [i for o in obj for i in _refs(o)]
    if isinstance(obj, dict):
        return [i for o in obj.values() for i in _refs(o)]
    return []


class _Tracer(fx.Tracer):
    """fx's default leaves (torch.nn modules) plus subclasses of the weight and BN modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _WEIGHT_MODULES + (_BatchNorm,)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _is_leaf(m: nn.Module) -> bool:
    return _Tracer().is_leaf_module(m, "")


def _as_inputs(example_input) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


class _EvalNoGrad:
    """Run the model in eval mode without autograd, restoring every module's mode after:
    a training-mode forward pass would update BatchNorm running statistics."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        for m, mode in self.modes:
            m.training = mode
        return False


def _ops_from_fx(model: nn.Module, example_input=None) -> List[_Op]:
    """The forward pass as ops, by ``torch.fx`` symbolic tracing (raises if untraceable)."""
    if _is_leaf(model):
        # The root itself is a leaf (a bare Conv2d/Linear): there is nothing to trace into.
        return [_Op("input", "input", "", label="input"),
                _Op("module", type(model).__name__, "", (_Ref(0),), module=model),
                _Op("output", "output", "", (_Ref(1),))]
    tracer = _Tracer()
    graph = tracer.trace(model)
    shapes: Dict[str, Tuple[int, ...]] = {}
    if example_input is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        gm = fx.GraphModule(model, graph)
        with _EvalNoGrad(model):
            ShapeProp(gm).propagate(*_as_inputs(example_input))
        for node in gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                shapes[node.name] = tuple(meta.shape)
        graph = gm.graph
    index: Dict[fx.Node, int] = {}
    ops: List[_Op] = []

    def conv(a):
        return fx.node.map_arg(a, lambda n: _Ref(index[n]))

    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        enclosing = list(stack.values())[-1][0] if stack else ""
        args, kwargs = conv(node.args), conv(node.kwargs)
        shape = shapes.get(node.name)
        if node.op == "placeholder":
            op = _Op("input", node.target, "", label=node.target, shape=shape)
        elif node.op == "call_module":
            mod = model.get_submodule(node.target)
            op = _Op("module", type(mod).__name__, node.target, args, kwargs, module=mod, label=node.target,
                     shape=shape)
        elif node.op == "call_function":
            fn = node.target
            label = f"{getattr(fn, '__module__', '') or ''}.{getattr(fn, '__name__', fn)}".lstrip(".")
            # Unknown callables keep a name no handler matches, so they fail with their label.
            op = _Op("call", _FUNCTIONS.get(fn, "?" + label), enclosing, args, kwargs, label=label, shape=shape)
        elif node.op == "call_method":
            op = _Op("call", _method_name(node.target), enclosing, args, kwargs, label=f"Tensor.{node.target}",
                     shape=shape)
        elif node.op == "get_attr":
            op = _Op("other", "get_attr", enclosing, label=node.target)
        elif node.op == "output":
            op = _Op("output", "output", "", args)
        else:  # pragma: no cover - fx has no other node kinds
            raise UnsupportedModuleError(f"unexpected fx node {node.op} {node.target}")
        index[node] = len(ops)
        ops.append(op)
    return ops


def _ops_from_forward(model: nn.Module, example_input) -> List[_Op]:
    """The forward pass as ops, recorded while running ``model(*example_input)``.

    Forward hooks record every leaf module call (and the module path of everything called
    inside a module's forward); a ``TorchFunctionMode`` records the torch functions and tensor
    methods called outside leaf modules. Tensors are matched to their producer by identity.
    """
    inputs = _as_inputs(example_input)
    ops: List[_Op] = []
    producer: Dict[int, int] = {}  # id(tensor) -> op index
    keep_alive: List[Any] = []  # keeps recorded tensors alive so that ids are not reused
    stack: List[str] = [""]
    depth = [0]

    def to_args(obj):
        if isinstance(obj, torch.Tensor):
            return _Ref(producer[id(obj)]) if id(obj) in producer else _CONST
        if isinstance(obj, (list, tuple)):
            return type(obj)(to_args(o) for o in obj) if not hasattr(obj, "_fields") else tuple(to_args(o) for o in obj)
        if isinstance(obj, dict):
            return {k: to_args(v) for k, v in obj.items()}
        return obj

    def first_tensor(out):
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, (list, tuple)):
            for o in out:
                t = first_tensor(o)
                if t is not None:
                    return t
        return None

    def record(op: _Op, out) -> None:
        t = first_tensor(out)
        if t is None:
            return
        op.shape = tuple(t.shape)
        producer[id(t)] = len(ops)
        keep_alive.append(t)
        ops.append(op)

    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            name = params[i] if i < len(params) else f"input{i}"
            record(_Op("input", name, "", label=name), x)

    leaves = {id(m) for m in model.modules() if _is_leaf(m)}
    handles = []

    def pre_hook(path):
        def hook(module, args, kwargs):
            stack.append(path)
            if id(module) in leaves:
                depth[0] += 1
        return hook

    def post_hook(path):
        def hook(module, args, kwargs, output):
            stack.pop()
            if id(module) in leaves:
                depth[0] -= 1
                if depth[0] == 0:
                    record(_Op("module", type(module).__name__, path, to_args(args), to_args(kwargs), module=module,
                               label=path), output)
        return hook

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if depth[0] == 0:
                mapped_args, mapped_kwargs = to_args(args), to_args(kwargs)
                if _refs((mapped_args, mapped_kwargs)):
                    owner = getattr(func, "__objclass__", None)
                    fname = getattr(func, "__name__", repr(func))
                    if owner is not None and issubclass(owner, torch._C.TensorBase):
                        name, label = _method_name(fname), f"Tensor.{fname}"
                    else:
                        label = f"{getattr(func, '__module__', '') or ''}.{fname}".lstrip(".")
                        name = _FUNCTIONS.get(func, "?" + label)
                    record(_Op("call", name, stack[-1], mapped_args, mapped_kwargs, label=label), out)
            return out

    for path, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
        handles.append(m.register_forward_hook(post_hook(path), with_kwargs=True))
    try:
        with _EvalNoGrad(model), Recorder():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    ops.append(_Op("output", "output", "", (to_args(out),)))
    return ops


# ----------------------------------------------------------------------------- builder
@dataclass
class _Layer:
    name: str
    size: Optional[int]
    excluded: bool
    parent: int


@dataclass(frozen=True)
class _Seg:
    """A run of a value's channels: all units of node layer ``layer``, in order."""

    layer: int
    fresh: Optional[Tuple[int, ...]] = None  # blocks a BatchNorm can scale row-wise (see module doc)
    col_scale: Optional[torch.Tensor] = None  # pending BatchNorm scale for the consumers' columns
    bn: Tuple[str, ...] = ()  # BatchNorms whose scale is pending in col_scale


@dataclass(frozen=True)
class _Val:
    segs: Tuple[_Seg, ...]
    kind: str  # "unknown" (a raw input), "channels" (dim 1 = channels), "features" (last dim = units)


class _Other:
    """The value of an op that is not a tensor of units (a size, a constant)."""


_OTHER = _Other()


class _Builder:
    def __init__(self, ops: List[_Op], model: nn.Module, kernel_norm: str, fold_batchnorm: bool,
                 include_dense: Optional[bool], include_input: Optional[bool],
                 differentiable_dtype: Optional[torch.dtype] = None) -> None:
        self.ops = ops
        # None: detached edge weights (a measurement). A dtype: edge weights computed in that
        # dtype from the live parameters, so they carry autograd (the regularizer's graph).
        self.grad_dtype = differentiable_dtype
        self.model = model
        self.kernel_norm = kernel_norm
        self.fold = fold_batchnorm
        is_cnn = any(op.kind == "module" and isinstance(op.module, nn.Conv2d) for op in ops)
        # Defaults: the research code's CNN graph (conv channels only), the full MLP otherwise.
        self.include_dense = (not is_cnn) if include_dense is None else bool(include_dense)
        self.include_input = (not is_cnn) if include_input is None else bool(include_input)
        self.layers: List[_Layer] = []
        self.blocks: List[Tuple[int, int, torch.Tensor]] = []
        self.values: List[Any] = [None] * len(ops)
        self.calls: Dict[str, int] = {}
        self.merged: Dict[int, List[str]] = {}
        self.identity_skips: List[str] = []
        self.batchnorm: Dict[str, str] = {}
        self.unused: List[str] = []
        param = next(iter(model.parameters()), None)
        self.device = param.device if param is not None else torch.device("cpu")
        # Liveness and fan-out: which ops feed the output, and how many live ops use each value.
        self.users = [0] * len(ops)
        live = [False] * len(ops)
        for i in range(len(ops) - 1, -1, -1):
            if ops[i].kind == "output":
                live[i] = True
            if live[i]:
                for j in _refs((ops[i].args, ops[i].kwargs)):
                    live[j] = True
                    self.users[j] += 1
        self.live = live

    # ------------------------------------------------------------------ layers
    def new_layer(self, name: str, size: Optional[int], excluded: bool) -> int:
        self.layers.append(_Layer(name, size, excluded, len(self.layers)))
        return len(self.layers) - 1

    def find(self, l: int) -> int:
        while self.layers[l].parent != l:
            self.layers[l].parent = self.layers[self.layers[l].parent].parent
            l = self.layers[l].parent
        return l

    def size(self, seg: _Seg) -> Optional[int]:
        return self.layers[self.find(seg.layer)].size

    def width(self, v: _Val) -> Optional[int]:
        sizes = [self.size(s) for s in v.segs]
        return None if any(s is None for s in sizes) else int(sum(sizes))

    def joined(self, a: int, b: int) -> bool:
        a, b = self.find(a), self.find(b)
        return any({self.find(s), self.find(d)} == {a, b} for s, d, _ in self.blocks)

    def layer_name(self, path: str) -> str:
        """Module path of a weight layer; later calls of the same module get ``#2``, ``#3``..."""
        base = path or "model"
        self.calls[base] = self.calls.get(base, 0) + 1
        return base if self.calls[base] == 1 else f"{base}#{self.calls[base]}"

    # ------------------------------------------------------------------ errors
    def fail(self, op: _Op, why: str = "") -> None:
        what = f"module {op.name}" if op.kind == "module" else f"op {op.label or op.name}"
        hint = ""
        if op.kind == "module" and isinstance(op.module, (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                                                          nn.TransformerDecoderLayer, nn.Transformer,
                                                          nn.TransformerEncoder, nn.TransformerDecoder)):
            hint = " Attention is not a unit graph; use transformer_mlp_graphs(model) for the MLP sub-blocks."
        raise UnsupportedModuleError(
            f"unsupported {what} at '{op.path or '<root>'}'{': ' + why if why else ''}.{hint} {_supported_text()} "
            f"For other architectures build the graph by hand with WeightGraph(layer_sizes, blocks)."
        )

    def mismatch(self, op: _Op, why: str) -> None:
        """Widths that do not fit: the model itself is inconsistent, so a ValueError."""
        what = f"{op.name}" if op.kind == "module" else f"op {op.label or op.name}"
        raise ValueError(f"{what} at '{op.path or '<root>'}' {why}: the layers do not chain")

    # ------------------------------------------------------------------ values
    def arg(self, op: _Op, i: int, key: str, default=None):
        if len(op.args) > i:
            return op.args[i]
        return op.kwargs.get(key, default)

    def resolve(self, a):
        if isinstance(a, _Ref):
            return self.values[a.index]
        if isinstance(a, (list, tuple)):
            return [self.resolve(x) for x in a]
        return a

    def unit_vals(self, op: _Op) -> List[_Val]:
        found = []

        def walk(a):
            if isinstance(a, _Ref):
                v = self.values[a.index]
                if isinstance(v, _Val):
                    found.append(v)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    walk(x)
            elif isinstance(a, dict):
                for x in a.values():
                    walk(x)

        walk((op.args, op.kwargs))
        return found

    def in_shape(self, op: _Op) -> Optional[Tuple[int, ...]]:
        for a in op.args:
            if isinstance(a, _Ref):
                return self.ops[a.index].shape
        return None

    @staticmethod
    def keep(v: _Val, fresh: bool = True, kind: Optional[str] = None) -> _Val:
        segs = v.segs if fresh else tuple(_Seg(s.layer, None, s.col_scale, s.bn) for s in v.segs)
        return _Val(segs, kind or v.kind)

    def set_unknown(self, v: _Val, n: int, op: _Op) -> None:
        """Give a raw input its width, from the first op that needs it."""
        if v.kind == "unknown" and len(v.segs) == 1 and self.size(v.segs[0]) is None:
            self.layers[self.find(v.segs[0].layer)].size = int(n)
        w = self.width(v)
        if w != n:
            self.mismatch(op, f"expects {n} input channels/features but receives {w}")

    # ------------------------------------------------------------------ edges
    def connect(self, v: _Val, n: torch.Tensor, dst: int, op: _Op) -> Tuple[int, ...]:
        """Edge blocks into layer ``dst`` from the channels of ``v``; ``n`` is (out, width)."""
        offset = 0
        per_layer: Dict[int, torch.Tensor] = {}
        for seg in v.segs:
            k = self.size(seg)
            cols = n[:, offset:offset + k]
            if seg.col_scale is not None:
                cols = cols * seg.col_scale.to(cols)[None, :]
                for bn in seg.bn:
                    self.batchnorm[bn] = "outgoing"
            src = self.find(seg.layer)
            per_layer[src] = per_layer[src] + cols if src in per_layer else cols
            offset += k
        ids = []
        for src, w in per_layer.items():
            self.blocks.append((src, dst, w.contiguous()))
            ids.append(len(self.blocks) - 1)
        return tuple(ids)

    def weight_layer(self, op: _Op, v: Optional[_Val]) -> None:
        m = op.module
        out_dtype = m.weight.dtype if m.weight.dtype in (torch.float32, torch.float64) else torch.float32
        if isinstance(m, nn.Conv2d):
            out_n, excluded, kind = m.out_channels, False, "channels"
        else:
            out_n, excluded, kind = m.out_features, not self.include_dense, "features"
        dst = self.new_layer(self.layer_name(op.path), out_n, excluded)
        if v is None:  # a dead op: its nodes stay isolated
            return
        if isinstance(m, nn.Conv2d):
            if v.kind == "features":
                self.fail(op, "its input is the output of a Linear layer (a feature vector, not channels)")
            self.set_unknown(v, m.in_channels, op)
            if self.grad_dtype is not None:
                n = _conv_edges(m.weight.to(self.grad_dtype), m.groups, self.kernel_norm)
            else:
                n = conv_edge_weights(m.weight, m.groups, self.kernel_norm).to(out_dtype)
        else:
            if v.kind == "channels":
                shape = self.in_shape(op)
                if shape is not None and len(shape) != 2:
                    self.fail(op, f"it is applied to a {len(shape)}-D conv output of shape {shape}; flatten it first")
                width = self.width(v)
                if m.in_features % width:
                    self.mismatch(op, f"has {m.in_features} input features, not a whole number of flattened "
                                      f"positions for each of the {width} channels feeding it")
                # NCHW flatten is channel-major: channel c owns flat indices [c*HW, (c+1)*HW).
                hw = m.in_features // width
                if self.grad_dtype is not None:
                    w = m.weight.to(self.grad_dtype).abs()
                    n = w if hw == 1 else w.reshape(out_n, width, hw).sum(-1)
                else:
                    w = m.weight.detach()
                    n = w.abs() if hw == 1 else w.to(torch.float64).abs().reshape(out_n, width, hw).sum(-1).to(out_dtype)
            else:
                self.set_unknown(v, m.in_features, op)
                if self.grad_dtype is not None:
                    n = m.weight.to(self.grad_dtype).abs()
                else:
                    n = m.weight.detach().abs().to(out_dtype)
        fresh = self.connect(v, n, dst, op)
        self.values[self._current] = _Val((_Seg(dst, fresh),), kind)

    def batchnorm_op(self, op: _Op, v: _Val) -> _Val:
        m = op.module
        if v.kind == "unknown":
            self.set_unknown(v, m.num_features, op)
            v = _Val(v.segs, "features" if isinstance(m, nn.BatchNorm1d) else "channels")
        if self.width(v) != m.num_features:
            self.mismatch(op, f"has {m.num_features} features but receives {self.width(v)} channels/units")
        if not self.fold:
            self.batchnorm[op.path] = "not folded"
            return v
        if m.affine:
            gamma = (m.weight if self.grad_dtype is not None else m.weight.detach()).abs().to(torch.float64)
        else:
            gamma = torch.ones(m.num_features, dtype=torch.float64, device=m.running_var.device
                               if m.running_var is not None else None)
        if m.running_var is not None:
            scale = gamma / torch.sqrt(m.running_var.detach().to(torch.float64) + m.eps)
        else:
            # No running statistics: the batch variance is unknown here, only gamma can be folded.
            warnings.warn(f"BatchNorm '{op.path}' keeps no running statistics; only |gamma| is folded", UserWarning,
                          stacklevel=4)
            scale = gamma
        scale = scale.to(device=self.device, dtype=self.grad_dtype or scale.dtype)
        segs, offset = [], 0
        for seg in v.segs:
            k = self.size(seg)
            s = scale[offset:offset + k]
            offset += k
            if seg.fresh is not None:
                for b in seg.fresh:
                    src, dst, w = self.blocks[b]
                    self.blocks[b] = (src, dst, w * s.to(w)[:, None])
                self.batchnorm[op.path] = "incoming"
                segs.append(seg)
            else:
                col = s if seg.col_scale is None else seg.col_scale * s
                segs.append(_Seg(seg.layer, None, col, seg.bn + (op.path,)))
                self.batchnorm.setdefault(op.path, "not folded")
        return _Val(tuple(segs), v.kind)

    def add_op(self, op: _Op, vals: List[_Val]) -> _Val:
        widths = []
        for v in vals:
            if v.kind == "unknown" and self.width(v) is None:
                continue
            widths.append(self.width(v))
        if not widths:
            self.fail(op, "adding raw inputs of unknown width")
        for v in vals:
            self.set_unknown(v, widths[0], op)
        kind = next((v.kind for v in vals if v.kind != "unknown"), "unknown")
        for v in vals:
            for s in v.segs:
                if s.col_scale is not None:
                    for bn in s.bn:
                        self.batchnorm[bn] = "not folded"
        whole = [v for v in vals if len(v.segs) == 1]
        roots = {self.find(v.segs[0].layer) for v in whole}
        if len(whole) == len(vals) and len(roots) == 1:  # x + x, or branches already merged
            fresh = self._union_fresh(vals)
            return _Val((_Seg(roots.pop(), fresh),), kind)
        # Merge: both operands are whole, included layers not joined by a block.
        if len(vals) == 2 and len(whole) == 2:
            a, b = (self.find(v.segs[0].layer) for v in vals)
            if not (self.layers[a].excluded or self.layers[b].excluded) and not self.joined(a, b):
                root, other = min(a, b), max(a, b)
                self.layers[other].parent = root
                members = self.merged.setdefault(root, [self.layers[root].name])
                members += self.merged.pop(other, [self.layers[other].name])
                return _Val((_Seg(root, self._union_fresh(vals)),), kind)
        # Identity skip into the output layer of the branch that computed something new.
        candidates = [v for v in whole if not self.layers[self.find(v.segs[0].layer)].excluded]
        fresh_c = [v for v in candidates if v.segs[0].fresh is not None]
        if candidates:
            target = (fresh_c or candidates)[-1]
            dst = self.find(target.segs[0].layer)
        else:
            # No operand can host the sum: it gets nodes of its own, left out like its operands
            # when they all are (e.g. two excluded dense branches).
            all_excluded = all(self.layers[self.find(s.layer)].excluded for v in vals for s in v.segs)
            dst = self.new_layer(f"{op.path or '<root>'}:{op.name}", widths[0], all_excluded)
            target = None
        n = widths[0]
        for v in vals:
            if v is target:
                continue
            offset = 0
            for seg in v.segs:
                k, src = self.size(seg), self.find(seg.layer)
                if src == dst:
                    if offset != 0 or k != n:
                        self.fail(op, "a skip connection that permutes the channels of its own output layer")
                else:
                    eye = torch.zeros(n, k, device=self.device, dtype=self.grad_dtype or torch.float32)
                    eye[torch.arange(offset, offset + k), torch.arange(k)] = 1.0
                    self.blocks.append((src, dst, eye))
                offset += k
        self.identity_skips.append(f"{op.path or '<root>'}:{op.name}")
        return _Val((_Seg(dst, None),), kind)

    @staticmethod
    def _union_fresh(vals: List[_Val]) -> Optional[Tuple[int, ...]]:
        # A BatchNorm after the add scales every branch: foldable only if all of them are fresh.
        if all(v.segs[0].fresh is not None for v in vals):
            return tuple(sorted({b for v in vals for b in v.segs[0].fresh}))
        return None

    def cat_op(self, op: _Op, vals: List[_Val]) -> _Val:
        tensors = self.arg(op, 0, "tensors")
        dim = self.arg(op, 1, "dim", 0)
        tensors = self.resolve(tensors)
        if not isinstance(tensors, list) or not all(isinstance(t, _Val) for t in tensors):
            self.fail(op, "concatenation with a constant tensor")
        if any(self.width(t) is None for t in tensors):
            self.fail(op, "concatenating a raw input before any layer has read its width")
        kinds = {t.kind for t in tensors} - {"unknown"}
        if len(kinds) > 1:
            self.fail(op, "concatenating conv channels with Linear features")
        kind = kinds.pop() if kinds else "unknown"
        shape = self.ops[op.args[0][0].index].shape if isinstance(op.args[0], (list, tuple)) and op.args[0] else None
        if shape is not None and isinstance(dim, int) and dim < 0:
            dim += len(shape)
        ok = dim == 1 if kind == "channels" else (dim in (1, -1) if shape is None else dim == len(shape) - 1)
        if not ok:
            self.fail(op, f"concatenation along dim {dim}; only the channel/feature dimension is supported")
        return _Val(tuple(s for t in tensors for s in t.segs), kind)

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        n_inputs = sum(op.kind == "input" for op in self.ops)
        for i, op in enumerate(self.ops):
            self._current = i
            if op.kind == "input":
                name = "input" if n_inputs == 1 else f"input:{op.name}"
                layer = self.new_layer(name, None, not self.include_input)
                self.values[i] = _Val((_Seg(layer),), "unknown")
                continue
            if op.kind in ("output", "other"):
                self.values[i] = _OTHER
                continue
            if op.kind == "module" and isinstance(op.module, _WEIGHT_MODULES) and not self.live[i]:
                self.weight_layer(op, None)
                self.unused.append(op.path or "model")
                continue
            if not self.live[i]:
                continue
            vals = self.unit_vals(op)
            if not vals:
                self.values[i] = _OTHER  # sizes, constants: no units flow through here
                continue
            out = self.module_op(op, vals) if op.kind == "module" else self.call_op(op, vals)
            if out is not None:  # weight layers store their value themselves
                self.values[i] = out
            if isinstance(self.values[i], _Val) and self.users[i] > 1:
                # A value with several consumers cannot let each of them rescale its producer's
                # incoming edges: conv -> (bn_a, bn_b) would fold both scales into one block.
                self.values[i] = self.keep(self.values[i], fresh=False)

    def module_op(self, op: _Op, vals: List[_Val]) -> Optional[_Val]:
        m = op.module
        if not isinstance(m, _WEIGHT_MODULES + _BATCHNORMS + _ACTIVATION_MODULES + _IDENTITY_MODULES
                          + _SPATIAL_MODULES + (nn.Flatten,)):
            self.fail(op)
        if len(vals) != 1:
            self.fail(op, "a module with several unit inputs")
        v = vals[0]
        if isinstance(m, _WEIGHT_MODULES):
            self.weight_layer(op, v)
            return None
        if isinstance(m, _BATCHNORMS):
            return self.batchnorm_op(op, v)
        if isinstance(m, _ACTIVATION_MODULES):
            return self.keep(v, fresh=False)
        if isinstance(m, _IDENTITY_MODULES):
            return self.keep(v)
        if isinstance(m, _SPATIAL_MODULES):
            if v.kind == "features":
                self.fail(op, "pooling/padding of Linear features")
            return self.keep(v)
        if isinstance(m, nn.Flatten):
            return self.flatten(op, v, m.start_dim)
        self.fail(op)
        return None

    def flatten(self, op: _Op, v: _Val, start_dim) -> _Val:
        if v.kind != "channels":
            return self.keep(v)  # an input or feature vector: its units are whatever the next Linear reads
        shape, out = self.in_shape(op), op.shape
        if shape is not None and out is not None:
            # Flattening to (N, -1) keeps NCHW's channel-major order; keeping dim 1 keeps channels.
            to_flat = len(out) == 2 and out[0] == shape[0]
            if not (to_flat or (len(out) > 2 and out[:2] == shape[:2])):
                self.fail(op, f"a reshape from {shape} to {out}; only flattening to (N, -1) is supported")
        elif start_dim not in (1, None):
            self.fail(op, f"flatten from dim {start_dim}; only flattening to (N, -1) is supported")
        return self.keep(v)

    def call_op(self, op: _Op, vals: List[_Val]) -> _Val:
        name = op.name
        if name in _NON_UNIT_OPS:
            return _OTHER
        if name in _ADD_OPS:
            if len(vals) == 1:
                return self.keep(vals[0])  # + a constant (a bias): no new edges
            return self.add_op(op, vals)
        if name == "cat":
            return self.cat_op(op, vals)
        if name == "getitem":
            self.fail(op, "indexing or slicing a tensor of units (channel slices, split outputs)")
        if len(vals) != 1:
            self.fail(op, "an op combining several branches" if name in _SCALE_OPS else "")
        v = vals[0]
        if name in _SCALE_OPS or name in _IDENTITY_OPS:
            return self.keep(v)
        if name in _ACTIVATION_OPS:
            return self.keep(v, fresh=False)
        if name in _SPATIAL_OPS:
            if v.kind == "features":
                self.fail(op, "pooling/padding of Linear features")
            return self.keep(v)
        if name in _FLATTEN_OPS:
            # torch.flatten and Tensor.flatten start at dim 0 by default (nn.Flatten at 1).
            start = self.arg(op, 1, "start_dim", 0) if name == "flatten" else 1
            if name == "squeeze":
                dim = self.arg(op, 1, "dim", None)
                if dim in (0, 1):
                    self.fail(op, f"squeeze of dim {dim}")
                start = 1
            return self.flatten(op, v, start)
        if name in _REDUCE_OPS:
            dims = self.arg(op, 1, "dim", None)
            dims = (dims,) if isinstance(dims, int) else dims
            shape = self.in_shape(op)
            if v.kind != "channels" or dims is None or not isinstance(dims, (list, tuple)):
                self.fail(op, "a reduction that is not over the spatial dims of conv channels")
            norm = [d + len(shape) if (shape is not None and d < 0) else d for d in dims]
            if any(d in (0, 1) or (shape is None and d < 0 and d < -2) for d in norm):
                self.fail(op, f"a reduction over dims {tuple(dims)} (it mixes channels or samples)")
            return self.keep(v)
        self.fail(op)
        return v

    # ------------------------------------------------------------------ result
    def graph(self, method: str) -> Tuple[WeightGraph, TraceReport]:
        sizes, names, blocks = self.collect()
        graph = WeightGraph(sizes, blocks, layer_names=names)
        excluded = tuple(self.layers[l].name for l in range(len(self.layers))
                         if self.find(l) == l and self.layers[l].excluded and self.layers[l].size)
        report = TraceReport(
            method=method,
            unused=tuple(self.unused),
            merged={self.layers[r].name: tuple(names) for r, names in self.merged.items()},
            identity_skips=tuple(self.identity_skips),
            batchnorm=dict(self.batchnorm),
            excluded=excluded,
        )
        return graph, report

    def collect(self) -> Tuple[List[int], List[str], List[Tuple[int, int, torch.Tensor]]]:
        """Layer sizes, layer names and summed ``(src, dst, A)`` blocks of the included layers."""
        called = {op.path for op in self.ops if op.kind == "module"}
        for path, m in self.model.named_modules():
            if isinstance(m, _WEIGHT_MODULES) and path not in called and not (path == "" and "" in called):
                # Never called in the forward pass: its nodes exist but have no edges.
                excluded = isinstance(m, nn.Linear) and not self.include_dense
                self.new_layer(self.layer_name(path), m.out_channels if isinstance(m, nn.Conv2d) else m.out_features,
                               excluded)
                self.unused.append(path or "model")
        keep = [l for l in range(len(self.layers)) if self.find(l) == l and not self.layers[l].excluded
                and self.layers[l].size]
        new = {l: i for i, l in enumerate(keep)}
        summed: Dict[Tuple[int, int], torch.Tensor] = {}
        for src, dst, w in self.blocks:
            s, d = self.find(src), self.find(dst)
            if s not in new or d not in new:
                continue
            assert s != d, "internal error: an edge block joins a node layer to itself"
            key = (new[s], new[d])
            summed[key] = summed[key] + w.to(summed[key]) if key in summed else w
        if not keep:
            if not any(op.kind == "module" and isinstance(op.module, _WEIGHT_MODULES) for op in self.ops):
                raise ValueError(f"{type(self.model).__name__} has no nn.Linear or nn.Conv2d layers in its forward "
                                 f"pass, so there is no weight graph to measure")
            raise ValueError(
                f"{type(self.model).__name__} leaves no node layers with include_input={self.include_input}, "
                f"include_dense={self.include_dense}: there is no weight graph to measure"
            )
        if not summed:
            names = ", ".join(self.layers[l].name for l in keep)
            raise ValueError(
                f"the weight graph of {type(self.model).__name__} has no edges with include_input={self.include_input}, "
                f"include_dense={self.include_dense} (node layers: {names}); a single conv layer needs "
                f"include_input=True, a Linear-only model include_dense=True"
            )
        return ([self.layers[l].size for l in keep], [self.layers[l].name for l in keep],
                [(s, d, w) for (s, d), w in summed.items()])


# ----------------------------------------------------------------------------- chain fallback
def _linear_chain(model: nn.Module) -> Optional[WeightGraph]:
    """The historical ``WeightGraph.from_module``: Linear layers in registration order, or None
    when the model holds anything but Linear layers and parameter-free pass-through modules."""
    weights, names = [], ["input"]
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weights.append(module.weight)
            names.append(path or "model")
            continue
        own = list(module.parameters(recurse=False))
        if list(module.children()) and not own:
            continue
        if isinstance(module, _ACTIVATION_MODULES + _IDENTITY_MODULES + (nn.Flatten,)):
            continue
        return None
    if not weights:
        return None
    try:
        return WeightGraph.from_weights(weights, layer_names=names)
    except ValueError:
        return None




class _UntraceableError(UnsupportedModuleError):
    """fx could not trace the model and there was no ``example_input`` to record a forward pass."""


def _record_ops(model: nn.Module, example_input) -> Tuple[List[_Op], str]:
    """The forward pass as ops, by fx tracing, else recorded from a forward pass on
    ``example_input``; ``(ops, "fx" | "forward")``. Raises :class:`UnsupportedModuleError`
    for unsupported modules and :class:`_UntraceableError` for untraceable models without
    ``example_input``."""
    try:
        return _ops_from_fx(model, example_input), "fx"
    except UnsupportedModuleError:
        raise
    except Exception as err:  # fx raises TraceError, TypeError, ... on data-dependent Python
        if example_input is not None:
            return _ops_from_forward(model, example_input), "forward"
        raise _UntraceableError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}). Pass "
            f"example_input=<a batch the model accepts> so that the graph is recorded from one forward pass, "
            f"or build the graph by hand with WeightGraph(layer_sizes, blocks)."
        ) from err


# ----------------------------------------------------------------------------- public API
def trace_module(
    model: nn.Module,
    *,
    example_input: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    kernel_norm: str = "l1",
    fold_batchnorm: bool = True,
    include_dense: Optional[bool] = None,
    include_input: Optional[bool] = None,
) -> Tuple[WeightGraph, TraceReport]:
    """The weight graph of a model and a report of merges, BatchNorm folds and unused layers.

    Same as :func:`graph_from_module` (see there for the construction and arguments), but
    returns the :class:`TraceReport` alongside the graph.

    Example:
        >>> class Res(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.stem = nn.Conv2d(3, 8, 3, padding=1)
        ...         self.conv = nn.Conv2d(8, 8, 3, padding=1)
        ...     def forward(self, x):
        ...         x = self.stem(x)
        ...         return x + self.conv(x).relu()
        >>> g, report = trace_module(Res())
        >>> g.layer_names, report.identity_skips
        (('stem', 'conv'), ('<root>:add',))

    Returns:
        ``(graph, report)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if kernel_norm not in KERNEL_NORMS:
        raise ValueError(f"kernel_norm must be one of {KERNEL_NORMS}, got {kernel_norm!r}")
    model = _unwrap(model)
    try:
        ops, method = _record_ops(model, example_input)
    except _UntraceableError:
        chain = _linear_chain(model) if include_dense is not False and include_input is not False else None
        if chain is not None:
            return chain, TraceReport(method="chain")
        raise
    builder = _Builder(ops, model, kernel_norm, fold_batchnorm, include_dense, include_input)
    builder.run()
    graph, report = builder.graph(method)
    if report.unused:
        warnings.warn(
            f"{len(report.unused)} weight layer(s) of {type(model).__name__} never reach the model output or are never "
            f"called: {', '.join(report.unused)}. Their nodes have no edges (isolated; remove_isolated drops them); "
            f"the list is in TraceReport.unused / graph.trace_report.unused.",
            UserWarning,
            stacklevel=3,
        )
    return graph, report


class GraphRebuilder:
    """Rebuild a model's weight graph from its current parameters, with autograd (internal).

    Traces the model once (as :func:`trace_module`); each call then re-runs the cheap graph
    construction on the live parameters, so the edge blocks are differentiable functions of
    the conv/linear weights and of the BatchNorm ``gamma`` (the running variance enters as a
    constant). Used by :class:`~torch_modularity.SpectralRegularizer` for CNN and DAG models.
    :meth:`create` raises :class:`UnsupportedModuleError` as :func:`trace_module` does.
    """

    def __init__(self, model: nn.Module, ops: List[_Op], options: Dict[str, Any]) -> None:
        self.model, self.ops, self.options = model, ops, options

    @classmethod
    def create(cls, model: nn.Module, *, example_input=None, kernel_norm: str = "l1", fold_batchnorm: bool = True,
               include_dense: Optional[bool] = None, include_input: Optional[bool] = None) -> "GraphRebuilder":
        if kernel_norm not in KERNEL_NORMS:
            raise ValueError(f"kernel_norm must be one of {KERNEL_NORMS}, got {kernel_norm!r}")
        model = _unwrap(model)
        ops, _ = _record_ops(model, example_input)
        return cls(model, ops, dict(kernel_norm=kernel_norm, fold_batchnorm=fold_batchnorm,
                                    include_dense=include_dense, include_input=include_input))

    def __call__(self, dtype: torch.dtype) -> Tuple[List[int], List[str], List[Tuple[int, int, torch.Tensor]]]:
        """``(layer_sizes, layer_names, blocks)`` with blocks in ``dtype`` carrying autograd."""
        builder = _Builder(self.ops, self.model, differentiable_dtype=dtype, **self.options)
        builder.run()
        return builder.collect()


def graph_from_module(
    model: nn.Module,
    *,
    example_input: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    kernel_norm: str = "l1",
    fold_batchnorm: bool = True,
    include_dense: Optional[bool] = None,
    include_input: Optional[bool] = None,
) -> WeightGraph:
    """Weight graph of an MLP, CNN or DAG model: units are nodes, |weights| are edges.

    The data flow between ``nn.Conv2d`` and ``nn.Linear`` layers is found by ``torch.fx``
    symbolic tracing (nested modules, residual adds and concatenations included); the
    construction rules are in this module's docstring. Nodes are the output channels of
    every Conv2d ("filters as units") and the output units of every Linear, layer by layer
    in execution order, plus the input layer. Node layers are named after module paths
    (``"input"`` for the input, ``"model"`` for a bare root layer, ``"path#2"`` for the second
    call of a module), so ``graph.node_info(i)`` gives ``(module path, channel/unit index)``.

    Defaults follow the research code: for a CNN (any Conv2d called) the graph is the conv
    channels only, without the image channels and dense layers; for an MLP it is every
    Linear layer plus the input, exactly the chain ``WeightGraph.from_weights`` builds.

    The returned graph carries the :class:`TraceReport` as ``graph.trace_report`` (an
    attribute of this object only: graphs derived from it, e.g. by ``remove_isolated``, do not
    have it). Unused layers (never reaching the output) also raise a ``UserWarning``.

    Example:
        >>> cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
        >>> graph_from_module(cnn).layer_sizes
        (8, 16)
        >>> g = graph_from_module(cnn, include_dense=True, include_input=True)
        >>> g.layer_sizes, g.layer_names
        ((3, 8, 16, 10), ('input', '0', '4', '7'))
        >>> g.node_info(3 + 8 + 5)
        ('4', 5)

    Args:
        model: the network. Supported: Conv2d (any groups), Linear, BatchNorm1d/2d/Sync,
            activations, dropout, pooling, padding, upsampling, Flatten, Identity, residual
            adds, channel concatenation, flatten/view/reshape, spatial means. Anything else
            raises :class:`UnsupportedModuleError` naming the module or op and its path.
        example_input: a batch (or tuple of positional inputs) the model accepts. Needed only
            when fx cannot trace the model (Python control flow on tensor values): the graph
            is then recorded from one forward pass in eval mode without gradients (BatchNorm
            statistics are not touched). With fx it is used to check reshapes by their shapes.
            An untraceable plain Linear chain without example_input is read in registration
            order, as ``WeightGraph.from_module`` always did.
        kernel_norm: how a conv kernel slice ``|W[o, i]|`` becomes one edge weight: ``"l1"``
            (default: total absolute weight, additive over kernel positions and consistent
            under rescaling, so a 1x1 conv equals a Linear), ``"fro"``, or ``"induced_l1"``
            (the research code's numbers). See :func:`conv_edge_weights`.
        fold_batchnorm: fold every BatchNorm's ``|gamma| / sqrt(running_var + eps)`` into the
            edges (``False`` reproduces the research code's unfolded VGG graphs).
        include_dense: keep Linear layers (default: yes for MLPs, no for CNNs). After a
            Flatten of conv channels each channel connects to each dense unit with the sum
            of ``|w|`` over its ``H*W`` flattened positions (NCHW order; 1 after global pooling).
        include_input: keep the input units/channels as the first node layer (default: yes
            for MLPs, no for CNNs).

    Returns:
        The :class:`~torch_modularity.graph.WeightGraph` (not necessarily bipartite: residual
        DAGs give odd cycles, and the spectral engine then uses its generic path).

    Raises:
        UnsupportedModuleError: (a ``TypeError``) an unsupported module or op, named with its
            module path; or an untraceable model without ``example_input``.
        ValueError: widths that do not chain, non-finite weights, or a graph without edges
            (e.g. a lone conv with the input excluded).
    """
    graph, report = trace_module(model, example_input=example_input, kernel_norm=kernel_norm,
                                 fold_batchnorm=fold_batchnorm, include_dense=include_dense,
                                 include_input=include_input)
    graph.trace_report = report
    return graph


def _mlp_weights(m: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The (out, in) weight of submodule ``name`` of ``m`` if it is a Linear-like layer."""
    try:
        sub = m.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(sub, nn.Linear):
        return sub.weight
    # Hugging Face's GPT-2 "Conv1D" is a Linear with its weight stored as (in, out).
    if type(sub).__name__ == "Conv1D" and isinstance(getattr(sub, "weight", None), torch.Tensor) \
            and sub.weight.dim() == 2:
        return sub.weight.t()
    return None


# Known transformer layouts: (first, second) layer of the MLP, by attribute name.
_KNOWN_MLP_LAYOUTS = (
    ("intermediate.dense", "output.dense"),  # Hugging Face BERT family (BertLayer, RobertaLayer, ViTLayer...)
    ("c_fc", "c_proj"),  # Hugging Face GPT-2 MLP
)


def _mlp_pair(m: nn.Module) -> Optional[Tuple[str, str]]:
    """Names of the two Linear children of a Linear-activation-Linear block, or None."""
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return "linear1", "linear2"
    for first, second in _KNOWN_MLP_LAYOUTS:
        w1, w2 = _mlp_weights(m, first), _mlp_weights(m, second)
        if w1 is not None and w2 is not None and w1.shape[0] == w2.shape[1]:
            return first, second
    linears = [(n, c) for n, c in m.named_modules() if isinstance(c, nn.Linear) and n]
    if len(linears) != 2:
        return None
    own = {id(p) for _, c in linears for p in c.parameters()}
    if any(id(p) not in own for p in m.parameters()):
        return None  # other weights (norms, attention): not a bare MLP
    try:
        ops = _ops_from_fx(m)
    except Exception:
        return None
    seq = [op for op in ops if op.kind not in ("input", "output")]
    mods = [i for i, op in enumerate(seq) if op.kind == "module" and isinstance(op.module, nn.Linear)]
    if len(mods) != 2 or mods[0] != 0:
        return None

    def kind(op: _Op) -> str:
        if op.kind == "module":
            return ("act" if isinstance(op.module, _ACTIVATION_MODULES) else
                    "id" if isinstance(op.module, _IDENTITY_MODULES) else "x")
        return "act" if op.name in _ACTIVATION_OPS else "id" if op.name in _IDENTITY_OPS else "x"

    between = [kind(op) for op in seq[1:mods[1]]]
    after = [kind(op) for op in seq[mods[1] + 1:]]
    # The ops must form one chain: each uses the previous one's output.
    pos = {id(op): i for i, op in enumerate(ops)}
    chained = all(_refs((op.args, op.kwargs)) == [pos[id(prev)]] for prev, op in zip(seq, seq[1:]))
    if not chained or "act" not in between or "x" in between or any(k != "id" for k in after):
        return None
    return seq[mods[0]].label, seq[mods[1]].label


def transformer_mlp_graphs(model: nn.Module) -> Dict[str, WeightGraph]:
    """One weight graph per MLP sub-block (Linear -> activation -> Linear) of a transformer.

    Found: every ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
    (``linear1 -> activation -> dropout -> linear2``); Hugging Face layouts by attribute name
    (BERT family: ``intermediate.dense -> act -> output.dense``; GPT-2: ``c_fc -> act ->
    c_proj``, its ``Conv1D`` weights transposed); and every other submodule whose whole
    forward is a Linear, activations/dropout, and a Linear (timm-style ``Mlp``,
    ``nn.Sequential(Linear, GELU, Linear)``). Nested matches inside a match are not repeated.
    Gated MLPs (LLaMA's SwiGLU, three Linears and a product) are not recognised.
    Each graph has three node layers: the block's input features (``"<path>:input"``, or
    ``"input"`` for the root), the hidden units (``linear1``'s path) and the output features
    (``linear2``'s path), with ``|W|`` edges as in ``WeightGraph.from_weights``.

    Not included: self- and cross-attention (they mix tokens, not units), LayerNorms (not
    folded), biases, residual connections, embeddings and heads; the blocks are not joined
    to each other.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32)
        >>> g = transformer_mlp_graphs(layer)[""]
        >>> g.layer_sizes, g.layer_names
        ((16, 32, 16), ('input', 'linear1', 'linear2'))

    Args:
        model: any module holding transformer layers or MLP blocks.

    Returns:
        A dict from the module path of each MLP block (``""`` for the root) to its graph,
        in ``named_modules`` order; empty when there is none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    found: Dict[str, WeightGraph] = {}
    for path, m in model.named_modules():
        if any(path == p or path.startswith(p + ".") or p == "" for p in found):
            continue
        pair = _mlp_pair(m)
        if pair is None:
            continue
        w1, w2 = _mlp_weights(m, pair[0]), _mlp_weights(m, pair[1])
        if w1 is None or w2 is None or w1.shape[0] != w2.shape[1]:
            continue
        full = [f"{path}.{p}" if path else p for p in pair]
        found[path] = WeightGraph.from_weights([w1, w2], layer_names=[f"{path}:input" if path else "input"] + full)
    return found
