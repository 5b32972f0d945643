"""bnlib.torch.SyncBatchNorm: exact merging of per-rank statistics, the single-process fallback, conversion,
and a 2-process gloo run (torch.multiprocessing, 127.0.0.1, a free port) against one process on the
concatenated batch -- equal and unequal per-rank batch sizes, channels-last, (N, C) input, an empty rank."""
import warnings

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnlib.torch import BatchNorm1d, BatchNorm2d, GhostBatchNorm2d
from bnlib.torch.sync_batchnorm import (
    SyncBatchNorm,
    convert_sync_batchnorm,
    local_moments,
    merge_moments,
    spawn_comparison,
)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda s: sum(s) >= 2),
       loc=st.sampled_from([0.0, 1e3]))
def test_merge_moments_is_exact(sizes, loc):
    g = torch.Generator().manual_seed(sum(sizes))
    x = torch.randn(sum(sizes), 3, 2, dtype=torch.float64, generator=g) + loc
    parts = [local_moments(p) for p in torch.split(x, sizes)]
    n, mean, m2 = merge_moments(*(torch.stack(t) for t in zip(*parts)))
    var, mu = torch.var_mean(x, dim=(0, 2), correction=0)
    assert torch.equal(n, torch.full((3,), float(x.numel() // 3), dtype=torch.float64))
    torch.testing.assert_close(mean, mu, rtol=1e-12, atol=1e-12 * (1 + loc))
    torch.testing.assert_close(m2 / n, var, rtol=1e-9, atol=1e-12)


def test_without_process_group_is_plain_batch_norm_and_warns_once():
    assert not (dist.is_available() and dist.is_initialized())
    torch.manual_seed(0)
    sync, ref = SyncBatchNorm(4, momentum=0.2), nn.BatchNorm2d(4, momentum=0.2)
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [sync(x), sync(x + 1)]
    msgs = [w for w in caught if "no torch.distributed process group" in str(w.message)]
    assert len(msgs) == 1
    yr = [ref(x), ref(x + 1)]
    for a, b in zip(ys, yr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sync.running_var, ref.running_var)
    assert int(sync.num_batches_tracked) == 2
    sync.eval()
    ref.eval()
    torch.testing.assert_close(sync(x), ref(x), rtol=1e-5, atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2D"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError):
        SyncBatchNorm(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="more than 1 value"):
        SyncBatchNorm(3)(torch.randn(1, 3))


def test_convert_sync_batchnorm_keeps_parameters_and_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(BatchNorm2d(4), GhostBatchNorm2d(4, virtual_batch_size=2)),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5), BatchNorm1d(5, momentum=None))
    model(torch.randn(4, 3, 6, 6))  # non-trivial running statistics
    model[6].eval()
    w_before = model[1].weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(SyncBatchNorm) == 3
    assert isinstance(converted[3][1], GhostBatchNorm2d)  # other semantics: left alone
    assert converted[1].weight is w_before
    assert converted[6].momentum is None and not converted[6].training and converted[1].training
    for k, v in converted.state_dict().items():
        assert torch.equal(v, state[k]), k
    single = convert_sync_batchnorm(nn.BatchNorm1d(7, eps=1e-3, affine=False))
    assert isinstance(single, SyncBatchNorm) and single.eps == 1e-3 and single.weight is None


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_two_processes_match_one_process_on_concatenated_batch():
    """One spawn of 2 gloo processes runs all scenarios (process start-up costs seconds)."""
    scenarios = [
        dict(sizes=[4, 4], feature_shape=(3, 4, 4)),
        dict(sizes=[3, 5], feature_shape=(3, 4, 4)),                      # unequal batch sizes
        dict(sizes=[2, 6], feature_shape=(4, 3, 5), channels_last=True),  # channels-last
        dict(sizes=[1, 7], feature_shape=(5,), momentum=None, steps=3),   # (N, C), one sample on rank 0
        dict(sizes=[5, 2], feature_shape=(3, 6)),                         # (N, C, L)
        dict(sizes=[0, 6], feature_shape=(3,)),                           # an empty rank
        dict(sizes=[3, 5], feature_shape=(3, 4, 4), dtype=torch.float64),
    ]
    results = spawn_comparison(scenarios)
    assert len(results) == len(scenarios)
    for scenario, diffs in zip(scenarios, results):
        tol = 1e-12 if scenario.get("dtype") == torch.float64 else 1e-5
        assert set(diffs) == {"y", "dx", "dweight", "dbias", "running_mean", "running_var", "y_eval"}
        assert max(diffs.values()) <= tol, (scenario, diffs)
