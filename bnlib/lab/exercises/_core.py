"""The machinery every checker shares: run the reader's function on unseen cases, stop at the first problem,
say what is wrong and why, and print only text that reads the same on any processor.

A checker is a list of :class:`Case` objects. Each case calls the reader's function through :func:`call`
(which turns ``NotImplementedError`` into the friendly "not implemented yet" verdict and any other exception
into a :class:`Problem` that names the exception and, where the message allows, its likely cause), compares
what came back with the bnlib reference, and raises a :class:`Problem` whose message says what is wrong and
the likely mistake. :func:`run_cases` runs the cases in order, stops at the first problem and prints the
verdict; the returned :class:`Result` keeps it for tests.

Printed numbers are rounded to two significant digits (:func:`num`), and the verdict of a correct
function holds no number at all, so a stored notebook output does not depend on the processor.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Problem", "Case", "Result", "Revealed", "run_cases", "call", "as_array", "unpack", "num", "close",
           "rel_error", "first_match", "mismatch", "reveal"]

PASS, FAIL, TODO = "✓", "✗", "…"


class Problem(Exception):
    """What is wrong with the reader's result, and the likely cause (the message is printed as it is)."""


class _NotImplemented(Exception):
    """The reader's function still raises NotImplementedError."""


@dataclass
class Case:
    """One check: ``label`` says what input it uses, ``run(fn)`` raises :class:`Problem` when ``fn`` fails it."""

    label: str
    run: Callable[[Callable], None]


@dataclass
class Result:
    """The verdict of a checker: ``status`` is 'passed', 'failed' or 'not implemented'."""

    name: str
    status: str
    passed_labels: List[str] = field(default_factory=list)
    failed_label: Optional[str] = None
    message: str = ""
    remaining: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def lines(self) -> List[str]:
        if self.status == "not implemented":
            return [f"{TODO} {self.name} is not implemented yet (its body still raises NotImplementedError): "
                    "write it, then run this cell again."]
        if self.status == "passed":
            head = f"{PASS} {self.name} passes all {len(self.passed_labels)} checks:"
            return [head] + [f"  {PASS} {label}" for label in self.passed_labels]
        out = [f"{FAIL} {self.name} fails check {len(self.passed_labels) + 1} of "
               f"{len(self.passed_labels) + 1 + self.remaining}: {self.failed_label}"]
        out += ["    " + line for line in self.message.splitlines()]
        if self.passed_labels:
            out.append(f"  ({PASS} passed before it: {'; '.join(self.passed_labels)})")
        if self.remaining == 1:
            out.append("  (the last check runs once this one passes)")
        elif self.remaining:
            out.append(f"  (the other {self.remaining} checks run once this one passes)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def __repr__(self) -> str:
        return f"Result({self.name!r}, {self.status!r})"

    def _ipython_display_(self):
        """Nothing: the checker has printed the verdict already (so ``check(f)`` as a cell's last line does not
        show it twice)."""


def _name(fn) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "your function" if name == "<lambda>" else name


def run_cases(fn, cases: Sequence[Case], *, quiet: bool = False) -> Result:
    """Run ``cases`` in order on ``fn`` until one fails; print the verdict (unless ``quiet``) and return it."""
    name = _name(fn)
    if not callable(fn):
        result = Result(name, "failed", failed_label="the argument",
                        message=f"expected your function, got {type(fn).__name__}: pass the function itself, "
                                "without calling it (check(my_function), not check(my_function()))",
                        remaining=len(cases) - 1)
    else:
        result = Result(name, "passed")
        for k, case in enumerate(cases):
            try:
                case.run(fn)
            except _NotImplemented:
                result = Result(name, "not implemented")
                break
            except Problem as problem:
                result.status, result.failed_label = "failed", case.label
                result.message, result.remaining = str(problem), len(cases) - k - 1
                break
            result.passed_labels.append(case.label)
    if not quiet:
        print(result)
    return result


# ---------------------------------------------------------------------------------------------------------
# Calling the reader's code
# ---------------------------------------------------------------------------------------------------------

#: (text found in the exception message, the likely cause) for mistakes every checker can meet.
COMMON_HINTS: Tuple[Tuple[str, str], ...] = (
    ("could not be broadcast", "a per-channel array of shape (C,) broadcasts against the LAST axis: reshape it "
                               "to (1, C, 1, 1) (or keep the reduced axes with keepdims=True) to act on the "
                               "channel axis"),
    ("NoneType", "an optional argument is None here (no affine parameters, or no running statistics): treat "
                 "weight=None as 1 and bias=None as 0"),
    ("view size is not compatible", "the input is not contiguous: use .reshape() (or .contiguous().view())"),
    ("out of bounds", "your code assumes a different number of dimensions; this input has a different layout"),
    ("unexpected keyword argument", "keep the signature of the stub (the checker calls it with those names)"),
    ("positional argument", "keep the signature of the stub (the checker calls it with those arguments)"),
    ("division by zero", "a count of 1 (a batch of one, or one value per statistic) makes n - 1 = 0"),
)


def call(fn, *args, hints: Sequence[Tuple[str, str]] = (), **kwargs):
    """``fn(*args, **kwargs)`` with NumPy's floating-point warnings silenced; NotImplementedError becomes the
    "not implemented yet" verdict, any other exception a :class:`Problem` naming it and its likely cause."""
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except NotImplementedError:
        raise _NotImplemented() from None
    except Exception as exc:  # the reader's code failed: say how, without a traceback
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"your function raised {type(exc).__name__}" + (f": {text[:200]}" if text else "")
        for pattern, cause in tuple(hints) + COMMON_HINTS:
            if pattern in str(exc) or pattern == type(exc).__name__:
                message += f"\nlikely cause: {cause}"
                break
        raise Problem(message) from None


def as_array(value, what: str) -> np.ndarray:
    """The reader's ``value`` (a NumPy array, a torch tensor, a number or a list) as a float64 array."""
    if value is None:
        raise Problem(f"{what} is None: did the function forget to `return` it?")
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise Problem(f"{what} should be numbers (an array), got {type(value).__name__}") from None
    return arr


def unpack(value, n: int, what: str) -> tuple:
    """The reader's return value as a tuple of ``n`` items (``what`` names them, e.g. '(mean, var)')."""
    if value is None:
        raise Problem(f"your function returned None: did it forget `return {what.strip('()')}`?")
    if not isinstance(value, (tuple, list)) or len(value) != n:
        got = f"a {type(value).__name__}" + (f" of {len(value)} items" if isinstance(value, (tuple, list)) else "")
        raise Problem(f"expected your function to return {n} things, {what}; it returned {got}")
    return tuple(value)


def num(v: float) -> str:
    """``v`` with two significant digits (never more: the last digits of a float depend on the processor)."""
    v = float(v)
    if not np.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        text = f"{v:.2g}"
        return text if "e" not in text else f"{v:.0f}"
    return f"{v:.1e}"


def rel_error(got: np.ndarray, expected: np.ndarray, scale: Optional[float] = None) -> float:
    """``max |got - expected|`` over ``scale`` (default: the largest ``|expected|``, at least 1e-30); inf when
    ``got`` has NaN/inf where ``expected`` is finite or the shapes differ."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return float("inf")
    finite = np.isfinite(expected)
    if not np.array_equal(np.isfinite(got), finite):
        return float("inf")
    if not finite.any():
        return 0.0
    if scale is None:
        scale = float(np.abs(expected[finite]).max())
    diff = np.abs(got[finite] - expected[finite]).max()
    return float(diff / max(scale, 1e-30))


def close(got, expected, tol: float, scale: Optional[float] = None) -> bool:
    """Whether ``got`` matches ``expected`` to ``tol`` relative to ``scale`` (see :func:`rel_error`)."""
    return rel_error(got, expected, scale) <= tol


def first_match(got, candidates, tol: float, scale: Optional[float] = None) -> Optional[str]:
    """The message of the first ``(array_or_callable, message)`` candidate that ``got`` matches, else None.

    A candidate may be a callable returning the array (computed only when needed; one that fails is
    skipped), so a checker can list every mistake it knows cheaply."""
    for candidate, message in candidates:
        if callable(candidate):
            try:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    candidate = candidate()
            except Exception:  # the mistake cannot occur for this input (e.g. shapes that do not broadcast)
                continue
        if candidate is not None and close(got, candidate, tol, scale):
            return message
    return None


def mismatch(what: str, got: np.ndarray, expected: np.ndarray, scale: Optional[float] = None) -> str:
    """A description of how ``got`` differs from ``expected``: where, by how much, one example value."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    bad_nan = ~np.isfinite(got) & np.isfinite(expected)
    if bad_nan.any():
        idx = tuple(int(i) for i in np.argwhere(bad_nan)[0])
        return (f"{what} has {int(bad_nan.sum())} NaN/inf value(s) where the reference is finite, first at index "
                f"{idx}")
    diff = np.where(np.isfinite(expected), np.abs(got - expected), 0.0)
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)) if diff.ndim else ()
    if scale is None:
        finite = expected[np.isfinite(expected)]
        scale = float(np.abs(finite).max()) if finite.size else 1.0
    where = f" at index {idx}" if idx else ""
    return (f"{what} is off by up to {num(diff.max())} (its largest entry is {num(scale)}){where}: yours "
            f"{num(got[idx])}, expected {num(expected[idx])}")


def check_shape(what: str, got: np.ndarray, shape: tuple, hints: Sequence[Tuple[tuple, str]] = ()) -> None:
    """Raise a :class:`Problem` when ``got`` does not have ``shape``; ``hints`` map a wrong shape to its cause."""
    if got.shape == tuple(shape):
        return
    message = f"{what} has shape {tuple(got.shape)}, expected {tuple(shape)}"
    for wrong, cause in hints:
        if got.shape == tuple(wrong):
            message += f": {cause}"
            break
    raise Problem(message)


def check_unchanged(what: str, before: np.ndarray, after, advice: str) -> None:
    """Raise a :class:`Problem` when an input the reader's function must not modify has changed."""
    after = np.asarray(after.detach().cpu().numpy() if hasattr(after, "detach") else after)
    if after.shape != before.shape or not np.array_equal(after, before, equal_nan=True):
        raise Problem(f"your function changed its input {what} in place: {advice}")


# ---------------------------------------------------------------------------------------------------------
# Predict, then run
# ---------------------------------------------------------------------------------------------------------

def _round(value, digits: int):
    """``value`` (a number, an array, a string, a dict of them) rounded for printing; -0.0 printed as 0.0."""
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, (str, bool, type(None))):
        return value
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    rounded = np.round(arr, digits) + 0.0
    return rounded.item() if rounded.ndim == 0 else rounded


def _show(value, digits: int) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_show(v, digits)}" for k, v in value.items())
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return np.array2string(np.asarray(value), precision=digits, floatmode="fixed", separator=", ")


def _agrees(prediction, result, tol: float) -> bool:
    if isinstance(result, dict):
        return (isinstance(prediction, dict) and set(prediction) == set(result)
                and all(_agrees(prediction[k], result[k], tol) for k in result))
    if isinstance(result, str) or isinstance(prediction, str):
        return str(prediction).strip().lower() == str(result).strip().lower()
    if isinstance(result, bool) or isinstance(prediction, bool):
        return bool(prediction) == bool(result) and isinstance(prediction, bool) == isinstance(result, bool)
    try:
        p, r = np.asarray(prediction, dtype=np.float64), np.asarray(result, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return p.shape == r.shape and bool(np.all(np.abs(p - r) <= tol))


class Revealed:
    """What :func:`reveal` returns: true when the prediction agrees (``bool(r)``, ``r.agrees``); shows nothing
    in Jupyter (the verdict is printed already)."""

    def __init__(self, agrees: bool, text: str):
        self.agrees, self.text = agrees, text

    def __bool__(self) -> bool:
        return self.agrees

    def __repr__(self) -> str:
        return f"Revealed(agrees={self.agrees})"

    def _ipython_display_(self):
        """Nothing: the result was printed already."""


def reveal(prediction, result, *, digits: int = 2, tol: Optional[float] = None, quiet: bool = False) -> Revealed:
    """Print the ``result`` of a predict-then-run cell next to the reader's ``prediction`` (``None``: none yet).

    Numbers are printed with ``digits`` decimals and compared within ``tol`` (default ``10**-digits``, one
    unit of the last printed digit); strings and booleans exactly (strings case-insensitively); dicts key by
    key. Returns a :class:`Revealed`, true when the prediction agrees.
    """
    tol = 10.0 ** -digits if tol is None else tol
    shown = _round(result, digits)
    if isinstance(shown, dict):
        lines = ["result:"] + [f"  {k}: {_show(v, digits)}" for k, v in shown.items()]
    else:
        lines = [f"result: {_show(shown, digits)}"]
    agrees = False
    if prediction is None or prediction is Ellipsis:
        lines.append("your prediction: none yet (write it into `prediction` above, then run the cell again)")
    else:
        agrees = _agrees(prediction, result if isinstance(result, (str, bool, dict)) else shown, tol)
        mark = PASS if agrees else FAIL
        verdict = "agrees with the result" if agrees else "differs from the result: the answer below explains why"
        lines.append(f"{mark} your prediction {_show(_round(prediction, digits), digits)} {verdict}")
    text = "\n".join(lines)
    if not quiet:
        print(text)
    return Revealed(agrees, text)
