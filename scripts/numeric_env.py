"""Print the environment of one of the book's two numeric configurations, as ``NAME=value`` lines.

    env $(python scripts/numeric_env.py native) pytest ...    # this processor's own SIMD kernels, 1 thread
    env $(python scripts/numeric_env.py other) pytest ...     # emulates the other kind of x86 processor

Floating-point sums depend on the order of their terms, and the order depends on the processor: torch's
kernels, oneDNN's convolutions, MKL's and OpenBLAS's matrix products and NumPy's dispatched loops each pick
a code path by the widest SIMD unit they find (AVX-512 on recent Intel Xeons and AMD Zen 4, AVX2 on older AMD EPYCs).
SGD amplifies the last bit, so a notebook whose stored outputs were made on one processor is checked on the
other too. ``make test`` runs the unit tests and every notebook under both configurations:

- ``native``: every library on its own choice of kernels, one thread (the two configurations run side by side
  on a 2-core machine);
- ``other``: torch's portable (non-SIMD-specific) kernels, MKL's processor-independent path, and oneDNN,
  OpenBLAS and NumPy held one SIMD level below what this processor offers (AVX2 on an AVX-512 processor, SSE
  on an AVX2 one). Every torch sum then runs in an order that neither kind of processor uses natively.
  NumPy's own reductions (pairwise summation in a fixed block order) give the same bits on every x86
  processor, so pure-NumPy results rarely change here; its matrix products (OpenBLAS) do.
  ``tests/test_numeric_env.py`` checks that the two configurations really give different full-precision
  results.
"""
from __future__ import annotations

import sys
from pathlib import Path

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# Whatever the processor: torch's own kernels (reductions, element-wise ops, batch norm) in their portable
# build, whose loops neither the AVX2 nor the AVX-512 build shares, and MKL's matrix products on its
# processor-independent path.
ALWAYS_OTHER = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
# One SIMD level below the processor's own for the libraries that pick kernels by it at run time:
# oneDNN (torch's convolutions), OpenBLAS (NumPy's matrix products) and NumPy's dispatched loops.
BELOW_AVX512 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OPENBLAS_CORETYPE": "Haswell",
                "NPY_DISABLE_CPU_FEATURES": "X86_V4,AVX512_ICL"}
BELOW_AVX2 = {"ONEDNN_MAX_CPU_ISA": "SSE41", "OPENBLAS_CORETYPE": "Nehalem", "NPY_DISABLE_CPU_FEATURES": "X86_V3"}
CONFIGS = ("native", "other")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The processor's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def environment(config: str, flags: set[str] | None = None) -> dict[str, str]:
    """The variables that select ``config`` ('native' or 'other') on a processor with these ``flags``."""
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    env = {"BNLIB_NUMERIC_CONFIG": config, **ONE_THREAD}
    if config == "other":
        flags = cpu_flags() if flags is None else flags
        env.update(ALWAYS_OTHER)
        env.update(BELOW_AVX512 if "avx512f" in flags else BELOW_AVX2)
    return env


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CONFIGS:
        print(f"usage: numeric_env.py {{{'|'.join(CONFIGS)}}}", file=sys.stderr)
        return 2
    print("\n".join(f"{k}={v}" for k, v in environment(argv[0]).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
