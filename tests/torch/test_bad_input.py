"""Bad input: the rules and messages of bnlib.numpy (bnlib._checks), device/dtype errors naming both, and
running statistics untouched whenever an error is raised."""
import numpy as np
import pytest
import torch

import bnlib.numpy as bnp
import bnlib.torch as bt
from bnlib.torch import functional as BF


def _message(fn, *args, **kwargs):
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    return type(info.value), str(info.value)


CASES = [
    # (description, args for batch_norm: x shape, rm shape, rv shape, weight shape, training, momentum, eps)
    ("one value per channel", (1, 3), (3,), (3,), None, True, 0.1, 1e-5),
    ("1-D input", (3,), (3,), (3,), None, True, 0.1, 1e-5),
    ("weight shape", (4, 3), (3,), (3,), (2,), True, 0.1, 1e-5),
    ("running_mean shape", (4, 3), (4,), (3,), None, True, 0.1, 1e-5),
    ("negative eps", (4, 3), (3,), (3,), None, True, 0.1, -1.0),
    ("momentum > 1", (4, 3), (3,), (3,), None, True, 1.5, 1e-5),
    ("eval without running stats", (4, 3), None, None, None, False, 0.1, 1e-5),
    ("only running_mean", (4, 3), (3,), None, None, True, 0.1, 1e-5),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_batch_norm_same_message_as_numpy_and_state_untouched(case):
    _, xs, rms, rvs, ws, training, momentum, eps = case
    x = torch.randn(xs)
    rm = None if rms is None else torch.arange(float(rms[0]))
    rv = None if rvs is None else torch.arange(float(rvs[0])) + 1
    w = None if ws is None else torch.ones(ws)
    rm0 = None if rm is None else rm.clone()
    rv0 = None if rv is None else rv.clone()
    t_err = _message(BF.batch_norm, x, rm, rv, w, None, training, momentum, eps)
    n_err = _message(bnp.batch_norm, x.numpy(), None if rm is None else rm.numpy().copy(),
                     None if rv is None else rv.numpy().copy(), None if w is None else w.numpy(), None,
                     training, momentum, eps)
    assert t_err == n_err
    if rm is not None:
        assert torch.equal(rm, rm0)
    if rv is not None:
        assert torch.equal(rv, rv0)


def test_module_error_leaves_running_stats_and_counter_untouched():
    m = bt.BatchNorm1d(3)
    m(torch.randn(4, 3))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 3))
    with pytest.raises(ValueError, match="num_features=3"):
        m(torch.randn(4, 5))
    with pytest.raises(ValueError, match="dimensions"):
        m(torch.randn(4, 3, 2, 2))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    g = bt.GhostBatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        g(torch.randn(5, 3))  # the last virtual batch has a single sample
    assert int(g.num_batches_tracked) == 0 and torch.equal(g.running_mean, torch.zeros(3))


def test_device_and_dtype_mismatch_errors_name_both():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"weight: expected dtype float32 \(input has dtype float32\), got float64"):
        BF.batch_norm(x, None, None, torch.ones(3, dtype=torch.float64), training=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError,
                       match=r"running_mean: expected dtype float32 \(input has dtype float32\), got float64"):
        BF.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64))
    meta = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match=r"weight: expected a tensor on input\'s device \(cpu\), got one on meta"):
        BF.batch_norm(x, None, None, meta, training=True)
    with pytest.raises(TypeError, match="input: expected a floating-point dtype"):
        BF.batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True)
    with pytest.raises(TypeError, match="input: expected a torch.Tensor"):
        BF.layer_norm(np.ones((2, 3)), 3)


def test_other_functions_share_numpy_messages():
    x = torch.randn(2, 6, 4)
    assert _message(BF.group_norm, x, 4) == _message(bnp.group_norm, x.numpy(), 4)
    assert _message(BF.layer_norm, x, (3,)) == _message(bnp.layer_norm, x.numpy(), (3,))
    one = torch.randn(2, 3, 1)
    assert _message(BF.instance_norm, one) == _message(bnp.instance_norm, one.numpy())
    rm, rv = torch.zeros(6), torch.ones(6)
    assert (_message(BF.batch_renorm, x, rm, rv, training=True, r_max=0.5) ==
            _message(bnp.batch_renorm, x.numpy(), rm.numpy(), rv.numpy(), training=True, r_max=0.5))
    assert torch.equal(rm, torch.zeros(6))
    assert (_message(BF.batch_layer_norm, x, rm, rv, training=True, eps=-1.0) ==
            _message(bnp.batch_layer_norm, x.numpy(), rm.numpy(), rv.numpy(), training=True, eps=-1.0))


def test_backend_argument_checked():
    with pytest.raises(ValueError, match="backend: expected one of"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=True, backend="cuda")
    with pytest.raises(ValueError, match="backend: expected one of"):
        bt.BatchNorm1d(3, backend="nope")
