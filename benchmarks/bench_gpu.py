"""GPU benchmark: bnlib's Triton batch norm against PyTorch (cuDNN, and PyTorch's native CUDA kernels).

    .venv/bin/python benchmarks/bench_gpu.py                  # on a machine with a CUDA GPU
    .venv/bin/python benchmarks/bench_gpu.py --interpret      # no GPU: tiny-shape correctness check on CPU
    .venv/bin/python benchmarks/bench_gpu.py --json out.json  # also write the rows as JSON

For (N, C, H, W) = (32, 64, 112, 112) and (256, 256, 14, 14), NCHW and channels-last (NHWC), float32 and
bfloat16 (parameters and running statistics in float32), it times the training-mode forward and the backward
of

- ``torch``  : ``torch.nn.functional.batch_norm`` (cuDNN for these 4-D inputs),
- ``native`` : the same with cuDNN disabled (PyTorch's own Welford CUDA kernels),
- ``triton`` : ``bnlib.torch.triton_bn.batch_norm_forward`` / ``batch_norm_backward``,

after checking that the Triton results match torch's. Times are medians of repeats from
``triton.testing.do_bench`` (which flushes the L2 cache before every run, so the data come from HBM). The
device copy bandwidth is measured with a 1 GiB ``dst.copy_(src)`` (2 GiB moved). For every row it prints
the bytes a *streaming* batch-norm kernel must move (forward ``3E*b`` = 12E bytes in float32, backward
``5E*b`` = 20E; ``b`` bytes per element), the achieved bandwidth ``bytes / time`` and that as a percentage
of the copy bandwidth -- the same byte count for every implementation, so the GB/s column compares times. The
bytes Triton's own launch plan moves are printed as well.

Times are those of the public Python calls, so they include bnlib's host-side planning and the launch of its
(three) kernels -- tens of microseconds, which matters for the small shape; CUDA graphs would remove it.

Without a CUDA GPU it prints that no GPU is available and exits 0 without numbers (nothing is estimated).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

SHAPES = [(32, 64, 112, 112), (256, 256, 14, 14)]
LAYOUTS = ["NCHW", "NHWC"]
DTYPES = ["float32", "bfloat16"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton kernels in the CPU interpreter on tiny shapes and check them (no timing)")
    p.add_argument("--rep", type=int, default=200, help="milliseconds of timed runs per measurement (do_bench)")
    p.add_argument("--json", type=str, default=None, help="write the result rows to this JSON file")
    return p.parse_args(argv)


def make_inputs(torch, shape, layout, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(C, generator=g) + 0.5).to(device)
    b = torch.randn(C, generator=g).to(device)
    return x, dy, w, b


def torch_reference(torch, x, dy, w, b):
    """torch's forward output, running statistics after one step, and gradients (x, w, b)."""
    F = torch.nn.functional
    C = x.shape[1]
    rm, rv = torch.zeros(C, device=x.device), torch.ones(C, device=x.device)
    xg, wg, bg = x.detach().clone().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = F.batch_norm(xg, rm, rv, wg, bg, True, 0.1, 1e-5)
    dx, dw, db = torch.autograd.grad(y, (xg, wg, bg), dy)
    return y.detach(), rm, rv, dx, dw, db


def check_triton(torch, tb, x, dy, w, b):
    """Largest differences (forward, running stats, dx, dw/db relative) between Triton and torch."""
    y_t, rm_t, rv_t, dx_t, dw_t, db_t = torch_reference(torch, x, dy, w, b)
    C = x.shape[1]
    rm, rv = torch.zeros(C, device=x.device), torch.ones(C, device=x.device)
    y, mean, invstd = tb.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    dx, dw, db = tb.batch_norm_backward(dy, x, w, mean, invstd)
    d = lambda a, c: (a.float() - c.float()).abs().max().item()  # noqa: E731
    scale = dw_t.abs().max().item() + 1.0
    return {"y": d(y, y_t), "running": max(d(rm, rm_t), d(rv, rv_t)), "dx": d(dx, dx_t),
            "dw_rel": max(d(dw, dw_t), d(db, db_t)) / scale,
            "layout_kept": y.stride() == x.stride() and dx.stride() == x.stride()}


def interpret_mode() -> int:
    os.environ["TRITON_INTERPRET"] = "1"  # before bnlib.torch.triton_bn is imported
    import torch

    from bnlib.torch import triton_bn as tb

    if not tb.is_interpreted():
        print("bnlib.torch.triton_bn was imported before TRITON_INTERPRET was set; cannot interpret")
        return 1
    ok = True
    print(f"{'shape':<18}{'layout':<7}{'dtype':<10}{'path':<7}{'y':>9}{'running':>9}{'dx':>9}{'dw_rel':>9}")
    for shape in [(4, 3, 6, 7), (4, 3, 48, 48)]:
        for layout in LAYOUTS:
            for dtype_name in DTYPES:
                dtype = getattr(torch, dtype_name)
                x, dy, w, b = make_inputs(torch, shape, layout, dtype, "cpu")
                path = "fused" if tb.plan(x).launches[0].name == "_bn_fwd_fused" else "split"
                r = check_triton(torch, tb, x, dy, w, b)
                tol = 2e-5 if dtype == torch.float32 else 6e-2
                good = r["y"] <= tol and r["dx"] <= tol and r["running"] <= 1e-4 and r["dw_rel"] <= 1e-3 \
                    and r["layout_kept"]
                ok &= good
                print(f"{str(shape):<18}{layout:<7}{dtype_name:<10}{path:<7}{r['y']:>9.1e}{r['running']:>9.1e}"
                      f"{r['dx']:>9.1e}{r['dw_rel']:>9.1e}  {'ok' if good else 'MISMATCH'}")
    print("interpreter check:", "all match torch" if ok else "MISMATCH")
    return 0 if ok else 1


def gpu_mode(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU is available on this machine: no GPU numbers were measured (none are estimated).")
        print("Run this script on a machine with a CUDA GPU, or use --interpret for a CPU correctness check.")
        return 0
    import triton
    from triton.testing import do_bench

    from bnlib.torch import triton_bn as tb

    if tb.is_interpreted():
        print("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels")
        return 1
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    F = torch.nn.functional

    def bench(fn):
        return do_bench(fn, rep=args.rep, return_mode="median") * 1e-3  # seconds

    n = 2**28  # 1 GiB of float32
    src = torch.ones(n, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * n * 4 / bench(lambda: dst.copy_(src))
    src = dst = None  # free the 2 GiB (rebinding, not del: the lambda above refers to the names)
    torch.cuda.empty_cache()
    print(f"device: {name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"cuDNN {torch.backends.cudnn.version()}")
    print(f"copy bandwidth (1 GiB dst.copy_(src), 2 GiB moved): {copy_bw / 1e9:.0f} GB/s")

    rows = []
    header = (f"{'shape':<19}{'layout':<7}{'dtype':<9}{'pass':<9}{'impl':<8}{'time ms':>9}{'MB':>8}"
              f"{'GB/s':>8}{'% copy':>8}{'triton MB':>10}")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        for layout in LAYOUTS:
            for dtype_name in DTYPES:
                dtype = getattr(torch, dtype_name)
                x, dy, w, b = make_inputs(torch, shape, layout, dtype, dev)
                err = check_triton(torch, tb, x, dy, w, b)
                tol = 1e-4 if dtype == torch.float32 else 6e-2
                if not (err["y"] <= tol and err["dx"] <= tol and err["dw_rel"] <= 1e-3 and err["layout_kept"]):
                    print(f"MISMATCH {shape} {layout} {dtype_name}: {err}")
                    return 1
                C, E, bsz = shape[1], x.numel(), x.element_size()
                rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
                _, mean, invstd = tb.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
                xg = x.detach().clone().requires_grad_(True)
                wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
                times = {}
                for impl in ("torch", "native"):
                    with torch.backends.cudnn.flags(enabled=(impl == "torch")):
                        times[("forward", impl)] = bench(lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
                        y = F.batch_norm(xg, rm, rv, wg, bg, True, 0.1, 1e-5)
                        times[("backward", impl)] = bench(
                            lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True))
                        y = None  # free the graph (rebinding, not del: the lambdas refer to y)
                times[("forward", "triton")] = bench(lambda: tb.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5))
                times[("backward", "triton")] = bench(lambda: tb.batch_norm_backward(dy, x, w, mean, invstd))
                for pas, k in (("forward", 3), ("backward", 5)):
                    nbytes = k * E * bsz
                    planned = tb.planned_bytes(x, training=True, backward=(pas == "backward"))
                    for impl in ("torch", "native", "triton"):
                        t = times[(pas, impl)]
                        row = dict(shape=list(shape), layout=layout, dtype=dtype_name, pass_=pas, impl=impl,
                                   time_ms=t * 1e3, bytes=nbytes, gbps=nbytes / t / 1e9,
                                   pct_copy=100 * nbytes / t / copy_bw,
                                   triton_planned_bytes=planned if impl == "triton" else None)
                        rows.append(row)
                        tm = f"{planned / 1e6:>10.1f}" if impl == "triton" else f"{'':>10}"
                        print(f"{str(shape):<19}{layout:<7}{dtype_name:<9}{pas:<9}{impl:<8}{t * 1e3:>9.3f}"
                              f"{nbytes / 1e6:>8.1f}{row['gbps']:>8.0f}{row['pct_copy']:>7.0f}%{tm}")
                x = dy = xg = None  # free the tensors (rebinding, not del: the lambdas refer to them)
                torch.cuda.empty_cache()
    print("torch = F.batch_norm (cuDNN); native = cuDNN disabled; triton = bnlib.torch.triton_bn.")
    print("MB, GB/s and % copy use the streaming minimum (forward 3E*b, backward 5E*b bytes) for every impl.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "copy_bandwidth": copy_bw, "rows": rows}, f, indent=1)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rep < 1:
        raise SystemExit("--rep must be >= 1")
    if args.interpret:
        return interpret_mode()
    return gpu_mode(args)


if __name__ == "__main__":
    sys.exit(main())
