"""How the book prints numbers: the output policy of CONTRIBUTING.md as three small helpers.

- :func:`rounding_bound` -- a difference that is rounding noise is printed as a bound in units of machine
  epsilon (``max |bnlib - torch| < 8 eps``) and asserted, never as its digits (``8.6e-18`` on one processor,
  ``1.1e-17`` on another);
- :func:`spread` -- a result over seeds is printed as its median and range, at the precision the spread
  supports;
- :func:`glue` -- a number quoted in the prose is glued from the computation (myst-nb's ``{glue:text}`` role),
  so text and outputs cannot disagree;
- :func:`judge` -- the book's one rule for turning a per-seed effect into a verdict on a claim
  (:data:`VERDICT_RULE`), so every chapter and the claims audit use the same words for the same evidence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Tuple

import numpy as np

__all__ = ["rounding_bound", "spread", "glue", "eps_of", "VERDICTS", "VERDICT_RULE", "Verdict", "judge",
           "judge_conditions"]


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


# ------------------------------------------------------------------------------------------------ verdicts
VERDICTS = ("confirmed", "qualified", "not supported", "refuted")

VERDICT_RULE = (
    "Each claim is measured as an effect per seed, positive in the direction the claim states (a speed-up as "
    "the log of a ratio of steps, a gain as a difference of accuracies), on at least 3 seeds, with a margin: "
    "the smallest effect that counts. "
    "Confirmed: every seed's effect exceeds the margin and the median effect exceeds the seed-to-seed range "
    "(max - min), and the claim holds in every condition tested. "
    "Qualified: every seed's effect exceeds the margin, but the median does not exceed the range, or the claim "
    "holds only in part of the conditions tested (stated next to the verdict). "
    "Refuted: every seed's effect is below minus the margin (the opposite of the claim). "
    "Not supported: anything else (the seeds disagree, or the effect stays within the margin)."
)


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict and the per-seed effects it rests on (:func:`judge`)."""

    claim: str
    verdict: str
    effects: Tuple[float, ...]
    margin: float
    fmt: str
    unit: str
    partial: str

    @property
    def n(self) -> int:
        return len(self.effects)

    @property
    def median(self) -> float:
        return float(np.median(self.effects))

    @property
    def low(self) -> float:
        return float(min(self.effects))

    @property
    def high(self) -> float:
        return float(max(self.effects))

    def evidence(self) -> str:
        """``'median [min, max] over n seeds'`` of the effect, in its format and unit."""
        u = self.unit
        return (f"{self.median:{self.fmt}}{u} [{self.low:{self.fmt}}{u}, {self.high:{self.fmt}}{u}] "
                f"over {self.n} seeds")

    def __str__(self) -> str:
        only = f" (only {self.partial})" if self.partial else ""
        return f"{self.claim}: {self.verdict}{only}; effect {self.evidence()}"

    def glue(self, key: str) -> None:
        """Glue the verdict word under ``key`` and its evidence under ``key + '_evidence'`` (for the prose and
        the claims audit, which reads them back with :func:`bnlib.lab.book.stored_glue`)."""
        glue(key, self.verdict)
        glue(key + "_evidence", self.evidence())


def judge(claim: str, effects: Iterable[float], *, margin: float = 0.0, fmt: str = ".2f", unit: str = "",
          partial: str = "", min_seeds: int = 3) -> Verdict:
    """The verdict on ``claim`` from its per-seed ``effects`` under :data:`VERDICT_RULE`.

    ``effects``: one number per seed, positive in the claim's direction; ``margin`` (>= 0): the smallest effect
    that counts; ``partial``: empty when the claim held in every condition tested, else the conditions it held
    in (the verdict is then at most 'qualified'); ``fmt``/``unit``: how :meth:`Verdict.evidence` prints it.

    >>> str(judge("BN trains faster", [1.2, 1.5, 1.4], fmt=".1f"))
    'BN trains faster: confirmed; effect 1.4 [1.2, 1.5] over 3 seeds'
    >>> judge("BN regularizes", [0.01, -0.02, 0.0], margin=0.005).verdict
    'not supported'
    """
    if not isinstance(claim, str) or not claim:
        raise ValueError(f"claim: expected a non-empty string, got {claim!r}")
    try:
        values = tuple(float(e) for e in effects)
    except (TypeError, ValueError):
        raise ValueError(f"effects: expected numbers, one per seed, got {effects!r}") from None
    if len(values) < min_seeds:
        raise ValueError(f"effects: expected at least {min_seeds} seeds, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"effects: expected finite numbers (pass a censored run as its bound), got {values}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin: expected a finite number >= 0, got {margin!r}")
    if not isinstance(partial, str):
        raise TypeError(f"partial: expected a string (empty when the claim held everywhere), got {partial!r}")
    lo, hi, med = min(values), max(values), float(np.median(values))
    if lo > margin:
        verdict = "confirmed" if med > hi - lo and not partial else "qualified"
    elif hi < -margin:
        verdict = "refuted"
    else:
        verdict = "not supported"
    return Verdict(claim, verdict, values, float(margin), fmt, unit, partial)


def judge_conditions(claim: str, effects: dict, *, margin: float, fmt: str = ".2f", unit: str = ""):
    """The book's verdict (:func:`bnlib.lab.report.judge`) on a claim measured in several conditions.

    ``effects``: ``{condition: per-seed effects}`` (the same seeds in every condition, positive in the claim's
    direction). The claim holds in every condition when each seed's *smallest* effect over the conditions
    exceeds the margin, so the verdict is judged on those minima; when it does not, but the claim holds (every
    seed above the margin) in some conditions, the verdict is judged on the first of them and is at most
    'qualified', naming them (``partial``); otherwise (no condition holds) it is judged on the minima.
    """
    if not isinstance(effects, dict) or not effects:
        raise ValueError(f"effects: expected a non-empty dict {{condition: per-seed effects}}, got {effects!r}")
    arrays = {k: np.asarray(list(v), dtype=float) for k, v in effects.items()}
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"effects: expected the same number of seeds in every condition, got {sorted(sizes)}")
    worst = np.min(np.stack(list(arrays.values())), axis=0)
    holding = [k for k, a in arrays.items() if a.min() > margin]
    if worst.min() > margin or not holding:
        return judge(claim, worst, margin=margin, fmt=fmt, unit=unit)
    return judge(claim, arrays[holding[0]], margin=margin, fmt=fmt, unit=unit, partial=", ".join(holding))
