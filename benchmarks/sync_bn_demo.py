"""SyncBatchNorm across processes: each rank holds part of a batch, the statistics are the whole batch's.

Run it with torchrun (2 processes on this machine; gloo on CPU, NCCL when every rank has a GPU)::

    .venv/bin/torchrun --nproc_per_node=2 benchmarks/sync_bn_demo.py
    .venv/bin/torchrun --nproc_per_node=2 benchmarks/sync_bn_demo.py --sizes 3 5   # unequal batch sizes

torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the script initializes the default process group
from them. It then

1. converts a small CNN's ``torch.nn.BatchNorm2d`` layers with ``bnlib.torch.SyncBatchNorm.convert_sync_batchnorm``
   and shows that one training step on the ranks' parts of a batch gives the same loss, parameter gradients
   (after DDP-style all-reduce) and running statistics as the unconverted model on the whole batch in one
   process;
2. runs :func:`bnlib.torch.sync_batchnorm.compare_with_single_process` layer-level checks (outputs, input
   gradients, parameter gradients, running statistics, evaluation mode) for the given per-rank batch sizes.

Rank 0 prints a table of the largest absolute differences; the script exits with status 1 when one exceeds
the tolerance (1e-5, float32; differences are divided by max(1, largest reference value) because
parameter gradients are sums over the batch). Started without torchrun (no RANK in the environment) it says
so and exits 0.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from bnlib.torch.sync_batchnorm import SyncBatchNorm, compare_with_single_process

TOL = 1e-5


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def model_step_differences(sizes, seed: int = 0, device="cpu") -> dict:
    """One SGD-free training step of :func:`small_cnn`: the converted model on this rank's rows vs the plain
    model on all rows. Returns the largest differences (loss and parameter gradients divided by
    max(1, largest reference value); running statistics absolute)."""
    rank = dist.get_rank()
    total, start = sum(sizes), sum(sizes[:rank])
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(total, 3, 8, 8, generator=gen).to(device)
    T = torch.randint(0, 10, (total,), generator=gen).to(device)
    ref = small_cnn(seed).to(device)
    sync = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    loss_ref = nn.functional.cross_entropy(ref(X), T, reduction="sum")
    loss_ref.backward()
    rows = slice(start, start + sizes[rank])
    loss = nn.functional.cross_entropy(sync(X[rows]), T[rows], reduction="sum")
    loss.backward()
    total_loss = loss.detach().clone()
    dist.all_reduce(total_loss)
    out = {"loss": abs(total_loss.item() - loss_ref.item()) / max(1.0, abs(loss_ref.item())), "grad": 0.0,
           "running": 0.0}
    for p_sync, p_ref in zip(sync.parameters(), ref.parameters()):
        g = p_sync.grad.clone()
        dist.all_reduce(g)  # what DistributedDataParallel does (with a sum loss)
        scale = max(1.0, p_ref.grad.abs().max().item())
        out["grad"] = max(out["grad"], (g - p_ref.grad).abs().max().item() / scale)
    for (_name, b_sync), (_, b_ref) in zip(sync.named_buffers(), ref.named_buffers()):
        if b_sync.is_floating_point():
            out["running"] = max(out["running"], (b_sync - b_ref).abs().max().item())
    n_sync = sum(isinstance(m, SyncBatchNorm) for m in sync.modules())
    out["sync_layers"] = n_sync
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="batch size of each rank (default: 3, 5, 7, ... for the world size)")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        print("not started by torchrun (no RANK in the environment); run:\n"
              "  torchrun --nproc_per_node=2 benchmarks/sync_bn_demo.py")
        return 0
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
        sizes = args.sizes or [3 + 2 * r for r in range(world)]
        if len(sizes) != world:
            raise SystemExit(f"--sizes needs {world} values (one per rank), got {sizes}")
        model = model_step_differences(sizes, device=device)
        layer = {
            "NCHW": compare_with_single_process(sizes, (4, 5, 5), device=device),
            "channels_last": compare_with_single_process(sizes, (4, 5, 5), channels_last=True, device=device),
            "(N, C)": compare_with_single_process(sizes, (6,), momentum=None, steps=3, device=device),
        }
        if rank == 0:
            print(f"SyncBatchNorm over {world} processes ({dist.get_backend()}, {device.type}), "
                  f"per-rank batch sizes {sizes}")
            print(f"small CNN, {model['sync_layers']} SyncBatchNorm layers, one step vs one process on all "
                  f"{sum(sizes)} samples:")
            print(f"  loss {model['loss']:.1e} | parameter gradients {model['grad']:.1e} | "
                  f"running statistics {model['running']:.1e}")
            keys = ["y", "dx", "dweight", "dbias", "running_mean", "running_var", "y_eval"]
            print("layer checks (largest difference / max(1, largest reference value)):")
            print(f"{'layer check':<14}" + "".join(f"{k:>13}" for k in keys))
            for name, d in layer.items():
                print(f"{name:<14}" + "".join(f"{d[k]:>13.1e}" for k in keys))
        worst = max([model["grad"], model["running"], model["loss"]] +
                    [v for d in layer.values() for v in d.values()])
        ok = worst <= TOL
        if rank == 0:
            print(f"largest difference {worst:.1e}: {'OK' if ok else 'FAILED'} (tolerance {TOL:g})")
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
