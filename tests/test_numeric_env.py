"""The two numeric configurations of `make test` (scripts/numeric_env.py): the second one really sums in
another order, so passing under both means something."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("numeric_env", ROOT / "scripts" / "numeric_env.py")
numeric_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(numeric_env)

PROBE = """
import torch, numpy as np
g = torch.Generator().manual_seed(0)
x = torch.randn(100_003, generator=g)
conv = torch.nn.functional.conv2d(torch.randn(8, 16, 14, 14, generator=g), torch.randn(32, 16, 3, 3, generator=g))
a, b = torch.randn(64, 300, generator=g), torch.randn(300, 70, generator=g)
r = np.random.default_rng(0)
A, B = r.standard_normal((64, 300)), r.standard_normal((300, 70))
print(torch.backends.cpu.get_cpu_capability())
for value in (x.sum().item(), conv.sum().item(), (a @ b).sum().item(), float((A @ B).sum())):
    print(repr(value))
"""


def _probe(config: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in numeric_env.environment("other")}
    env.update(numeric_env.environment(config))
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_the_other_configuration_changes_full_precision_results():
    native, other = _probe("native"), _probe("other")
    assert other[0] == "DEFAULT" and native[0] != "DEFAULT"  # torch's portable kernels, not this CPU's
    values_n, values_o = [float(v) for v in native[1:]], [float(v) for v in other[1:]]
    differing = [i for i, (n, o) in enumerate(zip(values_n, values_o)) if n != o]
    assert len(differing) >= 2, f"the 'other' configuration changed too little: {native} vs {other}"
    for n, o in zip(values_n, values_o):  # ... and only in the rounding: float32 sums of ~1e5 terms
        assert abs(n - o) <= 1e-4 * max(1.0, abs(n)) * 10


def test_configurations_by_processor():
    assert numeric_env.environment("native") == {"BNLIB_NUMERIC_CONFIG": "native", **numeric_env.ONE_THREAD}
    on_avx512 = numeric_env.environment("other", {"avx2", "avx512f"})
    on_avx2 = numeric_env.environment("other", {"avx2"})
    assert on_avx512["ATEN_CPU_CAPABILITY"] == on_avx2["ATEN_CPU_CAPABILITY"] == "default"
    assert on_avx512["ONEDNN_MAX_CPU_ISA"] == "AVX2" and on_avx2["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    assert all(" " not in v for v in on_avx512.values())  # `env $(numeric_env.py other)` splits on spaces
    with pytest.raises(ValueError, match="config"):
        numeric_env.environment("intel")
