"""bnlib.lab.cost: byte counts (exact), timers (call counts, quartiles), bandwidth helpers, communication bytes."""
import pytest
import torch
from torch import nn

from bnlib.lab import cost


def test_bn_bytes_are_the_tensor_passes():
    shape = (32, 64, 112, 112)
    E = 32 * 64 * 112 * 112
    assert cost.bn_bytes(shape) == 12 * E
    assert cost.bn_bytes(shape, torch.float32, "backward") == 20 * E
    assert cost.bn_bytes(shape, torch.float32, "forward_fused") == 8 * E
    assert cost.bn_bytes(shape, torch.float32, "backward_fused") == 12 * E
    assert cost.bn_bytes(shape, torch.bfloat16, "forward") == 6 * E
    assert cost.bn_bytes(shape, torch.float16, "eval") == 4 * E
    assert cost.bn_bytes((0, 3), torch.float32) == 0


def test_bn_bytes_bad_input():
    with pytest.raises(ValueError, match="kind"):
        cost.bn_bytes((2, 3), torch.float32, "sideways")
    with pytest.raises(TypeError, match="dtype"):
        cost.bn_bytes((2, 3), torch.int32)
    with pytest.raises(ValueError, match=r"shape: expected a sequence of non-negative ints, got \(2, -3\)"):
        cost.bn_bytes((2, -3))
    with pytest.raises(TypeError, match="shape"):
        cost.bn_bytes((2, 3.0))


def test_median_time_counts_calls_and_orders_quartiles():
    calls = []
    t = cost.median_time(lambda: calls.append(1), repeats=5, warmup=2, number=3)
    assert len(calls) == 2 + 5 * 3
    assert len(t.samples) == 5 and t.q1 <= t.median <= t.q3
    assert "ms" in str(t)
    one = cost.median_time(lambda: None, repeats=1, warmup=0)
    assert one.q1 == one.median == one.q3
    with pytest.raises(ValueError, match="repeats"):
        cost.median_time(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        cost.median_time(lambda: None, warmup=-1)
    with pytest.raises(TypeError, match="callable"):
        cost.median_time(3)


def test_interleaved_times_take_turns():
    order = []
    fns = {"a": lambda: order.append("a"), ("b", 2): lambda: order.append("b")}
    times = cost.interleaved_times(fns, repeats=4, warmup=1, number=2)
    assert list(times) == ["a", ("b", 2)]                     # the keys, in the order given
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 4     # warmup round, then one sample of each per round
    for t in times.values():
        assert len(t.samples) == 4 and t.q1 <= t.median <= t.q3


def test_interleaved_times_bad_input():
    with pytest.raises(ValueError, match="fns"):
        cost.interleaved_times({})
    with pytest.raises(TypeError, match="fns: expected a non-empty mapping"):
        cost.interleaved_times([lambda: None])
    with pytest.raises(TypeError, match=r"fns\['x'\]"):
        cost.interleaved_times({"x": 3})
    with pytest.raises(ValueError, match="repeats"):
        cost.interleaved_times({"x": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="number"):
        cost.interleaved_times({"x": lambda: None}, number=0)


def test_bandwidth_helpers():
    bw = cost.copy_bandwidth(2**20, repeats=3, warmup=1)
    assert bw > 1e6  # more than a megabyte per second, on any machine
    assert cost.achieved_bandwidth(100.0, 2.0) == 50.0
    assert cost.roofline_time(100.0, 50.0) == 2.0
    with pytest.raises(ValueError, match=r"seconds: expected a real number in \(0, inf\), got 0.0"):
        cost.achieved_bandwidth(1.0, 0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        cost.roofline_time(1.0, -1.0)
    with pytest.raises(ValueError, match="nbytes: expected an int >= 1024, got 10"):
        cost.copy_bandwidth(10)
    with pytest.raises(TypeError, match="nbytes"):
        cost.copy_bandwidth(2048.0)


@pytest.mark.parametrize("impl", ["torch", "bnlib"])
@pytest.mark.parametrize("backward", [False, True])
def test_time_batch_norm_runs(impl, backward):
    x = torch.randn(4, 3, 5, 5)
    t = cost.time_batch_norm(x, impl, backward=backward, repeats=2, warmup=1)
    assert t.median > 0
    with pytest.raises(ValueError, match="impl"):
        cost.time_batch_norm(x, "numpy")


def test_training_step_and_inference_timers_leave_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t = torch.randn(8, 6), torch.randint(0, 3, (8,))
    step = cost.time_training_step(model, x, t, repeats=2, warmup=1)
    assert step.median > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    inf = cost.time_inference(model, x, repeats=2, warmup=0)
    assert inf.median > 0 and not model.training
    # the building blocks of interleaved timings: a training step trains a copy, inference changes nothing
    model.train()
    step_fn, infer_fn = cost.training_step(model, x, t, lr=0.1), cost.inference_call(model, x)
    assert not model.training
    times = cost.interleaved_times({"step": step_fn, "inference": infer_fn}, repeats=2, warmup=1)
    assert set(times) == {"step", "inference"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(TypeError, match="model"):
        cost.training_step(lambda v: v, x, t)
    with pytest.raises(TypeError, match="model"):
        cost.inference_call(None, x)


def test_batch_norm_step_runs_and_checks_impl():
    x = torch.randn(4, 3, 5, 5)
    for backward in (False, True):
        cost.batch_norm_step(x, "bnlib", backward=backward)()
    with pytest.raises(ValueError, match="impl"):
        cost.batch_norm_step(x, "numpy")


def test_sync_bn_communication_bytes():
    c = cost.sync_bn_communication_bytes(64, 2)
    assert c == {"forward": 3 * 64 * 8, "backward": 2 * 64 * 4, "total": 3 * 64 * 8 + 2 * 64 * 4}
    assert cost.sync_bn_communication_bytes(64, 1)["total"] == 0
    assert cost.sync_bn_communication_bytes(10, 4, torch.float64)["backward"] == round(2 * 3 / 4 * 2 * 10 * 8)
    with pytest.raises(ValueError, match="num_features"):
        cost.sync_bn_communication_bytes(0, 2)
    with pytest.raises(TypeError, match="world_size"):
        cost.sync_bn_communication_bytes(64, 2.0)
