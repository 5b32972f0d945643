"""Inference time of a small CNN: batch norms folded into the convolutions vs left in (eval mode) vs the same
network without batch norm.

Folding (``bnlib.torch.fold_batchnorm``) turns each Conv/Linear + BatchNorm pair into one Conv/Linear, so the
folded network should cost what the network without batch norm costs. Prints a table with the median
wall-clock time per batch over ``--repeats`` repeats (the three variants alternate within each repeat, so
they see the same machine load; on a shared machine the absolute numbers are noisy) and the largest
deviation of the folded output from the unfolded one.

    python benchmarks/bench_fold.py            # batch 64, 3x32x32 input, 2 threads, 20 repeats
    python benchmarks/bench_fold.py --quick    # batch 16, 5 repeats
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bnlib.torch import fold_batchnorm  # noqa: E402


def small_cnn(batch_norm: bool = True, width: int = 32) -> nn.Sequential:
    def bn2(c):
        return nn.BatchNorm2d(c) if batch_norm else nn.Identity()

    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1, bias=not batch_norm), bn2(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1, bias=not batch_norm), bn2(w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=not batch_norm), bn2(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=not batch_norm), bn2(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * w, 128, bias=not batch_norm), nn.BatchNorm1d(128) if batch_norm else nn.Identity(),
        nn.ReLU(), nn.Linear(128, 10),
    )


def trained_bn_model(seed: int = 0) -> nn.Module:
    """A model with non-trivial running statistics and affine parameters (a few forward passes)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = small_cnn(True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        model.train()
        for _ in range(3):
            model(torch.randn(32, 3, 32, 32, generator=g))
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 16 and 5 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20; 5 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; 16 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    batch = args.batch or (16 if args.quick else 64)
    torch.set_num_threads(args.threads)

    unfolded = trained_bn_model()
    folded, report = fold_batchnorm(unfolded, return_report=True)
    no_bn = small_cnn(False).eval()
    variants = {"eval, batch norm": unfolded, "folded": folded, "no batch norm": no_bn}
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = unfolded(x)
        err = ((folded(x) - ref).abs().max() / ref.abs().max()).item()
        for m in variants.values():  # warm-up
            for _ in range(3):
                m(x)
        times = {n: [] for n in variants}
        names = list(variants)
        for r in range(repeats):
            for n in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                variants[n](x)
                times[n].append(time.perf_counter() - t0)
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in variants.items()}
    n_bn = {n: sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in v.modules())
            for n, v in variants.items()}
    print(f"small CNN inference, input ({batch}, 3, 32, 32) float32, {args.threads} threads, median of {repeats} "
          f"repeats; torch {torch.__version__} (shared machine: timings are noisy)")
    print(f"fold report: {len(report.folded)} folded, {len(report.skipped)} skipped; "
          f"max |folded - unfolded| / max |unfolded| = {err:.1e}")
    base = statistics.median(times["eval, batch norm"])
    head = f"{'variant':<18} {'BN layers':>9} {'parameters':>10} {'median ms':>10} {'vs eval BN':>11}"
    print(head)
    print("-" * len(head))
    for n in variants:
        med = statistics.median(times[n])
        print(f"{n:<18} {n_bn[n]:>9} {n_params[n]:>10} {med * 1e3:10.2f} {med / base:11.2f}")


if __name__ == "__main__":
    main()
