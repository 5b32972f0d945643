"""The output policy's mechanism: nbval compares stored numbers within a stated tolerance (tools/nbval_numeric.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tools.nbval_numeric import DEFAULT_RTOL, NumericText, cell_rtol, number_mismatch, split_numbers

ROOT = Path(__file__).resolve().parents[2]


def test_split_numbers_keeps_text_and_numbers_apart():
    text = "BatchNorm2d (32, 16): 0.951 [5%-95%: 0.982-1.017], 5,000 digits, 1.1e-05"
    pieces, numbers = split_numbers(text)
    assert numbers == ["32", "16", "0.951", "5", "95", "0.982", "1.017", "5,000", "1.1e-05"]
    assert "".join(p + n for p, n in zip(pieces, numbers + [""])) == text
    assert split_numbers("x = -0.5, y=+2")[1] == ["-0.5", "+2"]
    assert split_numbers("conv2d v2.13.0") == (["conv2d v2.13.0"], [])


@pytest.mark.parametrize("stored", ["0.9512", "1234", "37.85", "6.021e+23", "-0.4471"])
def test_a_change_in_the_4th_significant_digit_passes(stored):
    value = float(stored)
    digits = int(f"{abs(value):e}".split("e")[1])
    changed = value + 9 * 10 ** (digits - 3) * (1 if value > 0 else -1)  # +9 in the 4th significant digit
    text = f"{changed:.4g}" if "e" not in stored else f"{changed:.3e}"
    assert number_mismatch(f"loss {stored} after", f"loss {text} after") is None


@pytest.mark.parametrize("stored", ["0.9512", "1234", "37.85", "6.021e+23", "-0.4471", "12"])
def test_a_ten_percent_change_fails(stored):
    changed = float(stored) * 1.10
    why = number_mismatch(f"loss {stored} after", f"loss {changed:.6g} after")
    assert why is not None and "stored" in why


def test_rounding_noise_in_the_last_printed_digit_passes_integers_do_not_get_it():
    assert number_mismatch("accuracy 0.951", "accuracy 0.953", rtol=0.0) is not None
    assert number_mismatch("accuracy 0.951", "accuracy 0.952", rtol=0.0) is None  # one unit in the last digit
    assert number_mismatch("3 of 6 layers", "4 of 6 layers") is not None  # small integers are exact
    assert number_mismatch("1.1e-05", "8.6e-18") is not None  # rounding noise printed as a value


def test_text_and_number_counts_must_match_exactly():
    assert "text differs" in number_mismatch("BN: 0.95", "LN: 0.95")
    assert "numbers" in number_mismatch("0.95", "0.95 0.96")
    assert number_mismatch("same", "same") is None


def test_numeric_text_is_what_nbval_compares_and_cells_can_state_a_tolerance():
    assert NumericText("acc 0.900") == NumericText("acc 0.915")  # 1.7 % < 2 %
    assert NumericText("acc 0.900") != NumericText("acc 0.950")  # 5.6 %
    assert NumericText("acc 0.900", 0.1) != NumericText("acc 0.950")  # the smaller tolerance of the two wins
    assert NumericText("acc 0.900", 0.1) == NumericText("acc 0.950", 0.1)
    cell = nbformat.v4.new_code_cell("print(1)", metadata={"tags": ["hide-input", "nbval-rtol=0.05"]})
    assert cell_rtol(cell) == 0.05
    assert cell_rtol(nbformat.v4.new_code_cell("x")) == DEFAULT_RTOL
    with pytest.raises(ValueError, match="nbval-rtol"):
        cell_rtol(nbformat.v4.new_code_cell("x", metadata={"tags": ["nbval-rtol=big"]}))


def _notebook(path: Path, stored: str) -> Path:
    cell = nbformat.v4.new_code_cell('print(f"accuracy {0.9512:.4f}")', execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"accuracy {stored}\n")]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("stored, passes", [("0.9512", True), ("0.9518", True), ("1.0463", False), ("0.8561", False)])
def test_pytest_nbval_uses_the_numeric_comparison(tmp_path, stored, passes):
    """End to end: a stored output edited in its 4th digit still passes nbval here, one moved by 10 % fails."""
    nb = _notebook(tmp_path / "check.ipynb", stored)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "-q", "-p", "no:cacheprovider",
         "-p", "tools.nbval_numeric", str(nb)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )
    assert (run.returncode == 0) is passes, run.stdout[-3000:]
    if not passes:
        assert "numeric comparison: number" in run.stdout, run.stdout[-3000:]


def test_embedded_images_are_masked_numbers_beside_them_compared():
    import base64

    from tools.nbval_numeric import BASE64_PLACEHOLDER, mask_embedded_images, number_mismatch

    img_a = base64.b64encode(bytes(range(256)) * 2).decode()
    img_b = base64.b64encode(bytes(reversed(range(256))) * 2).decode()
    page = '<img src="data:image/png;base64,{}"><script>{{"img":"{}","summary":{{"slope":"{}"}}}}</script>'
    a = mask_embedded_images(page.format(img_a, img_a, "0.494"))
    b = mask_embedded_images(page.format(img_b, img_b, "0.495"))
    assert img_a not in a and a.count(BASE64_PLACEHOLDER) == 2
    assert number_mismatch(a, b) is None  # other pixels, a number within the tolerance
    c = mask_embedded_images(page.format(img_b, img_b, "0.61"))
    assert "number 0.494 (stored) vs 0.61 (computed)" in number_mismatch(a, c)
    assert mask_embedded_images("short base64 AAAA==, words and 0.5") == "short base64 AAAA==, words and 0.5"
