"""Inference time of two CNNs: batch norms folded into the convolutions vs left in (eval mode) vs the same
network without batch norm.

Folding (``bnlib.torch.fold_batchnorm``) turns each Conv/Linear + BatchNorm pair into one Conv/Linear, so the
folded network should cost what the network without batch norm costs. The models: a small CNN (an
``nn.Sequential``) and a ResNet-18-shaped network (``bnlib.lab.cost.resnet18_like``: 20 batch norms, 17 of them
called from the blocks' ``forward``, found by torch.fx). Prints a table with the median wall-clock time per batch
over ``--repeats`` repeats (the three variants of a model alternate within each repeat, so they see the same
machine load; on a shared machine the absolute numbers are noisy), the ratio to the eval-mode model with its
batch norms, and the largest deviation of the folded output from the unfolded one. One torch thread by default:
on the project's 2-core machine shared with other processes, 2 threads made the medians swing by up to 7x
between runs (a thread waiting for a busy core), one thread kept each folded/eval ratio within 0.03 across runs.

    python benchmarks/bench_fold.py            # batch 64, 3x32x32 input, 1 thread, 20 repeats
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
from bnlib.lab.cost import resnet18_like  # noqa: E402
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


def trained_bn_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with non-trivial running statistics and affine parameters (a few forward passes), in eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        model.train()
        for _ in range(3):
            model(torch.randn(32, 3, 32, 32, generator=g))
    return model.eval()


def measure(title: str, unfolded: nn.Module, no_bn: nn.Module, x: torch.Tensor, repeats: int):
    """Fold ``unfolded``; time the three variants in turns; print the report line; return the table rows."""
    folded, report = fold_batchnorm(unfolded, return_report=True)
    variants = {"eval, batch norm": unfolded, "folded": folded, "no batch norm": no_bn.eval()}
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
    print(f"{title}: fold report {len(report.folded)} folded, {len(report.skipped)} skipped, "
          f"{len(report.untraced)} parts not traced; max |folded - unfolded| / max |unfolded| = {err:.1e}")
    base = statistics.median(times["eval, batch norm"])
    rows = []
    for n, m in variants.items():
        med = statistics.median(times[n])
        rows.append((title, n, sum(isinstance(k, (nn.BatchNorm1d, nn.BatchNorm2d)) for k in m.modules()),
                     sum(p.numel() for p in m.parameters()), med * 1e3, med / base))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 16 and 5 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20; 5 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; 16 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--widths", type=str, default="64,128,256,512",
                   help="ResNet-18-shaped model's stage widths (default torchvision's 64,128,256,512)")
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    batch = args.batch or (16 if args.quick else 64)
    widths = tuple(int(w) for w in args.widths.split(","))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    threads = f"{args.threads} thread" + ("s" if args.threads != 1 else "")
    print(f"inference, input ({batch}, 3, 32, 32) float32, {threads}, median of {repeats} repeats (the variants "
          f"of a model alternate); torch {torch.__version__} (shared machine: timings are noisy)")
    rows = measure("small CNN", trained_bn_model(small_cnn(True)), small_cnn(False), x, repeats)
    rows += measure(f"ResNet-18-shaped {'/'.join(map(str, widths))}",
                    trained_bn_model(resnet18_like(widths)), resnet18_like(widths, norm_layer=None), x, repeats)
    head = (f"{'model':<32} {'variant':<18} {'BN layers':>9} {'parameters':>10} {'median ms':>10} "
            f"{'vs eval BN':>11}")
    print(head)
    print("-" * len(head))
    for model, n, n_bn, n_params, ms, ratio in rows:
        print(f"{model:<32} {n:<18} {n_bn:>9} {n_params:>10} {ms:10.2f} {ratio:11.2f}")


if __name__ == "__main__":
    main()
