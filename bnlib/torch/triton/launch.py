"""Host side of the Triton batch norm: tiles and grids, launch plans, and the wrappers that run them.

:func:`plan_forward` / :func:`plan_backward` validate a call, view ``x`` as ``(N, C, S)`` (:func:`_as_ncs`),
choose the tile (:func:`_choose_tiles`: the fused one-pass kernels when a program holds whole channels, else
the three-kernel split path), cut the batch into programs (:func:`_work_split`) and allocate the outputs: a
:class:`Plan` of :class:`Launch` objects (kernel, grid, arguments, constexprs, warps, bytes moved). Nothing
runs until :meth:`Plan.run`; :func:`batch_norm_forward` / :func:`batch_norm_backward` plan, check and run.

The tile thresholds are read at planning time from this module's globals: patch them here (not on a module
that re-exports them) to change the tiles, as the tests do to force the split path on tiny shapes.
"""
import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .kernels import _TRITON_IMPORT_ERROR, KERNELS, is_interpreted

__all__ = ["batch_norm_forward", "batch_norm_backward", "is_available", "plan", "plan_forward", "plan_backward",
           "Plan", "Launch", "planned_bytes", "FUSED_MAX_TILE"]

#: Largest tile (elements) one program holds in registers on the fused path.
FUSED_MAX_TILE = 8192
#: Elements per tile on the split path (float32; doubled for 16-bit dtypes).
SPLIT_TILE = 2048
#: Work items are packed so that about this many programs run per (channel block) grid column in total.
TARGET_PROGRAMS = 1024
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_available(x) -> bool:
    """Whether :func:`batch_norm_forward` can run on ``x``.

    True when triton imports and ``x`` is a float32/float16/bfloat16 tensor with at least 2 dimensions that
    is either on a CUDA device (compiled kernels) or, when the kernels are interpreted (``TRITON_INTERPRET=1``
    was set before this module was imported), on any device. float64 is not supported (the kernels accumulate
    in float32) and returns False, so callers fall back to their own path."""
    if _TRITON_IMPORT_ERROR is not None or not isinstance(x, torch.Tensor):
        return False
    if x.dtype not in SUPPORTED_DTYPES or x.dim() < 2:
        return False
    if is_interpreted():
        return os.environ.get("TRITON_INTERPRET", "0") == "1" or x.device.type == "cpu"
    return x.is_cuda


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _as_ncs(x: torch.Tensor):
    """``x`` (dense, possibly after a copy) and its ``(N, C, S)`` view: ``(x, N, C, S, (sN, sC, sS))``."""
    N, C = int(x.shape[0]), int(x.shape[1])
    S = int(math.prod(x.shape[2:]))
    if not x.is_contiguous():
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        if fmt is not None and x.is_contiguous(memory_format=fmt):
            return x, N, C, S, (S * C, 1, C)
        x = x.contiguous()
    return x, N, C, S, (C * S, S, 1)


@dataclass
class _Tiles:
    block_n: int
    block_c: int
    block_s: int
    num_warps: int
    fused: bool


def _choose_tiles(N: int, C: int, S: int, strides, itemsize: int) -> _Tiles:
    """Tile shape: the contiguous axis long, about ``SPLIT_TILE`` elements (2x for 16-bit), or the whole
    reduction of a few channels when it fits (``FUSED_MAX_TILE``)."""
    channels_fast = strides[1] == 1 and C > 1
    rr = _next_pow2(N) * _next_pow2(S)
    if rr <= FUSED_MAX_TILE:
        # a program holds whole channels; keep BLOCK_C small so that many programs share the GPU
        cap = 8 if channels_fast else 1
        block_c = max(1, min(_next_pow2(C), FUSED_MAX_TILE // rr, cap))
        tile = rr * block_c
        return _Tiles(_next_pow2(N), block_c, _next_pow2(S), 4 if tile <= 2048 else 8, True)
    tile = SPLIT_TILE * (2 if itemsize <= 2 else 1)
    if channels_fast:
        block_c = min(_next_pow2(C), 64)
    else:
        block_c = 1
    block_s = min(_next_pow2(S), max(1, tile // block_c))
    block_n = min(_next_pow2(N), max(1, tile // (block_c * block_s)))
    return _Tiles(block_n, block_c, block_s, 4, False)


@dataclass
class Launch:
    """One kernel launch of a plan: the kernel's name, its grid, arguments, compile-time constants, warps
    and the bytes it must move (reads + writes of ``x``-sized tensors; per-channel vectors counted too)."""

    name: str
    grid: Tuple[int, ...]
    args: Dict[str, object]
    constexprs: Dict[str, object]
    num_warps: int
    bytes: int
    note: str = ""

    def run(self) -> None:
        KERNELS[self.name][self.grid](**self.args, **self.constexprs, num_warps=self.num_warps)


@dataclass
class Plan:
    """The launches of one forward or backward call and the tensors they produce."""

    launches: List[Launch]
    outputs: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    def run(self) -> None:
        x = next((v for v in self.launches[0].args.values() if isinstance(v, torch.Tensor)), None)
        on_gpu = x is not None and x.is_cuda
        with torch.cuda.device(x.device) if on_gpu else contextlib.nullcontext():  # launch on x's GPU
            for launch in self.launches:
                launch.run()


def _work_split(N, S, tiles: _Tiles, channel_blocks: int):
    SB = _cdiv(S, tiles.block_s)
    W = _cdiv(N, tiles.block_n) * SB
    per_col = max(1, TARGET_PROGRAMS // max(1, channel_blocks))
    TILES = max(1, _cdiv(W, per_col))
    P = _cdiv(W, TILES)
    return SB, W, TILES, P


def _vec_bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _check_common(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16 (the Triton kernels' dtypes), got "
                        f"{str(x.dtype).replace('torch.', '')}")
    if x.dim() < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions (N, C, *), got {x.dim()}-D input")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")


def _check_vec(name, t, x, C):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != (C,):
        raise ValueError(f"{name}: expected shape ({C},) (one value per channel), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {str(t.dtype).replace('torch.', '')}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on x's device ({x.device}), got one on {t.device}")


def plan_forward(x, weight=None, bias=None, running_mean=None, running_var=None, training=True,
                 momentum=0.1, eps=1e-5) -> Plan:
    """Validate the arguments and return the launches :func:`batch_norm_forward` would run (nothing runs).

    The plan's ``outputs`` hold the (uninitialized) ``y``, ``save_mean`` and ``save_invstd``."""
    _check_common(x)
    C = int(x.shape[1])
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vec(name, t, x, C)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both tensors or both None, got one of each")
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    has_running = running_mean is not None
    if training and has_running and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        raise TypeError(f"momentum: expected a real number when running statistics are updated, got {momentum!r}")
    if not training and not has_running:
        raise ValueError("running_mean, running_var: expected both when training=False, got None")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor (it is updated in place), got a non-contiguous one")

    xd, N, C, S, strides = _as_ncs(x)
    if training and N * S <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(x.shape)}")
    E, b = xd.numel(), xd.element_size()
    use_int64 = E >= 2**31 - 1
    tiles = _choose_tiles(N, C, S, strides, b)
    dev = xd.device
    y = torch.empty_like(xd)
    mean = torch.empty(C, device=dev, dtype=torch.float32)
    invstd = torch.empty(C, device=dev, dtype=torch.float32)
    dummy = mean  # stands in for absent optional pointers (never read: the HAS_* flags are False)
    w = weight.contiguous() if weight is not None else None
    bb = bias.contiguous() if bias is not None else None
    shape_args = dict(N=N, C=C, S=S, sN=strides[0], sC=strides[1], sS=strides[2])
    outputs = {"y": y, "save_mean": mean, "save_invstd": invstd}
    vec = _vec_bytes(w) + _vec_bytes(bb)
    run_bytes = 2 * (_vec_bytes(running_mean) + _vec_bytes(running_var))

    if not training:
        # per-channel constants on the host side (C values, negligible), then one streaming pass
        with torch.no_grad():
            mean.copy_(running_mean.float())
            invstd.copy_(torch.rsqrt(running_var.float() + eps))
            scale = invstd * (w.float() if w is not None else 1.0)
            shift = bb.float().contiguous() if bb is not None else torch.zeros_like(mean)
        cb = _cdiv(C, tiles.block_c)
        SB, W, TILES, P = _work_split(N, S, tiles, cb)
        return Plan([Launch("_bn_normalize", (cb, P),
                            dict(X=xd, Y=y, MEAN=mean, SCALE=scale, SHIFT=shift, **shape_args, SB=SB, W=W,
                                 TILES=TILES),
                            dict(BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
                                 USE_INT64=use_int64),
                            tiles.num_warps, 2 * E * b + 3 * C * 4, "eval: y = (x - rm) * w/sqrt(rv+eps) + b")],
                    outputs)

    flags = dict(HAS_WEIGHT=w is not None, HAS_BIAS=bb is not None, HAS_RUNNING=has_running)
    opt = dict(WEIGHT=w if w is not None else dummy, BIAS=bb if bb is not None else dummy,
               RMEAN=running_mean if has_running else dummy, RVAR=running_var if has_running else dummy)
    mom = float(momentum) if has_running else 0.0
    if tiles.fused:
        cb = _cdiv(C, tiles.block_c)
        return Plan([Launch("_bn_fwd_fused", (cb,),
                            dict(X=xd, Y=y, **opt, MEAN=mean, INVSTD=invstd, **shape_args,
                                 momentum=mom, eps=float(eps)),
                            dict(**flags, BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c,
                                 BLOCK_S=tiles.block_s, USE_INT64=use_int64),
                            tiles.num_warps, 2 * E * b + vec + run_bytes + 2 * C * 4,
                            "one pass: a program holds whole channels")], outputs)

    cb = _cdiv(C, tiles.block_c)
    SB, W, TILES, P = _work_split(N, S, tiles, cb)
    pcnt = torch.empty((P, C), device=dev, dtype=torch.float32)
    pmean = torch.empty((P, C), device=dev, dtype=torch.float32)
    pm2 = torch.empty((P, C), device=dev, dtype=torch.float32)
    scale = torch.empty(C, device=dev, dtype=torch.float32)
    shift = torch.empty(C, device=dev, dtype=torch.float32)
    blocks = dict(BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, USE_INT64=use_int64)
    fin_c = min(_next_pow2(C), 32)
    fin_p = min(_next_pow2(P), 64)
    launches = [
        Launch("_bn_stats", (cb, P),
               dict(X=xd, PCNT=pcnt, PMEAN=pmean, PM2=pm2, **shape_args, SB=SB, W=W, TILES=TILES),
               blocks, tiles.num_warps, E * b + 3 * P * C * 4, "per-tile (count, mean, M2), Chan-merged"),
        Launch("_bn_finalize", (_cdiv(C, fin_c),),
               dict(PCNT=pcnt, PMEAN=pmean, PM2=pm2, P=P, C=C, **opt, MEAN=mean, INVSTD=invstd, SCALE=scale,
                    SHIFT=shift, momentum=mom, eps=float(eps)),
               dict(**flags, BLOCK_P=fin_p, BLOCK_C=fin_c), 4,
               3 * P * C * 4 + vec + run_bytes + 4 * C * 4, "merge partials, running stats, invstd"),
        Launch("_bn_normalize", (cb, P),
               dict(X=xd, Y=y, MEAN=mean, SCALE=scale, SHIFT=shift, **shape_args, SB=SB, W=W, TILES=TILES),
               blocks, tiles.num_warps, 2 * E * b + 3 * C * 4, "y = (x - mean) * scale + shift"),
    ]
    return Plan(launches, outputs)


def plan_backward(dy, x, weight, save_mean, save_invstd) -> Plan:
    """Validate the arguments and return the launches :func:`batch_norm_backward` would run.

    The plan's ``outputs`` hold ``dx``, ``dweight`` and ``dbias`` (float32; cast by the caller)."""
    _check_common(x)
    _check_common(dy, "dy")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: expected x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.device != x.device:
        raise ValueError(f"dy: expected a tensor on x's device ({x.device}), got one on {dy.device}")
    C = int(x.shape[1])
    _check_vec("weight", weight, x, C)
    for name, t in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if t is None:
            raise ValueError(f"{name}: expected the batch statistics returned by batch_norm_forward, got None")
        _check_vec(name, t, x, C)
    xd, N, C, S, strides = _as_ncs(x)
    if dy.stride() != xd.stride() or dy.dtype != xd.dtype:
        dy = torch.empty_like(xd).copy_(dy)  # same strides and dtype as x
    E, b = xd.numel(), xd.element_size()
    use_int64 = E >= 2**31 - 1
    tiles = _choose_tiles(N, C, S, strides, b)
    dev = xd.device
    dx = torch.empty_like(xd)
    mean = save_mean.float().contiguous()
    invstd = save_invstd.float().contiguous()
    dweight = torch.empty(C, device=dev, dtype=torch.float32)
    dbias = torch.empty(C, device=dev, dtype=torch.float32)
    w = weight.contiguous() if weight is not None else None
    shape_args = dict(N=N, C=C, S=S, sN=strides[0], sC=strides[1], sS=strides[2])
    outputs = {"dx": dx, "dweight": dweight, "dbias": dbias}
    if tiles.fused:
        cb = _cdiv(C, tiles.block_c)
        return Plan([Launch("_bn_bwd_fused", (cb,),
                            dict(X=xd, DY=dy, DX=dx, WEIGHT=w if w is not None else mean, MEAN=mean,
                                 INVSTD=invstd, DWEIGHT=dweight, DBIAS=dbias, **shape_args),
                            dict(HAS_WEIGHT=w is not None, BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c,
                                 BLOCK_S=tiles.block_s, USE_INT64=use_int64),
                            tiles.num_warps, 3 * E * b + 5 * C * 4, "one pass: both sums and dx")], outputs)
    cb = _cdiv(C, tiles.block_c)
    SB, W, TILES, P = _work_split(N, S, tiles, cb)
    p1 = torch.empty((P, C), device=dev, dtype=torch.float32)
    p2 = torch.empty((P, C), device=dev, dtype=torch.float32)
    coef = torch.empty(C, device=dev, dtype=torch.float32)
    k1 = torch.empty(C, device=dev, dtype=torch.float32)
    k2 = torch.empty(C, device=dev, dtype=torch.float32)
    blocks = dict(BLOCK_N=tiles.block_n, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, USE_INT64=use_int64)
    fin_c = min(_next_pow2(C), 32)
    fin_p = min(_next_pow2(P), 64)
    launches = [
        Launch("_bn_bwd_reduce", (cb, P),
               dict(X=xd, DY=dy, MEAN=mean, INVSTD=invstd, PSUM_DY=p1, PSUM_DYX=p2, **shape_args, SB=SB, W=W,
                    TILES=TILES),
               blocks, tiles.num_warps, 2 * E * b + 2 * P * C * 4, "partial sum g, sum g*xhat"),
        Launch("_bn_bwd_finalize", (_cdiv(C, fin_c),),
               dict(PSUM_DY=p1, PSUM_DYX=p2, P=P, C=C, M=N * S, WEIGHT=w if w is not None else mean,
                    INVSTD=invstd, DWEIGHT=dweight, DBIAS=dbias, COEF=coef, K1=k1, K2=k2),
               dict(HAS_WEIGHT=w is not None, BLOCK_P=fin_p, BLOCK_C=fin_c), 4,
               2 * P * C * 4 + 7 * C * 4, "dgamma, dbeta, dx coefficients"),
        Launch("_bn_bwd_dx", (cb, P),
               dict(X=xd, DY=dy, DX=dx, MEAN=mean, INVSTD=invstd, COEF=coef, K1=k1, K2=k2, **shape_args, SB=SB,
                    W=W, TILES=TILES),
               blocks, tiles.num_warps, 3 * E * b + 5 * C * 4, "dx = coef (g - k1 - xhat k2)"),
    ]
    return Plan(launches, outputs)


def plan(x, training=True, backward=False, weight=None, bias=None, running_mean=None, running_var=None):
    """The launches for input ``x`` (forward, or backward with ``backward=True``), for inspection.

    Uses dummy per-channel tensors where needed; nothing runs and no tensor is modified."""
    C = int(x.shape[1])
    if not training and running_mean is None:
        running_mean = torch.zeros(C, device=x.device)
        running_var = torch.ones(C, device=x.device)
    if backward:
        stats = torch.zeros(C, device=x.device)
        return plan_backward(torch.empty_like(x), x, weight, stats, stats + 1)
    return plan_forward(x, weight, bias, running_mean, running_var, training, 0.1, 1e-5)


def planned_bytes(x, training=True, backward=False) -> int:
    """Bytes the planned kernels must move for ``x`` (each tensor access counted once, no cache reuse)."""
    return plan(x, training=training, backward=backward).bytes


def _require_runnable(x):
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    if not x.is_cuda and not is_interpreted():
        raise RuntimeError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
                           "bnlib.torch.triton_bn is imported (CPU interpreter)")


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """Batch-norm forward with the Triton kernels.

    Args:
        x: ``(N, C, *)`` float32/float16/bfloat16, NCHW-contiguous or channels-last (other strides are copied
            to contiguous first).
        weight, bias: ``(C,)`` or None (gamma = 1, beta = 0); any float dtype (read as float32).
        running_mean, running_var: ``(C,)`` contiguous buffers or None. In training they are updated in place
            (``momentum`` weights the new batch; the unbiased variance is stored); in evaluation they normalize.
        training: batch statistics (True) or running statistics (False).
        momentum, eps: as in :func:`torch.nn.functional.batch_norm`.

    Returns:
        ``(y, save_mean, save_invstd)``: ``y`` has ``x``'s shape, dtype and memory format; ``save_mean`` and
        ``save_invstd`` are float32 ``(C,)`` (in evaluation: the running mean and ``1/sqrt(running_var+eps)``).
    """
    p = plan_forward(x, weight, bias, running_mean, running_var, training, momentum, eps)
    _require_runnable(x)
    p.run()
    return p.outputs["y"], p.outputs["save_mean"], p.outputs["save_invstd"]


def batch_norm_backward(dy, x, weight, save_mean, save_invstd):
    """Training-mode backward: ``(dx, dweight, dbias)`` from ``dy``, ``x`` and the saved batch statistics.

    ``dx`` has ``x``'s dtype and memory format; ``dweight``/``dbias`` have ``weight``'s dtype (float32 when
    ``weight`` is None). ``dy`` in another memory format is copied to ``x``'s first."""
    p = plan_backward(dy, x, weight, save_mean, save_invstd)
    _require_runnable(x)
    p.run()
    out_dtype = weight.dtype if weight is not None else torch.float32
    return p.outputs["dx"], p.outputs["dweight"].to(out_dtype), p.outputs["dbias"].to(out_dtype)

