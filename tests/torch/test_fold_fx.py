"""fold_batchnorm with torch.fx: every conv -> BN pair of a ResNet-18-shaped model, the pairs it must leave in
place (with a reason), and the Sequential fallback for parts torch.fx cannot trace."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bnlib.torch as bt
from bnlib.lab.cost import resnet18_like
from bnlib.torch.fold import _BN_TYPES, Folded

BN2D = {"torch": nn.BatchNorm2d, "bnlib": bt.BatchNorm2d}


def _trained_resnet(norm: str, dtype=torch.float32) -> nn.Module:
    """A ResNet-18-shaped model (widths 8/16/32/64) after 2 SGD steps on random data, with randomized affine
    parameters and running statistics, so that each of its 20 folds is far from the identity; in eval mode."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = resnet18_like((8, 16, 32, 64), norm_layer=BN2D[norm]).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN_TYPES):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):  # training mode: the running statistics move towards the batch statistics
        x = torch.randn(8, 3, 32, 32, generator=gen, dtype=dtype)
        t = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    return model.eval()


def _bn_calls(model: nn.Module) -> list:
    """The batch norms that ``model``'s forward calls (the traced graph's call_module nodes)."""
    graph = bt.fold._Tracer().trace(model)
    return [n.target for n in graph.nodes
            if n.op == "call_module" and isinstance(model.get_submodule(n.target), _BN_TYPES)]


def test_resnet18_like_layout_and_bad_arguments():
    model = resnet18_like()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 20
    assert len(_bn_calls(model)) == 20
    names = dict(model.named_parameters())
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.weight", "fc.bias"} <= set(names)
    assert names["layer4.1.conv2.weight"].shape == (64, 64, 3, 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = resnet18_like((4, 4, 8, 8), norm_layer=None, num_classes=3)
    assert not any(isinstance(m, _BN_TYPES) for m in plain.modules()) and plain.conv1.bias is not None
    assert plain(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    with pytest.raises(ValueError, match="widths"):
        resnet18_like((8, 16, 32))
    with pytest.raises(ValueError, match="widths"):
        resnet18_like((8, 16, 0, 64))
    with pytest.raises(TypeError, match="norm_layer"):
        resnet18_like(norm_layer="bn")


@pytest.mark.parametrize("norm", ["torch", "bnlib"])
def test_fx_folds_all_20_batch_norms_of_a_resnet18(norm):
    model = _trained_resnet(norm)
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing untraced: no warning
        folded, report = bt.fold_batchnorm(model, return_report=True)
    assert len(report.folded) == 20 and not report.skipped and not report.untraced
    assert ("layer2.0.conv1", "layer2.0.bn1") in report.folded
    assert ("layer3.0.downsample.0", "layer3.0.downsample.1") in report.folded
    assert not any(isinstance(m, _BN_TYPES) for m in folded.modules())
    assert _bn_calls(folded) == [] and len(_bn_calls(model)) == 20
    assert sum(isinstance(m, Folded) for m in folded.modules()) == 20
    # the user's class, forward and parameter names; each conv gained a bias, each BN's entries are gone
    assert type(folded) is type(model) and type(folded.layer1[0]) is type(model.layer1[0])
    bn_keys = {k for k in before if any(k.startswith(n + ".") for n, m in model.named_modules()
                                        if isinstance(m, _BN_TYPES))}
    conv_biases = {f"{n}.bias" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(folded.state_dict()) == (set(before) - bn_keys) | conv_biases
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, y_folded = model(x), folded(x)
    assert y.abs().max() > 0.1  # a non-trivial output
    torch.testing.assert_close(y_folded, y, rtol=1e-5, atol=1e-5)
    # the input model is untouched: same modules, same values, still in eval mode
    assert not any(isinstance(m, Folded) for m in model.modules()) and not model.training
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("norm", ["torch", "bnlib"])
def test_fx_fold_resnet18_float64(norm):
    model = _trained_resnet(norm, torch.float64)
    folded, report = bt.fold_batchnorm(model, return_report=True)
    assert len(report.folded) == 20 and not report.skipped
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    assert folded.conv1.weight.dtype == torch.float64


class _TwoUses(nn.Module):
    """The conv's output feeds the batch norm and the addition: not foldable."""

    def __init__(self, c_in=3):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y
        return self.bn2(self.conv2(z))  # this pair folds


def test_conv_output_used_twice_is_skipped_with_reason():
    model = _trained_model(_TwoUses(), (8, 3, 5, 5))
    with pytest.warns(UserWarning, match="also used by"):
        folded, report = bt.fold_batchnorm(model, return_report=True)
    assert report.folded == [("conv2", "bn2")]
    reasons = dict(report.skipped)
    assert list(reasons) == ["bn"] and "output of 'conv' is also used by add()" in reasons["bn"]
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, Folded)
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.mean, self.var, training=False)
        return bt.functional.batch_norm(y, None, None, training=True)


def test_functional_batch_norms_are_reported_not_folded():
    model = _Functional().eval()
    with pytest.warns(UserWarning, match="functional batch norm"):
        folded, report = bt.fold_batchnorm(model, return_report=True)
    assert not report.folded and not report.untraced and len(report.skipped) == 2
    names = [n for n, _ in report.skipped]
    assert "torch.nn.functional.batch_norm() call" in names[0] and "model's forward" in names[0]
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(folded(x), model(x))


class _Untraceable(nn.Module):
    """Data-dependent control flow in forward: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), _UntraceableChild(),
                                 nn.Conv2d(4, 4, 1), bt.BatchNorm2d(4))
        self.block = _TwoUses(4)  # traceable on its own

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # depends on the data
            y = -y
        return self.block(self.seq(y))


class _UntraceableChild(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean() > 0 else x


def test_untraceable_parts_fall_back_to_the_sequential_rule():
    model = _trained_model(_Untraceable(), (8, 3, 5, 5))
    with pytest.warns(UserWarning, match="did not trace"):
        folded, report = bt.fold_batchnorm(model, return_report=True)
    untraced = dict(report.untraced)
    assert list(untraced) == ["<model>", "seq", "seq.3"]
    assert all("TraceError" in e and "control flow" in e for e in untraced.values())
    # seq (untraced, plain Sequential): the Sequential rule; block (traced by itself): torch.fx
    assert report.folded == [("seq.0", "seq.1"), ("seq.4", "seq.5"), ("block.conv2", "block.bn2")]
    reasons = dict(report.skipped)
    assert list(reasons) == ["bn", "block.bn"]
    assert "not traced" in reasons["bn"] and "nn.Sequential" in reasons["bn"]
    assert "also used by" in reasons["block.bn"]
    assert "not traced: <model> (TraceError" in str(report)
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(model.seq[1], nn.BatchNorm2d)  # the original is untouched


class _Misc(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(2, 2, 1)
        self.bn_a = nn.BatchNorm2d(2)
        self.bn_in = nn.BatchNorm2d(2)
        self.conv_r = nn.Conv2d(2, 2, 1)
        self.bn_r = nn.BatchNorm2d(2)
        self.conv_h = nn.Conv2d(2, 2, 1)
        self.bn_h = nn.BatchNorm2d(2)
        self.conv_l = nn.Conv2d(2, 2, 1)
        self.bln = bt.BatchLayerNorm(2)
        self.unused = nn.BatchNorm2d(2)
        self.lin = nn.Linear(2, 3)
        self.bn1d = bt.BatchNorm1d(3)

    def forward(self, x):
        a = self.bn_a(self.shared(self.shared(x)))                  # the conv is called twice
        b = self.bn_in(x)                                           # the model's input
        c = self.bn_r(self.conv_r(x)) * self.conv_r.weight.sum()   # parameters also read directly
        d = self.bn_h(self.conv_h(x))                               # a forward hook on the batch norm
        e = self.bln(self.conv_l(x))                                # BatchLayerNorm: not a fixed affine map
        f = self.bn1d(self.lin((a + b + c + d + e).mean((2, 3))))   # Linear -> BatchNorm1d, 2-D
        return f


def test_other_unfoldable_cases_have_reasons_and_linear_folds():
    model = _trained_model(_Misc(), (8, 2, 3, 3))
    model.bn_h.register_forward_hook(lambda mod, inp, out: None)
    with pytest.warns(UserWarning):
        folded, report = bt.fold_batchnorm(model, return_report=True)
    assert report.folded == [("lin", "bn1d")]
    reasons = dict(report.skipped)
    assert "more than one place" in reasons["bn_a"]
    assert "input of the model's forward" in reasons["bn_in"]
    assert "read in forward" in reasons["bn_r"]
    assert "forward hooks" in reasons["bn_h"]
    assert "BatchLayerNorm" in reasons["bln"]
    assert "not called" in reasons["unused"]
    assert len(reasons) == 6
    x = torch.randn(4, 2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(folded.bn1d, Folded) and folded.bn1d.require_2d


class _Optional(nn.Module):
    """With ``extra`` given the conv's output is used once; with the default ``None`` it is used twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.inner = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x, extra=None):
        y = self.conv(x)
        if extra is not None:  # torch.fx takes this branch: its placeholder is a proxy, never None
            return self.inner(self.bn(y) * extra)
        return self.inner(self.bn(y) + y)


def test_forward_with_optional_arguments_is_not_traced():
    model = _trained_model(_Optional(), (8, 2, 3, 3))
    with pytest.warns(UserWarning, match="did not trace"):
        folded, report = bt.fold_batchnorm(model, return_report=True)
    assert report.untraced[0][0] == "<model>" and "not one input" in report.untraced[0][1]
    assert report.folded == [("inner.0", "inner.1")]  # the child is traced by itself
    assert "not traced" in dict(report.skipped)["bn"]
    x, extra = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded(x, extra), model(x, extra), rtol=1e-5, atol=1e-5)


def test_batch_norm_alone_and_training_mode():
    bn = _trained_model(nn.Sequential(nn.BatchNorm2d(3)), (4, 3, 2, 2))[0]
    with pytest.warns(UserWarning, match="by itself"):
        _, report = bt.fold_batchnorm(bn, return_report=True)
    assert report.skipped[0][0] == "<model>"
    model = _trained_resnet("torch").train()
    with pytest.warns(UserWarning, match="training mode"):
        _, report = bt.fold_batchnorm(model, return_report=True)
    assert not report.folded and len(report.skipped) == 20


def test_folded_resnet_traces_without_batch_norm_nodes():
    """The folded copy is still traceable, and its graph has no batch-norm call left."""
    folded = bt.fold_batchnorm(_trained_resnet("bnlib"))
    graph = fx.symbolic_trace(folded).graph
    assert not any(n.op == "call_function" and "batch_norm" in str(n.target) for n in graph.nodes)


def _trained_model(model: nn.Module, shape) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for _ in range(3):
            model(torch.randn(shape, generator=gen) * 2 + 1)
    return model.eval()
