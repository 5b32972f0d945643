"""Batch renorm's schedule in the torch modules: the limits follow num_batches_tracked, the warm-up is batch
norm in training, torch matches the NumPy reference step by step, state and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlib.numpy as bnp
import bnlib.torch as bt
from bnlib.torch._batch_renorm import RenormSchedule

SCHEDULE = RenormSchedule(3, 9, 6)


def _batches(n=11, shape=(6, 4, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) * 2.5 + 1.5 for _ in range(n)]


@pytest.mark.parametrize("cls, shape", [(bt.BatchRenorm1d, (6, 4)), (bt.BatchRenorm2d, (6, 4, 3, 3)),
                                        (bt.BatchRenorm3d, (6, 4, 2, 2, 2))])
def test_limits_follow_the_step_count(cls, shape):
    m = cls(4, schedule=SCHEDULE, r_max=2.0, d_max=1.0).double()
    for k, x in enumerate(_batches(shape=shape)):
        assert m.current_limits() == SCHEDULE.limits(k, 2.0, 1.0)
        m(x)
    assert int(m.num_batches_tracked) == 11 and m.current_limits() == (2.0, 1.0)


def test_warmup_is_batch_norm_in_training():
    brn = bt.BatchRenorm2d(4, schedule=SCHEDULE).double()
    bn = torch.nn.BatchNorm2d(4).double()
    for k, x in enumerate(_batches()):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_bn = brn(xa), bn(xb)
        g = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view_as(y)
        (y * g).sum().backward()
        (y_bn * g).sum().backward()
        if k <= 3:  # r_max = 1, d_max = 0 (at step 3 the ramps start at 0)
            torch.testing.assert_close(y, y_bn, rtol=0, atol=1e-12)
            torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
            torch.testing.assert_close(brn.running_var, bn.running_var, rtol=0, atol=1e-12)
        elif k == 5:
            assert not torch.allclose(y, y_bn)
            break


def test_matches_numpy_reference_step_by_step():
    m = bt.BatchRenorm2d(4, momentum=0.3, schedule=SCHEDULE, r_max=1.5, d_max=0.5).double()
    ref = bnp.BatchRenorm2d(4, momentum=0.3, dtype=np.float64, schedule=SCHEDULE, r_max=1.5, d_max=0.5)
    for x in _batches():
        assert m.current_limits() == ref.current_limits()
        y, y_ref = m(x), ref(x.numpy())
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(m.running_mean.numpy(), ref.running_mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(m.running_var.numpy(), ref.running_var, rtol=0, atol=1e-12)


def test_default_is_unchanged_and_eval_ignores_schedule():
    x = _batches(n=4)
    a, b = bt.BatchRenorm2d(4).double(), bt.BatchRenorm2d(4, schedule=RenormSchedule(0, 0, 0)).double()
    for xi in x:
        torch.testing.assert_close(a(xi), b(xi), rtol=0, atol=0)
    assert "schedule" not in repr(a) and "schedule=RenormSchedule" in repr(b)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x[0]), b(x[0]), rtol=0, atol=0)


def test_state_dict_resumes_the_schedule():
    m = bt.BatchRenorm1d(4, schedule=SCHEDULE).double()
    for x in _batches(n=5, shape=(6, 4)):
        m(x)
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    fresh = bt.BatchRenorm1d(4, schedule=SCHEDULE).double()
    fresh.load_state_dict(m.state_dict())
    assert fresh.current_limits() == m.current_limits() == SCHEDULE.limits(5)
    fresh.reset_running_stats()
    assert fresh.current_limits() == (1.0, 0.0)


@pytest.mark.parametrize("value, exc", [((3, 9, 6), TypeError), ("warmup", TypeError)])
def test_bad_schedule_raises_and_leaves_state_untouched(value, exc):
    with pytest.raises(exc, match="schedule"):
        bt.BatchRenorm2d(4, schedule=value)
    m = bt.BatchRenorm2d(4)
    m.schedule = value
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(exc, match="schedule"):
        m.train()(torch.randn(2, 4, 3, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_schedule_arguments_name_themselves():
    with pytest.raises(ValueError, match="r_max_steps"):
        RenormSchedule(10, 5, 20)
    with pytest.raises(ValueError, match="warmup_steps"):
        RenormSchedule(-1, 5, 20)


def test_packed_layer_keeps_the_schedule():
    import copy

    m = bt.BatchRenorm2d(4, schedule=SCHEDULE)
    assert copy.deepcopy(m).schedule == SCHEDULE
