"""Batch renorm's schedule (Ioffe 2017): the limits at given steps, and the NumPy modules that follow it."""
from __future__ import annotations

import numpy as np
import pytest

import bnlib.numpy as bnp
from bnlib.numpy.batch_renorm import RenormSchedule

PAPER = RenormSchedule(5_000, 40_000, 25_000)


@pytest.mark.parametrize("step, expected", [
    (0, (1.0, 0.0)), (4_999, (1.0, 0.0)), (5_000, (1.0, 0.0)),
    (15_000, (1.0 + 2.0 * 10 / 35, 2.5)), (25_000, (1.0 + 2.0 * 20 / 35, 5.0)),
    (40_000, (3.0, 5.0)), (10**7, (3.0, 5.0)),
])
def test_paper_schedule_values(step, expected):
    assert PAPER.limits(step, 3.0, 5.0) == pytest.approx(expected, rel=1e-15)


def test_final_limits_are_the_layers_and_ramps_are_monotone():
    s = RenormSchedule(10, 50, 30)
    assert s.limits(60, 1.5, 0.5) == (1.5, 0.5)
    r, d = np.array([s.limits(k, 2.0, 1.0) for k in range(80)]).T
    assert np.all(np.diff(r) >= 0) and np.all(np.diff(d) >= 0)
    assert r[10] == 1.0 and d[10] == 0.0 and r[30] == 1.5 and d[30] == 1.0 and r[50] == 2.0


def test_jump_when_the_ramp_has_no_length():
    s = RenormSchedule(3, 3, 3)
    assert s.limits(2) == (1.0, 0.0) and s.limits(3) == (3.0, 5.0)


def test_ioffe2017_scaled():
    assert RenormSchedule.ioffe2017() == PAPER
    assert RenormSchedule.ioffe2017(800) == RenormSchedule(100, 800, 500)


@pytest.mark.parametrize("args, name, exc", [
    ((-1, 10, 10), "warmup_steps", ValueError), ((5, 4, 10), "r_max_steps", ValueError),
    ((5, 10, 4), "d_max_steps", ValueError), ((1.5, 10, 10), "warmup_steps", TypeError),
    ((True, 10, 10), "warmup_steps", TypeError),
])
def test_bad_schedule(args, name, exc):
    with pytest.raises(exc, match=name):
        RenormSchedule(*args)


def test_bad_limits_arguments():
    with pytest.raises(ValueError, match="step"):
        PAPER.limits(-1)
    with pytest.raises(ValueError, match="r_max"):
        PAPER.limits(0, 0.5, 1.0)
    with pytest.raises(TypeError, match="schedule"):
        bnp.BatchRenorm1d(3, schedule=(1, 2, 3))


def test_module_follows_schedule_and_warmup_is_batch_norm():
    rng = np.random.default_rng(0)
    brn = bnp.BatchRenorm1d(4, dtype=np.float64, schedule=RenormSchedule(3, 7, 5))
    bn = bnp.BatchNorm1d(4, dtype=np.float64)
    seen = []
    for step in range(9):
        x = rng.normal(2.0, 3.0, size=(5, 4))
        seen.append(brn.current_limits())
        y, y_bn = brn(x), bn(x)
        if step <= 3:  # r_max = 1, d_max = 0 (step 3: ramps at 0): batch norm exactly (and the same running statistics)
            np.testing.assert_allclose(y, y_bn, rtol=0, atol=1e-12)
            np.testing.assert_allclose(brn.running_mean, bn.running_mean, rtol=0, atol=1e-12)
        else:  # relaxed limits: the running statistics' corrections take effect
            assert not np.allclose(y, y_bn)
    assert seen == [RenormSchedule(3, 7, 5).limits(k) for k in range(9)]
    assert int(brn.num_batches_tracked) == 9
    brn.eval()
    assert brn.current_limits() == (3.0, 5.0)


def test_bad_schedule_attribute_leaves_state_untouched():
    m = bnp.BatchRenorm1d(3)
    m.schedule = "warmup"
    before = {k: np.copy(v) for k, v in m.state_dict().items()}
    with pytest.raises(TypeError, match="schedule"):
        m(np.ones((4, 3), np.float32))
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
