"""Checkers for chapter 11 (diagnostics and fine-tuning): freezing batch norm for fine-tuning the way Keras'
``layer.trainable = False`` does (eval-mode normalization with the pretrained running statistics, and
``gamma``/``beta`` excluded from training), with the rest of the model left trainable."""
from __future__ import annotations

import copy

from ._core import Case, Problem, call, run_cases

__all__ = ["check_freeze_bn"]


def _bn_modules(model):
    import torch.nn as nn

    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _affine(bn):
    return [p for p in (bn.weight, bn.bias) if p is not None]


def check_freeze_bn(fn, *, seed: int = 0, quiet: bool = False):
    """Check ``fn(model) -> None``: prepare a pretrained ``torch.nn`` model for fine-tuning with every batch
    norm layer frozen as Keras' ``trainable = False`` freezes it: each batch norm layer (``BatchNorm1d``,
    ``2d``, ...) in eval mode (it normalizes with its running statistics and stops updating them), its
    ``gamma`` and ``beta`` with ``requires_grad = False``; the rest of the model in train mode with every other
    parameter trainable, and no weight or running statistic changed. ``fn`` works in place (returning the
    model itself is accepted)."""
    import torch
    from torch import nn

    from ... import generator

    def mlp():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))

    def cnn(affine=True):
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=affine), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * 5 * 5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                             nn.Dropout(0.1), nn.Linear(8, 3))

    def build(k, factory, train):
        gen = generator(seed * 100 + 31 + k)
        model = factory()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            for bn in _bn_modules(model):                    # statistics from pretraining
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                bn.num_batches_tracked.fill_(300)
        return model.train(train)

    specs = [("an MLP with BatchNorm1d and Dropout, given in train mode", 0, mlp, True),
             ("a CNN with BatchNorm2d and BatchNorm1d layers, given in train mode", 1, cnn, True),
             ("the same CNN given in eval mode (as it comes out of an evaluation)", 2, cnn, False),
             ("a CNN whose BatchNorm2d has no gamma and beta (affine=False)", 3, lambda: cnn(affine=False), True)]

    def make(k, factory, train):
        def run(f):
            model = build(k, factory, train)
            original = copy.deepcopy(model)
            out = call(f, model, hints=(("'NoneType' object has no attribute 'requires_grad",
                                         "a layer built with affine=False has weight = bias = None: skip them "
                                         "(freeze only the parameters that exist)"),))
            if out is not None and out is not model:
                raise Problem("your function returned another model: freeze the model you were given in place (the "
                              "caller keeps using it and its optimizer)")
            bns, bns0 = _bn_modules(model), _bn_modules(original)
            for (name, p), (_, p0) in zip(model.named_parameters(), original.named_parameters()):
                if not torch.equal(p.detach(), p0.detach()):
                    raise Problem(f"a weight changed ({name}): freezing only sets flags, it changes no value")
            for i, (m, m0) in enumerate(zip(bns, bns0)):
                if not (torch.equal(m.running_mean, m0.running_mean) and torch.equal(m.running_var, m0.running_var)):
                    raise Problem(f"batch-norm layer {i}: its running statistics changed (did you reset them, or "
                                  "run data through the model?): they are what pretraining estimated, and a "
                                  "frozen layer normalizes with exactly those")
            bn_params = {id(p) for m in bns for p in _affine(m)}
            others = [(n, p) for n, p in model.named_parameters() if id(p) not in bn_params]
            frozen_others = [n for n, p in others if not p.requires_grad]
            if frozen_others and len(frozen_others) == len(others):
                raise Problem("every parameter of the model is frozen: only the batch norm layers' gamma and beta "
                              "get requires_grad = False; the other layers must still learn the new task")
            if frozen_others:
                raise Problem(f"parameter {frozen_others[0]} (not batch norm) has requires_grad = False: leave "
                              "the other layers trainable")
            training_bn = [i for i, m in enumerate(bns) if m.training]
            trainable_affine = [i for i, m in enumerate(bns) if any(p.requires_grad for p in _affine(m))]
            if training_bn and len(training_bn) == len(bns) and not trainable_affine:
                raise Problem("gamma and beta are frozen but the batch norm layers are still in TRAINING mode: "
                              "requires_grad = False only stops the optimizer; each layer still normalizes with "
                              "the batch's statistics and overwrites its running averages (PyTorch's "
                              "'frozen_affine', not Keras' trainable = False): also call bn.eval() on each layer")
            if training_bn:
                i = training_bn[0]
                raise Problem(f"batch-norm layer {i} ({type(bns[i]).__name__}) is still in training mode: "
                              "find the layers with isinstance(m, nn.modules.batchnorm._BatchNorm), which "
                              "catches BatchNorm1d, 2d and 3d alike, and call .eval() on each")
            if trainable_affine:
                i = trainable_affine[0]
                which = "the batch norm layers" if len(trainable_affine) == len([m for m in bns if _affine(m)]) \
                    else f"batch-norm layer {i} ({type(bns[i]).__name__})"
                raise Problem(f"{which} normalize with the running statistics, but gamma and beta still have "
                              "requires_grad = True (PyTorch's 'frozen_stats'): Keras' trainable = False also "
                              "freezes them; set requires_grad_(False) on weight and bias")
            eval_rest = [n for n, m in model.named_modules()
                         if m is not model and not isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training]
            if eval_rest:
                # name the module the flag matters for (Dropout), not the first Linear
                eval_rest.sort(key=lambda n: "Dropout" not in type(model.get_submodule(n)).__name__)
                hint = ("the model came in eval mode: call model.train() first, then put the batch norm layers in "
                        "eval mode" if not train else "you called model.eval(), which switches off Dropout too: put "
                        "only the batch norm layers in eval mode")
                raise Problem(f"module {eval_rest[0]} ({type(model.get_submodule(eval_rest[0])).__name__}) is in "
                              f"eval mode, so it would not train as it should: {hint}")
            if not model.training:
                raise Problem("the model itself is in eval mode: call model.train(), then put the batch norm "
                              "layers in eval mode")
            # what freezing is for: a training forward pass leaves the statistics alone
            x = torch.randn((4, 6) if factory is mlp else (4, 1, 5, 5), generator=generator(seed * 100 + 39))
            with torch.no_grad():
                model(x)
            for i, (m, m0) in enumerate(zip(bns, bns0)):
                if not torch.equal(m.running_mean, m0.running_mean):
                    raise Problem(f"batch-norm layer {i}: a forward pass still updates its running statistics: put "
                                  "the layer in eval mode")
        return run

    return run_cases(fn, [Case(label, make(k, f, t)) for label, k, f, t in specs], quiet=quiet)
