"""bnlib.torch.convert on a small ResNet; fold_batchnorm equality and its report."""
import copy
import warnings

import pytest
import torch
from torch import nn

import bnlib.torch as bt
from bnlib.torch.fold import Folded
from tests._numerics import assert_error_within, assert_states_within


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def tiny_resnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        Block(8, 8, 1), Block(8, 16, 2),
        nn.GroupNorm(4, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 12), nn.LayerNorm(12), nn.BatchNorm1d(12), nn.Linear(12, 10),
    )


def test_convert_small_resnet_trains_identically():
    """bnlib's converted model trains like torch's: its float32 losses, state and eval outputs are as close to a
    float64 twin (same start, same batches) as torch's float32 model is, within a few times torch's error (the
    float32 rounding depends on the processor's convolution and reduction kernels; tests/_numerics.py)."""
    torch.manual_seed(0)
    ref = tiny_resnet()
    ours = bt.convert(copy.deepcopy(ref))
    kinds = {type(m) for m in ours.modules()}
    assert not kinds & {nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm}
    assert {bt.BatchNorm2d, bt.BatchNorm1d, bt.GroupNorm, bt.LayerNorm} <= kinds
    truth = copy.deepcopy(ref).double()
    models = (ours, ref, truth)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        t = torch.randint(0, 10, (8,), generator=gen)
        losses = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x.double() if m is truth else x), t)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_error_within(*losses, what=f"step {step} loss")
    assert_states_within(*models)
    for m in models:
        m.eval()
    x = torch.randn(4, 3, 8, 8, generator=gen)
    assert_error_within(ours(x), ref(x), truth(x.double()), what="eval output")


def test_convert_keeps_state_by_reference_and_back():
    bn = nn.BatchNorm2d(3).double().eval()
    params = {id(p) for p in bn.parameters()}
    new = bt.convert(bn)  # the root itself is replaced
    assert type(new) is bt.BatchNorm2d and not new.training
    assert {id(p) for p in new.parameters()} == params
    assert new.weight.dtype == torch.float64 and new.running_mean.dtype == torch.float64
    assert new.backend == "auto"
    back = bt.convert(new, to="torch")
    assert type(back) is nn.BatchNorm2d and not hasattr(back, "backend")
    with pytest.raises(TypeError):
        bt.convert("not a model")
    sync = bt.convert(nn.Sequential(nn.SyncBatchNorm(4)))  # to bnlib's SyncBatchNorm when importable
    if type(sync[0]) is not nn.SyncBatchNorm:
        assert type(sync[0]).__name__ == "SyncBatchNorm" and sync[0].backend == "auto"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert sync(torch.randn(4, 4, 2)).shape == (4, 4, 2)
        assert type(bt.convert(sync, to="torch")[0]) is nn.SyncBatchNorm
    shared = nn.LayerNorm(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model = bt.convert(model)
    assert model[0] is model[2] and type(model[0]) is bt.LayerNorm


# --- folding ----------------------------------------------------------------------------------------------
def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False, groups=2), bt.BatchNorm2d(8), nn.ReLU()),
        nn.Conv1d(8, 8, 1) if False else nn.Identity(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4),
    )


def _trained(model, shape):
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for _ in range(3):
            model(torch.randn(shape, generator=gen, dtype=next(model.parameters()).dtype) * 2 + 1)
    return model.eval()


def test_fold_batchnorm_equals_eval_model():
    model = _trained(small_cnn(), (16, 3, 6, 6))
    before = copy.deepcopy(model.state_dict())
    folded, report = bt.fold_batchnorm(model, return_report=True)
    assert len(report.folded) == 3 and not report.skipped
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, bt.BatchNorm2d)) for m in folded.modules())
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():  # original untouched
        assert torch.equal(v, before[k])
    assert folded.fold_report is not None and "folded 3" in str(report)
    assert "folded into '6'" in repr(folded)


def test_fold_conv1d_conv3d_and_float64():
    for conv, bn, shape in ((nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), (6, 2, 9)),
                            (nn.Conv3d(2, 4, 2), bt.BatchNorm3d(4), (6, 2, 4, 4, 4))):
        model = _trained(nn.Sequential(conv, bn).double(), shape)
        folded = bt.fold_batchnorm(model)
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
        assert isinstance(folded[1], Folded)


def test_fold_reports_training_mode_and_unfoldable():
    model = small_cnn().train()
    with pytest.warns(UserWarning, match="training mode"):
        folded, report = bt.fold_batchnorm(model, return_report=True)
    assert not report.folded and len(report.skipped) == 3
    x = torch.randn(4, 3, 6, 6)
    torch.manual_seed(0)
    torch.testing.assert_close(folded(x), copy.deepcopy(model)(x))  # nothing silently changed
    resnet = _trained(tiny_resnet(), (8, 3, 8, 8))
    with pytest.warns(UserWarning):
        folded, report = bt.fold_batchnorm(resnet, return_report=True)
    # torch.fx finds the pairs called in Block.forward too (bn1(conv1(x))), not only those in a Sequential
    assert report.folded == [("0", "1"), ("3.conv1", "3.bn1"), ("3.conv2", "3.bn2"), ("4.conv1", "4.bn1"),
                             ("4.conv2", "4.bn2"), ("4.short.0", "4.short.1")]
    assert not report.untraced
    reasons = dict(report.skipped)
    assert list(reasons) == ["10"] and "preceded by LayerNorm" in reasons["10"]
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(folded(x), resnet(x), rtol=1e-5, atol=1e-5)
    ct = _trained(nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.BatchNorm2d(3),
                                nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)), (4, 2, 3, 3))
    with pytest.warns(UserWarning):
        _, report = bt.fold_batchnorm(ct, return_report=True)
    reasons = dict(report.skipped)
    assert "ConvTranspose2d" in reasons["1"] and "no running statistics" in reasons["3"]


def test_fold_linear_guard_and_shared_layers():
    model = _trained(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (8, 4))
    folded = bt.fold_batchnorm(model)
    with pytest.raises(ValueError, match="2-D"):
        folded(torch.randn(2, 4, 4))
    conv = nn.Conv2d(2, 2, 1)
    shared = _trained(nn.Sequential(conv, nn.BatchNorm2d(2), conv), (4, 2, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = bt.fold_batchnorm(shared, return_report=True)
    assert "more than one place" in report.skipped[0][1]


def test_convert_swaps_rms_norm_both_ways():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 6)
    ref = model(x)
    bt.convert(model)
    assert type(model[1]) is bt.RMSNorm
    assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-6)
    bt.convert(model, to="torch")
    assert type(model[1]) is nn.RMSNorm
    assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-6)
