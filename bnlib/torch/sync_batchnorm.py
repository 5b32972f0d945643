r"""Synchronized batch normalization over ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Each process (rank) holds a part of the global batch. ``SyncBatchNorm`` normalizes every part with the
statistics of the *whole* batch, as if one process had the concatenated batch, and gives the same outputs,
input gradients and running statistics (parameter gradients are the local contributions, which
``DistributedDataParallel`` -- or an ``all_reduce`` -- sums, exactly like :class:`torch.nn.SyncBatchNorm`).

Forward (per channel). Rank ``r`` computes its count ``n_r``, mean ``m_r`` and centred sum of squares
``M2_r = sum (x - m_r)^2`` (two-pass, no cancellation), and the three ``(C,)`` vectors of every rank are
all-gathered (one collective of ``3 C`` numbers per rank). They are merged exactly with the parallel
formula of Chan, Golub & LeVeque (1979), in float64:

.. math::
    n = \sum_r n_r,\qquad \mu = \tfrac1n \sum_r n_r m_r,\qquad
    M_2 = \sum_r M_{2,r} + \sum_r n_r (m_r - \mu)^2,\qquad \sigma^2 = M_2 / n .

Ranks may hold different numbers of samples (even zero): the counts weight the merge, so unequal batch sizes
give exactly the concatenated-batch statistics. Running statistics use PyTorch's convention (``momentum``
weights the new batch, the unbiased ``M2 / (n - 1)`` is stored) and are identical on every rank.

Backward (hand-derived, ``once_differentiable``). With ``g = dL/dy`` and ``xhat = (x - mu) * invstd``,

.. math::
    \frac{\partial L}{\partial x} = \gamma\,\mathrm{invstd}\,\Big(g - \tfrac1n\textstyle\sum g
        - \hat x\,\tfrac1n\sum g\hat x\Big),

where both sums run over the *global* batch: each rank computes its local ``(sum g, sum g*xhat)`` and one
``all_reduce`` of ``2 C`` numbers adds them up. ``dgamma`` and ``dbeta`` are the local sums (summed across
ranks by DDP's gradient all-reduce).

Without an initialized process group (or with a world of one process) the module is plain batch norm
(:class:`bnlib.torch.BatchNorm2d` & co.) and warns once, as ``torch.nn.SyncBatchNorm`` also runs as plain batch
norm on a single process. In evaluation mode it always uses the running statistics, with no communication.

Run the two-process demonstration with::

    torchrun --nproc_per_node=2 benchmarks/sync_bn_demo.py
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from datetime import timedelta
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .modules import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm", "merge_moments", "local_moments",
           "compare_with_single_process", "spawn_comparison"]


def _reduce_dims(x: Tensor):
    return [0] + list(range(2, x.dim()))


def _bshape(x: Tensor):
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def local_moments(x: Tensor):
    """``(count, mean, M2)`` per channel of ``x`` ``(N, C, *)``: count as a float64 ``(C,)`` vector, mean and
    centred sum of squares in float64 (computed from the input in float32, float64 for float64 input)."""
    C = x.shape[1]
    count = x.numel() // C if C else 0
    if count == 0:
        z = torch.zeros(C, dtype=torch.float64, device=x.device)
        return z.clone(), z.clone(), z
    var, mean = torch.var_mean(x.to(_compute_dtype(x)), dim=_reduce_dims(x), correction=0)
    cnt = torch.full((C,), float(count), dtype=torch.float64, device=x.device)
    return cnt, mean.double(), var.double() * count


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor):
    """Exact merge of per-part statistics, each of shape ``(parts, C)``: returns ``(n, mean, M2)`` of the
    union (Chan et al.'s parallel formula; parts with count 0 contribute nothing)."""
    n = counts.sum(0)
    safe = torch.clamp(n, min=1.0)
    mean = (counts * means).sum(0) / safe
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return n, mean, m2


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size):
        C = x.shape[1]
        cd = _compute_dtype(x)
        cnt, mean_l, m2_l = local_moments(x)
        packed = torch.stack([cnt, mean_l, m2_l])  # (3, C) float64
        gathered = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(gathered, packed, group=process_group)
        allstats = torch.stack(gathered)  # (world, 3, C)
        n, mean, m2 = merge_moments(allstats[:, 0], allstats[:, 1], allstats[:, 2])
        total = int(n[0].item()) if C else 0
        if total <= 1:
            sizes = [int(t[0, 0].item()) for t in gathered]
            raise ValueError(f"Expected more than 1 value per channel when training, got {total} in total "
                             f"over {world_size} processes (per-process counts {sizes})")
        var = m2 / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1.0 - momentum).add_((m2 / (total - 1)).to(running_var.dtype), alpha=momentum)
        mean_c, invstd_c = mean.to(cd), invstd.to(cd)
        scale = invstd_c if weight is None else invstd_c * weight.to(cd)
        y = (x.to(cd) - mean_c.view(_bshape(x))) * scale.view(_bshape(x))
        if bias is not None:
            y = y + bias.to(cd).view(_bshape(x))
        ctx.save_for_backward(x, weight, mean_c, invstd_c)
        ctx.total = total
        ctx.process_group = process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        cd = mean.dtype
        dims, bs = _reduce_dims(x), _bshape(x)
        g = dy.to(cd)
        xhat = (x.to(cd) - mean.view(bs)) * invstd.view(bs)
        if x.numel():
            sum_g = g.sum(dims)
            sum_gx = (g * xhat).sum(dims)
        else:
            sum_g = torch.zeros_like(mean)
            sum_gx = torch.zeros_like(mean)
        local = torch.stack([sum_g, sum_gx])
        glob = local.clone()
        dist.all_reduce(glob, op=dist.ReduceOp.SUM, group=ctx.process_group)
        need_dx, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_dx:
            coef = invstd if weight is None else invstd * weight.to(cd)
            k1 = (glob[0] / ctx.total).view(bs)
            k2 = (glob[1] / ctx.total).view(bs)
            dx = (coef.view(bs) * (g - k1 - xhat * k2)).to(x.dtype)
        if need_w and weight is not None:
            dw = local[1].to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            db = local[0].to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None


def sync_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float = 0.1,
                    eps: float = 1e-5, process_group=None) -> Tensor:
    """Training-mode batch norm of ``x`` with statistics over all ranks of ``process_group`` (default: the
    world). Every rank must call it (a collective). Running statistics are updated in place."""
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    return _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, float(eps),
                                        float(momentum), group, world)


def _dist_ready(process_group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(
        process_group if process_group is not None else dist.group.WORLD) > 1


class SyncBatchNorm(_BatchNorm):
    """Drop-in for :class:`torch.nn.SyncBatchNorm`: batch norm with statistics over all processes.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as :class:`torch.nn.BatchNorm2d`
            (``momentum=None`` is the cumulative average, as there).
        process_group: the group whose ranks share statistics (default: the whole world).

    Accepts ``(N, C, *)`` inputs with at least 2 dimensions. In training, with an initialized process group
    of more than one process, the statistics are those of the concatenated batch of all ranks (ranks may
    hold different batch sizes, including a single value or none); otherwise it is plain batch norm (with a
    one-time warning when no process group is initialized).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self._warned_no_group = False

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _will_sync(self, training: bool) -> bool:
        return training and self.training and _dist_ready(self.process_group)

    def _validate(self, input: Tensor, running_mean, running_var, training: bool) -> None:
        if self._will_sync(training) and input.numel() // max(1, input.shape[1]) <= 1:
            # one value (or none) on this rank is fine when the ranks together have more: validate the rest
            # of the arguments on a small probe with this input's dtype, device and channels
            probe = input.new_zeros((2, input.shape[1]) + (1,) * (input.dim() - 2))
            return super()._validate(probe, running_mean, running_var, training)
        return super()._validate(input, running_mean, running_var, training)

    def _functional(self, input, running_mean, running_var, weight, bias, training, momentum, eps):
        if not self._will_sync(training):
            if training and self.training and not self._warned_no_group and not (
                    dist.is_available() and dist.is_initialized()):
                warnings.warn("SyncBatchNorm: no torch.distributed process group is initialized; running as "
                              "plain batch norm on this process's batch", RuntimeWarning, stacklevel=3)
                self._warned_no_group = True
            return super()._functional(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return sync_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps,
                               self.process_group)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Return ``module`` with every batch-norm layer (``torch.nn.BatchNorm1d/2d/3d``,
        ``torch.nn.SyncBatchNorm``, ``bnlib.torch.BatchNorm1d/2d/3d``) replaced by a :class:`SyncBatchNorm`
        with the same parameters (the same ``Parameter`` objects), buffers and train/eval mode, as
        :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. Variants with other semantics (ghost batch
        norm, batch renormalization, batch-layer norm) are left as they are."""
        return convert_sync_batchnorm(module, process_group)


def _is_plain_batchnorm(module: nn.Module) -> bool:
    from . import modules as M

    torch_bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    bnlib_bn = (M.BatchNorm1d, M.BatchNorm2d, M.BatchNorm3d, SyncBatchNorm)
    return type(module) in torch_bn or type(module) in bnlib_bn


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """See :meth:`SyncBatchNorm.convert_sync_batchnorm`. A batch-norm ``module`` itself is returned
    converted; containers are modified in place and returned."""
    out = module
    if _is_plain_batchnorm(module):
        ref = module.weight if module.affine else module.running_mean
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group,
                            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


# ----------------------------------------------------------------------------------------------------------
# The check used by the tests, the book's chapter and benchmarks/sync_bn_demo.py: SyncBatchNorm on the
# ranks' parts of a batch against torch.nn.BatchNorm on the whole batch in one process.
# ----------------------------------------------------------------------------------------------------------
def compare_with_single_process(sizes: Sequence[int], feature_shape: Sequence[int] = (3, 4, 4), steps: int = 2,
                                momentum: Optional[float] = 0.1, channels_last: bool = False, seed: int = 0,
                                dtype: torch.dtype = torch.float32, device=None,
                                process_group=None) -> Dict[str, float]:
    """Run on every rank of an initialized process group with ``len(sizes)`` ranks; rank ``r`` holds
    ``sizes[r]`` samples of a global batch of ``sum(sizes)`` (the same seeded data on every rank).

    For ``steps`` training steps it compares, against :class:`torch.nn.BatchNorm1d/2d` on the concatenated
    batch in this process: the outputs (this rank's rows), input gradients (this rank's rows), parameter
    gradients (summed over ranks with ``all_reduce``, as DDP does), running mean and variance; then one
    evaluation-mode forward (all in ``dtype`` on ``device``, default CPU; data are drawn on the CPU).

    Returns, for each quantity, the largest absolute difference over all steps divided by
    ``max(1, largest |reference value|)`` -- absolute for values of order 1, relative for large ones (the
    parameter gradients are sums over the batch, whose float32 rounding grows with their size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if len(sizes) != world:
        raise ValueError(f"sizes: expected one batch size per rank ({world}), got {list(sizes)}")
    C = int(feature_shape[0])
    ref_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}[len(feature_shape)]
    gen = torch.Generator().manual_seed(seed)
    device = torch.device("cpu") if device is None else torch.device(device)
    ref = ref_cls(C, momentum=momentum, dtype=dtype, device=device)
    sync = SyncBatchNorm(C, momentum=momentum, process_group=process_group, dtype=dtype, device=device)
    with torch.no_grad():
        w, b = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
        for m in (ref, sync):
            m.weight.copy_(w)
            m.bias.copy_(b)
    start, total = sum(sizes[:rank]), sum(sizes)
    rows = slice(start, start + sizes[rank])
    fmt = torch.channels_last if channels_last and len(feature_shape) == 3 else torch.contiguous_format
    diffs = {k: 0.0 for k in ("y", "dx", "dweight", "dbias", "running_mean", "running_var", "y_eval")}

    def upd(key, a, b):
        if a.numel():
            scale = max(1.0, b.double().abs().max().item())
            diffs[key] = max(diffs[key], (a.double() - b.double()).abs().max().item() / scale)

    for _ in range(steps):
        X = (torch.randn(total, *feature_shape, generator=gen) * 2 + 3).to(device, dtype)
        X = X.contiguous(memory_format=fmt)
        G = torch.randn(total, *feature_shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
        x_ref = X.clone().requires_grad_(True)
        x_loc = X[rows].clone().contiguous(memory_format=fmt).requires_grad_(True)
        for m in (ref, sync):
            m.zero_grad()
        y_ref = ref(x_ref)
        (y_ref * G).sum().backward()
        y_loc = sync(x_loc)
        (y_loc * G[rows]).sum().backward()
        dw, db = sync.weight.grad.clone(), sync.bias.grad.clone()
        dist.all_reduce(dw, group=group)
        dist.all_reduce(db, group=group)
        upd("y", y_loc, y_ref[rows])
        upd("dx", x_loc.grad, x_ref.grad[rows])
        upd("dweight", dw, ref.weight.grad)
        upd("dbias", db, ref.bias.grad)
        upd("running_mean", sync.running_mean, ref.running_mean)
        upd("running_var", sync.running_var, ref.running_var)
    ref.eval()
    sync.eval()
    X = torch.randn(total, *feature_shape, generator=gen).to(device, dtype)
    with torch.no_grad():
        upd("y_eval", sync(X[rows]), ref(X)[rows])
    return diffs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_worker(rank, world, port, out_dir, scenarios):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        mine = [compare_with_single_process(**kw) for kw in scenarios]
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            merged = [{k: max(r[i][k] for r in everyone) for k in mine[i]} for i in range(len(mine))]
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump(merged, f)
    finally:
        dist.destroy_process_group()


def spawn_comparison(scenarios: Sequence[dict]) -> list:
    """Start one process per rank on this machine (``torch.multiprocessing``, gloo over 127.0.0.1 on a free
    port) and run :func:`compare_with_single_process` for each dict of keyword arguments in ``scenarios``
    (all with the same number of ``sizes``, the world size). Returns, per scenario, the largest
    differences over all ranks. One spawn serves all scenarios (starting processes costs seconds)."""
    import torch.multiprocessing as mp

    scenarios = [dict(s) for s in scenarios]
    if not scenarios:
        raise ValueError("scenarios: expected at least one dict of arguments, got none")
    worlds = {len(s.get("sizes", ())) for s in scenarios}
    if len(worlds) != 1 or 0 in worlds:
        raise ValueError(f"scenarios: expected 'sizes' with the same number (>= 1) of ranks in each, got {worlds}")
    world = worlds.pop()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_spawn_worker, args=(world, _free_port(), out_dir, scenarios), nprocs=world, join=True)
        with open(os.path.join(out_dir, "result.json")) as f:
            return json.load(f)
