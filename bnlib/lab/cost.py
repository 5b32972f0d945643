r"""Measuring what batch norm costs: timers, byte counts, bandwidth and the memory roofline.

Used by the chapter "The cost of batch norm, and how to make it free" and by ``benchmarks/``.

Batch norm does a handful of FLOPs per element (a subtraction, a multiply-add, a few reductions), far fewer
than a processor can do while one element travels from memory, so its time is bounded below by the *bytes*
it must move divided by the memory bandwidth: the memory roof of the roofline model. With ``E`` elements of
``b`` bytes (``b = 4`` for float32; per-channel vectors are negligible):

================================  ===============  ==========================================
pass                               tensor passes    bytes
================================  ===============  ==========================================
forward, streaming (training)      3  (x, x, y)     ``3bE`` = 12E float32
forward, channel tile on chip      2  (x, y)        ``2bE`` = 8E
backward, streaming                5  (x,g,x,g,dx)  ``5bE`` = 20E
backward, channel tile on chip     3  (x, g, dx)    ``3bE`` = 12E
evaluation (or folded away)        2  (x, y) / 0    ``2bE`` / nothing
================================  ===============  ==========================================

All timers report the **median** of repeats (robust to the other processes sharing the machine) together
with the quartiles; CUDA work is synchronized before the clock is read. To *compare* several variants, time
them with :func:`interleaved_times`: they take turns, sample by sample, so a change in the load of a shared
machine during the measurement affects all of them alike and their ratios stay meaningful.
:func:`training_step`, :func:`inference_call` and :func:`batch_norm_step` build the functions to time.
:func:`resnet18_like` builds the ResNet-18-shaped network on which batch-norm folding is shown and benchmarked.

Bad arguments raise ``TypeError`` (wrong type) or ``ValueError`` (wrong value) with the message shape of
:mod:`bnlib._checks` and the rest of :mod:`bnlib.lab`: ``"<name>: expected <what>, got <value>"``.
"""
from __future__ import annotations

import copy
import math
import numbers
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .. import _checks

__all__ = [
    "Timing",
    "median_time",
    "interleaved_times",
    "training_step",
    "inference_call",
    "batch_norm_step",
    "TENSOR_PASSES",
    "bn_bytes",
    "copy_bandwidth",
    "achieved_bandwidth",
    "roofline_time",
    "time_training_step",
    "time_inference",
    "time_batch_norm",
    "sync_bn_communication_bytes",
    "resnet18_like",
]


@dataclass
class Timing:
    """Seconds per call: median and quartiles of ``samples``."""

    median: float
    q1: float
    q3: float
    samples: List[float]

    def __str__(self) -> str:
        return f"{self.median * 1e3:.3f} ms (IQR {self.q1 * 1e3:.3f}-{self.q3 * 1e3:.3f})"


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _check_callable(name: str, fn) -> None:
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _check_counts(repeats, warmup, number) -> None:
    _checks.check_positive_int("repeats", repeats)
    _checks.check_int("warmup", warmup, 0)
    _checks.check_positive_int("number", number)


def _timing(samples: List[float]) -> Timing:
    qs = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return Timing(statistics.median(samples), qs[0], qs[2], samples)


def _sample(fn, number: int, device) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / number


def median_time(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 2, number: int = 1,
                device=None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` samples of ``number`` calls each.

    Returns seconds *per call*. ``device``: synchronize this CUDA device around each sample."""
    _check_counts(repeats, warmup, number)
    _check_callable("fn", fn)
    for _ in range(warmup):
        fn()
    _sync(device)
    return _timing([_sample(fn, number, device) for _ in range(repeats)])


def interleaved_times(fns: Mapping[Hashable, Callable[[], object]], *, repeats: int = 10, warmup: int = 2,
                      number: int = 1, device=None) -> Dict[Hashable, Timing]:
    """Time several functions *in turns*: ``warmup`` untimed rounds, then ``repeats`` rounds in which every
    function gives one sample of ``number`` calls, in the order of ``fns``.

    Sample ``k`` of every function is taken in the same round, so a change in the load of a shared machine
    during the measurement hits all of them alike: their ratios, unlike those of timings taken one after the
    other (:func:`median_time`), do not depend on when the load changed. Returns a :class:`Timing` (seconds per
    call) for each key of ``fns``, in the same order.

    >>> t = interleaved_times({"a": f, "b": g}, repeats=9)
    >>> t["b"].median / t["a"].median
    """
    _check_counts(repeats, warmup, number)
    if not isinstance(fns, Mapping):
        raise TypeError(f"fns: expected a non-empty mapping of name -> callable, got {type(fns).__name__}")
    if not fns:
        raise ValueError(f"fns: expected a non-empty mapping of name -> callable, got {fns!r}")
    for key, fn in fns.items():
        _check_callable(f"fns[{key!r}]", fn)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: Dict[Hashable, List[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            samples[key].append(_sample(fn, number, device))
    return {key: _timing(s) for key, s in samples.items()}


#: Tensor-sized passes over memory (reads + writes) of each batch-norm kernel design.
TENSOR_PASSES: Dict[str, int] = {
    "forward": 3,         # streaming training forward: read x (statistics), read x, write y
    "forward_fused": 2,   # a channel's tile stays on chip: read x, write y
    "backward": 5,        # read x, g (two sums); read x, g, write dx
    "backward_fused": 3,  # read x, g, write dx
    "eval": 2,            # read x, write y (running statistics)
    "copy": 2,            # read, write
}


def bn_bytes(shape: Sequence[int], dtype: torch.dtype = torch.float32, kind: str = "forward") -> int:
    """Bytes a batch-norm kernel of design ``kind`` (a key of :data:`TENSOR_PASSES`) must move for an input of
    ``shape`` and ``dtype`` (per-channel vectors, ``O(C)``, are not counted).

    >>> bn_bytes((32, 64, 112, 112), torch.float32, "forward") == 12 * 32 * 64 * 112 * 112
    True
    """
    if kind not in TENSOR_PASSES:
        raise ValueError(f"kind: expected one of {sorted(TENSOR_PASSES)}, got {kind!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in shape):
        raise TypeError(f"shape: expected a sequence of non-negative ints, got {tuple(shape)!r}")
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: expected a sequence of non-negative ints, got {tuple(shape)!r}")
    E = math.prod(shape)
    return TENSOR_PASSES[kind] * E * torch.empty((), dtype=dtype).element_size()


def copy_bandwidth(nbytes: int = 64 * 2**20, *, device="cpu", repeats: int = 10, warmup: int = 2) -> float:
    """Measured memory bandwidth in bytes/s: ``dst.copy_(src)`` of ``nbytes`` moves ``2 * nbytes``
    (one read, one write); median of ``repeats``. Use a buffer much larger than the last-level cache."""
    _checks.check_int("nbytes", nbytes, 1024)
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeats=repeats, warmup=warmup, device=device)
    return 2 * n * 4 / t.median


def achieved_bandwidth(nbytes: float, seconds: float) -> float:
    """Bytes per second."""
    _checks.check_real("seconds", seconds, 0.0, open_low=True)
    return nbytes / seconds


def roofline_time(nbytes: float, bandwidth: float) -> float:
    """The memory-bound floor: the least time in which ``nbytes`` can move at ``bandwidth`` bytes/s."""
    _checks.check_real("bandwidth", bandwidth, 0.0, open_low=True)
    return nbytes / bandwidth


def batch_norm_step(x: torch.Tensor, impl: str = "torch", *, backward: bool = False) -> Callable[[], None]:
    """A function that runs one training-mode batch norm of ``x`` (forward, or forward + backward with
    ``backward=True``) with affine parameters and running statistics, for :func:`median_time` or
    :func:`interleaved_times`.

    ``impl``: ``'torch'`` (``torch.nn.functional.batch_norm``: native CPU kernels, cuDNN on GPUs),
    ``'bnlib'`` (:func:`bnlib.torch.functional.batch_norm` with ``backend='torch'``, the hand-derived
    autograd in PyTorch ops) or ``'triton'`` (bnlib's Triton kernels; CUDA or TRITON_INTERPRET)."""
    if impl not in ("torch", "bnlib", "triton"):
        raise ValueError(f"impl: expected 'torch', 'bnlib' or 'triton', got {impl!r}")
    C = x.shape[1]
    w = torch.ones(C, device=x.device, requires_grad=backward)
    b = torch.zeros(C, device=x.device, requires_grad=backward)
    rm, rv = torch.zeros(C, device=x.device), torch.ones(C, device=x.device)
    xg = x.detach().clone().requires_grad_(backward)
    g = torch.randn_like(x) if backward else None
    if impl == "torch":
        def f():
            return torch.nn.functional.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5)
    else:
        from ..torch import functional as BF
        backend = "torch" if impl == "bnlib" else "triton"

        def f():
            return BF.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5, backend=backend)

    def step():
        if backward:
            f().backward(g)
            xg.grad = w.grad = b.grad = None
        else:
            with torch.no_grad():
                f()

    return step


def time_batch_norm(x: torch.Tensor, impl: str = "torch", *, backward: bool = False, repeats: int = 10,
                    warmup: int = 2) -> Timing:
    """Median time of :func:`batch_norm_step` ``(x, impl, backward=backward)``."""
    return median_time(batch_norm_step(x, impl, backward=backward), repeats=repeats, warmup=warmup,
                       device=x.device)


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, lr: float = 0.01
                  ) -> Callable[[], None]:
    """A function that runs one SGD training step (forward, cross-entropy, backward, update) of a *copy* of
    ``model`` on the batch ``(x, target)``; ``model`` itself is never changed."""
    _check_module(model)
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(m(x), target).backward()
        opt.step()

    return step


def time_training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, repeats: int = 10,
                       warmup: int = 2, lr: float = 0.01) -> Timing:
    """Median time of one SGD training step (forward, cross-entropy, backward, update) of a *copy* of
    ``model`` on the batch ``(x, target)``; ``model`` itself is not changed."""
    return median_time(training_step(model, x, target, lr=lr), repeats=repeats, warmup=warmup, device=x.device)


def inference_call(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A function that computes ``model(x)`` in evaluation mode under ``torch.no_grad()`` (``model`` is put in
    eval now)."""
    _check_module(model)
    model.eval()

    def run():
        with torch.no_grad():
            model(x)

    return run


def time_inference(model: nn.Module, x: torch.Tensor, *, repeats: int = 10, warmup: int = 2) -> Timing:
    """Median time of ``model(x)`` in evaluation mode under ``torch.no_grad()`` (``model`` is put in eval)."""
    return median_time(inference_call(model, x), repeats=repeats, warmup=warmup, device=x.device)


def sync_bn_communication_bytes(num_features: int, world_size: int,
                                grad_dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Bytes each rank *receives* per SyncBatchNorm layer and training step, as implemented in
    :mod:`bnlib.torch.sync_batchnorm`: the forward all-gathers ``(count, mean, M2)`` in float64 (``3C``
    values from each of the other ``W - 1`` ranks); the backward all-reduces ``(sum g, sum g*xhat)``
    (``2C`` values in the compute dtype, float32 unless the input is float64; a ring all-reduce receives
    ``2 (W-1)/W`` times the buffer). Independent of the batch and image sizes."""
    _checks.check_positive_int("num_features", num_features)
    _checks.check_positive_int("world_size", world_size)
    gb = torch.empty((), dtype=grad_dtype).element_size()
    fwd = 3 * num_features * 8 * (world_size - 1)
    bwd = int(round(2 * (world_size - 1) / world_size * 2 * num_features * gb))
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016, torchvision's layout): ``relu(bn2(conv2(relu(bn1(conv1(x))))) +
    shortcut(x))``, the shortcut a 1x1 convolution + norm (``downsample``) when the stride or width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm_layer) -> None:
        super().__init__()
        bias = norm_layer is None
        norm = norm_layer or (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)
        self.bn1 = norm(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        self.bn2 = norm(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=bias), norm(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNetLike(nn.Module):
    """ResNet-18's layout with chosen widths; see :func:`resnet18_like`."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], in_channels: int, num_classes: int,
                 norm_layer) -> None:
        super().__init__()
        bias = norm_layer is None
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=bias)
        self.bn1 = norm_layer(widths[0]) if norm_layer is not None else nn.Identity()
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = [BasicBlock(c_in if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1, norm_layer)
                     for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            c_in = w
        self.n_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_like(widths: Sequence[int] = (8, 16, 32, 64), *, in_channels: int = 3, num_classes: int = 10,
                  norm_layer: Optional[Callable[[int], nn.Module]] = nn.BatchNorm2d) -> nn.Module:
    """A ResNet-18-shaped network with narrower stages: torchvision's ``resnet18`` layout (stem conv7x7/2 + norm
    + ReLU + max-pool/2; 4 stages of 2 :class:`BasicBlock`; the first block of stages 2-4 halves the size and
    has a conv1x1 + norm shortcut ``downsample``; global average pool; Linear), with ``widths`` channels per
    stage (torchvision's are ``(64, 128, 256, 512)``). ``norm_layer(num_features)`` builds each norm (e.g.
    ``torch.nn.BatchNorm2d`` or ``bnlib.torch.BatchNorm2d``): 20 of them, called from the blocks' ``forward``
    (``self.bn1(self.conv1(x))``), 3 of them (the shortcuts') inside an ``nn.Sequential``. ``norm_layer=None``
    gives the same network without normalization (convolutions with bias). Parameter names are torchvision's
    (``layer2.0.downsample.0.weight``). Input ``(N, in_channels, H, W)``, e.g. 32x32 (the last stage is 1x1)."""
    widths = tuple(widths) if isinstance(widths, (tuple, list)) else widths
    if not isinstance(widths, tuple) or len(widths) != 4:
        raise ValueError(f"widths: expected 4 channel counts (one per stage), got {widths!r}")
    for w in widths:
        _checks.check_positive_int("widths", w)
    _checks.check_positive_int("in_channels", in_channels)
    _checks.check_positive_int("num_classes", num_classes)
    if norm_layer is not None and not callable(norm_layer):
        raise TypeError(f"norm_layer: expected a callable num_features -> module or None, got "
                        f"{type(norm_layer).__name__}")
    return ResNetLike(widths, (2, 2, 2, 2), in_channels, num_classes, norm_layer)

