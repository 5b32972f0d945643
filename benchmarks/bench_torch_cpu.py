"""CPU benchmark: bnlib.torch batch norm (hand-written forward and backward) vs torch's native batch norm.

Prints one table, both implementations side by side from the same run: the median wall-clock time of the
forward pass alone and of forward + backward (training mode, running statistics updated, input and affine
parameters requiring grad), over ``--repeats`` repeats after a warm-up, and the peak memory of one
forward + backward step.

Peak memory method (Linux): each (implementation, layout) step runs in a *fresh* Python process that warms
up on a small tensor and allocates the input and upstream gradient, then resets the kernel's peak-RSS
counter (``echo 5 > /proc/self/clear_refs``); the peak is ``VmHWM`` after one full-size step minus ``VmRSS``
just before it. Tensors this large are ``mmap``-ed by the allocator and returned on free, so this is the
peak of the bytes the step keeps alive at once (``y``, saved tensors, temporaries, ``dx``), with a few MB of
noise. The timing numbers are noisy when the machine's cores are shared: say so when quoting them.

A second table times the *modules* at small sizes, where the per-call overhead (Python, argument checks,
autograd) dominates: ``bnlib.torch.BatchNorm1d/2d`` vs ``torch.nn.BatchNorm1d/2d``, training mode, affine,
running statistics tracked, forward + backward, one intra-op thread (``--small-threads``), median over
``--small-repeats`` repeats of ``--small-iters`` calls each, both modules alternating within each repeat.

    python benchmarks/bench_torch_cpu.py                  # (256, 64, 32, 32) float32, 2 threads, 10 repeats
    python benchmarks/bench_torch_cpu.py --quick          # (64, 64, 32, 32), 5 repeats: a smoke test
    python benchmarks/bench_torch_cpu.py --repeats 30 --threads 2 --shape 256 64 32 32
    python benchmarks/bench_torch_cpu.py --small-only     # only the small-module table
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bnlib.torch as bt  # noqa: E402
from bnlib.torch.functional import batch_norm as bn_batch_norm  # noqa: E402

IMPLS = {
    "torch (native)": lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
    "bnlib.torch": lambda x, rm, rv, w, b: bn_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend="torch"),
}


def make_inputs(shape, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 1
    dy = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w = (torch.rand(C, generator=g) + 0.5).requires_grad_(True)
    b = torch.randn(C, generator=g).requires_grad_(True)
    return x.requires_grad_(True), dy, w, b, torch.zeros(C), torch.ones(C)


def step(fn, x, dy, w, b, rm, rv, backward=True):
    y = fn(x, rm, rv, w, b)
    if backward:
        y.backward(dy)
        x.grad = w.grad = b.grad = None
    return y


def time_impls(fns, inputs, repeats, backward):
    """Median wall-clock and CPU (process) time in ms per implementation. The implementations alternate
    within each repeat (order swapped every repeat), so both see the same machine load."""
    names = list(fns)
    for name in names:  # warm-up
        for _ in range(2):
            step(fns[name], *inputs, backward=backward)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            step(fns[name], *inputs, backward=backward)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {n: (statistics.median(wall[n]) * 1e3, statistics.median(cpu[n]) * 1e3) for n in names}


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name, shape, channels_last, threads):
    """Runs in a fresh process: peak RSS growth (bytes) of one forward + backward step (Linux)."""
    torch.set_num_threads(threads)
    fn = IMPLS[name]
    small = (max(shape[0] // 64, 2),) + tuple(shape[1:])
    step(fn, *make_inputs(small, channels_last))      # warm up code paths on a small tensor
    inputs = make_inputs(shape, channels_last)
    with open("/proc/self/clear_refs", "w") as f:     # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    step(fn, *inputs)
    return (_status_kb("VmHWM") - before) * 1024


def peak_memory(name, shape, channels_last, threads):
    code = ("import json, sys; sys.path.insert(0, %r); import bench_torch_cpu as b; "
            "print(json.dumps(b.peak_memory_child(%r, %r, %r, %r)))"
            % (os.path.dirname(os.path.abspath(__file__)), name, tuple(shape), channels_last, threads))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# (bnlib module, torch.nn module, input shape, channels_last, target ratio); the channels-last row has no target
# of its own in the issue, it is held to the contiguous one
SMALL_CASES = [
    (bt.BatchNorm1d, nn.BatchNorm1d, (2, 64), False, 2.0),
    (bt.BatchNorm1d, nn.BatchNorm1d, (60, 100), False, 2.0),
    (bt.BatchNorm2d, nn.BatchNorm2d, (32, 16, 8, 8), False, 1.5),
    (bt.BatchNorm2d, nn.BatchNorm2d, (32, 16, 8, 8), True, 1.5),
]


def time_small_modules(ours, ref, shape, channels_last, repeats, iters, seed=0):
    """Median microseconds per forward + backward call of two modules (training mode) on the same input, as
    ``{name: (wall, cpu)}`` (``cpu``: this thread's CPU time, ``time.thread_time``, which other processes on a
    shared machine disturb less); the modules alternate within each repeat (order swapped every repeat)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 1
    dy = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    mods = {"bnlib": ours, "torch.nn": ref}

    def run(m):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(iters):
            m(x).backward(dy)
            x.grad = m.weight.grad = m.bias.grad = None
        return (time.perf_counter() - t0) / iters * 1e6, (time.thread_time() - c0) / iters * 1e6

    for m in mods.values():  # warm-up
        run(m)
    times = {n: [] for n in mods}
    for r in range(repeats):
        for name in (list(mods) if r % 2 == 0 else list(mods)[::-1]):
            times[name].append(run(mods[name]))
    return {n: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for n, v in times.items()}


def small_table(repeats, iters, threads):
    torch.set_num_threads(threads)
    print(f"small modules, training mode (affine, running stats tracked), float32, forward + backward, "
          f"{threads} thread(s), median of {repeats} repeats x {iters} calls; torch {torch.__version__}")
    head = (f"{'module':<12} {'shape':<16} {'layout':<14} {'torch.nn us':>12} {'bnlib us':>9} {'ratio':>6} "
            f"{'torch.nn cpu us':>16} {'bnlib cpu us':>13} {'ratio':>6} {'target':>7}")
    print(head)
    print("-" * len(head))
    for ours_cls, ref_cls, shape, cl, target in SMALL_CASES:
        t = time_small_modules(ours_cls(shape[1]), ref_cls(shape[1]), shape, cl, repeats, iters)
        (bw, bc), (tw, tc) = t["bnlib"], t["torch.nn"]
        print(f"{ours_cls.__name__:<12} {str(shape):<16} {'channels_last' if cl else 'contiguous':<14} "
              f"{tw:12.1f} {bw:9.1f} {bw / tw:6.2f} {tc:16.1f} {bc:13.1f} {bc / tc:6.2f} {'<= %.1f' % target:>7}")
    print("ratio = bnlib.torch module / torch.nn module, per call (forward + backward, gradients set to None); "
          "cpu = the thread's CPU time")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller input (N/4) and 5 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 10; 5 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--shape", type=int, nargs="+", default=None, help="input shape (default 256 64 32 32)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--small-only", action="store_true", help="only the small-module table")
    p.add_argument("--no-small", action="store_true", help="skip the small-module table")
    p.add_argument("--small-threads", type=int, default=1, help="threads for the small-module table (default 1)")
    p.add_argument("--small-repeats", type=int, default=15, help="repeats per small-module row (default 15)")
    p.add_argument("--small-iters", type=int, default=200, help="calls per repeat, small modules (default 200)")
    args = p.parse_args(argv)
    if args.small_only and args.no_small:
        p.error("--small-only and --no-small exclude each other")
    if not args.no_small:
        small_table(args.small_repeats, args.small_iters, args.small_threads)
        if args.small_only:
            return
        print()
    shape = tuple(args.shape) if args.shape else ((64, 64, 32, 32) if args.quick else (256, 64, 32, 32))
    repeats = args.repeats or (5 if args.quick else 10)
    if repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    E = 1
    for s in shape:
        E *= s
    print(f"batch norm, training mode, float32 {shape} ({E * 4 / 2**20:.0f} MiB per tensor), "
          f"{args.threads} threads, median of {repeats} repeats; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs visible (shared machine: timings are noisy)")
    layouts = [False, True] if len(shape) == 4 else [False]
    rows = []
    for cl in layouts:
        inputs = make_inputs(shape, cl)
        fwd = time_impls(IMPLS, inputs, repeats, backward=False)
        both = time_impls(IMPLS, inputs, repeats, backward=True)
        mem = {n: None if args.no_memory else peak_memory(n, shape, cl, args.threads) for n in IMPLS}
        rows.append(("channels_last" if cl else "contiguous", fwd, both, mem))
    head = (f"{'layout':<14} {'implementation':<15} {'fwd ms':>8} {'fwd+bwd ms':>11} {'ratio':>6} "
            f"{'fwd+bwd cpu ms':>15} {'ratio':>6} {'peak MiB':>9} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    base_name = "torch (native)"
    for layout, fwd, both, mem in rows:
        for name in IMPLS:
            rw = both[name][0] / both[base_name][0]
            rc = both[name][1] / both[base_name][1]
            m = mem[name]
            mem_s = "n/a" if m is None else f"{m / 2**20:9.1f}"
            rm = "" if (m is None or not mem[base_name]) else f"{m / mem[base_name]:6.2f}"
            print(f"{layout:<14} {name:<15} {fwd[name][0]:8.1f} {both[name][0]:11.1f} {rw:6.2f} "
                  f"{both[name][1]:15.1f} {rc:6.2f} {mem_s:>9} {rm:>6}")
    print("ratio = bnlib.torch / torch (native); targets: time <= 1.3, peak memory <= 1.25. cpu ms = process "
          "CPU time (all threads), less sensitive to other processes than wall-clock; peak = RSS growth during "
          "one forward+backward step in a fresh process")


if __name__ == "__main__":
    main()
