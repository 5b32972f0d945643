"""Array-level validation and running-statistics helpers shared by the NumPy layers (private).

Everything here only *reads*; the single function that writes (:func:`update_running`) is called by each layer
after all its arguments have been validated, so an error never leaves the running statistics half-updated.
"""
from __future__ import annotations

import numpy as np

from .. import _checks

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float(name, dtype):
    """:func:`bnlib._checks.check_float_dtype` with a fast path for the accepted dtypes."""
    if dtype not in _FLOAT_DTYPES:
        _checks.check_float_dtype(name, dtype)


def as_input(x, allowed_ndim, layout=""):
    """``x`` as an ndarray of float32/float64 with an allowed number of dimensions."""
    x = np.asarray(x)
    _checks.check_ndim(x.ndim, allowed_ndim, "input", layout)
    check_float("input", x.dtype)
    return x


def as_per_channel(name, value, C):
    """``None`` or a float array of shape ``(C,)``."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.shape != (C,):
        _checks.check_per_channel(name, arr.shape, C)
    check_float(name, arr.dtype)
    return arr


def as_running(name, value, C, will_update):
    """Like :func:`as_per_channel`; when the layer will update it in place it must be a writeable ndarray."""
    if value is None:
        return None
    if will_update and not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array (it is updated in place), got {type(value).__name__}")
    arr = as_per_channel(name, value, C)
    if will_update and not arr.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array (it is updated in place), got a read-only one")
    return arr


def _as_count(num_batches_tracked):
    """``num_batches_tracked`` as a Python int, or ``None`` when it is not an integer scalar."""
    count = np.asarray(num_batches_tracked)
    if count.ndim != 0 or count.dtype.kind not in "iu":
        return None
    return int(count)


def averaging_factor(momentum, num_batches_tracked, needed):
    """The weight of the new batch in ``running = (1 - f) * running + f * batch``: ``momentum``, or
    ``1 / num_batches_tracked`` for ``momentum=None``; see :func:`bnlib._checks.averaging_factor`.
    ``num_batches_tracked`` may be an int or an integer NumPy scalar (0-d array)."""
    return _checks.averaging_factor(momentum, num_batches_tracked, needed, _as_count)


def update_running(running, batch_value, factor):
    """``running <- (1 - factor) * running + factor * batch_value``, in place (computed in float64)."""
    running[...] = (1.0 - factor) * running.astype(np.float64) + factor * batch_value


def unbiased(var, n):
    """Bessel's correction ``var * n / (n - 1)`` (``n > 1`` is checked before)."""
    return var * (n / (n - 1.0))

