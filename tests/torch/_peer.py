"""The peer suite's machinery: PyTorch's own test samples for the normalization layers, run against bnlib.

PyTorch ships, inside its wheel, the samples its own test suite feeds every module and operator:
``torch.testing._internal.common_modules.module_db`` (one ``ModuleInfo`` per ``torch.nn`` module: constructor
and forward arguments, and arguments that must raise) and ``torch.testing._internal.common_methods_invocations
.op_db`` (one ``OpInfo`` per function: ``sample_inputs``, ``reference_inputs``, ``error_inputs``). This module
turns those samples into *cases*, each a comparison of bnlib with ``torch.nn`` (the reference) on one sample:

Module cases (``nn.<Name>-<sample>-...``), for each module sample, in training and in evaluation mode:

- ``{train,eval}-{f32,f64}-forward``: both modules built from the same constructor arguments, torch's
  parameters and buffers randomized and copied into bnlib's (``load_state_dict``); two forward passes: the
  outputs and every buffer (running statistics, ``num_batches_tracked``) after each pass are equal;
- ``{train,eval}-{f32,f64}-backward``: one forward, a random cotangent, the gradients of the input and of
  every parameter are equal;
- ``state`` (once per sample): same parameter and buffer names, state-dict keys, shapes and dtypes,
  ``load_state_dict(strict=True)`` works both ways, and ``repr`` is the same text;
- ``error<i>-...``: a module error input: bnlib raises an instance of the exception class torch raises, at
  the same stage (construction or forward).

Functional cases (``F.<name>-s<index>-<sample>-...``), for each ``OpInfo`` sample (the ``reference_inputs``,
which begin with the ``sample_inputs``):

- ``{f32,f64}-forward``: the output and the running statistics updated in place are equal;
- ``{f32,f64}-vjp``: the gradients of every differentiable argument for a random cotangent are equal;
- ``f64-gradcheck``, ``f64-gradgradcheck``: :func:`torch.autograd.gradcheck` / ``gradgradcheck`` of bnlib's
  function alone (samples of at most ``GRADCHECK_NUMEL`` values);
- ``f64-jvp``: forward-mode AD (:func:`torch.func.jvp`, random tangents for the differentiable arguments):
  output and tangent equal to torch's;
- ``f64-vmap``: :func:`torch.func.vmap` over a stack of three inputs of the sample's shape (``in_dims=0`` on
  the input only) equal to torch's under vmap; a sample on which torch's own function fails under vmap (or
  jvp) has no such case;
- ``error<i>-...``: an ``OpInfo`` error input: bnlib raises an instance of the exception class torch raises.

Not used: ``nn.functional.batch_norm``'s ``without_cudnn`` variant (the same samples; on CPU the same kernel)
and CUDA. Samples are made with a fixed seed per (module or function, dtype, mode), so case ids and data
are the same on every run.

``all_cases()`` lists the cases (importing PyTorch's test databases the first time; that import changes a
few process-wide settings, which are restored: hypothesis' profile, ``torch.backends``' frozen flags,
``torch._C.ScriptFunction.__call__``, warning filters and the environment). ``run_cases`` runs them outside
pytest and ``format_table`` prints the per-module / per-function counts (``python -m
tests.torch.test_peer_suite``).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import inspect
import os
import sys
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import bnlib.torch as bt
import bnlib.torch.functional as BF
from tests._numerics import assert_error_within

MODULE_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
                "InstanceNorm3d", "LayerNorm", "RMSNorm")
OP_NAMES = ("batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm")
DTYPES = {"f32": torch.float32, "f64": torch.float64}
#: (rtol, atol) for float64 results (float32 ones are judged against a float64 truth, see assert_close).
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-7, 1e-9)}
#: gradcheck, gradgradcheck, jvp and vmap only for samples of at most this many input values (all of
#: ``sample_inputs``; the larger ``reference_inputs`` of group_norm get forward and vjp only).
GRADCHECK_NUMEL = 1000
VMAP_BATCH = 3


# --------------------------------------------------------------------------------------------------------
# PyTorch's test databases, imported without leaving their process-wide side effects behind
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _preserved_process_state():
    """Restore what importing ``torch.testing._internal.common_utils`` changes for the whole process."""
    hypothesis = sys.modules.get("hypothesis")
    if hypothesis is None:
        try:
            import hypothesis
        except ImportError:  # pragma: no cover (hypothesis is a test dependency)
            hypothesis = None
    profile = getattr(hypothesis.settings, "_current_profile", None) if hypothesis else None
    frozen = torch.backends.flags_frozen()
    script_calls = (torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__)
    filters = list(warnings.filters)
    environ = dict(os.environ)
    try:
        yield
    finally:
        if hypothesis is not None and profile is not None:
            hypothesis.settings.load_profile(profile)
        if not frozen:  # (torch.backends is a module wrapper: the flag lives in its functions' globals)
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = script_calls
        warnings.filters[:] = filters
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)


@functools.lru_cache(maxsize=None)
def torch_dbs():
    """``({name: ModuleInfo}, {name: OpInfo})`` for the modules and functions compared here."""
    with _preserved_process_state():
        from torch.testing._internal.common_methods_invocations import op_db
        from torch.testing._internal.common_modules import module_db
    modules = {m.module_cls.__name__: m for m in module_db
               if m.module_cls.__module__.startswith("torch.nn.") and m.module_cls.__name__ in MODULE_NAMES}
    ops = {o.name.rsplit(".", 1)[1]: o for o in op_db
           if o.name.startswith("nn.functional.") and o.name.rsplit(".", 1)[1] in OP_NAMES
           and o.variant_test_name == ""}
    return modules, ops


def _seed(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


@contextlib.contextmanager
def _seeded(*parts):
    """The global RNG seeded from ``parts``, restored afterwards (other tests' random streams stay as they
    were)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(*parts))
        yield


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def _clone(obj):
    """Tensors in ``obj`` (nested lists, tuples, dicts) copied, ``requires_grad`` kept."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _to(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(dtype).requires_grad_(obj.requires_grad) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, dtype) for k, v in obj.items()}
    return obj


def assert_close(actual, expected, dtype, what: str, truth=None, floor=None) -> None:
    """``actual`` (bnlib) equals ``expected`` (torch), NaNs in the same places. float64: to ``TOLERANCES``.
    float32 with a ``truth`` (torch in float64 on the same, rounded, inputs): bnlib's error against the truth
    is at most a few times torch's own, plus a few ulps (:func:`tests._numerics.assert_error_within`: the
    project's rule, since a fixed float32 tolerance tuned on one processor fails on another) of the larger of
    ``max|truth|`` and ``floor`` (for gradients: the cotangent's size, the natural unit of a gradient that
    nearly cancels, such as layer norm's over two values)."""
    if expected is None or actual is None:
        assert (actual is None) == (expected is None), f"{what}: bnlib gave {type(actual).__name__}, torch " \
                                                       f"{type(expected).__name__}"
        return
    assert isinstance(actual, torch.Tensor), f"{what}: bnlib gave a {type(actual).__name__}, not a tensor"
    assert (actual.shape, actual.dtype) == (expected.shape, expected.dtype), \
        f"{what}: bnlib gave {tuple(actual.shape)} {actual.dtype}, torch {tuple(expected.shape)} {expected.dtype}"
    if truth is None or dtype == torch.float64:
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
        return
    a, e, t = (v.detach() for v in (actual, expected, truth))
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN in different places (bnlib {int(a.isnan().sum())}, " \
                                              f"torch {int(e.isnan().sum())} of {a.numel()})"
    keep = ~(e.isnan() | t.isnan())
    scale = float(t[keep].abs().max()) if keep.any() else 0.0
    assert_error_within(a[keep], e[keep], t[keep], what=what, scale=max(scale, floor or 0.0))


def _grads(out, inputs, cotangent):
    return torch.autograd.grad(out, inputs, cotangent, allow_unused=True, materialize_grads=True)


def _shape_text(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"


def _value_text(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "x".join(_value_text(x) for x in v) or "()"
    return str(v)


_SHORT = {"running_mean": "rm", "running_var": "rv", "weight": "w", "bias": "b", "normalized_shape": "ns",
          "num_groups": "G", "momentum": "mom", "use_input_stats": "uis", "eps": "eps", "training": "training"}


def _describe_call(fn: Callable, input: torch.Tensor, args: Sequence, kwargs: dict) -> str:
    """``3x2x4-rm-rv-w-b-eval-mom-1.2``: the input's shape, then each argument given (tensors by name)."""
    params = list(inspect.signature(fn).parameters)[1:]
    given = dict(zip(params, args))
    given.update(kwargs)
    parts = [_shape_text(input)]
    for name in params:
        if name not in given or given[name] is None:
            continue
        v = given[name]
        short = _SHORT.get(name, name)
        if isinstance(v, torch.Tensor):
            parts.append(short if v.shape == input.shape[1:2] or name in ("weight", "bias")
                         else f"{short}{_shape_text(v)}")
        elif name == "training":
            parts.append("train" if v else "eval")
        else:
            parts.append(f"{short}{_value_text(v)}")
    return "-".join(parts)


@dataclass
class Case:
    """One comparison; ``run()`` raises (AssertionError or bnlib's exception) when bnlib differs from torch."""

    id: str
    group: str   # "nn.BatchNorm1d" or "F.batch_norm"
    kind: str    # "module" or "functional"
    check: str   # forward, backward, state, error, vjp, gradcheck, gradgradcheck, jvp, vmap
    fn: Callable[[], None] = field(repr=False)

    def run(self) -> None:
        with _seeded("run", self.id), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.fn()


# --------------------------------------------------------------------------------------------------------
# module cases
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _module_samples(name: str, training: bool) -> tuple:
    info = torch_dbs()[0][name]
    with _seeded("module", name, training):
        return tuple(info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                             training=training))


def _randomize(m: torch.nn.Module) -> None:
    """Parameters and running statistics away from their initial values (so that copying matters)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.5)
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.5)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(3)


def _module_pair(name: str, ctor, dtype, training: bool):
    """``(torch's, bnlib's, truth)``: the two modules with the same (randomized) state, and for float32 a
    float64 copy of torch's (``None`` for float64)."""
    torch_m = getattr(torch.nn, name)(*ctor.args, **ctor.kwargs).to(dtype)
    _randomize(torch_m)
    bnlib_m = getattr(bt, name)(*ctor.args, **ctor.kwargs).to(dtype)
    bnlib_m.load_state_dict(torch_m.state_dict())
    truth_m = copy.deepcopy(torch_m).double() if dtype != torch.float64 else None
    for m in (torch_m, bnlib_m, truth_m):
        if m is not None:
            m.train(training)
    return torch_m, bnlib_m, truth_m


def _module_forward(name, ctor, x, dtype, training):
    torch_m, bnlib_m, truth_m = _module_pair(name, ctor, dtype, training)
    for step in range(2):
        y_t = torch_m(*_clone(x))
        y_b = bnlib_m(*_clone(x))
        y_64 = truth_m(*_to(_clone(x), torch.float64)) if truth_m is not None else None
        assert_close(y_b, y_t, dtype, f"output (forward {step + 1})", y_64)
        sd_t, sd_b = torch_m.state_dict(), bnlib_m.state_dict()
        sd_64 = truth_m.state_dict() if truth_m is not None else {}
        assert list(sd_t) == list(sd_b), f"state-dict keys: {list(sd_b)} (bnlib) vs {list(sd_t)} (torch)"
        for key, b_t in sd_t.items():
            b_b = sd_b[key]
            if not b_t.is_floating_point():
                assert torch.equal(b_b, b_t), f"{key} after forward {step + 1}: {b_b} (bnlib) vs {b_t} (torch)"
            else:
                assert_close(b_b, b_t, dtype, f"{key} after forward {step + 1}", sd_64.get(key))


def _module_backward(name, ctor, x, dtype, training):
    torch_m, bnlib_m, truth_m = _module_pair(name, ctor, dtype, training)
    names = [n for n, _ in torch_m.named_parameters()]
    assert names == [n for n, _ in bnlib_m.named_parameters()], "parameter names differ"
    runs = [(torch_m, _clone(x)), (bnlib_m, _clone(x))]
    if truth_m is not None:
        runs.append((truth_m, _to(_clone(x), torch.float64)))
    ys = [m(*xs) for m, xs in runs]
    dy = torch.randn_like(ys[0])
    grads = [_grads(y, [t for t in xs if isinstance(t, torch.Tensor)] + list(m.parameters()), dy.to(y.dtype))
             for y, (m, xs) in zip(ys, runs)]
    truth = ys[2] if truth_m is not None else None
    assert_close(ys[1], ys[0], dtype, "output", truth)
    labels = ["gradient of the input"] * (len(grads[0]) - len(names)) + [f"gradient of {n}" for n in names]
    for k, label in enumerate(labels):
        assert_close(grads[1][k], grads[0][k], dtype, label, grads[2][k] if truth_m is not None else None,
                     floor=float(dy.abs().max()) if dy.numel() else None)


def _module_state(name, ctor):
    torch_m, bnlib_m, _ = _module_pair(name, ctor, torch.float64, True)
    sd_t, sd_b = torch_m.state_dict(), bnlib_m.state_dict()
    assert list(sd_t) == list(sd_b), f"state-dict keys: {list(sd_b)} (bnlib) vs {list(sd_t)} (torch)"
    for key in sd_t:
        assert (sd_t[key].shape, sd_t[key].dtype) == (sd_b[key].shape, sd_b[key].dtype), \
            f"{key}: {tuple(sd_b[key].shape)} {sd_b[key].dtype} (bnlib) vs {tuple(sd_t[key].shape)} " \
            f"{sd_t[key].dtype} (torch)"
    assert [n for n, _ in torch_m.named_buffers()] == [n for n, _ in bnlib_m.named_buffers()], "buffer names"
    fresh_t = getattr(torch.nn, name)(*ctor.args, **ctor.kwargs)
    fresh_t.load_state_dict(sd_b, strict=True)
    fresh_b = getattr(bt, name)(*ctor.args, **ctor.kwargs)
    fresh_b.load_state_dict(sd_t, strict=True)
    assert repr(bnlib_m) == repr(torch_m), f"repr: {bnlib_m!r} (bnlib) vs {torch_m!r} (torch)"


def _raise_stage(build: Callable, forward: Callable) -> Tuple[Optional[BaseException], str]:
    """``(exception or None, stage)``: what building then calling the module raised, and where."""
    try:
        m = build()
    except Exception as e:  # noqa: BLE001 (any exception is a result here)
        return e, "construction"
    try:
        forward(m)
    except Exception as e:  # noqa: BLE001
        return e, "forward"
    return None, "none"


def _module_error(name, err):
    mi = err.module_error_input
    ctor, fwd = mi.constructor_input, mi.forward_input

    def forward(m):
        m.train()
        m(*_clone(fwd.args), **_clone(fwd.kwargs))

    e_t, stage_t = _raise_stage(lambda: getattr(torch.nn, name)(*ctor.args, **ctor.kwargs), forward)
    assert e_t is not None, "torch raised nothing (the sample is stale)"
    e_b, stage_b = _raise_stage(lambda: getattr(bt, name)(*ctor.args, **ctor.kwargs), forward)
    assert e_b is not None, f"bnlib raised nothing; torch raised {type(e_t).__name__} at {stage_t}: {e_t}"
    assert isinstance(e_b, type(e_t)), \
        f"bnlib raised {type(e_b).__name__} ({e_b}), torch {type(e_t).__name__} ({e_t})"
    assert stage_b == stage_t, f"bnlib raised at {stage_b}, torch at {stage_t} ({type(e_t).__name__}: {e_t})"


def _unique(ids: List[str]) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for i in ids:
        n = seen.get(i, 0)
        seen[i] = n + 1
        out.append(i if n == 0 else f"{i}#{n}")
    return out


def module_cases() -> List[Case]:
    modules, _ = torch_dbs()
    cases = []
    for name in MODULE_NAMES:
        info = modules[name]
        group = f"nn.{name}"
        samples = {tr: _module_samples(name, tr) for tr in (True, False)}
        descs = _unique([s.desc or "default" for s in samples[True]])
        for i, desc in enumerate(descs):
            for training in (True, False):
                sample = samples[training][i]
                mode = "train" if training else "eval"
                for tag, dtype in DTYPES.items():
                    x = _to(sample.forward_input.args, dtype)
                    ctor = sample.constructor_input
                    for check, impl in (("forward", _module_forward), ("backward", _module_backward)):
                        cases.append(Case(f"{group}-{desc}-{mode}-{tag}-{check}", group, "module", check,
                                          functools.partial(impl, name, ctor, x, dtype, training)))
            cases.append(Case(f"{group}-{desc}-state", group, "module", "state",
                              functools.partial(_module_state, name, samples[True][i].constructor_input)))
        if info.module_error_inputs_func is not None:
            with _seeded("module-error", name):
                errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                                       requires_grad=False, training=True)
            for i, err in enumerate(errors):
                ci = err.module_error_input.constructor_input
                args = "-".join([_value_text(a) for a in ci.args]
                                + [f"{k}{_value_text(v)}" for k, v in ci.kwargs.items()])
                cases.append(Case(f"{group}-error{i}-{args}", group, "module", "error",
                                  functools.partial(_module_error, name, err)))
    return cases


# --------------------------------------------------------------------------------------------------------
# functional cases
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _op_samples(name: str, dtype: torch.dtype) -> tuple:
    op = torch_dbs()[1][name]
    with _seeded("op", name, dtype):
        return tuple(op.reference_inputs("cpu", dtype, requires_grad=True))


def _torch_fn(name):
    return getattr(torch.nn.functional, name)


def _bnlib_fn(name):
    return getattr(BF, name)


def _diff_slots(sample) -> List[Tuple[str, object]]:
    """Where the differentiable tensors are: ``("input", None)``, ``("args", i)``, ``("kwargs", key)``."""
    slots = [("input", None)]
    slots += [("args", i) for i, a in enumerate(sample.args) if isinstance(a, torch.Tensor) and a.requires_grad]
    slots += [("kwargs", k) for k, v in sample.kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    return slots


class _Call:
    """A sample made callable: fresh copies of its tensors (running statistics are updated in place;
    ``dtype``: converted, for the float64 truth of a float32 sample), and a function of its differentiable
    tensors only (for gradcheck, jvp)."""

    def __init__(self, sample, dtype=None):
        self.input = _clone(sample.input)
        self.args = list(_clone(tuple(sample.args)))
        self.kwargs = _clone(dict(sample.kwargs))
        if dtype is not None:
            self.input, self.args, self.kwargs = _to(self.input, dtype), _to(self.args, dtype), _to(self.kwargs, dtype)
        self.slots = _diff_slots(sample)

    def diff(self) -> List[torch.Tensor]:
        return [self._get(s) for s in self.slots]

    def _get(self, slot):
        where, key = slot
        return self.input if where == "input" else (self.args[key] if where == "args" else self.kwargs[key])

    def stats(self) -> List[torch.Tensor]:
        """The tensors updated in place (running statistics): non-differentiable tensor arguments."""
        ts = [a for a in self.args if isinstance(a, torch.Tensor) and not a.requires_grad]
        return ts + [v for v in self.kwargs.values() if isinstance(v, torch.Tensor) and not v.requires_grad]

    def call(self, fn, *diff):
        """``fn`` on the sample, with ``diff`` (if given) in place of the differentiable tensors."""
        if not diff:
            return fn(self.input, *self.args, **self.kwargs)
        x, args, kwargs = self.input, list(self.args), dict(self.kwargs)
        for (where, key), t in zip(self.slots, diff):
            if where == "input":
                x = t
            elif where == "args":
                args[key] = t
            else:
                kwargs[key] = t
        return fn(x, *args, **kwargs)


def _calls(sample, dtype):
    """``(torch's, bnlib's, truth's)`` calls of the sample (truth: torch in float64, for float32 only)."""
    return _Call(sample), _Call(sample), (_Call(sample, torch.float64) if dtype != torch.float64 else None)


def _op_forward(name, sample, dtype):
    c_t, c_b, c_64 = _calls(sample, dtype)
    with torch.no_grad():
        y_t = c_t.call(_torch_fn(name))
        y_b = c_b.call(_bnlib_fn(name))
        y_64 = c_64.call(_torch_fn(name)) if c_64 else None
    assert_close(y_b, y_t, dtype, "output", y_64)
    stats_64 = c_64.stats() if c_64 else [None] * len(c_t.stats())
    for i, (s_b, s_t, s_64) in enumerate(zip(c_b.stats(), c_t.stats(), stats_64)):
        assert_close(s_b, s_t, dtype, f"running statistic {i} after the call", s_64)


def _op_vjp(name, sample, dtype):
    c_t, c_b, c_64 = _calls(sample, dtype)
    calls = [(c, fn) for c, fn in ((c_t, _torch_fn(name)), (c_b, _bnlib_fn(name)), (c_64, _torch_fn(name))) if c]
    ys = [c.call(fn) for c, fn in calls]
    dy = torch.randn_like(ys[0])
    grads = [_grads(y, c.diff(), dy.to(y.dtype)) for y, (c, _) in zip(ys, calls)]
    truth = (lambda k: grads[2][k]) if c_64 else (lambda k: None)
    assert_close(ys[1], ys[0], dtype, "output", ys[2] if c_64 else None)
    for k, slot in enumerate(c_t.slots):
        label = "input" if slot[0] == "input" else slot[1]
        assert_close(grads[1][k], grads[0][k], dtype, f"gradient of {label}", truth(k),
                     floor=float(dy.abs().max()) if dy.numel() else None)


def _op_gradcheck(name, sample, second: bool):
    c = _Call(sample)
    fn = functools.partial(c.call, _bnlib_fn(name))
    check = torch.autograd.gradgradcheck if second else torch.autograd.gradcheck
    assert check(fn, tuple(c.diff()), raise_exception=True)


def _op_jvp(name, sample, dtype):
    c_t, c_b = _Call(sample), _Call(sample)
    primals = tuple(t.detach() for t in c_t.diff())
    tangents = tuple(torch.randn_like(p) for p in primals)
    y_t, jy_t = torch.func.jvp(functools.partial(c_t.call, _torch_fn(name)), primals, tangents)
    y_b, jy_b = torch.func.jvp(functools.partial(c_b.call, _bnlib_fn(name)), _clone(primals), _clone(tangents))
    assert_close(y_b, y_t, dtype, "output")
    assert_close(jy_b, jy_t, dtype, "tangent of the output")


def _stacked_input(sample) -> torch.Tensor:
    x = sample.input.detach()
    with _seeded("vmap-stack", tuple(x.shape)):
        rest = [torch.randn_like(x) for _ in range(VMAP_BATCH - 1)]
    return torch.stack([x] + rest)


def _vmap_call(c: _Call, fn, xs):
    return torch.func.vmap(lambda x: c.call(fn, *([x] + [t.detach() for t in c.diff()[1:]])))(xs)


def _op_vmap(name, sample, dtype):
    xs = _stacked_input(sample)
    c_t, c_b = _Call(sample), _Call(sample)
    y_t = _vmap_call(c_t, _torch_fn(name), xs.clone())
    y_b = _vmap_call(c_b, _bnlib_fn(name), xs.clone())
    assert_close(y_b, y_t, dtype, "output under vmap")
    for i, (s_b, s_t) in enumerate(zip(c_b.stats(), c_t.stats())):
        assert_close(s_b, s_t, dtype, f"running statistic {i} after the call")


def _torch_supports(check: str, name: str, sample) -> bool:
    """Whether torch's own function runs ``check`` (vmap, jvp) on the sample; cases only where it does."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = _Call(sample)
            if check == "vmap":
                _vmap_call(c, _torch_fn(name), _stacked_input(sample))
            else:
                primals = tuple(t.detach() for t in c.diff())
                torch.func.jvp(functools.partial(c.call, _torch_fn(name)), primals,
                               tuple(torch.zeros_like(p) for p in primals))
    except Exception:  # noqa: BLE001
        return False
    return True


def _op_error(name, err):
    si = err.sample_input
    try:
        _torch_fn(name)(_clone(si.input), *_clone(tuple(si.args)), **_clone(dict(si.kwargs)))
    except Exception as e:  # noqa: BLE001
        e_t = e
    else:
        raise AssertionError("torch raised nothing (the sample is stale)")
    try:
        _bnlib_fn(name)(_clone(si.input), *_clone(tuple(si.args)), **_clone(dict(si.kwargs)))
    except Exception as e:  # noqa: BLE001
        assert isinstance(e, type(e_t)), \
            f"bnlib raised {type(e).__name__} ({e}), torch {type(e_t).__name__} ({e_t})"
    else:
        raise AssertionError(f"bnlib raised nothing; torch raised {type(e_t).__name__}: {e_t}")


#: functional samples that exist but are not compared: (function, reason)
NOT_APPLICABLE: Dict[str, int] = {}


def functional_cases() -> List[Case]:
    _, ops = torch_dbs()
    cases = []
    NOT_APPLICABLE.clear()
    for name in OP_NAMES:
        op = ops[name]
        group = f"F.{name}"
        s32, s64 = _op_samples(name, torch.float32), _op_samples(name, torch.float64)
        descs = [_describe_call(_torch_fn(name), s.input, s.args, s.kwargs) for s in s64]
        for i, desc in enumerate(descs):
            base = f"{group}-s{i:02d}-{desc}"
            for tag, samples in (("f32", s32), ("f64", s64)):
                dtype = DTYPES[tag]
                cases.append(Case(f"{base}-{tag}-forward", group, "functional", "forward",
                                  functools.partial(_op_forward, name, samples[i], dtype)))
                cases.append(Case(f"{base}-{tag}-vjp", group, "functional", "vjp",
                                  functools.partial(_op_vjp, name, samples[i], dtype)))
            sample = s64[i]
            if sample.input.numel() > GRADCHECK_NUMEL:
                continue
            cases.append(Case(f"{base}-f64-gradcheck", group, "functional", "gradcheck",
                              functools.partial(_op_gradcheck, name, sample, False)))
            cases.append(Case(f"{base}-f64-gradgradcheck", group, "functional", "gradgradcheck",
                              functools.partial(_op_gradcheck, name, sample, True)))
            for check, impl in (("jvp", _op_jvp), ("vmap", _op_vmap)):
                if _torch_supports(check, name, sample):
                    cases.append(Case(f"{base}-f64-{check}", group, "functional", check,
                                      functools.partial(impl, name, sample, torch.float64)))
                else:
                    NOT_APPLICABLE[group] = NOT_APPLICABLE.get(group, 0) + 1
        if op.error_inputs_func is not None:
            with _seeded("op-error", name):
                errors = list(op.error_inputs("cpu"))
            for i, err in enumerate(errors):
                si = err.sample_input
                desc = _describe_call(_torch_fn(name), si.input, si.args, si.kwargs)
                cases.append(Case(f"{group}-error{i}-{desc}", group, "functional", "error",
                                  functools.partial(_op_error, name, err)))
    return cases


@functools.lru_cache(maxsize=None)
def _all_cases() -> Tuple[Case, ...]:
    cases = module_cases() + functional_cases()
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids), "duplicate case ids"
    return tuple(cases)


def all_cases() -> List[Case]:
    return list(_all_cases())


# --------------------------------------------------------------------------------------------------------
# expected failures, running outside pytest, the count table
# --------------------------------------------------------------------------------------------------------
def known_reason(case_id: str, known: Dict[str, str]) -> Optional[str]:
    """The reason of the first pattern (``fnmatch``, case-sensitive) in ``known`` that matches ``case_id``."""
    for pattern, reason in known.items():
        if fnmatch.fnmatchcase(case_id, pattern):
            return reason
    return None


def _failure_text(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def run_cases(cases: Sequence[Case]) -> Dict[str, Optional[str]]:
    """``{case id: None (passed) or a one-line failure}``."""
    results = {}
    for case in cases:
        try:
            case.run()
        except Exception as e:  # noqa: BLE001
            results[case.id] = _failure_text(e)
        else:
            results[case.id] = None
    return results


DESIGN = "by design"


def is_design(reason: Optional[str]) -> bool:
    """A known failure whose reason starts with "by design": a deliberate difference (bnlib rejects an argument
    torch computes with), left out of the pass-rate denominators."""
    return bool(reason) and reason.startswith(DESIGN)


def rates(cases: Sequence[Case], known: Dict[str, str], kind: str) -> Tuple[int, int, int, int]:
    """``(passing, by design, other known failures, total)`` among the ``kind`` cases, counted from the table
    (with strict xfail every case not listed passes, every listed one fails)."""
    p = d = x = t = 0
    for case in cases:
        if case.kind != kind:
            continue
        reason = known_reason(case.id, known)
        t += 1
        if reason is None:
            p += 1
        elif is_design(reason):
            d += 1
        else:
            x += 1
    return p, d, x, t


def format_table(cases: Sequence[Case], results: Dict[str, Optional[str]], known: Dict[str, str],
                 title: str = "") -> str:
    """Per module / function: cases passed, failed by design (listed, "by design: ..."), failed and listed as
    known otherwise (xfail), failed unexpectedly, total; the pass rates (raw, and without the by-design
    cases); per check; and the failures grouped by their first line."""
    head = f"{'pass':>6s} {'design':>6s} {'xfail':>6s} {'fail':>6s} {'total':>6s}"
    rows: Dict[str, List[int]] = {}
    per_check: Dict[Tuple[str, str], List[int]] = {}
    kinds: Dict[str, List[int]] = {"module": [0] * 5, "functional": [0] * 5}
    groups: Dict[Tuple[str, str], List[str]] = {}
    for case in cases:
        if case.id not in results:
            continue
        failure = results[case.id]
        reason = known_reason(case.id, known)
        col = 0 if failure is None else (1 if is_design(reason) else (2 if reason else 3))
        for counts in (rows.setdefault(case.group, [0] * 5),
                       per_check.setdefault((case.kind, case.check), [0] * 5), kinds[case.kind]):
            counts[col] += 1
            counts[4] += 1
        if failure is not None:
            groups.setdefault((case.check, failure), []).append(case.id)
    out = [title] if title else []
    out.append(f"bnlib from {os.path.dirname(os.path.dirname(bt.__file__))}, torch {torch.__version__}")
    out.append("")
    out.append(f"{'module / function':22s} {head}")
    for group, c in rows.items():
        out.append(f"{group:22s} " + " ".join(f"{n:6d}" for n in c))
    for kind, c in kinds.items():
        if c[4]:
            rate = 100.0 * c[0] / c[4]
            rate_nd = 100.0 * c[0] / max(c[4] - c[1], 1)
            out.append(f"{'all ' + kind:22s} " + " ".join(f"{n:6d}" for n in c)
                       + f"   pass rate {rate:.1f}% ({rate_nd:.1f}% without by-design)")
    out.append("")
    out.append(f"{'kind / check':22s} {head}")
    for (kind, check), c in per_check.items():
        out.append(f"{kind[:4] + ' ' + check:22s} " + " ".join(f"{n:6d}" for n in c))
    if NOT_APPLICABLE:
        out.append("")
        out.append("samples without a jvp/vmap case (torch's own function fails there): "
                   + ", ".join(f"{g} {n}" for g, n in NOT_APPLICABLE.items()))
    if groups:
        out.append("")
        out.append("failures, grouped by check and first line (count, an example id):")
        for (check, failure), ids in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            out.append(f"  {len(ids):4d}  [{check}] {failure}")
            out.append(f"        e.g. {ids[0]}")
    return "\n".join(out)


def main(known: Dict[str, str], argv: Sequence[str] = ()) -> int:
    """Script mode: run every case (or those matching the ``fnmatch`` patterns in ``argv``), print the
    table; ``--ids`` also lists every failing case id with its failure."""
    patterns = [a for a in argv if not a.startswith("--")]
    cases = [c for c in all_cases() if not patterns or any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
    try:
        results = run_cases(cases)
    except Exception:  # pragma: no cover
        traceback.print_exc()
        return 2
    print(format_table(cases, results, known, title="bnlib vs torch.nn on PyTorch's own test samples"))
    if "--ids" in argv:
        print("\nfailing cases:")
        for case in cases:
            if results[case.id] is not None:
                reason = known_reason(case.id, known)
                tag = "design" if is_design(reason) else ("xfail " if reason else "FAIL  ")
                print(f"  {tag} {case.id}: {results[case.id]}")
    passed_but_listed = [c.id for c in cases if results[c.id] is None and known_reason(c.id, known)]
    if passed_but_listed:
        print("\nlisted in KNOWN_FAILURES but passing (remove the entry):")
        for case_id in passed_but_listed:
            print(f"  XPASS {case_id}")
    return 0
