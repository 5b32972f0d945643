"""The one activation probe: forward hooks on chosen layers of a network, recording what flows through them.

>>> with ActivationProbe(model, nn.Linear, reduce="moments") as probe, torch.no_grad():
...     model(x)
>>> probe["1"]            # the records of the layer named "1" in model.named_modules(), one per forward call

Three ways to use one probe:

- as a context manager (above): hooks are registered on entry and removed on exit (also when the block
  raises); every forward call of a chosen layer inside the block is recorded (or every ``every``-th call);
- :meth:`ActivationProbe.capture`: one forward pass of a batch, without gradients, in a chosen mode, leaving
  the model as it was (buffers such as running statistics, train/eval flags, the global random state);
- as a ``callback`` of :func:`bnlib.lab.train.train` when given a probe batch ``probe_x``: every ``every``
  steps it captures the probe batch and appends the step to ``steps`` (:meth:`ActivationProbe.record` does
  it at any step, e.g. 0 before training).

Layers are chosen by instance, by name (as in ``model.named_modules()``), by type (or tuple of types), by a
predicate ``module -> bool``, by a mapping ``name -> module``, or by a list mixing instances, names and types.
What is recorded is the first positional input (``what='input'``, taken before the layer runs, so an in-place
layer cannot overwrite it), all positional inputs as a tuple (``what='inputs'``, e.g. ``(x, t)`` of a
per-time-step norm) or the output (``what='output'``). Tensors are detached; ``reduce`` turns them into
something smaller: a callable, or ``'rows'`` (:func:`rows`), ``'moments'`` (:func:`moments`), ``'shape'``;
:func:`percentiles` makes a percentile reducer.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ActivationProbe", "rows", "moments", "percentiles"]

_WHATS = ("input", "inputs", "output")
_MODES = ("train", "eval", None)


# ----------------------------------------------------------------------------------------------------------
# Reducers


def rows(t: Tensor) -> Tensor:
    """``(N, C)`` -> ``(N, C)``; ``(N, C, *spatial)`` -> ``(N * prod(spatial), C)``: one row per sample and
    position, one column per unit, as ``float32``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"activation: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"output: expected a tensor of shape (N, C, ...), got shape {tuple(t.shape)}")
    if t.dim() > 2:
        t = t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.float()


def moments(t: Tensor) -> Tensor:
    """Per unit mean and (biased) standard deviation over the rows of :func:`rows`: shape ``(2, units)``."""
    r = rows(t)
    return torch.stack([r.mean(0), r.std(0, unbiased=False)])


def percentiles(q: Sequence[float] = (15, 50, 85), unit: Optional[int] = None) -> Callable[[Tensor], Tensor]:
    """A reducer: the ``q`` percentiles (in percent) over the rows of :func:`rows`, of column ``unit`` (shape
    ``(len(q),)``) or of every unit (shape ``(len(q), units)``), on the CPU."""
    try:
        qs = [float(v) for v in q]
    except TypeError:
        raise TypeError(f"q: expected a sequence of percentages, got {type(q).__name__}") from None
    if not qs or not all(0 <= v <= 100 for v in qs):  # NaN fails too
        raise ValueError(f"q: expected percentages in [0, 100], got {list(q)!r}")
    if unit is not None and not _is_int(unit):
        raise TypeError(f"unit: expected an int or None, got {type(unit).__name__}")
    fractions = torch.tensor([v / 100.0 for v in qs])

    def reduce(t: Tensor) -> Tensor:
        r = rows(t)
        if unit is not None:
            r = r[:, unit]
        return torch.quantile(r.cpu(), fractions, dim=0)

    return reduce


_REDUCERS = {"rows": rows, "moments": moments, "shape": lambda t: t.shape}


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _detach(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _clone(value):
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _storages(value) -> set:
    if isinstance(value, Tensor):
        return {value.untyped_storage().data_ptr()}
    if isinstance(value, (tuple, list)):
        return set().union(*(_storages(v) for v in value)) if value else set()
    return set()


def _own(result, source_storages: set):
    """``result`` of a reducer, copied where it may still share memory with the module's tensors (a view, a
    ``.numpy()`` of a CPU tensor), so that later in-place operations of the network cannot change a record."""
    if isinstance(result, Tensor):
        return result.clone() if result.untyped_storage().data_ptr() in source_storages else result
    if isinstance(result, np.ndarray):
        return result.copy() if result.base is not None else result
    if isinstance(result, (tuple, list)):
        return type(result)(_own(v, source_storages) for v in result)
    return result


def _describe(layers) -> str:
    if isinstance(layers, type):
        return layers.__name__
    if isinstance(layers, tuple) and all(isinstance(t, type) for t in layers):
        return "(" + ", ".join(t.__name__ for t in layers) + ")"
    return repr(layers) if isinstance(layers, str) else type(layers).__name__


def _is_types(value) -> bool:
    return isinstance(value, type) or (isinstance(value, tuple) and len(value) > 0
                                       and all(isinstance(t, type) for t in value))


# ----------------------------------------------------------------------------------------------------------
# The probe


class ActivationProbe:
    """Forward hooks on chosen layers of ``model`` recording their inputs or outputs (see the module's doc).

    Arguments
        ``model``: the network (an ``nn.Module``); ``None`` only when ``layers`` gives the modules themselves
        (instances or a mapping name -> module) and the probe is used as a context manager.
        ``layers``: which modules to hook -- an instance, a name of ``model.named_modules()``, a type or tuple
        of types (every such submodule, in ``model.modules()`` order), a predicate ``module -> bool``, a
        mapping ``name -> module``, or a list of instances, names and types.
        ``what``: ``'input'`` (first positional input), ``'inputs'`` (the tuple of positional inputs) or
        ``'output'``.
        ``reduce``: ``None`` (keep a detached copy), a callable applied to the detached value, or ``'rows'``,
        ``'moments'``, ``'shape'``.
        ``every``: record every ``every``-th forward call of each layer (calls 0, every, 2 every, ...) inside
        a ``with`` block; as a training callback, probe at the steps divisible by ``every``.
        ``probe_x``: the fixed batch that :meth:`capture`, :meth:`record` and the callback run.
        ``mode``: the mode of those probe passes -- ``'train'`` (batch statistics, as during training, with
        dropout off), ``'eval'`` (running statistics), or ``None`` (the model's current mode).

    Results
        ``records[name]``: the list of recorded values of each layer (also ``probe[name]`` or
        ``probe[module]``); ``names``: the layers' names in order; ``steps``: the steps of :meth:`record`
        and of the callback; ``counts[name]``: forward calls seen (recorded or not).
    """

    def __init__(self, model: Optional[nn.Module], layers, *, what: str = "output",
                 reduce: Union[None, str, Callable[[Any], Any]] = None, every: int = 1,
                 probe_x: Optional[Tensor] = None, mode: Optional[str] = "train"):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module or None, got {type(model).__name__}")
        if not isinstance(what, str) or what not in _WHATS:
            raise ValueError(f"what: expected 'input', 'inputs' or 'output', got {what!r}")
        if isinstance(reduce, str):
            if reduce not in _REDUCERS:
                raise ValueError(f"reduce: expected None, a callable, 'rows', 'moments' or 'shape', got {reduce!r}")
            reduce = _REDUCERS[reduce]
        elif reduce is not None and not callable(reduce):
            raise TypeError(f"reduce: expected None, a callable, 'rows', 'moments' or 'shape', got "
                            f"{type(reduce).__name__}")
        if not _is_int(every) or every < 1:
            raise ValueError(f"every: expected a positive int, got {every!r}")
        if probe_x is not None and not isinstance(probe_x, Tensor):
            raise TypeError(f"probe_x: expected a torch.Tensor or None, got {type(probe_x).__name__}")
        if not (mode is None or (isinstance(mode, str) and mode in _MODES)):
            raise ValueError(f"mode: expected 'train', 'eval' or None, got {mode!r}")
        self.model, self.what, self.reduce, self.every = model, what, reduce, int(every)
        self.probe_x, self.mode = probe_x, mode
        self.modules: Dict[str, nn.Module] = self._select(layers)
        self.records: Dict[str, List[Any]] = {name: [] for name in self.modules}
        self.counts: Dict[str, int] = {name: 0 for name in self.modules}
        self.steps: List[int] = []
        self._handles: list = []
        self._hook_every = self.every

    # ---- choosing the layers

    def _select(self, layers) -> Dict[str, nn.Module]:
        model = self.model
        if isinstance(layers, Mapping):
            if not layers:
                raise ValueError("layers: expected at least one module to probe, got an empty mapping")
            for name, m in layers.items():
                if not isinstance(m, nn.Module):
                    raise TypeError(f"layers[{name!r}]: expected a torch.nn.Module, got {type(m).__name__}")
            return {str(name): m for name, m in layers.items()}
        items = list(layers) if isinstance(layers, list) or (isinstance(layers, tuple)
                                                              and not _is_types(layers)) else [layers]
        if not items:
            raise ValueError("layers: expected at least one module to probe, got an empty list")
        names_of = {}
        if model is not None:
            for name, m in model.named_modules():
                names_of.setdefault(id(m), name)
        chosen: Dict[str, nn.Module] = {}
        for k, item in enumerate(items):
            if isinstance(item, nn.Module):
                if model is None:
                    found = [(str(k), item)]
                elif id(item) in names_of:
                    found = [(names_of[id(item)], item)]
                else:
                    raise ValueError(f"layers: expected modules of model, got a {type(item).__name__} that is "
                                     f"not one of its submodules")
            elif isinstance(item, str) or _is_types(item) or callable(item):
                if model is None:
                    raise ValueError(f"model: expected the network to choose layers by name, type or "
                                     f"predicate in, got None (layers={_describe(item)})")
                if isinstance(item, str):
                    found = [(n, m) for n, m in model.named_modules() if n == item]
                elif _is_types(item):
                    found = [(n, m) for n, m in model.named_modules() if isinstance(m, item)]
                else:
                    found = [(n, m) for n, m in model.named_modules() if item(m)]
                if not found:
                    raise ValueError(f"layers: expected at least one module of model matching "
                                     f"{_describe(item)}, got none")
            else:
                raise TypeError(f"layers: expected a module, a name, a type, a predicate, a mapping name -> "
                                f"module or a list of these, got {type(item).__name__}")
            for name, m in found:
                if all(m is not other for other in chosen.values()):
                    chosen[name] = m
        return chosen

    @property
    def names(self) -> List[str]:
        """The probed layers' names, in order."""
        return list(self.modules)

    def __getitem__(self, key) -> List[Any]:
        """The records of a layer, by name or by module instance."""
        if isinstance(key, nn.Module):
            for name, m in self.modules.items():
                if m is key:
                    return self.records[name]
            raise KeyError(f"key: expected one of the probed modules, got a {type(key).__name__} that is not")
        if key not in self.records:
            raise KeyError(f"key: expected one of {self.names}, got {key!r}")
        return self.records[key]

    def last(self, key=None):
        """The latest record of a layer (``key``: name or module; may be left out when one layer is probed)."""
        if key is None:
            if len(self.modules) != 1:
                raise ValueError(f"key: expected a layer name when probing {len(self.modules)} layers "
                                 f"({self.names}), got None")
            key = self.names[0]
        values = self[key]
        if not values:
            raise ValueError(f"key: layer {key!r} has no record yet")
        return values[-1]

    def stacked(self, key=None):
        """All records of a layer stacked on a new first axis (``torch.stack`` or ``np.stack``)."""
        if key is None:
            if len(self.modules) != 1:
                raise ValueError(f"key: expected a layer name when probing {len(self.modules)} layers "
                                 f"({self.names}), got None")
            key = self.names[0]
        values = self[key]
        if values and all(isinstance(v, Tensor) for v in values):
            return torch.stack(values)
        return np.stack([np.asarray(v) for v in values])

    def clear(self) -> None:
        """Forget all records, counts and steps."""
        for name in self.modules:
            self.records[name] = []
            self.counts[name] = 0
        self.steps = []

    # ---- hooks

    def _store(self, name: str, value) -> None:
        self.records[name].append(value)

    def _keep(self, name: str, value) -> None:
        count = self.counts[name]
        self.counts[name] = count + 1
        if count % self._hook_every:
            return
        value = _detach(value)
        if self.reduce is None:
            kept = _clone(value)
        else:
            kept = _own(self.reduce(value), _storages(value))
        self._store(name, kept)

    def _register(self) -> None:
        if self._handles:
            raise RuntimeError("probe: already recording (its hooks are registered); exit the with block first")
        handles = []
        try:
            for name, m in self.modules.items():
                if self.what == "output":
                    handles.append(m.register_forward_hook(
                        lambda mod, inputs, output, name=name: self._keep(name, output)))
                elif self.what == "input":
                    handles.append(m.register_forward_pre_hook(
                        lambda mod, inputs, name=name: self._keep(name, inputs[0] if inputs else None)))
                else:
                    handles.append(m.register_forward_pre_hook(
                        lambda mod, inputs, name=name: self._keep(name, tuple(inputs))))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        self._handles = handles

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def __enter__(self) -> "ActivationProbe":
        self._register()
        return self

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    # ---- probe passes

    @contextlib.contextmanager
    def _probe_pass(self, model: nn.Module):
        """No gradients, the chosen mode, and afterwards the buffers, flags and global random state as they were."""
        flags = [(m, m.training) for m in model.modules()]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        devices = sorted({t.device.index or 0 for t in list(model.parameters()) + list(model.buffers())
                          if t.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                if self.mode is not None:
                    model.train(self.mode == "train")
                    if self.mode == "train":
                        for m in model.modules():
                            if isinstance(m, nn.modules.dropout._DropoutNd):
                                m.eval()
                yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, training in flags:
                m.training = training

    def capture(self, x: Optional[Tensor] = None) -> Dict[str, Any]:
        """One forward pass of ``x`` (default ``probe_x``) through ``model``, in ``mode``, without gradients,
        leaving the model as it was. Every forward call of a probed layer is recorded (``every`` is not
        applied within a pass); returns ``{name: latest record}`` of the layers that ran."""
        if self.model is None:
            raise ValueError("model: expected the network to run, got None (give it to ActivationProbe)")
        if x is None:
            x = self.probe_x
        if x is None:
            raise ValueError("x: expected a batch to run (or probe_x given to ActivationProbe), got None")
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        before = {name: len(values) for name, values in self.records.items()}
        self._hook_every = 1
        try:
            with self._probe_pass(self.model):
                self._register()
                try:
                    self.model(x)
                finally:
                    self._remove()
        finally:
            self._hook_every = self.every
        return {name: values[-1] for name, values in self.records.items() if len(values) > before[name]}

    def record(self, step: int, x: Optional[Tensor] = None) -> Dict[str, Any]:
        """:meth:`capture` and append ``step`` to ``steps`` (e.g. ``record(0)`` before training)."""
        if not _is_int(step):
            raise TypeError(f"step: expected an int, got {type(step).__name__}")
        out = self.capture(x)
        self.steps.append(int(step))
        return out

    def __call__(self, step: int, model: nn.Module, xb=None, yb=None) -> None:
        """The ``callback`` of :func:`bnlib.lab.train.train`: records ``probe_x`` at the steps divisible by
        ``every``."""
        if model is not self.model:
            raise ValueError(f"model: expected the network this probe was built for, got another "
                             f"{type(model).__name__}")
        if self.probe_x is None:
            raise ValueError("probe_x: expected a probe batch to use the probe as a training callback, got None")
        if step % self.every == 0:
            self.record(step)

    def __repr__(self) -> str:
        return (f"ActivationProbe({self.names}, what={self.what!r}, every={self.every}, mode={self.mode!r}, "
                f"records={sum(len(v) for v in self.records.values())})")
