r"""Fold batch norms into the preceding Linear/Conv layer for inference ("fused batch normalization").

In evaluation a batch norm is a per-channel affine map, ``y = s * z + t`` with ``s = gamma / sqrt(var + eps)``
and ``t = beta - s * mean`` (running statistics). When ``z = W x + b`` comes from a Linear or Conv layer,
``y = (s W) x + (s b + t)``: scaling the layer's output-channel weights by ``s`` and replacing its bias by
``s (b - mean) + beta`` removes the batch norm at no cost in accuracy (the new weights are computed in
float64 and rounded once to the layer's dtype).

**Finding the pairs: torch.fx.** The model's ``forward`` is traced symbolically (:mod:`torch.fx`), with
Linear/Conv layers, batch norms and bnlib's modules kept as leaves, so the pairs are found wherever they are
called: ``self.bn1(self.conv1(x))`` in a ResNet block as well as adjacent children of an ``nn.Sequential``.
A batch norm (``torch.nn`` or bnlib ``BatchNorm*``, and the variants whose evaluation is plain batch norm:
``SyncBatchNorm``, ``BatchRenorm*``, ``GhostBatchNorm*``) is folded when its only argument is the output of
an ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` and **that output feeds nothing else** (the
fx node's ``users`` is the batch norm alone).

**What is returned: the model's own class, patched.** The graph is used for the analysis only. The returned
model is a deep copy of ``model`` (its class, its methods, its ``forward`` source and its parameter names, e.g.
``layer2.0.conv1.weight``) in which each folded layer carries the new weight and bias and each folded batch norm
is replaced by :class:`Folded`, an identity that names the layer it went into. This is exact because the layer's
output reached nothing but the batch norm: the value that flowed on is ``bn(layer(x))`` before and
``Folded(layer'(x)) = layer'(x)`` after, equal to rounding. (A ``GraphModule`` would also be exact, but it
replaces the user's class and ``forward`` by generated code; :class:`Folded` costs one Python call per folded
layer.) The trace reflects the module attributes at the time of folding (e.g. ``if self.downsample is not
None``); the folded copy is meant to be used as it is.

**Untraceable parts: the Sequential rule.** Where ``forward`` cannot be traced (data-dependent control flow,
``if x.sum() > 0``, or any other error of the tracer), the part is listed in the report's ``untraced`` with the
tracer's error. So is a ``forward`` that takes more than one argument (``forward(x, mask=None)``): torch.fx
traces it with every argument a tensor (``if mask is not None`` is taken as true), and a call with other values
may route the layers' outputs differently, so no trace of it is trusted. In an untraced part a batch norm is
folded only when it is the **next child** of a foldable layer in a plain ``nn.Sequential`` (whose ``forward``
chains its children), and each child module is then traced on its own. There the pair is assumed to be reached
only through its container (as the Sequential rule always assumed); the report says where this fallback was used.

Everything else is left in place and listed in the report with the reason:

- the batch norm is in training mode, or has no running statistics (it normalizes with batch statistics), or it
  is a ``BatchLayerNorm`` (its evaluation mixes in per-sample statistics: not a fixed per-channel map);
- it is not preceded by a foldable layer (its input comes from a ReLU, an addition, a ConvTranspose, the
  model's input, ...), or the layer's output is also used elsewhere (e.g. ``y = conv(x); bn(y) + y``): folding
  would change that other use;
- the layer's output channels differ from the batch norm's ``num_features``;
- the layer or the batch norm is used at more than one place in the model (shared weights: registered under two
  names or called twice), their parameters are also read directly in ``forward``, they carry forward hooks, or
  the layer's weight is parametrized;
- functional batch norms (``F.batch_norm``, ``torch.batch_norm``, ``bnlib.torch.functional.batch_norm`` and its
  variants) found in a traced ``forward``: their statistics are arguments of the call, not a module's state.

A Linear followed by ``BatchNorm1d`` is folded for 2-D input ``(N, features)``; the :class:`Folded` left in
place raises if it ever sees other input, because then the two layers act on different dimensions.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from . import functional as _bf
from .modules import BatchLayerNorm as _BatchLayerNorm
from .modules import _BatchNorm as _BnlibBatchNorm

__all__ = ["fold_batchnorm", "FoldReport", "Folded"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.modules.batchnorm._BatchNorm, _BnlibBatchNorm)
# bnlib's functional forms are recorded as calls (not traced into); torch's are recorded by torch.fx itself
_BNLIB_FUNCTIONAL = tuple(f for f in (getattr(_bf, n, None) for n in ("batch_norm", "batch_renorm",
                                                                       "ghost_batch_norm", "batch_layer_norm"))
                          if f is not None)
_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm, torch.native_batch_norm) + _BNLIB_FUNCTIONAL
_SEQUENTIAL_RULE = ("in it, only a batch norm that is the next child of its Linear/Conv in an nn.Sequential is "
                    "folded; its child modules are traced separately")


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: ``folded`` lists ``(layer_name, bn_name)`` pairs, ``skipped`` lists
    ``(bn_name, reason)``, ``untraced`` lists ``(module_name, why)`` for the parts whose ``forward`` was not
    traced (``"<model>"`` for the model itself), where the Sequential rule was used."""

    folded: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    untraced: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s), skipped {len(self.skipped)}"]
        lines += [f"  folded {bn} into {layer}" for layer, bn in self.folded]
        lines += [f"  skipped {bn}: {reason}" for bn, reason in self.skipped]
        lines += [f"  not traced: {name} ({error}); {_SEQUENTIAL_RULE}" for name, error in self.untraced]
        return "\n".join(lines)


class Folded(nn.Identity):
    """What is left of a batch norm folded into ``into``; for a Linear fold it checks the input is 2-D."""

    def __init__(self, into: str, bn_repr: str, require_2d: bool = False) -> None:
        super().__init__()
        self.into = into
        self.bn_repr = bn_repr
        self.require_2d = require_2d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.require_2d and input.dim() != 2:
            raise ValueError(f"this {self.bn_repr} was folded into the Linear layer {self.into!r}, which is "
                             f"valid for 2-D (N, features) input only, got {input.dim()}-D input; fold a "
                             "model that sees other input shapes without it")
        return input

    def extra_repr(self) -> str:
        return f"folded into {self.into!r}: {self.bn_repr}"


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BN_TYPES)


def _bn_reason(bn: nn.Module):
    if bn.training:
        return ("in training mode: it normalizes with batch statistics, which folding cannot reproduce; "
                "call model.eval() first")
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): it normalizes with batch statistics"
    if isinstance(bn, _BatchLayerNorm):
        return ("BatchLayerNorm: in evaluation it also normalizes with each sample's own statistics, so it is "
                "not a fixed per-channel affine map")
    return None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks)


def _layer_reason(layer: nn.Module, bn: nn.Module, shared: bool) -> Optional[str]:
    """Why ``bn`` cannot be folded into ``layer``, its only input (None when it can)."""
    if not isinstance(layer, _FOLDABLE):
        return f"preceded by {type(layer).__name__}, not by Linear/Conv1d/Conv2d/Conv3d"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return f"preceding {type(layer).__name__} has {out} output channels, the batch norm {bn.num_features}"
    if shared:
        return "the layer or the batch norm is used at more than one place (shared weights)"
    if _hooked(layer) or _hooked(bn):
        return "the layer or the batch norm has forward hooks, which would see different values after folding"
    if parametrize.is_parametrized(layer):
        return "the layer's weight is parametrized (torch.nn.utils.parametrize): it cannot be replaced"
    return None


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    w = layer.weight
    dt = torch.float64
    scale = bn.running_var.to(dt).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.to(dt)
    shift = -bn.running_mean.to(dt) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dt)
    new_w = w.to(dt) * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    old_b = layer.bias.to(dt) if layer.bias is not None else torch.zeros_like(scale)
    new_b = old_b * scale + shift
    layer.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=w.requires_grad)
    layer.bias = nn.Parameter(new_b.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)


def _recorded(fn):
    """``fn`` that, called on a torch.fx proxy, records a ``call_function`` node instead of being traced into."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _record_bnlib_functionals():
    """While tracing, ``bnlib.torch.functional.batch_norm`` & co. reached as module attributes (``BF.batch_norm``)
    are recorded as calls too (names imported into the caller's globals are handled by ``autowrap_functions``)."""
    patched = []
    try:
        for module in (_bf, sys.modules.get(__package__)):
            for fn in _BNLIB_FUNCTIONAL:
                if module is not None and getattr(module, fn.__name__, None) is fn:
                    setattr(module, fn.__name__, _recorded(fn))
                    patched.append((module, fn))
        yield
    finally:
        for module, fn in patched:
            setattr(module, fn.__name__, fn)


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps Linear/Conv layers, batch norms and all of bnlib.torch's modules as leaves
    (as torch.nn's own modules are), and records bnlib's functional batch norms as calls."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_BNLIB_FUNCTIONAL)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, _FOLDABLE + _BN_TYPES + (Folded,)) or type(m).__module__.startswith("bnlib.torch")
                or super().is_leaf_module(m, module_qualified_name))

    def trace(self, root, concrete_args=None) -> fx.Graph:
        with _record_bnlib_functionals():
            return super().trace(root, concrete_args)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _where(prefix: str) -> str:
    return f"the forward of {prefix!r}" if prefix else "the model's forward"


def _check_signature(module: nn.Module) -> None:
    """Only a ``forward(x)`` of one argument is traced: with more, a caller may pass values (``None``, a flag)
    that route tensors differently from the path the trace took (fx takes ``if mask is not None`` as true)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if len(params) != 1 or params[0].kind in (params[0].VAR_POSITIONAL, params[0].VAR_KEYWORD):
        raise _NotTraced(f"forward takes the arguments ({', '.join(str(p) for p in params)}), not one input: "
                         "which layers see which tensors may depend on the values passed, so it is not traced")


class _NotTraced(Exception):
    pass


def _error_text(err: Exception) -> str:
    if isinstance(err, _NotTraced):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class _Folder:
    """Folds in place in ``root`` (the copy), region by region: a traced module's whole graph, or, where
    tracing fails, the Sequential rule on its children and a new region for each child."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.report = FoldReport()
        self.uses: Dict[int, int] = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        self.names = {id(m): n for n, m in root.named_modules()}
        self.handled = set()   # id of each batch norm already folded or reported
        self.visited = set()   # id of each module already traced (or tried)
        self.tracer = _Tracer()

    # -- shared --------------------------------------------------------------------------------------------
    def _skip(self, bn_name: str, bn: nn.Module, reason: str) -> None:
        self.handled.add(id(bn))
        self.report.skipped.append((bn_name, reason))

    def _fold(self, layer_name: str, layer: nn.Module, bn_name: str, bn: nn.Module) -> None:
        self.handled.add(id(bn))
        _fold_pair(layer, bn)
        parent_name, _, key = bn_name.rpartition(".")
        parent = self.root.get_submodule(parent_name) if parent_name else self.root
        parent._modules[key] = Folded(layer_name, f"{type(bn).__name__}({bn.num_features})",
                                      require_2d=isinstance(layer, nn.Linear))
        self.report.folded.append((layer_name, bn_name))

    def _is_leaf(self, m: nn.Module) -> bool:
        return self.tracer.is_leaf_module(m, "")

    # -- regions -------------------------------------------------------------------------------------------
    def region(self, module: nn.Module, prefix: str) -> None:
        if module is None or id(module) in self.visited or self._is_leaf(module):
            return
        self.visited.add(id(module))
        try:
            _check_signature(module)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _Tracer().trace(module)
        except Exception as err:  # whatever stops the tracer: fall back for this part, trace its children
            self.report.untraced.append((prefix or "<model>", _error_text(err)))
            self._sequential_rule(module, prefix)
            for key, child in list(module._modules.items()):
                self.region(child, _join(prefix, key))
            return
        self._graph(module, prefix, graph)

    def _graph(self, module: nn.Module, prefix: str, graph: fx.Graph) -> None:
        nodes = list(graph.nodes)
        calls = Counter(n.target for n in nodes if n.op == "call_module")
        attrs = [n.target for n in nodes if n.op == "get_attr"]

        def read_directly(target: str) -> bool:
            return any(a == target or a.startswith(target + ".") for a in attrs)

        def describe(node: fx.Node) -> str:
            if node.op == "call_module":
                return repr(_join(prefix, node.target))
            if node.op == "call_function":
                return f"{getattr(node.target, '__name__', node.target)}()"
            if node.op == "call_method":
                return f".{node.target}()"
            if node.op == "output":
                return "the output of the forward"
            return f"{node.op} {node.target}"

        for n in nodes:
            if n.op == "call_function" and n.target in _FUNCTIONAL_BN:
                fn = (f"bnlib.torch.functional.{n.target.__name__}" if n.target in _BNLIB_FUNCTIONAL
                      else f"{n.target.__module__}.{n.target.__name__}")
                self.report.skipped.append((
                    f"{fn}() call {n.name!r} in {_where(prefix)}",
                    "a functional batch norm: its statistics and affine parameters are arguments of the call, "
                    "not a module's state that can be folded into a layer"))
                continue
            if n.op != "call_module":
                continue
            bn = module.get_submodule(n.target)
            if not _is_bn(bn) or id(bn) in self.handled:
                continue
            bn_name = _join(prefix, n.target)
            reason = _bn_reason(bn)
            inp = n.args[0] if n.args else n.kwargs.get("input")
            layer = layer_name = None
            if reason is not None:
                pass
            elif len(n.args) + len(n.kwargs) != 1 or not isinstance(inp, fx.Node):
                reason = "called with other arguments than one traced tensor"
            elif inp.op == "placeholder":
                reason = f"its input is an input of {_where(prefix)}: no preceding Linear/Conv to fold into"
            elif inp.op != "call_module":
                reason = f"preceded by {describe(inp)}, not by Linear/Conv1d/Conv2d/Conv3d"
            else:
                layer = module.get_submodule(inp.target)
                layer_name = _join(prefix, inp.target)
                shared = (calls[n.target] > 1 or calls[inp.target] > 1 or self.uses[id(bn)] > 1
                          or self.uses[id(layer)] > 1)
                reason = _layer_reason(layer, bn, shared)
                if reason is None and len(inp.users) > 1:
                    others = ", ".join(describe(u) for u in inp.users if u is not n)
                    reason = (f"the output of {layer_name!r} is also used by {others}, not only by the batch norm: "
                              "folding would change that use")
                if reason is None and (read_directly(inp.target) or read_directly(n.target)):
                    reason = "the parameters or buffers of the layer or the batch norm are also read in forward"
            if reason is not None:
                self._skip(bn_name, bn, reason)
            else:
                self._fold(layer_name, layer, bn_name, bn)

    def _sequential_rule(self, module: nn.Module, prefix: str) -> None:
        """The fallback inside an untraced ``module``: fold the batch norms that are the next child of a
        foldable layer in a plain nn.Sequential; report its other batch-norm children."""
        where = f"{_where(prefix)}, which was not traced (see the report's untraced parts)"
        keys = list(module._modules.keys())
        plain_seq = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
        for i, key in enumerate(keys):
            bn = module._modules[key]
            if bn is None or not _is_bn(bn) or id(bn) in self.handled:
                continue
            bn_name = self.names.get(id(bn), _join(prefix, key))
            reason = _bn_reason(bn)
            prev = module._modules[keys[i - 1]] if i > 0 else None
            if reason is None:
                if not plain_seq:
                    reason = (f"called from {where}: there only a batch norm that is the next child of its "
                              "Linear/Conv in an nn.Sequential is folded")
                elif prev is None:
                    reason = "first layer of its nn.Sequential: no preceding Linear/Conv to fold into"
                else:
                    reason = _layer_reason(prev, bn, self.uses[id(prev)] > 1 or self.uses[id(bn)] > 1)
            if reason is not None:
                self._skip(bn_name, bn, reason)
            else:
                self._fold(self.names.get(id(prev), _join(prefix, keys[i - 1])), prev, bn_name, bn)

    def leftovers(self) -> None:
        for name, m in self.root.named_modules():
            if _is_bn(m) and id(m) not in self.handled:
                if not name:
                    reason = _bn_reason(m) or "the model is a batch norm by itself: no Linear/Conv to fold it into"
                else:
                    reason = _bn_reason(m) or ("not called as a module in a traced forward (unused, or inside a "
                                               "module that torch.fx keeps whole)")
                self._skip(name or "<model>", m, reason)


def fold_batchnorm(model: nn.Module, *, warn: bool = True, return_report: bool = False):
    """Return an inference copy of ``model`` with batch norms folded into the preceding Linear/Conv
    (found by torch.fx tracing, see the module docstring); ``model`` itself is not changed.

    The copy has ``model``'s class, ``forward`` and parameter names; each folded batch norm is replaced by a
    :class:`Folded` identity. Every batch norm that is not folded is listed, with the reason, in the
    :class:`FoldReport` (attached to the copy as ``fold_report``; returned as ``(copy, report)`` with
    ``return_report=True``), together with the parts that were not traced (folded by the Sequential rule
    instead), and, when ``warn``, in one ``UserWarning``. Outputs of the copy equal those of ``model`` in its
    current mode (to rounding)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    folded_model = copy.deepcopy(model)
    folder = _Folder(folded_model)
    folder.region(folded_model, "")
    folder.leftovers()
    report = folder.report

    if warn and (report.skipped or report.untraced):
        lines = [f"  {bn}: {reason}" for bn, reason in report.skipped]
        lines += [f"  not traced: {name} ({error}); {_SEQUENTIAL_RULE}"
                  for name, error in report.untraced]
        warnings.warn("fold_batchnorm left batch norm(s) in place or did not trace part of the model:\n"
                      + "\n".join(lines), UserWarning, stacklevel=2)
    folded_model.fold_report = report
    return (folded_model, report) if return_report else folded_model
