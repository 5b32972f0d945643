"""Benchmark: bnlib.numpy batch norm (forward + backward) vs PyTorch's native CPU batch norm.

Both run on the same cores in one process, interleaved repeat by repeat (so background load hits both
alike); the table shows the median and minimum over ``--repeats`` and the ratio of medians to torch.

- ``bnlib functional``: ``batch_norm(..., training=True)`` then ``batch_norm_backward`` (which recomputes the
  batch statistics from ``x``: one more read of ``x`` than the module).
- ``bnlib module``: ``BatchNorm2d`` forward then ``backward`` (reuses the forward's per-channel statistics).
- ``torch``: ``F.batch_norm(..., training=True)`` forward then autograd backward (dx, dweight, dbias).

Peak memory of the backward is measured with ``tracemalloc`` (NumPy reports its allocations to it), as the
peak of new allocations during the call minus the returned ``dx``, in units of ``x.nbytes``.

    python benchmarks/bench_numpy.py                 # (256, 64, 32, 32) float32, 10 repeats
    python benchmarks/bench_numpy.py --quick         # small shape, a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc

import numpy as np


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per implementation (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls (default 2)")
    p.add_argument("--quick", action="store_true", help="small shape (8, 4, 8, 8), for a smoke run")
    p.add_argument("--shape", type=int, nargs="+", default=None, help="input shape (default 256 64 32 32)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    return p.parse_args(argv)


def _peak_extra(fn, x_nbytes):
    """Peak bytes allocated during ``fn()`` beyond what it returns, in units of ``x_nbytes``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    returned = sum(a.nbytes for a in (out if isinstance(out, tuple) else (out,)) if a is not None)
    return (peak - base - returned) / x_nbytes


def main(argv=None):
    args = _parse(argv)
    import torch
    import torch.nn.functional as F

    import bnlib.numpy as bnp

    torch.set_num_threads(args.threads)
    shape = tuple(args.shape) if args.shape else ((8, 4, 8, 8) if args.quick else (256, 64, 32, 32))
    dtype = np.dtype(args.dtype)
    C = shape[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=dtype)
    dy = rng.standard_normal(shape, dtype=dtype)
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)

    # bnlib, functional
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)

    def bnlib_functional():
        y = bnp.batch_norm(x, rm, rv, w, b, training=True)
        return y, bnp.batch_norm_backward(dy, x, w)

    # bnlib, module
    module = bnp.BatchNorm2d(C, dtype=dtype) if len(shape) == 4 else bnp.BatchNorm1d(C, dtype=dtype)
    module.weight[...] = w
    module.bias[...] = b

    def bnlib_module():
        y = module(x)
        return y, module.backward(dy)

    # torch
    xt = torch.from_numpy(x.copy()).requires_grad_()
    dyt = torch.from_numpy(dy)
    wt = torch.from_numpy(w.copy()).requires_grad_()
    bt = torch.from_numpy(b.copy()).requires_grad_()
    rmt, rvt = torch.zeros(C, dtype=xt.dtype), torch.ones(C, dtype=xt.dtype)

    def torch_native():
        xt.grad = wt.grad = bt.grad = None
        y = F.batch_norm(xt, rmt, rvt, wt, bt, training=True)
        y.backward(dyt)
        return y, xt.grad

    impls = {"bnlib functional": bnlib_functional, "bnlib module": bnlib_module, "torch": torch_native}
    # correctness first: same dx as torch
    _, (dx_ref, _, _) = bnlib_functional()
    _, dx_t = torch_native()
    err = float(np.max(np.abs(dx_ref - dx_t.numpy())))
    for _ in range(args.warmup):
        for fn in impls.values():
            fn()
    times = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    # peak memory of the backward alone (forward done outside the traced region)
    module(x)
    peak_module = _peak_extra(lambda: module.backward(dy), x.nbytes)
    peak_functional = _peak_extra(lambda: bnp.batch_norm_backward(dy, x, w), x.nbytes)
    peak_forward = _peak_extra(lambda: bnp.batch_norm(x, rm, rv, w, b, training=True), x.nbytes)

    ref = statistics.median(times["torch"])
    print(f"batch norm forward + backward, input {shape} {dtype}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} repeats (max |dx - dx_torch| = {err:.2e})")
    print(f"{'implementation':<18} {'median ms':>10} {'min ms':>9} {'ratio to torch':>15}")
    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        results[name] = med
        print(f"{name:<18} {med * 1e3:>10.1f} {min(ts) * 1e3:>9.1f} {med / ref:>15.2f}")
    print(f"peak extra memory, in units of x.nbytes ({x.nbytes / 2**20:.1f} MiB), beyond inputs and outputs:")
    print(f"  module backward {peak_module:.2f}, functional backward {peak_functional:.2f}, "
          f"forward {peak_forward:.2f}")
    results.update(peak_module=peak_module, peak_functional=peak_functional, peak_forward=peak_forward,
                   max_abs_dx_error=err)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
