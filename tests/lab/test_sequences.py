"""Tests of bnlib.lab.sequences: per-time-step normalization, the RNN with variable lengths, data helpers."""
import pytest
import torch

import bnlib.torch as bt
from bnlib.lab import sequences as S


def test_time_step_norm_keeps_separate_statistics():
    torch.manual_seed(0)
    layer = S.TimeStepNorm(3, max_steps=2, momentum=1.0)
    a = torch.randn(8, 3) * 2 + 5
    b = torch.randn(8, 3) - 4
    out_a = layer(a, 0)
    layer(b, 1)
    torch.testing.assert_close(layer.norms[0].running_mean, a.mean(0))
    torch.testing.assert_close(layer.norms[1].running_mean, b.mean(0))
    # shared affine, batch statistics in training
    torch.testing.assert_close(out_a, (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5))
    layer.eval()
    # beyond the last step: the last step's statistics (beyond='last')
    torch.testing.assert_close(layer(b, 5), layer(b, 1))
    assert set(n for n, _ in layer.named_parameters()) == {"weight", "bias"}


def test_time_step_norm_errors_and_fallback():
    layer = S.TimeStepNorm(3, max_steps=2, beyond="error")
    with pytest.raises(ValueError, match="beyond"):
        layer(torch.randn(4, 3), 2)  # training: always an error
    layer.eval()
    with pytest.raises(ValueError, match="beyond='error'"):
        layer(torch.randn(4, 3), 2)
    with pytest.raises(ValueError, match="t:"):
        layer(torch.randn(4, 3), -1)
    for kwargs, match in (({"kind": "gn"}, "kind"), ({"beyond": "wrap"}, "beyond"), ({"min_batch": 1}, "min_batch"),
                          ({"affine": False}, "affine")):
        with pytest.raises(ValueError, match=match):
            S.TimeStepNorm(3, 2, **kwargs)
    # one sequence left in training: running statistics instead of an error
    layer = S.TimeStepNorm(3, max_steps=2)
    x = torch.randn(1, 3)
    out = layer(x, 0)
    torch.testing.assert_close(out, x / torch.sqrt(torch.tensor(1 + 1e-5)))
    assert layer.fallbacks == 1 and layer.norms[0].training
    assert int(layer.norms[0].num_batches_tracked) == 0


def test_time_step_norm_bln():
    layer = S.TimeStepNorm(4, max_steps=3, kind="bln", batch_size=8)
    assert isinstance(layer.norms[0], bt.BatchLayerNorm) and layer.norms[0].batch_size == 8
    assert layer(torch.randn(8, 4), 2).shape == (8, 4)


@pytest.mark.parametrize("norm", S.SEQ_NORMS)
def test_norm_rnn_shapes_and_backward(norm):
    torch.manual_seed(0)
    model = S.NormRNN(input_size=5, hidden_size=6, num_classes=3, norm=norm, max_steps=4, batch_size=8)
    x = torch.randn(8, 4, 5)
    out = model(x)
    assert out.shape == (8, 3)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert model(torch.randn(2, 7, 5)).shape == (2, 3)  # longer than max_steps at evaluation


@pytest.mark.parametrize("norm", ["none", "ln", "bn", "bln", "bn_shared"])
def test_variable_lengths_equal_separate_runs_in_eval(norm):
    """In eval mode a padded batch with lengths gives each sequence the result of running it alone."""
    torch.manual_seed(1)
    model = S.NormRNN(input_size=4, hidden_size=5, num_classes=3, norm=norm, max_steps=6, batch_size=4)
    model(torch.randn(16, 6, 4))  # non-trivial running statistics
    model.eval()
    lengths = torch.tensor([6, 3, 1, 5])
    x = torch.randn(4, 6, 4)
    padded = x.clone()
    for i, n in enumerate(lengths):
        padded[i, n:] = 100.0  # garbage padding must not matter
    out = model(padded, lengths)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i], model(x[i: i + 1, :n])[0], atol=1e-5, rtol=1e-5)


def test_variable_lengths_exclude_padding_from_batch_statistics():
    torch.manual_seed(2)
    model = S.NormRNN(input_size=3, hidden_size=4, num_classes=2, norm="bn", max_steps=5)
    x = torch.randn(6, 5, 3)
    lengths = torch.tensor([5, 5, 5, 3, 3, 2])
    a = model(x, lengths)
    x2 = x.clone()
    x2[3:, 3:] = 50.0  # change only the padding
    b = model(x2, lengths)
    torch.testing.assert_close(a, b)


def test_norm_rnn_bad_input():
    with pytest.raises(ValueError, match="norm"):
        S.NormRNN(norm="gn")
    model = S.NormRNN(input_size=4, hidden_size=5, max_steps=3)
    with pytest.raises(ValueError, match="x:"):
        model(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.randn(2, 3, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.randn(2, 3, 4), torch.tensor([1.0, 3.0]))


def test_rows_and_padding_helpers():
    imgs = torch.rand(3, 28, 28)
    seq = S.rows_as_sequence(imgs, blank_before=2, blank_after=1)
    assert seq.shape == (3, 31, 28)
    assert torch.equal(seq[:, 2:30], imgs) and seq[:, :2].abs().sum() == 0 and seq[:, 30].abs().sum() == 0
    assert S.rows_as_sequence(imgs.unsqueeze(1)).shape == (3, 28, 28)
    padded, lengths = S.pad_rows(imgs, torch.tensor([0, 4, 2]))
    assert padded.shape == (3, 32, 28) and lengths.tolist() == [28, 32, 30]
    assert torch.equal(padded[1, 4:], imgs[1]) and torch.equal(padded[2, 2:30], imgs[2])
    assert padded[0, 28:].abs().sum() == 0
    with pytest.raises(ValueError, match="blank_before"):
        S.rows_as_sequence(imgs, blank_before=-1)
    with pytest.raises(ValueError, match="blank_before"):
        S.pad_rows(imgs, torch.tensor([0, 1]))


def test_train_sequence_model_learns_and_is_seeded():
    torch.manual_seed(0)
    x = torch.randn(64, 5, 3)
    y = (x[:, :, 0].sum(1) > 0).long()

    def run():
        torch.manual_seed(3)
        model = S.NormRNN(input_size=3, hidden_size=8, num_classes=2, norm="ln", max_steps=5)
        losses = S.train_sequence_model(model, x, y, steps=60, batch_size=16, lr=0.02)
        return model, losses

    model, losses = run()
    _, again = run()
    assert losses == again
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert S.sequence_accuracy(model, x, y) > 0.7
    with pytest.raises(ValueError, match="lengths"):
        S.train_sequence_model(model, x, y, steps=1, batch_size=4, lengths=torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        S.train_sequence_model(model, x, y, steps=1, batch_size=65)


@pytest.mark.parametrize("norm,variable", [("none", True), ("ln", True), ("bn", True), ("bn", False), ("bln", True),
                                           ("bn_shared", False)])
def test_train_sequence_models_equals_training_each_alone(norm, variable):
    """The batched trainer is train_sequence_model applied to each network (same batches, clipping per network),
    up to rounding: in float64 so that the comparison is tight despite batch norm's amplification of rounding
    at steps with two or one sequences left (the fallback to running statistics is exercised too)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    lengths = torch.randint(3, 8, (40,), generator=gen) if variable else None

    def nets():
        out = []
        for k in range(3):
            torch.manual_seed(10 + k)
            out.append(S.NormRNN(input_size=3, hidden_size=5, num_classes=3, norm=norm, max_steps=7,
                                 batch_size=8).double())
        return out

    batched, alone = nets(), nets()
    expected_mode = {"none": "bias", "bn_shared": "loop"}.get(norm, norm)
    assert S._SeedEnsemble(nets()).mode == expected_mode              # batched, not one network at a time
    losses = S.train_sequence_models(batched, x, y, steps=12, batch_size=8, lengths=lengths, lr=0.05, seed=4)
    expected = [S.train_sequence_model(m, x, y, steps=12, batch_size=8, lengths=lengths, lr=0.05, seed=4)
                for m in alone]
    assert len(losses) == 3 and all(len(r) == 12 for r in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-7, atol=1e-7)
    for a, b in zip(batched, alone):
        assert a.training
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-7, atol=1e-7, msg=key)
        if norm in ("bn", "bln"):
            assert a.norm.fallbacks == b.norm.fallbacks
    if variable and norm == "bn":
        assert batched[0].norm.fallbacks > 0


def test_train_sequence_models_float32_and_bad_input():
    x = torch.randn(32, 5, 3)
    y = (x[:, :, 0].sum(1) > 0).long()
    torch.manual_seed(0)
    models = [S.NormRNN(input_size=3, hidden_size=8, num_classes=2, norm="ln", max_steps=5) for _ in range(2)]
    losses = S.train_sequence_models(models, x, y, steps=40, batch_size=16, lr=0.02)
    assert all(sum(r[-5:]) < sum(r[:5]) for r in losses)
    assert not torch.equal(models[0].w_h.weight, models[1].w_h.weight)       # two networks, not one
    other = S.NormRNN(input_size=3, hidden_size=8, num_classes=2, norm="bn", max_steps=5)
    with pytest.raises(ValueError, match="one configuration"):
        S.train_sequence_models([models[0], other], x, y, steps=1, batch_size=4)
    with pytest.raises(ValueError, match="more than once"):
        S.train_sequence_models([models[0], models[0]], x, y, steps=1, batch_size=4)
    with pytest.raises(TypeError, match="models"):
        S.train_sequence_models([], x, y, steps=1, batch_size=4)
    with pytest.raises(ValueError, match="lengths"):
        S.train_sequence_models(models, x, y, steps=1, batch_size=4, lengths=torch.zeros(32, dtype=torch.long))
    with pytest.raises(ValueError, match="x:"):
        S.train_sequence_models(models, x[:, :, :2], y, steps=1, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        S.train_sequence_models(models, x, y, steps=1, batch_size=33)


def test_train_sequence_model_runs_on_the_shared_loop():
    """The batches are bnlib.lab.train.run's (same seed, same indices); a callback can stop training."""
    from bnlib.lab.train import StopTraining, run

    x = torch.randn(30, 4, 3)
    y = torch.randint(0, 2, (30,))
    seen = []
    run(30, lambda t, idx: seen.append(idx.clone()) or 0.0, steps=5, batch_size=8, seed=3)
    batches = []

    class Spy(S.NormRNN):
        def forward(self, xb, lengths=None):
            batches.append(xb)
            return super().forward(xb, lengths)

    torch.manual_seed(0)
    S.train_sequence_model(Spy(input_size=3, hidden_size=4, num_classes=2, max_steps=4), x, y, steps=5,
                           batch_size=8, seed=3)
    assert all(torch.equal(b, x[i]) for b, i in zip(batches, seen)) and len(batches) == 5

    def stop_after_2(step, model):
        if step == 2:
            raise StopTraining

    model = S.NormRNN(input_size=3, hidden_size=4, num_classes=2, max_steps=4)
    assert len(S.train_sequence_model(model, x, y, steps=5, batch_size=8, callback=stop_after_2)) == 1
    with pytest.raises(ValueError, match="steps"):
        S.train_sequence_model(model, x, y, steps=0, batch_size=8)
    with pytest.raises(ValueError, match="y: expected 30 labels"):
        S.train_sequence_model(model, x, y[:5], steps=1, batch_size=4)


def test_argument_checks_share_exception_types():
    """Bad types raise TypeError, bad values ValueError, naming the argument."""
    with pytest.raises(TypeError, match="max_steps"):
        S.TimeStepNorm(3, 2.0)
    with pytest.raises(ValueError, match="hidden_size: expected a positive int, got 0"):
        S.NormRNN(hidden_size=0)
    layer = S.TimeStepNorm(3, max_steps=2)
    with pytest.raises(TypeError, match="t: expected an int >= 0, got float"):
        layer(torch.randn(4, 3), 1.0)
    with pytest.raises(TypeError, match="min_batch"):
        S.TimeStepNorm(3, 2, min_batch=2.5)
    with pytest.raises(TypeError, match="blank_after"):
        S.rows_as_sequence(torch.rand(2, 4, 4), blank_after=1.5)


def test_pooled_statistics():
    torch.manual_seed(0)
    model = S.NormRNN(input_size=5, hidden_size=4, num_classes=3, norm="bn", max_steps=3).eval()
    with torch.no_grad():
        for t, n in enumerate(model.norm.norms):
            n.running_mean.fill_(float(t))          # means 0, 1, 2; variances 1, 2, 3
            n.running_var.fill_(float(t + 1))
    pooled = S.pooled_statistics(model)
    for n in pooled.norm.norms:
        torch.testing.assert_close(n.running_mean, torch.full((4,), 1.0))
        torch.testing.assert_close(n.running_var, torch.full((4,), 2.0 + 2.0 / 3.0))   # mean var + var of means
    assert float(model.norm.norms[0].running_mean[0]) == 0.0      # the original is unchanged
    # steps that already share their statistics: nothing changes
    with torch.no_grad():
        for n in model.norm.norms:
            n.running_mean.fill_(0.5)
            n.running_var.fill_(2.0)
    x = torch.randn(6, 3, 5)
    torch.testing.assert_close(S.pooled_statistics(model)(x), model(x))
    with pytest.raises(ValueError, match="per-step"):
        S.pooled_statistics(S.NormRNN(input_size=5, norm="ln"))
    with pytest.raises(TypeError, match="NormRNN"):
        S.pooled_statistics(torch.nn.Linear(2, 2))
