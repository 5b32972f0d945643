"""Ahead-of-time compilation of the Triton kernels (no GPU needed): proves they compile for an NVIDIA
architecture and reports their registers, spills and vector widths.

:func:`compile_report` plans every call for a set of shapes on ``"meta"`` tensors, specializes each launch's
signature exactly as ``triton.jit`` would at launch time (:func:`_signature`) and compiles it with the
``ptxas`` Triton ships; :func:`_resource_usage` reads the cubin's resources with Triton's ``cuobjdump``.
It needs compiled (not interpreted) kernels: ``TRITON_INTERPRET`` unset when the kernels are imported.
"""
import os
from typing import Dict

import torch

from .kernels import _TRITON_IMPORT_ERROR, KERNELS, is_interpreted, triton
from .launch import Launch, plan_backward, plan_forward

__all__ = ["compile_report"]


def _signature(launch: Launch):
    """Signature, constexprs and attributes exactly as ``triton.jit`` specializes them at launch time
    (ints equal to 1 become constants; ints and pointers divisible by 16 get ``tt.divisibility``)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    fn = KERNELS[launch.name]
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            sig[name] = "constexpr"
            constexprs[name] = launch.constexprs[name]
            continue
        v = launch.args[name]
        if isinstance(v, torch.Tensor):  # meta tensors have no address: torch allocations are 16-aligned
            kind, attr = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[v.dtype], "D"
        else:
            kind, attr = native_specialize_impl(BaseBackend, v, False, True, True)
        if kind == "constexpr":
            sig[name] = "constexpr"
            constexprs[name] = attr
            continue
        sig[name] = kind
        if attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers, stack and local (spill) bytes of a cubin, read with the ``cuobjdump`` Triton ships."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def compile_report(arch: int = 90, shapes=None, dtypes=(torch.float32, torch.bfloat16), layouts=("NCHW", "NHWC"),
                   once_per_kernel: bool = False):
    """Compile every kernel the plans use for ``shapes`` x ``dtypes`` x (NCHW, channels-last) x
    (train forward, eval forward, backward) for NVIDIA ``sm_<arch>``, without a GPU (Triton ships ``ptxas``),
    specialized as ``triton.jit`` would specialize them on a GPU.

    ``layouts`` applies to 4-D shapes (2-D and 3-D shapes are always contiguous); ``once_per_kernel`` compiles
    each kernel only for its first configuration (a quick check that all of them compile).

    Needs compiled (not interpreted) kernels: run it in a process where ``TRITON_INTERPRET`` is unset.
    Returns a list of dicts: kernel, dtype, layout, shape, blocks, num_warps, registers per thread, spill
    (local) bytes, and ``vector_loads`` -- the widest global load in the PTX (``v4`` = 128-bit for float32).
    """
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    if is_interpreted():
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset when bnlib.torch.triton_bn is imported")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    shapes = shapes or [(32, 64, 112, 112), (256, 256, 14, 14), (64, 256)]
    target = GPUTarget("cuda", arch, 32)
    seen, rows = set(), []
    for shape in shapes:
        for dtype in dtypes:
            for layout in (layouts if len(shape) == 4 else ("NCHW",)):
                # only sizes, strides and dtypes matter: "meta" tensors allocate nothing
                x = torch.empty_strided(shape, _strides(shape, layout), dtype=dtype, device="meta")
                w = torch.ones(shape[1], device="meta")
                rm, rv = torch.zeros(shape[1], device="meta"), torch.ones(shape[1], device="meta")
                plans = [plan_forward(x, w, w, rm, rv, True, 0.1, 1e-5),
                         plan_forward(x, w, w, rm, rv, False, 0.1, 1e-5),
                         plan_backward(x, x, w, rm, rv)]
                for p in plans:
                    for launch in p.launches:
                        sig, constexprs, attrs = _signature(launch)
                        key = (launch.name, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
                               tuple(sorted(attrs)), launch.num_warps)
                        if key in seen or (once_per_kernel and launch.name in seen):
                            continue
                        seen.update([key, launch.name])
                        src = ASTSource(fn=KERNELS[launch.name], signature=sig, constexprs=constexprs,
                                        attrs=attrs)
                        compiled = triton.compile(src, target=target, options={"num_warps": launch.num_warps})
                        ptx = compiled.asm.get("ptx", "")
                        width = max([w for w in (4, 2) if f"ld.global.v{w}" in ptx] or
                                    [1 if "ld.global" in ptx else 0])
                        usage = _resource_usage(compiled.asm["cubin"]) if "cubin" in compiled.asm else {}
                        rows.append(dict(kernel=launch.name, dtype=str(dtype).replace("torch.", ""),
                                         layout=layout, shape=tuple(shape), num_warps=launch.num_warps,
                                         blocks={k: v for k, v in launch.constexprs.items()
                                                 if k.startswith("BLOCK")},
                                         registers=usage.get("reg"), spill_bytes=usage.get("local"),
                                         vector_loads=width))
    return rows


def _strides(shape, layout):
    """Strides of a dense tensor of ``shape`` in ``layout`` ('NCHW' = contiguous, 'NHWC' = channels-last)."""
    if layout == "NHWC":
        N, C, H, W = shape
        return (H * W * C, 1, W * C, C)
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))
