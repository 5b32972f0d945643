"""nbval with numbers compared within a stated tolerance: the book's check that stored outputs are not stale.

nbval compares a notebook's stored text outputs with freshly computed ones character by character. The
book's numbers come from floating-point sums whose order depends on the processor (see
``scripts/numeric_env.py``), so a strict comparison fails on another machine for noise, and a blanket
``NBVAL_IGNORE_OUTPUT`` would hide a stale result. This module makes the comparison *numeric*:

- the text around the numbers must match exactly, and both outputs must hold the same count of numbers;
- each number must agree with the stored one within ``max(rtol * |stored|, unit)``, where ``rtol`` is 2 %
  (:data:`DEFAULT_RTOL`) and ``unit`` is one unit in the last printed digit of a number printed with a
  decimal point or an exponent (``0.951`` -> 0.001, ``1.1e-05`` -> 1e-06; a rounding boundary can flip it);
  integers have no such allowance (``12`` vs ``13`` is a change);
- a cell may state a wider tolerance for a result whose seed-to-seed or processor-to-processor spread is
  larger, with the tag ``nbval-rtol=0.05``; CONTRIBUTING.md says when that is acceptable.

Images embedded in text outputs (runs of 200 or more base64 characters, such as the PNG frames of an
explorer's HTML, :mod:`bnlib.lab.explorer`) are not compared, as nbval does not compare ``image/png``
outputs; the numbers and text around them are.

So a stored number moved by 10 % fails, a change in its 4th significant digit passes (``tests/tools``).
Installed by the repository's ``conftest.py``, so ``pytest --nbval`` uses it wherever it runs here.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

DEFAULT_RTOL = 0.02
TAG_PREFIX = "nbval-rtol="

# A number as the book prints it: optional sign, digits with optional thousands separators, optional
# fraction, optional exponent. The text between numbers is compared exactly.
# A sign belongs to the number unless it follows a word, a number, '%' or a closing bracket ("0.3-30" is a range).
NUMBER = re.compile(r"(?:(?<![\w.%)\]])[-+\u2212])?(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


# An embedded image: a long run of base64 characters (a data URI's payload, or a JSON string holding one).
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")
BASE64_PLACEHOLDER = "<base64 data, not compared>"


def mask_embedded_images(text: str) -> str:
    """``text`` with every embedded base64 payload replaced by a placeholder."""
    return BASE64_RUN.sub(BASE64_PLACEHOLDER, text)


def split_numbers(text: str) -> tuple[list[str], list[str]]:
    """Split ``text`` into its non-number pieces (one more than the numbers) and its numbers, as strings."""
    pieces, numbers, last = [], [], 0
    for match in NUMBER.finditer(text):
        pieces.append(text[last : match.start()])
        numbers.append(match.group())
        last = match.end()
    pieces.append(text[last:])
    return pieces, numbers


def _value_and_unit(token: str) -> tuple[float, float]:
    """The value of a printed number and one unit in its last printed digit (0 for an integer)."""
    clean = token.replace(",", "").replace("\u2212", "-")
    try:
        dec = Decimal(clean)
    except InvalidOperation as exc:  # NUMBER only matches valid decimals; guard anyway
        raise ValueError(f"not a number: {token!r}") from exc
    is_integer = not any(c in clean for c in ".eE")
    unit = 0.0 if is_integer else float(Decimal(1).scaleb(dec.as_tuple().exponent))
    return float(dec), unit


def number_mismatch(stored: str, computed: str, rtol: float = DEFAULT_RTOL) -> str | None:
    """``None`` when ``computed`` agrees with ``stored`` under the book's rule, else why not (one line)."""
    if stored == computed:
        return None
    if not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
        raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")
    s_pieces, s_numbers = split_numbers(stored)
    c_pieces, c_numbers = split_numbers(computed)
    if len(s_numbers) != len(c_numbers):
        return f"the outputs hold {len(s_numbers)} (stored) and {len(c_numbers)} (computed) numbers"
    for s_piece, c_piece in zip(s_pieces, c_pieces):
        if s_piece != c_piece:
            return f"text differs: stored {s_piece.strip()[:60]!r}, computed {c_piece.strip()[:60]!r}"
    for s_tok, c_tok in zip(s_numbers, c_numbers):
        s_val, s_unit = _value_and_unit(s_tok)
        c_val, c_unit = _value_and_unit(c_tok)
        allowed = max(rtol * max(abs(s_val), abs(c_val)), s_unit, c_unit)
        if abs(s_val - c_val) > allowed * (1 + 1e-12):
            return (
                f"number {s_tok} (stored) vs {c_tok} (computed): differs by {abs(s_val - c_val):.3g}, "
                f"allowed {allowed:.3g} (rtol {rtol:g}, last digit {max(s_unit, c_unit):g})"
            )
    return None


def cell_rtol(cell) -> float:
    """The tolerance a notebook cell states with a ``nbval-rtol=X`` tag, else :data:`DEFAULT_RTOL`."""
    tags = (getattr(cell, "metadata", None) or {}).get("tags", []) or []
    for tag in tags:
        if isinstance(tag, str) and tag.startswith(TAG_PREFIX):
            try:
                value = float(tag[len(TAG_PREFIX) :])
            except ValueError:
                value = -1.0
            if not 0 <= value < 1:
                raise ValueError(f"cell tag {tag!r}: expected {TAG_PREFIX}<number in [0, 1)>")
            return value
    return DEFAULT_RTOL


class NumericText(str):
    """A sanitized output string whose ``==`` is :func:`number_mismatch` being ``None``.

    nbval compares outputs with ``ref != test``; handing it these strings from ``sanitize`` makes that
    comparison numeric without copying nbval's comparison code.
    """

    rtol = DEFAULT_RTOL
    last_mismatch: str | None = None

    def __new__(cls, text: str, rtol: float = DEFAULT_RTOL):
        obj = super().__new__(cls, text)
        obj.rtol = rtol
        return obj

    def __eq__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        why = number_mismatch(str(self), str(other), min(self.rtol, getattr(other, "rtol", self.rtol)))
        NumericText.last_mismatch = why
        return why is None

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = str.__hash__


def pytest_configure(config):  # noqa: ARG001 - pytest hook, for ``pytest -p tools.nbval_numeric``
    install()


def install() -> bool:
    """Patch nbval's cell item so its output comparison is numeric; ``False`` when nbval is not installed."""
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:
        return False
    if getattr(IPyNbCell, "_bnbook_numeric", False):
        return True
    original_sanitize = IPyNbCell.sanitize
    original_format = IPyNbCell.format_output_compare

    def sanitize(self, s):
        s = original_sanitize(self, s)
        return NumericText(mask_embedded_images(s), cell_rtol(self.cell)) if isinstance(s, str) else s

    def format_output_compare(self, key, left, right):
        original_format(self, key, left, right)
        if NumericText.last_mismatch:
            self.comparison_traceback.append(f"numeric comparison: {NumericText.last_mismatch}")

    IPyNbCell.sanitize = sanitize
    IPyNbCell.format_output_compare = format_output_compare
    IPyNbCell._bnbook_numeric = True
    return True
