"""bnlib.lab.report: the output policy's helpers."""
import numpy as np
import pytest
import torch

from bnlib.lab.report import eps_of, glue, rounding_bound, spread


def test_rounding_bound_states_only_the_bound_and_asserts_it():
    line = rounding_bound("max |a - b|", 3.0e-7, torch.float32, within=8)
    assert line == "max |a - b| < 8 eps (float32, eps = 1.2e-07)"
    assert rounding_bound("d", 2.9e-7, "float32", within=8) == line.replace("max |a - b|", "d")  # same text
    with pytest.raises(AssertionError, match="above the stated bound of 8 eps"):
        rounding_bound("d", 1.1e-5, "float32", within=8)
    assert "x 100" in rounding_bound("d", 1e-14, np.float64, within=1, scale=100.0)
    with pytest.raises(ValueError, match="error"):
        rounding_bound("d", float("nan"), "float64", within=1)
    with pytest.raises(ValueError, match="dtype"):
        eps_of("int32")


def test_spread_is_median_and_range():
    assert spread([0.91, 0.95, 0.90]) == "0.910 [0.900, 0.950]"
    assert spread([3, 1, 2], ".0f") == "2 [1, 3]"
    with pytest.raises(ValueError):
        spread([])


@pytest.mark.parametrize("with_myst_nb", [True, False])
def test_glue_records_the_value_for_the_prose(monkeypatch, with_myst_nb):
    """The same record with myst-nb (the website's build) and without it (a reader's Colab or clean venv)."""
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.append((a, k)))
    if with_myst_nb:
        myst_glue = pytest.importorskip("myst_nb.ext.glue")
        monkeypatch.setattr(myst_glue, "ipy_display", lambda *a, **k: shown.append((a, k)))
    else:
        monkeypatch.setitem(__import__("sys").modules, "myst_nb", None)  # `import myst_nb` fails
    glue("speedup", "12x")
    (bundle,), kwargs = shown[-1]
    assert bundle == {"application/papermill.record/text/plain": "'12x'"}
    assert kwargs["metadata"]["scrapbook"]["name"] == "speedup"


# ------------------------------------------------------------------------------------------------ judge
def test_judge_follows_the_rule():
    from bnlib.lab.report import judge

    assert judge("c", [1.0, 1.2, 1.1]).verdict == "confirmed"
    assert judge("c", [0.1, 1.2, 0.5]).verdict == "qualified"          # all positive, median 0.5 < range 1.1
    assert judge("c", [1.0, 1.2, 1.1], partial="at lr 1").verdict == "qualified"
    assert judge("c", [-1.0, -1.2, -1.1]).verdict == "refuted"
    assert judge("c", [-1.0, 1.2, 1.1]).verdict == "not supported"
    assert judge("c", [0.01, 0.02, 0.03], margin=0.05).verdict == "not supported"
    assert judge("c", [-0.01, -0.02, -0.03], margin=0.05).verdict == "not supported"


def test_judge_prints_median_and_range():
    from bnlib.lab.report import judge

    v = judge("BN trains faster", [2.0, 3.0, 2.5, 2.25, 2.75], fmt=".1f", unit="x")
    assert v.evidence() == "2.5x [2.0x, 3.0x] over 5 seeds"
    assert str(v) == "BN trains faster: confirmed; effect 2.5x [2.0x, 3.0x] over 5 seeds"
    assert "only at lr 1" in str(judge("c", [1, 1, 1], partial="at lr 1"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(claim="", effects=[1, 1, 1]), "claim"),
    (dict(claim="c", effects=[1, 1]), "at least 3 seeds"),
    (dict(claim="c", effects=[1, 1, float("inf")]), "finite"),
    (dict(claim="c", effects=[1, 1, "x"]), "effects"),
    (dict(claim="c", effects=[1, 1, 1], margin=-1), "margin"),
])
def test_judge_rejects_bad_input(kwargs, match):
    from bnlib.lab.report import judge

    with pytest.raises(ValueError, match=match):
        judge(**kwargs)
