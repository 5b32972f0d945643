"""Tests of bnlib.lab.modern: the standard-library text, the packed character transformer, normalizer-free residual
blocks, weight standardization and the padding measurements of chapter 10."""
import pytest
import torch

import bnlib.torch as bt
from bnlib.lab import modern as M

SMALL = dict(d_model=8, n_layers=2, n_heads=2, context=6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: threads only add synchronization (on a busy 2-core machine, ten times the run time)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------- data
def test_stdlib_text_is_deterministic_with_a_fixed_vocabulary():
    a = M.load_stdlib_text(3000, val_fraction=0.1)
    b = M.load_stdlib_text(3000, val_fraction=0.1)
    assert a.text == b.text and torch.equal(a.ids, b.ids)
    assert len(a.text) == 3000 and len(a.ids) == 3000
    assert len(a.train) == 2700 and len(a.val) == 300 and torch.equal(torch.cat([a.train, a.val]), a.ids)
    assert a.vocab_size == len(M.VOCAB) == 97 and a.ids.dtype == torch.int64
    assert int(a.ids.min()) >= 0 and int(a.ids.max()) < 97
    assert a.files[0] == M.STDLIB_FILES[0] and "Python 3." in a.source
    # the text is what the file holds
    assert a.text == M.decode(a.ids)


def test_vocabulary_encode_decode():
    printable = "".join(chr(c) for c in range(32, 127)) + "\n"
    assert M.decode(M.encode(printable)) == printable
    assert M.decode(M.encode("a\tb")) == "a b"                       # tabs become spaces
    ids = M.encode("é€")                                             # anything else: the one 'other' id
    assert ids.tolist() == [96, 96]
    with pytest.raises(TypeError, match="text"):
        M.encode(b"bytes")


def test_stdlib_text_skips_missing_files_and_checks_arguments(tmp_path):
    (tmp_path / "one.py").write_text("x = 1\n" * 10)
    (tmp_path / "two.py").write_text("y = 2\n" * 10)
    corpus = M.load_stdlib_text(100, files=("missing.py", "one.py", "two.py"), stdlib=str(tmp_path))
    assert corpus.files == ("one.py", "two.py") and corpus.text.startswith("x = 1\n")
    assert corpus.text[60:62] == "\n\n"                               # files joined by a blank line
    with pytest.raises(ValueError, match="n_chars"):
        M.load_stdlib_text(1000, files=("one.py",), stdlib=str(tmp_path))
    for kwargs, match in (({"n_chars": 0}, "n_chars"), ({"val_fraction": 0.0}, "val_fraction"),
                          ({"files": "one.py"}, "files"), ({"files": ()}, "files")):
        with pytest.raises(ValueError, match=match):
            M.load_stdlib_text(**{"n_chars": 10, "stdlib": str(tmp_path), **kwargs})


def test_baselines():
    ids = torch.tensor([0, 1, 0, 1])
    assert M.unigram_entropy(ids) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    corpus = M.load_stdlib_text(5000)
    loss = M.context_free_loss(corpus, context=8, windows=16)
    assert 2.0 < loss < 4.5


# ---------------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("norm", ["ln", "rms", "bn"])
def test_transformer_shapes_and_norm_from_the_registry(norm, position):
    model = M.CharTransformer(norm=norm, position=position, **SMALL)
    x = torch.randint(0, 97, (3, 6))
    assert model(x).shape == (3, 6, 97)
    assert model(x[:, :4]).shape == (3, 4, 97)
    expected = {"ln": bt.LayerNorm, "rms": bt.RMSNorm, "bn": bt.BatchNorm1d}[norm]
    norms = [m for m in model.modules() if isinstance(m, M.TokenNorm)]
    assert norms and all(type(m.norm) is expected for m in norms)
    assert len(norms) == 2 * SMALL["n_layers"] + (position == "pre")   # pre-LN: one more before the output
    assert (model.final_norm is None) == (position == "post")
    packed = M.CharTransformer(norm=norm, position=position, seeds=(0, 1), **SMALL)
    assert packed(torch.randint(0, 97, (2, 3, 6))).shape == (2, 3, 6, 97)


def test_pre_and_post_differ_and_bad_arguments():
    x = torch.randint(0, 97, (2, 6))
    pre, post = M.CharTransformer(position="pre", **SMALL), M.CharTransformer(position="post", **SMALL)
    post_params = dict(post.named_parameters())
    for name, p in pre.named_parameters():                           # same initial weights (same seed) ...
        if name in post_params:
            assert torch.equal(p, post_params[name]), name
    assert not torch.allclose(pre(x), post(x))                        # ... a different network
    for kwargs, match in (({"norm": "in"}, "norm"), ({"norm": "gn"}, "norm"), ({"norm": "nope"}, "norm"),
                          ({"position": "mid"}, "position"), ({"n_heads": 3}, "n_heads"), ({"seeds": ()}, "seeds"),
                          ({"seeds": (0, -1)}, "seeds"), ({"d_ffn": 0}, "d_ffn")):
        with pytest.raises(ValueError, match=match):
            M.CharTransformer(**{**SMALL, **kwargs})
    model = M.CharTransformer(**SMALL)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 6))                                      # float ids
    packed = M.CharTransformer(seeds=(0, 1), **SMALL)
    with pytest.raises(ValueError, match="idx"):
        packed(x)                                                     # a pack needs (k, B, T)


@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_causal_mask(norm, position):
    torch.manual_seed(0)
    model = M.CharTransformer(norm=norm, position=position, **SMALL)
    x = torch.randint(0, 97, (2, 6))
    out = model(x)
    for t in range(5):
        changed = x.clone()
        changed[:, t + 1:] = torch.randint(0, 97, (2, 5 - t))
        new = model(changed)
        torch.testing.assert_close(new[:, : t + 1], out[:, : t + 1])  # positions up to t: untouched
        assert not torch.allclose(new[:, t + 1:], out[:, t + 1:])


def test_batch_norm_in_training_sees_the_future_but_not_in_eval():
    torch.manual_seed(0)
    model = M.CharTransformer(norm="bn", **SMALL)
    x = torch.randint(0, 97, (4, 6))
    changed = x.clone()
    changed[:, 3:] = (changed[:, 3:] + 1) % 97
    assert not torch.allclose(model(changed)[:, :3], model(x)[:, :3])   # batch statistics include later tokens
    model.eval()
    torch.testing.assert_close(model(changed)[:, :3], model(x)[:, :3])


@pytest.mark.parametrize("norm", ["ln", "rms", "bn"])
def test_packed_members_are_independent_networks(norm):
    packed = M.CharTransformer(norm=norm, seeds=(0, 1, 2), **SMALL)
    x = torch.randint(0, 97, (3, 4, 6))
    out = packed(x)
    for j in range(3):
        single = packed.member(j)
        torch.testing.assert_close(single(x[j]), out[j], rtol=1e-5, atol=1e-5)
        fresh = M.CharTransformer(norm=norm, seeds=(j,), **SMALL)     # member j = the network built from seed j
        for a, b in zip(fresh.parameters(), single.parameters()):
            assert torch.equal(a, b)


def test_token_norm_per_member_affine_matches_the_registry_module():
    torch.manual_seed(0)
    layer = M.TokenNorm("ln", 5, members=2)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(2, 5) + 0.5)
        layer.bias.copy_(torch.randn(2, 5))
    x = torch.randn(2, 3, 4, 5)
    for j in range(2):
        ref = bt.LayerNorm(5)
        with torch.no_grad():
            ref.weight.copy_(layer.weight[j])
            ref.bias.copy_(layer.bias[j])
        torch.testing.assert_close(layer(x)[j], ref(x[j]))
    assert not hasattr(M.TokenNorm("rms", 5, members=2), "bias") or M.TokenNorm("rms", 5).affine == ("weight",)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, 3, 4, 5))
    with pytest.raises(ValueError, match="kind"):
        M.TokenNorm("in", 5)
    assert M.TokenNorm("bln", 5, members=2).batch_dependent


def test_packed_training_equals_separate_runs():
    corpus = M.load_stdlib_text(2000)
    packed = M.CharTransformer(seeds=(0, 1), **SMALL)
    runs = M.train_char_lm(packed, corpus, steps=5, batch_size=4, lr=1e-2, eval_windows=8)
    assert len(runs) == 2 and all(len(r.train_loss) == 5 and not r.diverged for r in runs)
    for j in range(2):
        single = M.CharTransformer(seeds=(j,), **SMALL)
        (run,) = M.train_char_lm(single, corpus, steps=5, batch_size=4, lr=1e-2, eval_windows=8)
        assert run.train_loss == pytest.approx(runs[j].train_loss, rel=1e-4)
        assert run.val_loss == pytest.approx(runs[j].val_loss, rel=1e-4)
        for a, b in zip(single.parameters(), packed.member(j).parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss_and_a_diverged_member_drops_out():
    corpus = M.load_stdlib_text(4000)
    model = M.CharTransformer(seeds=(0, 1), **SMALL)
    runs = M.train_char_lm(model, corpus, steps=40, batch_size=8, lr=1e-2, eval_windows=16)
    assert all(r.val_loss < r.val_loss_init - 0.5 for r in runs)
    model = M.CharTransformer(seeds=(0, 1), **SMALL)
    with torch.no_grad():
        model.tok[1, 0, 0] = float("nan")                             # member 1 is broken from the start
    runs = M.train_char_lm(model, corpus, steps=3, batch_size=4, lr=1e-2, eval_windows=8)
    assert runs[1].diverged and runs[1].train_loss == [] and runs[1].val_loss != runs[1].val_loss
    assert not runs[0].diverged and len(runs[0].train_loss) == 3


def test_block_grad_norms():
    model = M.CharTransformer(seeds=(0, 1), **SMALL)
    x, y = M.lm_batch(torch.arange(50) % 97, torch.tensor([0, 10, 20]), 6)
    g = M.block_grad_norms(model, x, y)
    assert g.shape == (2, 2) and bool((g > 0).all())
    assert all(p.grad is None for p in model.parameters())
    full = M.block_grad_norms(model, x, y, part="all")
    assert bool((full >= g).all())
    with pytest.raises(ValueError, match="part"):
        M.block_grad_norms(model, x, y, part="attn")


def test_lm_batch():
    ids = torch.arange(20)
    x, y = M.lm_batch(ids, torch.tensor([[0, 5], [3, 10]]), 4)
    assert x.shape == y.shape == (2, 2, 4)
    assert x[1, 1].tolist() == [10, 11, 12, 13] and y[1, 1].tolist() == [11, 12, 13, 14]


# ---------------------------------------------------------------------------------------------------------- CNNs
def test_skipinit_block_is_the_identity_at_initialization():
    torch.manual_seed(0)
    block = M.ResidualBlock(4, "skipinit")
    assert isinstance(block.alpha, torch.nn.Parameter) and block.alpha.item() == 0.0
    x = torch.rand(2, 4, 5, 5)                                         # non-negative, as after a ReLU
    torch.testing.assert_close(block(x), x)
    block(x).sum().backward()
    assert block.alpha.grad is not None and block.alpha.grad.item() != 0.0
    net = M.small_resnet("skipinit", width=4, blocks=3)
    trunk, rest = net[:3], net[3:6]                                   # stem, then the three blocks
    h = trunk(torch.randn(2, 1, 8, 8))
    torch.testing.assert_close(rest(h), h)
    assert not any(isinstance(m, (bt.BatchNorm2d, bt.GroupNorm)) for m in net.modules())


@pytest.mark.parametrize("kind", M.RESNET_KINDS)
def test_small_resnet_kinds(kind):
    net = M.small_resnet(kind, width=8, blocks=2)
    assert net(torch.randn(3, 1, 14, 14)).shape == (3, 10)
    layers = list(net.modules())
    assert any(isinstance(m, bt.BatchNorm2d) for m in layers) == (kind == "bn")
    assert any(isinstance(m, bt.GroupNorm) for m in layers) == (kind == "ws_gn")
    assert any(isinstance(m, M.WSConv2d) for m in layers) == (kind == "ws_gn")
    alphas = [m.alpha for m in layers if isinstance(m, M.ResidualBlock)]
    assert all(a.item() == (0.0 if kind == "skipinit" else 1.0) for a in alphas)
    with pytest.raises(ValueError, match="kind"):
        M.small_resnet("fixup")


def test_weight_standardization():
    torch.manual_seed(0)
    conv = M.WSConv2d(3, 5, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(7).add_(2)
    w = conv.standardized_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(dim=(1, 2, 3), unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, w, padding=1))
    before = conv(x)
    with torch.no_grad():                                              # invariant to each filter's scale and shift
        conv.weight.mul_(torch.arange(1, 6).view(5, 1, 1, 1)).add_(3.0)
    torch.testing.assert_close(conv(x), before, atol=1e-4, rtol=1e-4)
    conv(x).sum().backward()
    assert conv.weight.grad is not None


def test_train_resnet_smoke():
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    model, hist = M.train_resnet("ws_gn", x, y, x, y, batch_size=4, steps=3, lr=0.01, width=4, blocks=1)
    assert len(hist.train_loss) == 3 and len(hist.eval_acc) == 2


# ---------------------------------------------------------------------------------------------------------- padding
def test_padded_batch():
    ids, mask = M.padded_batch([torch.tensor([1, 2, 3]), torch.tensor([4])], length=5, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]]
    assert mask.tolist() == [[True, True, True, False, False], [True, False, False, False, False]]
    assert M.padded_batch([torch.tensor([1, 2])])[0].shape == (1, 2)
    with pytest.raises(ValueError, match="length"):
        M.padded_batch([torch.tensor([1, 2, 3])], length=2)
    with pytest.raises(ValueError, match="seqs"):
        M.padded_batch([])


def test_padding_measurements():
    torch.manual_seed(0)
    target = torch.randint(0, 97, (4,))
    companions = [torch.randint(0, 97, (4,)) for _ in range(3)]
    others = [torch.randint(0, 97, (4,)) for _ in range(3)]
    ln = M.CharTransformer(norm="ln", **SMALL)
    assert M.batch_dependence(ln, target, companions, length=6) < 1e-5
    bn = M.CharTransformer(norm="bn", **SMALL)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    ref = M.target_output(bn, target, companions, length=4)
    assert ref.shape == (4, 97)
    padded = M.target_output(bn, target, companions, length=6)
    masked = M.target_output(bn, target, companions, length=6, use_mask=True)
    assert M.relative_change(padded, ref) > 1e-3                       # padding enters BN's statistics ...
    assert M.relative_change(masked, ref) < 1e-5                       # ... unless it is masked out
    assert M.relative_change(M.target_output(bn, target, others, length=4, use_mask=True), ref) > 1e-3
    assert M.batch_dependence(bn, target, companions, length=6, train_mode=False) < 1e-5
    assert bn.training                                                 # mode and running statistics restored
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="target"):
        M.target_output(bn, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="members"):
        M.target_output(M.CharTransformer(seeds=(0, 1), **SMALL), target)
    with pytest.raises(ValueError, match="shape"):
        M.relative_change(torch.zeros(2), torch.zeros(3))
