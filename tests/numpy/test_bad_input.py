"""Bad input: errors name the argument and what was expected, and running statistics stay untouched."""
import numpy as np
import pytest
import torch

import bnlib.numpy as bnp
from bnlib import _checks


def _stats(C=3):
    return np.zeros(C), np.ones(C)


X = np.random.default_rng(0).standard_normal((4, 3, 5))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(x=X[0, 0]), ValueError, r"input: expected 2, 3, 4 or 5 dimensions .*got 1-D input"),
    (dict(x=np.zeros((2, 3, 2, 2, 2, 2))), ValueError, r"got 6-D input"),
    (dict(x=X.astype(np.int64)), TypeError,
     r"input: expected a floating-point dtype \(float32 or float64\), got int64"),
    (dict(x=X.astype(np.complex128)), TypeError, r"input: .*float32 or float64.*complex128"),
    (dict(x=X > 0), TypeError, r"input: .*float32 or float64.*got bool"),
    (dict(x=X.astype(np.float16)), TypeError, r"input: .*got float16"),
    (dict(weight=np.ones(4)), ValueError, r"weight: expected shape \(3,\) to match the 3 channels .*got shape \(4,\)"),
    (dict(bias=np.ones((3, 1))), ValueError, r"bias: expected shape \(3,\).*got shape \(3, 1\)"),
    (dict(weight=np.ones(3, dtype=np.int32)), TypeError, r"weight: expected a floating-point dtype"),
    (dict(running_mean=np.zeros(2)), ValueError, r"running_mean: expected shape \(3,\)"),
    (dict(running_var=np.ones(5)), ValueError, r"running_var: expected shape \(3,\)"),
    (dict(running_var=None), ValueError, r"running_mean, running_var: expected both or neither"),
    (dict(running_mean=[0.0, 0.0, 0.0]), TypeError, r"running_mean: expected a NumPy array \(it is updated in place\)"),
    (dict(eps=-1.0), ValueError, r"eps: expected a positive finite number or 0, got -1.0"),
    (dict(eps=-1e-5), ValueError, r"eps: expected a positive"),
    (dict(eps=float("nan")), ValueError, r"eps: expected a positive"),
    (dict(eps="1e-5"), TypeError, r"eps: expected a positive real number or 0, got str"),
    (dict(momentum=1.5), ValueError, r"momentum: expected None or a real number in \[0, 1\], got 1.5"),
    (dict(momentum=-0.1), ValueError, r"momentum: expected None or a real number in \[0, 1\]"),
    (dict(momentum=True), TypeError, r"momentum: expected None or a real number"),
    (dict(momentum=None), ValueError, r"num_batches_tracked"),
    (dict(x=X[:1, :, :1]), ValueError,
     r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3, 1\]\)"),
])
def test_batch_norm_bad_input_leaves_running_stats_untouched(kwargs, exc, pattern):
    rm, rv = _stats()
    args = dict(x=X, running_mean=rm, running_var=rv, weight=None, bias=None, training=True, momentum=0.1,
                eps=1e-5)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        bnp.batch_norm(**args)
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))


def test_one_value_per_channel_message_is_torchs():
    x = np.ones((1, 3))
    with pytest.raises(ValueError) as ours:
        bnp.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.batch_norm(torch.ones(1, 3), None, None, training=True)
    assert str(ours.value) == str(theirs.value)
    # evaluation with one value is fine
    assert bnp.batch_norm(x, np.zeros(3), np.ones(3)).shape == (1, 3)


def test_eval_needs_running_stats():
    with pytest.raises(ValueError, match="expected both when training=False"):
        bnp.batch_norm(X, None, None, training=False)


def test_keras_names_in_messages():
    mm, mv = _stats()
    with pytest.raises(ValueError, match="epsilon: expected a positive"):
        bnp.keras_batch_norm(X, mm, mv, training=True, epsilon=-1e-3)
    with pytest.raises(ValueError, match="moving_mean: expected shape"):
        bnp.keras_batch_norm(X, np.zeros(4), mv, training=True)
    with pytest.raises(ValueError, match="momentum: expected"):
        bnp.keras_batch_norm(X, mm, mv, training=True, momentum=2.0)
    with pytest.raises(TypeError, match="momentum: expected a real number in \\[0, 1\\], got None"):
        bnp.keras_batch_norm(X, mm, mv, training=True, momentum=None)
    assert np.array_equal(mm, np.zeros(3)) and np.array_equal(mv, np.ones(3))


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda rm, rv: bnp.batch_renorm(X, rm, rv, training=True, r_max=0.5), ValueError, r"r_max: expected .*>= 1"),
    (lambda rm, rv: bnp.batch_renorm(X, rm, rv, training=True, d_max=-1.0), ValueError, r"d_max: expected .*>= 0"),
    (lambda rm, rv: bnp.batch_renorm(X, None, None, training=True), ValueError, r"running_mean, running_var: expected"),
    (lambda rm, rv: bnp.batch_renorm(X, rm, rv, np.ones(2), training=True), ValueError, r"weight: expected shape"),
    (lambda rm, rv: bnp.batch_renorm(X[:1, :, :1], rm, rv, training=True), ValueError, r"more than 1 value"),
    (lambda rm, rv: bnp.batch_layer_norm(X, rm, rv, training=True, batch_size=0), ValueError,
     r"batch_size: expected a positive int"),
    (lambda rm, rv: bnp.batch_layer_norm(X, rm, rv, training=True, eps=-1.0), ValueError, r"eps: expected"),
    (lambda rm, rv: bnp.batch_layer_norm(X.astype(int), rm, rv, training=True), TypeError,
     r"input: expected a floating-point"),
    (lambda rm, rv: bnp.instance_norm(X, rm, rv, momentum=2.0), ValueError, r"momentum: expected"),
    (lambda rm, rv: bnp.instance_norm(X[:, :, :1], rm, rv), ValueError,
     r"Expected more than 1 spatial element when training, got input size torch.Size\(\[4, 3, 1\]\)"),
    (lambda rm, rv: bnp.instance_norm(X[0], rm, rv), ValueError, r"input: expected 3, 4 or 5 dimensions"),
    (lambda rm, rv: bnp.instance_norm(X, rm, np.ones(4)), ValueError, r"running_var: expected shape \(3,\)"),
])
def test_other_layers_bad_input_leaves_running_stats_untouched(call, exc, pattern):
    rm, rv = _stats()
    with pytest.raises(exc, match=pattern):
        call(rm, rv)
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: bnp.group_norm(X, 2), ValueError, r"num_groups: expected a divisor of the number of "
                                               r"channels \(3\), got num_groups=2"),
    (lambda: bnp.group_norm(X, 0), ValueError, r"num_groups: expected a positive int"),
    (lambda: bnp.group_norm(X, 1.5), TypeError, r"num_groups: expected a positive int, got float"),
    (lambda: bnp.group_norm(X, 3, np.ones(2)), ValueError, r"weight: expected shape \(3,\)"),
    (lambda: bnp.group_norm(X[0, 0], 1), ValueError, r"at least 2 dimensions"),
    (lambda: bnp.layer_norm(X, (4,)), ValueError, r"normalized_shape: expected \[4\] to match the trailing dimensions"),
    (lambda: bnp.layer_norm(X, ()), ValueError, r"normalized_shape: expected a non-empty"),
    (lambda: bnp.layer_norm(X, 5, np.ones(4)), ValueError, r"weight: expected shape \(5,\), got shape \(4,\)"),
    (lambda: bnp.layer_norm(X.astype(np.complex64), 5), TypeError, r"complex64"),
    (lambda: bnp.layer_norm(X, 5, eps=-1), ValueError, r"eps: expected"),
    (lambda: bnp.batch_norm_backward(np.ones((4, 3)), X), ValueError, r"dy: expected shape \(4, 3, 5\)"),
    (lambda: bnp.batch_norm_backward(X.astype(int), X), TypeError, r"dy: expected a floating-point dtype"),
])
def test_stateless_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("make,x,exc,pattern", [
    (lambda: bnp.BatchNorm1d(3), np.zeros((2, 3, 4, 4), np.float32), ValueError,
     r"input: expected 2 or 3 dimensions \(N, C\) or \(N, C, L\), got 4-D input"),
    (lambda: bnp.BatchNorm2d(3), np.zeros((2, 3, 4), np.float32), ValueError, r"input: expected 4 dimensions"),
    (lambda: bnp.BatchNorm3d(3), np.zeros((2, 3, 4, 4), np.float32), ValueError, r"input: expected 5"),
    (lambda: bnp.BatchNorm1d(3), np.zeros((2, 4), np.float32), ValueError,
     r"input: expected num_features=3 channels in dimension 1, got 4"),
    (lambda: bnp.BatchNorm1d(3), np.zeros((2, 3), np.int64), TypeError, r"input: expected a floating-point"),
    (lambda: bnp.BatchNorm1d(3), np.zeros((1, 3), np.float32), ValueError, r"Expected more than 1 value"),
    (lambda: bnp.BatchRenorm1d(3), np.zeros((1, 3), np.float32), ValueError, r"Expected more than 1 value"),
    (lambda: bnp.BatchLayerNorm(3), np.zeros((1, 3), np.float32), ValueError, r"Expected more than 1 value"),
    (lambda: bnp.InstanceNorm1d(3, track_running_stats=True), np.zeros((2, 3, 1)), ValueError,
     r"more than 1 spatial element"),
])
def test_module_bad_input_leaves_state_untouched(make, x, exc, pattern):
    m = make()
    before = {k: np.array(v, copy=True) for k, v in m.state_dict().items()}
    with pytest.raises(exc, match=pattern):
        m(x)
    after = m.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # incl. num_batches_tracked


@pytest.mark.parametrize("make,exc,pattern", [
    (lambda: bnp.BatchNorm2d(0), ValueError, r"num_features: expected a positive int"),
    (lambda: bnp.BatchNorm2d(3, eps=-1e-5), ValueError, r"eps: expected"),
    (lambda: bnp.BatchNorm2d(3, momentum=2), ValueError, r"momentum: expected"),
    (lambda: bnp.BatchNorm2d(3, dtype=np.int32), TypeError, r"dtype: expected a floating-point dtype"),
    (lambda: bnp.BatchNorm2d(3, momentum=None, convention="keras"), TypeError, r"momentum"),
    (lambda: bnp.GroupNorm(4, 6), ValueError, r"num_groups: expected a divisor"),
    (lambda: bnp.BatchRenorm2d(3, r_max=0.9), ValueError, r"r_max"),
    (lambda: bnp.BatchLayerNorm(3, batch_size=-2), ValueError, r"batch_size"),
])
def test_bad_constructor_arguments(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_backward_before_forward_and_wrong_dy():
    m = bnp.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="backward\\(\\) called before forward\\(\\)"):
        m.backward(np.zeros((2, 3), np.float32))
    m(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 3\)"):
        m.backward(np.zeros((2, 3), np.float32))


def test_checks_give_the_same_message_for_numpy_and_torch_dtypes():
    for np_dtype, torch_dtype in [(np.int64, torch.int64), (np.complex64, torch.complex64), (np.bool_, torch.bool),
                                  (np.float16, torch.float16)]:
        with pytest.raises(TypeError) as a:
            _checks.check_float_dtype("input", np.dtype(np_dtype))
        with pytest.raises(TypeError) as b:
            _checks.check_float_dtype("input", torch_dtype)
        assert str(a.value) == str(b.value)
    assert _checks.check_float_dtype("x", torch.float32) == "float32"
    assert _checks.check_float_dtype("x", np.float64) == "float64"
    assert _checks.check_float_dtype("x", torch.bfloat16, allowed=("bfloat16", "float32")) == "bfloat16"
    # shapes as tuples, from either framework
    with pytest.raises(ValueError) as a:
        _checks.check_per_channel("weight", np.ones(4).shape, 3)
    with pytest.raises(ValueError) as b:
        _checks.check_per_channel("weight", torch.ones(4).shape, 3)
    assert str(a.value) == str(b.value)
    with pytest.raises(ValueError) as a:
        _checks.check_training_size((1, 3, 1, 1))
    with pytest.raises(ValueError) as b:
        torch.nn.functional.batch_norm(torch.ones(1, 3, 1, 1), None, None, training=True)
    assert str(a.value) == str(b.value)
    assert _checks.check_momentum(None) is None and _checks.check_momentum(1) == 1.0
    assert _checks.check_normalized_shape(5, (2, 5)) == (5,)
