"""How the book prints numbers: the output policy of CONTRIBUTING.md as three small helpers.

- :func:`rounding_bound` -- a difference that is rounding noise is printed as a bound in units of machine
  epsilon (``max |bnlib - torch| < 8 eps``) and asserted, never as its digits (``8.6e-18`` on one processor,
  ``1.1e-17`` on another);
- :func:`spread` -- a result over seeds is printed as its median and range, at the precision the spread
  supports;
- :func:`glue` -- a number quoted in the prose is glued from the computation (myst-nb's ``{glue:text}`` role),
  so text and outputs cannot disagree.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["rounding_bound", "spread", "glue", "eps_of"]


def _dtype_name(dtype) -> str:
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        return np.dtype(dtype).name
    return str(getattr(dtype, "name", dtype)).replace("torch.", "")


def eps_of(dtype) -> float:
    """Machine epsilon of a NumPy or torch floating dtype (``float32`` -> 1.19e-07)."""
    name = _dtype_name(dtype)
    try:
        return float(np.finfo(np.dtype(name)).eps) if name != "bfloat16" else 2.0**-7
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dtype: expected a floating dtype (float16/32/64, bfloat16), got {dtype!r}") from exc


def rounding_bound(label: str, error: float, dtype, *, within: float, scale: float = 1.0) -> str:
    """Assert ``error <= within * eps(dtype) * scale`` and return the line that states it.

    ``scale`` is the magnitude the error is relative to (e.g. ``max |x|``); ``within`` the bound in units of
    epsilon, chosen with room for another processor's summation order. The returned text holds only the
    bound, so it reads the same wherever it runs.

    >>> rounding_bound("max |bnlib - torch|", 3e-7, "float32", within=8)
    'max |bnlib - torch| < 8 eps (float32, eps = 1.2e-07)'
    """
    eps = eps_of(dtype)
    if not np.isfinite(error) or error < 0:
        raise ValueError(f"error: expected a finite non-negative number, got {error!r}")
    if not within > 0 or not scale > 0:
        raise ValueError(f"within and scale must be positive, got within={within!r}, scale={scale!r}")
    limit = within * eps * scale
    units = error / (eps * scale)
    assert error <= limit, f"{label} = {error:.3g} = {units:.1f} eps, above the stated bound of {within:g} eps"
    dtype_name = _dtype_name(dtype)
    relative = "" if scale == 1.0 else f" x {scale:.3g}"
    return f"{label} < {within:g} eps{relative} ({dtype_name}, eps = {eps:.1e})"


def spread(values: Iterable[float], fmt: str = ".3f") -> str:
    """``'median [min, max]'`` of ``values`` with one format (e.g. ``'.2f'``, ``'.0f'``, ``'.1%'``)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        raise ValueError("values: expected at least one number")
    return f"{np.median(arr):{fmt}} [{arr.min():{fmt}}, {arr.max():{fmt}}]"


def glue(name: str, value) -> None:
    """Glue ``value`` under ``name`` for the prose (``{glue:text}`name```), showing nothing in the cell.

    Uses myst-nb's ``glue`` when it is installed (the website's build) and the same output format otherwise,
    so the notebook runs in Colab without it.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        from IPython.core.formatters import format_display_data
        from IPython.display import display

        bundle, metadata = format_display_data(value)
        metadata["scrapbook"] = {"name": name, "mime_prefix": "application/papermill.record/"}
        display({"application/papermill.record/" + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
        return
    myst_glue(name, value, display=False)
