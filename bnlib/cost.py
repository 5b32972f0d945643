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
with the quartiles; CUDA work is synchronized before the clock is read.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

__all__ = [
    "Timing",
    "median_time",
    "TENSOR_PASSES",
    "bn_bytes",
    "copy_bandwidth",
    "achieved_bandwidth",
    "roofline_time",
    "time_training_step",
    "time_inference",
    "time_batch_norm",
    "sync_bn_communication_bytes",
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


def median_time(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 2, number: int = 1,
                device=None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` samples of ``number`` calls each.

    Returns seconds *per call*. ``device``: synchronize this CUDA device around each sample."""
    for name, v, lo in (("repeats", repeats, 1), ("warmup", warmup, 0), ("number", number, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / number)
    qs = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return Timing(statistics.median(samples), qs[0], qs[2], samples)


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
        raise ValueError(f"kind must be one of {sorted(TENSOR_PASSES)}, got {kind!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if any((not isinstance(s, int)) or s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative ints, got {tuple(shape)}")
    E = math.prod(shape)
    return TENSOR_PASSES[kind] * E * torch.empty((), dtype=dtype).element_size()


def copy_bandwidth(nbytes: int = 64 * 2**20, *, device="cpu", repeats: int = 10, warmup: int = 2) -> float:
    """Measured memory bandwidth in bytes/s: ``dst.copy_(src)`` of ``nbytes`` moves ``2 * nbytes``
    (one read, one write); median of ``repeats``. Use a buffer much larger than the last-level cache."""
    if not isinstance(nbytes, int) or nbytes < 1024:
        raise ValueError(f"nbytes must be an int >= 1024, got {nbytes!r}")
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeats=repeats, warmup=warmup, device=device)
    return 2 * n * 4 / t.median


def achieved_bandwidth(nbytes: float, seconds: float) -> float:
    """Bytes per second."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return nbytes / seconds


def roofline_time(nbytes: float, bandwidth: float) -> float:
    """The memory-bound floor: the least time in which ``nbytes`` can move at ``bandwidth`` bytes/s."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
    return nbytes / bandwidth


def time_batch_norm(x: torch.Tensor, impl: str = "torch", *, backward: bool = False, repeats: int = 10,
                    warmup: int = 2) -> Timing:
    """Time one training-mode batch norm of ``x`` (forward, or forward + backward with ``backward=True``)
    with affine parameters and running statistics.

    ``impl``: ``'torch'`` (``torch.nn.functional.batch_norm``: native CPU kernels, cuDNN on GPUs),
    ``'bnlib'`` (:func:`bnlib.torch.functional.batch_norm` with ``backend='torch'``, the hand-derived
    autograd in PyTorch ops) or ``'triton'`` (bnlib's Triton kernels; CUDA or TRITON_INTERPRET)."""
    if impl not in ("torch", "bnlib", "triton"):
        raise ValueError(f"impl must be 'torch', 'bnlib' or 'triton', got {impl!r}")
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
        from .torch import functional as BF
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

    return median_time(step, repeats=repeats, warmup=warmup, device=x.device)


def time_training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, repeats: int = 10,
                       warmup: int = 2, lr: float = 0.01) -> Timing:
    """Median time of one SGD training step (forward, cross-entropy, backward, update) of a *copy* of
    ``model`` on the batch ``(x, target)``; ``model`` itself is not changed."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(m(x), target).backward()
        opt.step()

    return median_time(step, repeats=repeats, warmup=warmup, device=x.device)


def time_inference(model: nn.Module, x: torch.Tensor, *, repeats: int = 10, warmup: int = 2) -> Timing:
    """Median time of ``model(x)`` in evaluation mode under ``torch.no_grad()`` (``model`` is put in eval)."""
    model.eval()

    def run():
        with torch.no_grad():
            model(x)

    return median_time(run, repeats=repeats, warmup=warmup, device=x.device)


def sync_bn_communication_bytes(num_features: int, world_size: int,
                                grad_dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Bytes each rank *receives* per SyncBatchNorm layer and training step, as implemented in
    :mod:`bnlib.torch.sync_batchnorm`: the forward all-gathers ``(count, mean, M2)`` in float64 (``3C``
    values from each of the other ``W - 1`` ranks); the backward all-reduces ``(sum g, sum g*xhat)``
    (``2C`` values in the compute dtype, float32 unless the input is float64; a ring all-reduce receives
    ``2 (W-1)/W`` times the buffer). Independent of the batch and image sizes."""
    if world_size < 1 or num_features < 1:
        raise ValueError("num_features and world_size must be >= 1")
    gb = torch.empty((), dtype=grad_dtype).element_size()
    fwd = 3 * num_features * 8 * (world_size - 1)
    bwd = int(round(2 * (world_size - 1) / world_size * 2 * num_features * gb))
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}
