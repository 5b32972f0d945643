"""Float32 tolerances that hold on any processor (shared by tests/, tests/numpy and tests/torch).

A float32 result's rounding error depends on the order of its sums, and that order depends on the processor
(AVX2 or AVX-512 kernels in torch, oneDNN, MKL, OpenBLAS and NumPy): a constant like ``atol=2e-5`` between
bnlib and torch, tuned on one machine, fails on another. Instead a low-precision result is judged by its
error against a float64 truth computed from the *same* (rounded) inputs, next to the error that an
independent implementation -- usually torch's own float32 kernel, on the same input and the same machine --
makes against that truth::

    max|ours - truth|  <=  factor * max|ref - truth|  +  ulps * eps(ours.dtype) * scale

``scale`` defaults to ``max|truth|``, so the floor is counted in units in the last place of the result's
magnitude and a reference that happens to be exact does not make the bound zero.

The defaults, ``factor = 4`` and ``ulps = 16`` (16 float32 ulps = 1.9e-6 relative to the largest value),
come from measuring every comparison that uses them under both numeric configurations: bnlib's hand-derived
backward computes ``dx = a * dy + b * x + c`` (and its group/instance norm forward ``y = scale * x + shift``)
from the uncentered ``x``, so it rounds at the size of ``|x| * invstd`` where torch rounds at ``|x_hat|``;
with inputs a few standard deviations from 0 that makes bnlib's float32 error up to ~3-4x torch's, and up to
~10 ulps of the largest value where torch's is ~2 (the worst case measured is at 0.47 of this bound). Two
rounding errors are two random draws, so the bound needs that much room. An algorithmic fault (a one-pass
variance, a biased/unbiased mix-up, a wrong formula) makes errors orders of magnitude larger, and still fails.

(``tests/`` is a package mirroring ``bnlib``'s layout; import this module as ``from tests._numerics import ...``.)
"""
from __future__ import annotations

import numpy as np

try:
    import torch
except ImportError:  # the NumPy reference does not need torch
    torch = None

FACTOR = 4.0
ULPS = 16.0


def _float64(a) -> np.ndarray:
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def eps(a) -> float:
    """Machine epsilon of ``a``'s dtype (torch or NumPy; float32 for anything that is not floating point)."""
    if torch is not None and isinstance(a, torch.Tensor):
        return float(torch.finfo(a.dtype).eps) if a.is_floating_point() else float(np.finfo(np.float32).eps)
    dtype = np.asarray(a).dtype
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else float(np.finfo(np.float32).eps)


def max_error(a, truth) -> float:
    """``max |a - truth|`` in float64 (0 for empty arrays)."""
    d = np.abs(_float64(a) - _float64(truth))
    return float(d.max()) if d.size else 0.0


def assert_error_within(ours, ref, truth, *, factor: float = FACTOR, ulps: float = ULPS, scale=None,
                        what: str = "") -> tuple[float, float]:
    """Assert ``max|ours - truth| <= factor * max|ref - truth| + ulps * eps(ours) * scale``.

    ``ours``: the result under test; ``ref``: the same quantity from an independent implementation on the same
    input (torch's own kernel, say), in the same precision; ``truth``: the float64 result on the same input.
    ``scale``: the magnitude the floor is counted in (default ``max|truth|``). Returns both errors.
    """
    truth64 = _float64(truth)
    assert _float64(ours).shape == truth64.shape and _float64(ref).shape == truth64.shape, what
    err, err_ref = max_error(ours, truth64), max_error(ref, truth64)
    if scale is None:
        scale = float(np.abs(truth64).max()) if truth64.size else 0.0
    bound = factor * err_ref + ulps * eps(ours) * scale
    assert np.isfinite(err) and err <= bound, (
        f"{what}: error {err:.3g} against the float64 truth exceeds {factor:g} x the reference's error "
        f"{err_ref:.3g} + {ulps:g} ulps of {scale:.3g} (= {bound:.3g})")
    return err, err_ref


def assert_states_within(ours, ref, truth, **kwargs) -> None:
    """:func:`assert_error_within` for every floating entry of three modules' state dicts (bnlib, torch's
    float32, float64 truth); the other entries (``num_batches_tracked``) must be equal."""
    states = [m.state_dict() for m in (ours, ref, truth)]
    assert list(states[0]) == list(states[1]) == list(states[2])
    for k in states[0]:
        if states[1][k].is_floating_point():
            assert_error_within(states[0][k], states[1][k], states[2][k], what=k, **kwargs)
        else:
            assert (states[0][k] == states[1][k]).all(), k
