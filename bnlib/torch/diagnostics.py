r"""Training diagnostics for any torch model: what flows through each layer, and how fast each weight moves.

Two tools a practitioner attaches to their own network (no change to the model, hooks removed afterwards):

- :class:`LayerStats` -- per chosen layer (by default every Linear/Conv layer and every activation), summaries
  of the forward activations and of the gradients flowing back into them: mean, standard deviation,
  the *saturation* fraction of a bounded activation (tanh: :math:`|y| > 0.97`; sigmoid the same on
  :math:`2y - 1`), the fraction of *dead* units of a ReLU (zero for every example and position of the batch),
  and a histogram with fixed bins, so histograms of different steps can be compared;
- :class:`UpdateRatio` -- the *update:data ratio* of each parameter tensor,
  :math:`\operatorname{std}(w_{t+1} - w_t) / \operatorname{std}(w_t)`, measured on the actual update the
  optimizer made (so it is right for momentum, Adam and weight decay, not only for plain SGD where it equals
  :func:`grad_data_ratios`, Karpathy's :math:`\mathrm{lr}\cdot\operatorname{std}(g)/\operatorname{std}(w)`).
  A rule of thumb (Karpathy, *makemore* part 3): around :math:`10^{-3}` per step; far below, the layer
  barely learns; far above, it is changing too fast to settle.

>>> stats, ratio = LayerStats(model), UpdateRatio(model)
>>> with stats:                                           # hooks on until the block ends
...     for step, (x, y) in enumerate(loader):
...         loss = F.cross_entropy(model(x), y)
...         opt.zero_grad(); loss.backward()
...         with ratio.around(step):                       # copy the weights, then compare after the step
...             opt.step()
>>> stats.table()                                         # one dict per layer: mean, std, saturated, dead, ...
>>> ratio.report()["log10"]                               # {parameter name: log10 ratio per measured step}

Both also fit a training loop with hooks, such as the book's ``bnlib.lab.train.train``:
``LayerStats`` is a ``before_step(step, model)`` hook that labels the records with the step, ``UpdateRatio``
has :meth:`UpdateRatio.before_step` (copy) and :meth:`UpdateRatio.callback` (compare) -- this module does not
import that loop.

How this relates to the book's activation probe (``bnlib.lab.probes.ActivationProbe``): the probe records raw
activations (or a chosen reduction) of chosen layers for the chapters' experiments; :class:`LayerStats` is the
practitioner's summary, small enough to keep for every step, and adds the backward direction. They share
nothing but the idea of forward hooks, so each stays simple.

Everything returned is plain Python: floats, dicts and NumPy arrays. :meth:`LayerStats.plot` and
:meth:`UpdateRatio.plot` draw the usual figures (matplotlib is imported only there).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .. import _checks

__all__ = ["LayerStats", "UpdateRatio", "DEFAULT_LAYERS", "saturation_fraction", "dead_fraction",
           "update_ratio", "grad_data_ratios"]

#: The layers :class:`LayerStats` watches by default: Linear and convolution layers (pre-activations) and the
#: common activation functions.
DEFAULT_LAYERS: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Tanh, nn.Sigmoid, nn.ReLU,
                                    nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU)

_SATURATING = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_RECTIFYING = (nn.ReLU, nn.ReLU6)
_FIXED_RANGE = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}


def _kind(module: nn.Module) -> Optional[str]:
    """'tanh', 'sigmoid', 'relu' or None: which of saturation / dead units applies to the layer's output."""
    for cls, kind in _SATURATING.items():
        if isinstance(module, cls):
            return kind
    if isinstance(module, _RECTIFYING):
        return "relu"
    return None


# ----------------------------------------------------------------------------------------------------------
# The reductions, as functions on a tensor


def saturation_fraction(y: Tensor, kind: str = "tanh", threshold: float = 0.97) -> float:
    """The fraction of the values of ``y`` in the flat tails of a bounded activation: ``|y| > threshold`` for
    ``kind='tanh'``, ``|2y - 1| > threshold`` for ``kind='sigmoid'`` (the same point of the curve, since
    ``2 sigmoid(x) - 1 = tanh(x / 2)``). At 0.97 the local slope is 6 % of its maximum."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y: expected a torch.Tensor, got {type(y).__name__}")
    if kind not in _FIXED_RANGE:
        raise ValueError(f"kind: expected 'tanh' or 'sigmoid', got {kind!r}")
    threshold = _checks.check_real("threshold", threshold, 0.0, 1.0, open_low=True, open_high=True)
    if y.numel() == 0:
        raise ValueError("y: expected a non-empty tensor, got 0 elements")
    u = y.detach().float()
    if kind == "sigmoid":
        u = 2.0 * u - 1.0
    return float((u.abs() > threshold).float().mean())


def dead_fraction(y: Tensor, unit_dim: int = 1) -> float:
    """The fraction of units (positions along ``unit_dim``: features of a Linear, channels of a convolution)
    whose value is exactly zero for every example and position of the batch -- a ReLU unit that passes no
    gradient on this batch."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y: expected a torch.Tensor, got {type(y).__name__}")
    if y.dim() < 1 or y.numel() == 0:
        raise ValueError(f"y: expected a non-empty tensor with a unit dimension, got shape {tuple(y.shape)}")
    dim = _unit_dim(unit_dim, y.dim())
    alive = (y.detach() != 0).movedim(dim, 0).reshape(y.shape[dim], -1).any(1)
    return float((~alive).float().mean())


def _unit_dim(unit_dim, ndim: int) -> int:
    _checks.check_int("unit_dim", unit_dim, -ndim, ndim - 1)
    return unit_dim % ndim


def _check_range(name: str, value) -> Optional[Tuple[float, float]]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name}: expected None or a pair (low, high), got {value!r}")
    low, high = (_checks.check_real(name, v, -math.inf) for v in value)
    if not low < high:
        raise ValueError(f"{name}: expected low < high, got {value!r}")
    return low, high


def _first_tensor(value) -> Optional[Tensor]:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


# ----------------------------------------------------------------------------------------------------------
# LayerStats

_Layers = Union[type, Tuple[type, ...], Callable[[nn.Module], bool], str, nn.Module, Iterable[Union[str, nn.Module]]]


class LayerStats:
    """Summaries of the activations and gradients of chosen layers of ``model``, per recorded forward call.

    Arguments
        ``model``: any ``nn.Module``.
        ``layers``: which submodules to watch -- a type or tuple of types (default :data:`DEFAULT_LAYERS`), a
        predicate ``module -> bool``, a name of ``model.named_modules()``, a submodule, or a list of names
        and submodules.
        ``bins``: number of histogram bins. The bins of a layer are fixed once: ``act_range`` /
        ``grad_range`` when given, (-1, 1) for tanh and (0, 1) for sigmoid outputs, otherwise
        ``(-m, m)`` with ``m`` the largest ``|value|`` of the layer's first record; values outside are counted
        in the end bins (``clipped`` says what fraction was).
        ``saturation``: the threshold of :func:`saturation_fraction` (0.97).
        ``unit_dim``: the axis of the units, for dead ReLUs (1: ``(N, C)`` and ``(N, C, H, W)``; -1 for
        ``(N, T, C)`` sequences).
        ``every``: record every ``every``-th forward call of each layer (calls 0, every, 2 every, ...).
        ``gradients``: also record the gradient of the loss with respect to each recorded output (a tensor
        hook on it; fires when backward runs while the stats are attached).
        ``grad_enabled_only``: record only forward calls made with gradients enabled (training steps), so an
        evaluation under ``torch.no_grad()`` in the middle of training is not mixed in; ``False`` records all.

    Use it as a context manager (``with stats: ...``) or call :meth:`attach` / :meth:`detach`. Calling the
    object as ``stats(step, model)`` (the signature of a ``before_step`` hook) sets the step number that the
    following records carry; without it a record's step is its forward call's number.

    Results (plain Python)
        ``records[name]``: one dict per recorded call with ``step``, ``shape``, ``mean``, ``std``,
        ``saturated`` (tanh/sigmoid layers, else None), ``dead`` (ReLU layers, else None), ``clipped``,
        ``hist`` (int64 counts, summing to the number of values) and, once backward ran, ``grad``: a dict
        with ``mean``, ``std``, ``clipped`` and ``hist``. ``edges[name]`` / ``grad_edges[name]``: bin edges.
        :meth:`report` stacks them into arrays, :meth:`table` gives one row per layer.
    """

    def __init__(self, model: nn.Module, layers: _Layers = DEFAULT_LAYERS, *, bins: int = 40,
                 act_range=None, grad_range=None, saturation: float = 0.97, unit_dim: int = 1, every: int = 1,
                 gradients: bool = True, grad_enabled_only: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.bins = _checks.check_int("bins", bins, 1)
        self.act_range = _check_range("act_range", act_range)
        self.grad_range = _check_range("grad_range", grad_range)
        self.saturation = _checks.check_real("saturation", saturation, 0.0, 1.0, open_low=True, open_high=True)
        self.unit_dim = _checks.check_int("unit_dim", unit_dim, -8, 7)
        self.every = _checks.check_int("every", every, 1)
        for name, flag in (("gradients", gradients), ("grad_enabled_only", grad_enabled_only)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__} {flag!r}")
        self.model, self.gradients, self.grad_enabled_only = model, gradients, grad_enabled_only
        self.modules: Dict[str, nn.Module] = _select(model, layers)
        self.kinds: Dict[str, Optional[str]] = {name: _kind(m) for name, m in self.modules.items()}
        self.step: Optional[int] = None
        self._handles: list = []
        self._pending: Dict[int, Any] = {}
        self.clear()

    # ---- bookkeeping

    @property
    def names(self) -> List[str]:
        """The watched layers' names (as in ``model.named_modules()``), in order."""
        return list(self.modules)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def clear(self) -> None:
        """Forget every record and the histograms' bins."""
        self.records: Dict[str, List[dict]] = {name: [] for name in self.modules}
        self.counts: Dict[str, int] = {name: 0 for name in self.modules}
        self.edges: Dict[str, np.ndarray] = {}
        self.grad_edges: Dict[str, np.ndarray] = {}

    def __call__(self, step: int, model: Optional[nn.Module] = None, *args) -> None:
        """Label the following records with ``step`` (a ``before_step(step, model)`` hook of a training loop)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step: expected an int, got {type(step).__name__} {step!r}")
        if model is not None and model is not self.model:
            raise ValueError(f"model: expected the network these stats were built for, got another "
                             f"{type(model).__name__}")
        self.step = int(step)

    # ---- hooks

    def attach(self) -> "LayerStats":
        """Register the forward hooks (and, per recorded call, a gradient hook on the output)."""
        if self._handles:
            raise RuntimeError("stats: already attached; detach() (or leave the with block) first")
        handles = []
        try:
            for name, m in self.modules.items():
                handles.append(m.register_forward_hook(
                    lambda mod, inputs, output, name=name: self._forward(name, output)))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        self._handles = handles
        return self

    def detach(self) -> None:
        """Remove every hook, including the gradient hooks of forward calls whose backward has not run."""
        handles, self._handles = self._handles, []
        pending, self._pending = self._pending, {}
        for h in handles + list(pending.values()):
            h.remove()

    def __enter__(self) -> "LayerStats":
        return self.attach()

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    def _forward(self, name: str, output) -> None:
        y = _first_tensor(output)
        if y is None or (self.grad_enabled_only and not torch.is_grad_enabled()):
            return
        call = self.counts[name]
        self.counts[name] = call + 1
        if call % self.every:
            return
        record = self._summarize(name, y.detach())
        record["call"] = call
        record["step"] = call if self.step is None else self.step
        self.records[name].append(record)
        if self.gradients and y.requires_grad and torch.is_grad_enabled():
            key = id(record)
            handle = y.register_hook(lambda g, name=name, record=record, key=key: self._backward(name, record,
                                                                                                 key, g))
            self._pending[key] = handle

    def _summarize(self, name: str, y: Tensor) -> dict:
        kind = self.kinds[name]
        yf = y.float()
        n = yf.numel()
        out = {"shape": tuple(y.shape), "saturated": None, "dead": None}
        if n == 0:
            out.update(mean=math.nan, std=math.nan, clipped=0.0, hist=np.zeros(self.bins, np.int64))
            return out
        vals = [yf.mean(), yf.std(unbiased=False)]
        if kind in ("tanh", "sigmoid"):
            u = yf if kind == "tanh" else 2.0 * yf - 1.0
            vals.append((u.abs() > self.saturation).float().mean())
        elif kind == "relu" and y.dim() >= 2:
            dim = self.unit_dim % y.dim()
            vals.append((~(y != 0).movedim(dim, 0).reshape(y.shape[dim], -1).any(1)).float().mean())
        numbers_ = torch.stack(vals).tolist()
        out["mean"], out["std"] = numbers_[0], numbers_[1]
        if kind in ("tanh", "sigmoid"):
            out["saturated"] = numbers_[2]
        elif kind == "relu" and y.dim() >= 2:
            out["dead"] = numbers_[2]
        if name not in self.edges:
            self.edges[name] = self._edges(yf, self.act_range or _FIXED_RANGE.get(kind))
        out["hist"], out["clipped"] = _histogram(yf, self.edges[name])
        return out

    def _edges(self, values: Tensor, fixed) -> np.ndarray:
        if fixed is None:
            m = float(values.abs().max()) if values.numel() else 0.0
            m = m if math.isfinite(m) and m > 0 else 1.0
            fixed = (-m, m)
        return np.linspace(fixed[0], fixed[1], self.bins + 1)

    def _backward(self, name: str, record: dict, key: int, grad: Tensor) -> None:
        self._pending.pop(key, None)
        g = grad.detach().float()
        if g.numel() == 0:
            return
        mean, std = torch.stack([g.mean(), g.std(unbiased=False)]).tolist()
        if name not in self.grad_edges:
            self.grad_edges[name] = self._edges(g, self.grad_range)
        hist, clipped = _histogram(g, self.grad_edges[name])
        record["grad"] = {"mean": mean, "std": std, "hist": hist, "clipped": clipped}

    # ---- results

    def report(self) -> Dict[str, dict]:
        """Per layer: ``{'type', 'kind', 'steps', 'activation': {...}, 'gradient': {...}}``, where
        ``activation`` holds arrays over the records (``mean``, ``std``, ``saturated``, ``dead``, ``clipped``;
        NaN where not applicable), ``hist`` of shape ``(records, bins)`` and ``edges``; ``gradient`` the same
        (``mean``, ``std``, ``clipped``, ``hist``, ``edges``) over the records whose backward ran, with their
        ``steps``."""
        out = {}
        for name, recs in self.records.items():
            entry = {"type": type(self.modules[name]).__name__, "kind": self.kinds[name],
                     "steps": np.array([r["step"] for r in recs], dtype=np.int64)}
            act = {key: np.array([np.nan if r[key] is None else r[key] for r in recs], dtype=np.float64)
                   for key in ("mean", "std", "saturated", "dead", "clipped")}
            act["hist"] = (np.stack([r["hist"] for r in recs]) if recs
                           else np.zeros((0, self.bins), np.int64))
            act["edges"] = self.edges.get(name)
            entry["activation"] = act
            grecs = [r for r in recs if "grad" in r]
            grad = {key: np.array([r["grad"][key] for r in grecs], dtype=np.float64)
                    for key in ("mean", "std", "clipped")}
            grad["hist"] = (np.stack([r["grad"]["hist"] for r in grecs]) if grecs
                            else np.zeros((0, self.bins), np.int64))
            grad["edges"] = self.grad_edges.get(name)
            grad["steps"] = np.array([r["step"] for r in grecs], dtype=np.int64)
            entry["gradient"] = grad
            out[name] = entry
        return out

    def table(self, record: int = -1) -> List[dict]:
        """One row per layer for record ``record`` of each layer (default the latest): ``layer``, ``type``,
        ``step``, ``mean``, ``std``, ``saturated``, ``dead``, ``grad_mean``, ``grad_std`` (None where not
        applicable or not recorded). Layers without records are left out."""
        _checks.check_int("record", record, -(2 ** 62))
        rows = []
        for name, recs in self.records.items():
            if not recs:
                continue
            try:
                r = recs[record]
            except IndexError:
                raise IndexError(f"record: expected an index into the {len(recs)} records of layer {name!r}, "
                                 f"got {record}") from None
            g = r.get("grad")
            rows.append({"layer": name, "type": type(self.modules[name]).__name__, "step": r["step"],
                         "mean": r["mean"], "std": r["std"], "saturated": r["saturated"], "dead": r["dead"],
                         "grad_mean": None if g is None else g["mean"], "grad_std": None if g is None else g["std"]})
        return rows

    def plot(self, which: str = "activation", record: int = -1, *, ax=None, layers: Optional[Sequence[str]] = None,
             labels: Optional[Dict[str, str]] = None, title: Optional[str] = None):
        """The histograms of record ``record`` of each layer (or of ``layers``), as density curves on one axis
        (matplotlib, imported here). ``which``: ``'activation'`` or ``'gradient'``; ``labels``: legend text per
        layer name (default: the name and the layer's type). Returns the axis."""
        if which not in ("activation", "gradient"):
            raise ValueError(f"which: expected 'activation' or 'gradient', got {which!r}")
        _checks.check_int("record", record, -(2 ** 62))
        names = self.names if layers is None else list(layers)
        for name in names:
            if name not in self.records:
                raise ValueError(f"layers: expected names among {self.names}, got {name!r}")
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        for name in names:
            recs = self.records[name] if which == "activation" else [r for r in self.records[name] if "grad" in r]
            if not recs:
                continue
            r = recs[record] if which == "activation" else recs[record]["grad"]
            edges = self.edges[name] if which == "activation" else self.grad_edges[name]
            width = np.diff(edges)
            density = r["hist"] / max(1, r["hist"].sum()) / width
            centres = 0.5 * (edges[1:] + edges[:-1])
            label = (labels or {}).get(name, f"{name} ({type(self.modules[name]).__name__})")
            if which == "activation" and r["saturated"] is not None:
                label += f": {100 * r['saturated']:.0f} % saturated"
            elif which == "activation" and r["dead"] is not None:
                label += f": {100 * r['dead']:.0f} % dead"
            ax.plot(centres, density, label=label)
        ax.set_xlabel("activation value" if which == "activation" else "gradient value (dloss/doutput)")
        ax.set_ylabel("density (1 / unit of the value)")
        ax.set_title(title or f"{which.capitalize()} histograms per layer")
        ax.legend(fontsize=8)
        return ax

    def __repr__(self) -> str:
        return (f"LayerStats({self.names}, records={sum(len(v) for v in self.records.values())}, "
                f"attached={self.attached})")


def _histogram(values: Tensor, edges: np.ndarray) -> Tuple[np.ndarray, float]:
    """Counts over ``edges`` (values beyond them go to the end bins) and the fraction that had to be clipped."""
    low, high = float(edges[0]), float(edges[-1])
    flat = torch.nan_to_num(values.reshape(-1), nan=0.0)  # +-inf land in the end bins (and count as clipped)
    clipped = float(((flat < low) | (flat > high)).float().mean())
    counts = torch.histc(flat.clamp(low, high), bins=len(edges) - 1, min=low, max=high)
    return counts.to(torch.int64).cpu().numpy(), clipped


def _select(model: nn.Module, layers) -> Dict[str, nn.Module]:
    def is_types(v):
        return isinstance(v, type) or (isinstance(v, tuple) and len(v) > 0 and all(isinstance(t, type) for t in v))

    named = list(model.named_modules())
    if is_types(layers):
        found = [(n, m) for n, m in named if isinstance(m, layers)]
        what = getattr(layers, "__name__", None) or "(" + ", ".join(t.__name__ for t in layers) + ")"
    elif isinstance(layers, (str, nn.Module)) or (isinstance(layers, (list, tuple)) and not is_types(layers)):
        items = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
        if not items:
            raise ValueError("layers: expected at least one layer, got an empty list")
        by_id = {}
        for n, m in named:
            by_id.setdefault(id(m), n)
        names = {n for n, _ in named}
        found = []
        for item in items:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"layers: expected names of model.named_modules(), got {item!r}")
                found.append((item, model.get_submodule(item) if item else model))
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"layers: expected submodules of model, got a {type(item).__name__} that "
                                     f"is not one")
                found.append((by_id[id(item)], item))
            else:
                raise TypeError(f"layers: expected names or modules in the list, got {type(item).__name__}")
        what = "the given list"
    elif callable(layers):
        found = [(n, m) for n, m in named if layers(m)]
        what = "the predicate"
    else:
        raise TypeError(f"layers: expected a type, a tuple of types, a predicate, a name, a module or a list of "
                        f"names and modules, got {type(layers).__name__}")
    chosen: Dict[str, nn.Module] = {}
    for n, m in found:
        if all(m is not other for other in chosen.values()):
            chosen[n] = m
    if not chosen:
        raise ValueError(f"layers: expected at least one module of model matching {what}, got none")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# Update ratios

_MEASURES = ("std", "rms")


def _spread(t: Tensor, measure: str) -> Tensor:
    t = t.detach().double()
    return t.std(unbiased=False) if measure == "std" else t.pow(2).mean().sqrt()


def update_ratio(before: Tensor, after: Tensor, measure: str = "std") -> float:
    """``std(after - before) / std(before)`` (``measure='std'``) or the same with root-mean-squares
    (``'rms'``, defined also for a tensor whose values are all equal, such as a batch norm's initial γ).
    NaN when the denominator is 0. Computed in float64."""
    if not isinstance(before, Tensor) or not isinstance(after, Tensor):
        raise TypeError(f"before, after: expected torch.Tensors, got {type(before).__name__}, "
                        f"{type(after).__name__}")
    if before.shape != after.shape:
        raise ValueError(f"after: expected the shape of before {tuple(before.shape)}, got {tuple(after.shape)}")
    if measure not in _MEASURES:
        raise ValueError(f"measure: expected 'std' or 'rms', got {measure!r}")
    den = float(_spread(before, measure))
    num = float(_spread(after.detach().double() - before.detach().double(), measure))
    return num / den if den > 0 else math.nan


def _select_params(model: nn.Module, params) -> Dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    if params == "weights":
        chosen = {n: p for n, p in named.items() if p.requires_grad and p.dim() >= 2}
    elif params == "all":
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    elif isinstance(params, str):
        raise ValueError(f"params: expected 'weights', 'all' or a list of parameter names, got {params!r}")
    else:
        try:
            names = list(params)
        except TypeError:
            raise TypeError(f"params: expected 'weights', 'all' or a list of parameter names, got "
                            f"{type(params).__name__}") from None
        for n in names:
            if n not in named:
                raise ValueError(f"params: expected names of model.named_parameters(), got {n!r}")
        chosen = {n: named[n] for n in names}
    if not chosen:
        raise ValueError(f"params: expected at least one parameter to watch, got none for {params!r}")
    return chosen


def grad_data_ratios(model: nn.Module, lr: float, params="weights", measure: str = "std") -> Dict[str, float]:
    """Karpathy's estimate of the update:data ratio from the current gradients, ``lr * std(grad) / std(w)``,
    per parameter (NaN for a parameter without ``.grad``). It is the actual ratio only for plain SGD without
    momentum or weight decay; :class:`UpdateRatio` measures the update itself."""
    lr = _checks.check_real("lr", lr, 0.0, open_low=True)
    if measure not in _MEASURES:
        raise ValueError(f"measure: expected 'std' or 'rms', got {measure!r}")
    out = {}
    for n, p in _select_params(model, params).items():
        if p.grad is None:
            out[n] = math.nan
            continue
        den = float(_spread(p, measure))
        out[n] = lr * float(_spread(p.grad, measure)) / den if den > 0 else math.nan
    return out


class UpdateRatio:
    """The update:data ratio of each watched parameter tensor at each measured step:
    ``std(w_after - w_before) / std(w_before)`` (:func:`update_ratio`).

    Arguments
        ``model``: any ``nn.Module``.
        ``params``: ``'weights'`` (default: trainable parameters with two or more dimensions, the matrices and
        kernels, as in Karpathy's plot), ``'all'`` (every trainable parameter) or a list of names of
        ``model.named_parameters()``.
        ``measure``: ``'std'`` (default) or ``'rms'`` (see :func:`update_ratio`).
        ``every``: with the training-loop hooks, measure only the steps divisible by ``every``.

    Use: :meth:`snapshot` before ``optimizer.step()`` and :meth:`measure` after it, or ``with
    ratio.around(step): optimizer.step()``; or, in a loop with hooks, :meth:`before_step` as
    ``before_step(step, model)`` and :meth:`callback` as ``callback(step, model, ...)``. The model is only read.

    Results: ``steps`` (the measured steps) and ``ratios[name]`` (one float per measured step);
    :meth:`report` gives them as arrays, with their log10.
    """

    def __init__(self, model: nn.Module, params="weights", *, measure: str = "std", every: int = 1):
        if measure not in _MEASURES:
            raise ValueError(f"measure: expected 'std' or 'rms', got {measure!r}")
        self.params: Dict[str, nn.Parameter] = _select_params(model, params)
        self.model, self.measure_kind = model, measure
        self.every = _checks.check_int("every", every, 1)
        self._before: Optional[Dict[str, Tensor]] = None
        self._step: Optional[int] = None
        self.clear()

    @property
    def names(self) -> List[str]:
        return list(self.params)

    def clear(self) -> None:
        """Forget every measurement."""
        self.steps: List[int] = []
        self.ratios: Dict[str, List[float]] = {n: [] for n in self.params}

    def snapshot(self, step: Optional[int] = None) -> None:
        """Copy the watched parameters (call it just before ``optimizer.step()``)."""
        if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral)):
            raise TypeError(f"step: expected an int or None, got {type(step).__name__} {step!r}")
        with torch.no_grad():
            self._before = {n: p.detach().clone() for n, p in self.params.items()}
        self._step = len(self.steps) if step is None else int(step)

    def measure(self) -> Dict[str, float]:
        """Compare the parameters with the last :meth:`snapshot`, append the ratios, and return them."""
        if self._before is None:
            raise RuntimeError("measure: expected a snapshot() before the optimizer step, got none")
        before, self._before = self._before, None
        out = {n: update_ratio(before[n], p, self.measure_kind) for n, p in self.params.items()}
        self.steps.append(self._step)
        for n, v in out.items():
            self.ratios[n].append(v)
        return out

    @contextlib.contextmanager
    def around(self, step: Optional[int] = None):
        """``with ratio.around(step): optimizer.step()`` -- :meth:`snapshot` before, :meth:`measure` after
        (not when the block raises)."""
        self.snapshot(step)
        yield self
        self.measure()

    def before_step(self, step: int, model: Optional[nn.Module] = None) -> None:
        """A ``before_step(step, model)`` hook: :meth:`snapshot` at the steps divisible by ``every``."""
        self._check_hook(step, model)
        if step % self.every == 0:
            self.snapshot(step)
        else:
            self._before = None

    def callback(self, step: int, model: Optional[nn.Module] = None, *args) -> None:
        """A ``callback(step, model, ...)`` hook run after the optimizer step: :meth:`measure` when
        :meth:`before_step` took a snapshot at this step."""
        self._check_hook(step, model)
        if self._before is not None and self._step == step:
            self.measure()

    def _check_hook(self, step, model) -> None:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step: expected an int, got {type(step).__name__} {step!r}")
        if model is not None and model is not self.model:
            raise ValueError(f"model: expected the network this UpdateRatio was built for, got another "
                             f"{type(model).__name__}")

    def report(self) -> Dict[str, Any]:
        """``{'steps': int array, 'ratio': {name: array}, 'log10': {name: array}}`` (log10 of 0 is -inf)."""
        ratio = {n: np.asarray(v, dtype=np.float64) for n, v in self.ratios.items()}
        with np.errstate(divide="ignore", invalid="ignore"):
            log = {n: np.log10(v) for n, v in ratio.items()}
        return {"steps": np.asarray(self.steps, dtype=np.int64), "ratio": ratio, "log10": log}

    def plot(self, *, ax=None, target: Optional[float] = 1e-3, title: Optional[str] = None,
             names: Optional[Sequence[str]] = None, labels: Optional[Dict[str, str]] = None):
        """log10 of the ratio against the step, one line per parameter (or per name in ``names``; ``labels``:
        legend text per name), with the rule-of-thumb ``target`` as a dashed line (matplotlib, imported here).
        Returns the axis."""
        if target is not None:
            target = _checks.check_real("target", target, 0.0, open_low=True)
        names = self.names if names is None else list(names)
        for n in names:
            if n not in self.ratios:
                raise ValueError(f"names: expected parameter names among {self.names}, got {n!r}")
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        rep = self.report()
        for n in names:
            ax.plot(rep["steps"], rep["log10"][n], label=(labels or {}).get(n, n), linewidth=1.2)
        if target is not None:
            ax.axhline(math.log10(target), color="black", linestyle="--", linewidth=1,
                       label=f"rule of thumb ({target:g})")
        ax.set_xlabel("training step")
        ax.set_ylabel("log10(update std / parameter std)")
        ax.set_title(title or "Update:data ratio per parameter")
        ax.legend(fontsize=8)
        return ax

    def __repr__(self) -> str:
        return f"UpdateRatio({self.names}, measure={self.measure_kind!r}, measured steps={len(self.steps)})"
