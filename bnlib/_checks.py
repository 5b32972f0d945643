"""Input validation shared by ``bnlib.numpy`` and ``bnlib.torch``.

The functions here work on plain Python values -- shapes as tuples of ints, dtypes as anything whose name
can be read (a ``numpy.dtype``, a ``torch.dtype``, a NumPy scalar type or a string such as ``"float32"``) --
so a NumPy array and a torch tensor that are wrong in the same way get the *same* message.

Rules (every function raises before any state is touched; callers validate everything first, then update
running statistics):

- ``check_eps(eps, name="eps")``: a real number (not bool), finite and >= 0 (``eps=0`` is valid, as in
  ``torch.nn``). ``TypeError`` / ``ValueError``.
- ``check_training_eps(eps)``: batch statistics need ``eps > 0`` (``torch.nn.functional.batch_norm`` raises the
  same ``ValueError`` in training; evaluation with the running statistics accepts ``eps=0``).
- ``check_momentum(momentum, allow_none=True)``: ``None`` (cumulative average) or a real number in [0, 1]
  (``averaging_factor`` checks it only when running statistics are updated: torch ignores it otherwise).
- ``check_ndim(ndim, allowed, name="input", layout="")``: ``ndim`` must be one of ``allowed``;
  ``check_min_ndim(ndim, low, name="input", layout="")``: at least ``low`` dimensions.
- ``check_per_channel(name, shape, C)``: ``shape`` is ``None`` (argument not given) or exactly ``(C,)``.
- ``check_num_channels(C, num_features, dim=1)``: a module's input has ``num_features`` channels.
- ``check_shape(name, shape, expected)``: ``shape`` is ``None`` or exactly ``expected``.
- ``check_num_groups(num_groups, C)``: a positive int that divides ``C``.
- ``check_positive_int(name, value)``: a positive int (``num_features``, ``num_groups``, counts).
- ``check_normalized_shape(normalized_shape, input_shape)``: the trailing dims of the input; returns a tuple.
- ``check_training_size(shape)``: more than one value per channel, i.e. ``N * prod(spatial) > 1``;
  the message is PyTorch's, word for word, for arrays too: ``Expected more than 1 value per channel when
  training, got input size torch.Size([1, 3])``.
- ``check_spatial_size(shape)``: instance statistics need ``prod(spatial) > 1`` (PyTorch's message).
- ``check_float_dtype(name, dtype)``: float32 or float64 (``allowed`` widens it); integer, bool and complex
  dtypes raise ``TypeError``.
- ``check_running_stats(mean_given, var_given, training=True, names=...)``: both given or both ``None``;
  given when not training.
- ``check_renorm_limits(r_max, d_max)``: ``r_max >= 1`` and ``d_max >= 0``, finite.
- ``averaging_factor(momentum, num_batches_tracked, needed, as_count)``: the weight of the new batch in the
  running averages (``momentum``, or ``1 / num_batches_tracked`` for ``momentum=None``).

- ``check_int(name, value, low, high=None)``, ``check_real(name, value, low, high=None, ...)``: an int
  (not bool) or a real number in a range; ``check_training_run(n_train, n_labels, steps, batch_size)``.

Every message has one shape, ``"<argument>: expected <what>, got <value>"`` (the lab uses the same), with
``TypeError`` for a wrong type and ``ValueError`` for a wrong value -- except the two messages PyTorch
itself raises for too-small batches (and the module's num_features mismatch), which are copied word for word
so bnlib stays a drop-in. ``dtype_name(dtype)`` turns any dtype into ``"float32"``-style text.

Exception classes. Where ``torch.nn`` raises ``RuntimeError`` and bnlib's rule is a ``ValueError``, the
exception is an instance of both, so that code written for either library catches it:

- :class:`ShapeError` (``ValueError`` and ``RuntimeError``): a tensor or size argument that does not fit the
  input -- the number of dimensions (``check_ndim``, ``check_min_ndim``), a per-channel tensor of the wrong
  length (``check_per_channel``), a parameter of the wrong shape (``check_shape``), a module's
  ``num_features`` (``check_num_channels``), ``num_groups`` (``check_num_groups``: not positive, or not
  dividing the channels) and ``normalized_shape`` (``check_normalized_shape``). PyTorch raises
  ``RuntimeError`` for these in its functions (``ValueError`` for a module's input rank, which this is too).
- :class:`RunningStatsError` (``ValueError`` and ``RuntimeError``): running statistics missing in evaluation
  (``torch.nn.functional.batch_norm`` raises ``RuntimeError``) or given without their partner (``ValueError``
  in torch), from ``check_running_stats``.

Both are exported as ``bnlib.ShapeError`` and ``bnlib.RunningStatsError``; ``except ValueError`` (bnlib's
documented rule) and ``except RuntimeError`` (PyTorch's) both catch them.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Optional, Sequence, Tuple

FLOAT_DTYPES = ("float32", "float64")

__all__ = [
    "ShapeError",
    "RunningStatsError",
    "FLOAT_DTYPES",
    "dtype_name",
    "check_eps",
    "check_training_eps",
    "check_momentum",
    "check_ndim",
    "check_min_ndim",
    "check_shape",
    "check_per_channel",
    "check_num_channels",
    "check_num_groups",
    "check_positive_int",
    "check_int",
    "check_real",
    "check_training_run",
    "check_normalized_shape",
    "check_training_size",
    "check_spatial_size",
    "check_float_dtype",
    "check_running_stats",
    "check_renorm_limits",
    "averaging_factor",
]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def dtype_name(dtype) -> str:
    """``"float32"`` for ``np.float32``, ``np.dtype("float32")``, ``torch.float32`` or ``"torch.float32"``."""
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, type):
        name = dtype.__name__
    else:
        name = getattr(dtype, "name", None)
        if not isinstance(name, str):
            name = str(dtype)
    return name[len("torch."):] if name.startswith("torch.") else name


def _describe(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class ShapeError(ValueError, RuntimeError):
    """A tensor or size argument does not fit the input (dimensions, per-channel length, parameter shape,
    ``num_features``, ``num_groups``, ``normalized_shape``). A ``ValueError`` (bnlib's rule) and a
    ``RuntimeError`` (what ``torch.nn.functional`` raises for these)."""


class RunningStatsError(ValueError, RuntimeError):
    """Running statistics missing where they are needed, or given without their partner. A ``ValueError``
    (bnlib's rule) and a ``RuntimeError`` (what ``torch.nn.functional.batch_norm`` raises in evaluation)."""


def check_eps(eps, name: str = "eps") -> float:
    """``eps`` must be a finite real number >= 0 (0 is valid, as in ``torch.nn``). Returns it as a float."""
    if not _is_real(eps):
        raise TypeError(f"{name}: expected a positive real number or 0, got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(float(eps)) and eps >= 0):  # NaN fails this test too
        raise ValueError(f"{name}: expected a positive finite number or 0, got {eps!r}")
    return float(eps)


def check_training_eps(eps, name: str = "eps") -> float:
    """Batch statistics need ``eps > 0``: a channel with a constant value has variance 0 (torch's
    ``batch_norm`` raises ``ValueError`` in training too). Runs after :func:`check_eps`."""
    if not float(eps) > 0:
        raise ValueError(f"{name}: expected a positive number when training (batch statistics; a constant "
                         f"channel has variance 0), got {eps!r}")
    return float(eps)


def check_momentum(momentum, allow_none: bool = True) -> Optional[float]:
    """``momentum`` must be ``None`` (cumulative average, when allowed) or a real number in [0, 1]."""
    if momentum is None:
        if allow_none:
            return None
        raise TypeError("momentum: expected a real number in [0, 1], got None")
    if not _is_real(momentum):
        raise TypeError(f"momentum: expected None or a real number in [0, 1], got {type(momentum).__name__} "
                        f"{momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:  # NaN fails this test too
        raise ValueError(f"momentum: expected None or a real number in [0, 1], got {momentum!r}")
    return float(momentum)


def check_ndim(ndim: int, allowed: Iterable[int], name: str = "input", layout: str = "") -> None:
    """``ndim`` must be one of ``allowed``; ``layout`` (e.g. ``"(N, C) or (N, C, L)"``) is added to the message."""
    allowed = tuple(allowed)
    if ndim not in allowed:
        if len(allowed) == 1:
            want = f"{allowed[0]}"
        else:
            want = ", ".join(str(a) for a in allowed[:-1]) + f" or {allowed[-1]}"
        hint = f" {layout}" if layout else ""
        raise ShapeError(f"{name}: expected {want} dimensions{hint}, got {ndim}-D {name}")


def check_min_ndim(ndim: int, low: int, name: str = "input", layout: str = "") -> None:
    """``ndim`` must be at least ``low``; ``layout`` (e.g. ``"(N, C, *)"``) is added to the message."""
    if ndim < low:
        hint = f" {layout}" if layout else ""
        raise ShapeError(f"{name}: expected at least {low} dimensions{hint}, got {ndim}-D {name}")


def check_shape(name: str, shape: Optional[Sequence[int]], expected: Sequence[int]) -> None:
    """``shape`` (``None`` when the argument was not given) must equal ``expected``."""
    if shape is None:
        return
    if tuple(int(s) for s in shape) != tuple(int(s) for s in expected):
        raise ShapeError(f"{name}: expected shape {_describe(expected)}, got shape {_describe(shape)}")


def check_per_channel(name: str, shape: Optional[Sequence[int]], C: int) -> None:
    """A per-channel argument (weight, bias, running stats) must have shape ``(C,)`` or be ``None``."""
    if shape is None:
        return
    if tuple(int(s) for s in shape) != (int(C),):
        raise ShapeError(f"{name}: expected shape ({int(C)},) to match the {int(C)} channels of input "
                         f"(dimension 1), got shape {_describe(shape)}")


def check_num_channels(C: int, num_features: int, dim: int = 1) -> None:
    """A module built for ``num_features`` channels must get an input with that many in dimension ``dim``."""
    if int(C) != int(num_features):
        raise ShapeError(f"input: expected num_features={int(num_features)} channels in dimension {dim}, "
                         f"got {int(C)}")


def check_positive_int(name: str, value) -> int:
    """``value`` must be an int > 0."""
    if not _is_int(value):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_num_groups(num_groups, C: int) -> int:
    """``num_groups`` must be a positive int that divides the number of channels ``C`` (``TypeError`` for
    a non-int, :class:`ShapeError` otherwise)."""
    if not _is_int(num_groups):
        raise TypeError(f"num_groups: expected a positive int, got {type(num_groups).__name__} {num_groups!r}")
    if num_groups <= 0:
        raise ShapeError(f"num_groups: expected a positive int, got {num_groups!r}")
    num_groups = int(num_groups)
    if C % num_groups != 0:
        raise ShapeError(f"num_groups: expected a divisor of the number of channels ({C}), got "
                         f"num_groups={num_groups}")
    return num_groups


def check_normalized_shape(normalized_shape, input_shape: Sequence[int]) -> Tuple[int, ...]:
    """``normalized_shape`` (an int or a sequence of ints) must equal the trailing dims of the input."""
    if _is_int(normalized_shape):
        normalized_shape = (normalized_shape,)
    try:
        ns = tuple(normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape: expected an int or a sequence of ints, got "
                        f"{type(normalized_shape).__name__}") from None
    if len(ns) == 0 or not all(_is_int(s) and s > 0 for s in ns):
        raise ShapeError(f"normalized_shape: expected a non-empty sequence of positive ints, got {ns!r}")
    ns = tuple(int(s) for s in ns)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) < len(ns) or input_shape[len(input_shape) - len(ns):] != ns:
        raise ShapeError(f"normalized_shape: expected {list(ns)} to match the trailing dimensions of input "
                         f"(an input of shape (*, {', '.join(map(str, ns))})), got input of shape "
                         f"{_describe(input_shape)}")
    return ns


def _size_string(shape: Sequence[int]) -> str:
    return f"torch.Size([{', '.join(str(int(s)) for s in shape)}])"


def check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    """``value`` must be an int (not bool) in ``[low, high]`` (``high=None``: no upper bound). Returns it."""
    want = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if not _is_int(value):
        raise TypeError(f"{name}: expected {want}, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return int(value)


def check_real(name: str, value, low: float, high: Optional[float] = None, *, open_low: bool = False,
               open_high: bool = False) -> float:
    """``value`` must be a finite real number (not bool) in the interval from ``low`` to ``high``
    (closed unless ``open_low``/``open_high``; ``high=None``: no upper bound). Returns it as a float."""
    lo, hi = ("(" if open_low else "["), (")" if open_high or high is None else "]")
    want = f"a real number in {lo}{low:g}, {'inf' if high is None else format(high, 'g')}{hi}"
    if not _is_real(value):
        raise TypeError(f"{name}: expected {want}, got {type(value).__name__} {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > low if open_low else v >= low)
    if high is not None:
        ok = ok and (v < high if open_high else v <= high)
    if not ok:
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return v


def check_training_run(n_train: int, n_labels: int, steps, batch_size) -> None:
    """The arguments every training loop shares: ``steps`` a positive int, ``batch_size`` an int in
    ``[1, n_train]``, and one label per training example."""
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1, n_train)
    if n_labels != n_train:
        raise ValueError(f"y_train: expected {n_train} labels to match x_train, got {n_labels}")


def check_training_size(shape: Sequence[int]) -> None:
    """Batch statistics need more than one value per channel: ``N * prod(shape[2:]) > 1`` (torch's message)."""
    size = int(shape[0]) if len(shape) > 0 else 1
    for s in shape[2:]:
        size *= int(s)
    if size == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{_size_string(shape)}")


def check_spatial_size(shape: Sequence[int]) -> None:
    """Instance statistics need more than one spatial element: ``prod(shape[2:]) > 1`` (torch's message)."""
    size = 1
    for s in shape[2:]:
        size *= int(s)
    if size == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size "
                         f"{_size_string(shape)}")


def check_float_dtype(name: str, dtype, allowed: Sequence[str] = FLOAT_DTYPES) -> str:
    """``dtype`` must be one of ``allowed`` (default float32, float64); returns its name."""
    got = dtype_name(dtype)
    if got not in allowed:
        want = " or ".join(allowed) if len(allowed) <= 2 else ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
        raise TypeError(f"{name}: expected a floating-point dtype ({want}), got {got}")
    return got


def check_running_stats(running_mean_given: bool, running_var_given: bool, training: bool = True,
                        names: Tuple[str, str] = ("running_mean", "running_var")) -> None:
    """Running mean and variance are given together or not at all, and must be given when not training
    (:class:`RunningStatsError`)."""
    if bool(running_mean_given) != bool(running_var_given):
        given = names[0] if running_mean_given else names[1]
        raise RunningStatsError(f"{names[0]}, {names[1]}: expected both or neither, got only {given}")
    if not training and not running_mean_given:
        raise RunningStatsError(f"{names[0]}, {names[1]}: expected both when training=False (evaluation "
                         f"normalizes with the running statistics), got None")


def check_renorm_limits(r_max, d_max) -> Tuple[float, float]:
    """Batch renormalization clips: ``r_max >= 1`` and ``d_max >= 0``, both finite reals."""
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if not _is_real(value):
            raise TypeError(f"{name}: expected a real number >= {low:g}, got {type(value).__name__} {value!r}")
        if not (math.isfinite(float(value)) and value >= low):
            raise ValueError(f"{name}: expected a finite real number >= {low:g}, got {value!r}")
    return float(r_max), float(d_max)


def averaging_factor(momentum, num_batches_tracked, needed: bool,
                     as_count: Callable[[object], Optional[int]]) -> float:
    """The weight ``f`` of the new batch in ``running = (1 - f) * running + f * batch`` (PyTorch's convention).

    ``momentum`` in [0, 1] gives ``f = momentum``. ``momentum=None`` asks for the cumulative average, which
    needs ``num_batches_tracked``: the number of batches seen *including this one* (the modules increment
    their counter before the call, as ``torch.nn.BatchNorm*`` does), giving ``f = 1 / num_batches_tracked``.
    ``needed`` says whether running statistics will be updated at all; when not, ``momentum`` is unused and,
    as in torch, any real number (or ``None``) is accepted (``f = 0`` unless it is in [0, 1]); a
    non-number is still a ``TypeError``.

    ``as_count`` is the framework's part: it turns ``num_batches_tracked`` (an int, a NumPy or torch scalar)
    into a Python int, or ``None`` when it is not an integer scalar.
    """
    if not needed and (momentum is None or _is_real(momentum)):
        # unused (evaluation, or no running statistics to update): any real number, as torch ignores it too
        return float(momentum) if momentum is not None and 0.0 <= float(momentum) <= 1.0 else 0.0
    momentum = check_momentum(momentum)
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("num_batches_tracked: expected the number of batches seen including this one (momentum="
                         "None is the cumulative moving average), got None")
    count = as_count(num_batches_tracked)
    if count is None or count < 1:
        raise ValueError(f"num_batches_tracked: expected an int >= 1, got {num_batches_tracked!r}")
    return 1.0 / count
