r"""Normalization in recurrent models (chapter 8): a small RNN with a pluggable per-time-step normalization.

The cell normalizes the summed pre-activation of a tanh RNN (as layer-normalized RNNs do, Ba et al. 2016):

.. math::
    h_t = \tanh\big(\mathrm{N}_t(W_x x_t + W_h h_{t-1})\big), \qquad \text{logits} = W_o h_{T} + b_o ,

where ``N_t`` is one of

=============  =============================================================================================
``none``       a learned bias only
``bn``         batch norm with **separate statistics per time step** (Cooijmans et al. 2016, "recurrent
               batch normalization") and one shared gamma/beta: :class:`TimeStepNorm`
``bn_shared``  one :class:`bnlib.torch.BatchNorm1d` called at every step: it normalizes each step with that
               step's batch statistics in training, but its running average mixes all steps
``bln``        batch-layer norm (Ziaee & Cano 2022) with separate statistics per time step
``ln``         :class:`bnlib.torch.LayerNorm` (per example, so no statistics to keep)
=============  =============================================================================================

Time steps at or beyond ``max_steps`` have no statistics of their own: :class:`TimeStepNorm` uses those of
the last step it has (``beyond='last'``, Cooijmans et al.'s choice) or raises (``beyond='error'``).

Sequences of different lengths: ``forward(x, lengths)`` reads sequence ``i`` for ``lengths[i]`` steps only
(the rest of ``x`` is padding) and classifies from its last valid hidden state; at step ``t`` the
normalization sees only the sequences still running (no padding enters the batch statistics).

What per-step statistics buy at inference: :func:`pooled_statistics` returns a copy of a trained network whose
every step uses one set of statistics, those of all steps pooled (what a single shared batch norm would
estimate), so that its accuracy can be compared with the per-step network's.

How this differs from Cooijmans et al.'s recurrent batch normalization (an LSTM): they normalize the
input-to-hidden term ``W_x x_t`` and the hidden-to-hidden term ``W_h h_{t-1}`` with two separate batch norms
(and the cell state with a third), each with per-time-step statistics, scale ``gamma`` initialized to 0.1 and
``beta = 0`` on the two terms (the cell's own bias ``b`` is the shift). Here one batch norm acts on the summed
pre-activation, with per-time-step statistics and one affine initialized to ``gamma = 1, beta = 0``. What both
share, and what the chapter measures: statistics per time step, and the statistics of the last training step
for every step beyond it.

Data helpers: :func:`rows_as_sequence` (MNIST images read row by row, optionally with blank rows added before
or after the digit) and :func:`train_sequence_model`. :func:`train_sequence_models` trains several networks of
one configuration (different initial seeds) on the same batches as one batched model, which costs much less
than training them one after the other (the cell's small matrix products are dominated by per-step overhead).
Both train with :func:`bnlib.lab.train.run`, the book's one loop (its seeded batches, progress bar and stop at a
non-finite loss); their steps add what :func:`bnlib.lab.train.train` does not do: sequence lengths and
gradient-norm clipping.

Arguments are checked with :mod:`bnlib._checks` (its one message shape, ``"<name>: expected <what>, got
<value>"``: ``TypeError`` for a wrong type, ``ValueError`` for a wrong value).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks

__all__ = ["SEQ_NORMS", "TimeStepNorm", "NormRNN", "rows_as_sequence", "pad_rows", "train_sequence_model",
           "train_sequence_models", "sequence_accuracy", "pooled_statistics"]

SEQ_NORMS = ("none", "bn", "bn_shared", "bln", "ln")


def _bt():
    from .. import torch as bt

    return bt


class TimeStepNorm(nn.Module):
    """A batch-statistics normalization with separate running statistics for each time step and one shared
    affine ``(weight, bias)``.

    ``kind='bn'`` uses :class:`bnlib.torch.BatchNorm1d`, ``kind='bln'`` :class:`bnlib.torch.BatchLayerNorm`
    (both without their own affine) for each of the ``max_steps`` steps. ``forward(x, t)`` normalizes the
    ``(N, C)`` input ``x`` of step ``t``. For ``t >= max_steps``: in evaluation, ``beyond='last'`` uses the
    statistics of step ``max_steps - 1`` and ``beyond='error'`` raises; in training it always raises (the
    statistics of step ``max_steps - 1`` would be overwritten by those of later steps).
    """

    def __init__(self, num_features: int, max_steps: int, *, kind: str = "bn", beyond: str = "last",
                 min_batch: int = 2, **norm_kwargs) -> None:
        super().__init__()
        _checks.check_positive_int("num_features", num_features)
        _checks.check_positive_int("max_steps", max_steps)
        if kind not in ("bn", "bln"):
            raise ValueError(f"kind: expected 'bn' or 'bln', got {kind!r}")
        if beyond not in ("last", "error"):
            raise ValueError(f"beyond: expected 'last' or 'error', got {beyond!r}")
        _checks.check_int("min_batch", min_batch, 2)
        if "affine" in norm_kwargs:
            raise ValueError("affine: TimeStepNorm has one shared affine; do not pass affine")
        bt = _bt()
        cls = bt.BatchNorm1d if kind == "bn" else bt.BatchLayerNorm
        self.kind, self.max_steps, self.beyond, self.num_features = kind, max_steps, beyond, num_features
        self.min_batch = min_batch
        self.fallbacks = 0
        self.norms = nn.ModuleList(cls(num_features, affine=False, **norm_kwargs) for _ in range(max_steps))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        _checks.check_int("t", t, 0)
        if t >= self.max_steps:
            if self.training:
                raise ValueError(f"t: step {t} is beyond the {self.max_steps} steps this layer keeps statistics "
                                 "for; training on longer sequences needs a larger max_steps")
            if self.beyond == "error":
                raise ValueError(f"t: step {t} is beyond the {self.max_steps} steps this layer has statistics "
                                 "for (beyond='error')")
            t = self.max_steps - 1
        return self._normalize(x, t) * self.weight + self.bias

    def _normalize(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Step ``t``'s normalization without the shared affine (``t`` already checked)."""
        norm = self.norms[min(t, self.max_steps - 1)]
        if self.training and x.shape[0] < self.min_batch:
            self.fallbacks += 1
            norm.eval()
            try:
                return norm(x)
            finally:
                norm.train()
        return norm(x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, max_steps={self.max_steps}, kind={self.kind!r}, beyond={self.beyond!r}"


class NormRNN(nn.Module):
    """A tanh RNN classifier ``h_t = tanh(N_t(W_x x_t + W_h h_{t-1}))`` with the normalization ``norm`` (one
    of :data:`SEQ_NORMS`), reading ``(N, T, input_size)`` sequences.

    ``max_steps`` is how many per-step statistics 'bn'/'bln' keep (the training length). ``batch_size``
    fixes BLN's ``m`` (its mixing weights) at the training batch size, also at inference, as the authors'
    code does. ``W_h`` starts orthogonal, ``W_x`` with PyTorch's Linear default.
    """

    def __init__(self, input_size: int = 28, hidden_size: int = 64, num_classes: int = 10, *,
                 norm: str = "none", max_steps: int = 28, batch_size: Optional[int] = None,
                 beyond: str = "last", **norm_kwargs) -> None:
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_classes", num_classes),
                        ("max_steps", max_steps)):
            _checks.check_positive_int(name, v)
        if norm not in SEQ_NORMS:
            raise ValueError(f"norm: expected one of {SEQ_NORMS}, got {norm!r}")
        bt = _bt()
        self.norm_kind, self.input_size, self.hidden_size = norm, input_size, hidden_size
        self.w_x = nn.Linear(input_size, hidden_size)  # its bias keeps blank (all-zero) rows from giving a
        # constant pre-activation, whose layer-norm gradient would be 1/sqrt(eps) per step
        self.w_h = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.orthogonal_(self.w_h.weight)
        self.bias = None
        if norm == "none":
            self.norm = None
            self.bias = nn.Parameter(torch.zeros(hidden_size))
        elif norm == "bn":
            self.norm = TimeStepNorm(hidden_size, max_steps, kind="bn", beyond=beyond, **norm_kwargs)
        elif norm == "bln":
            if batch_size is not None:
                norm_kwargs = {**norm_kwargs, "batch_size": batch_size}
            self.norm = TimeStepNorm(hidden_size, max_steps, kind="bln", beyond=beyond, **norm_kwargs)
        elif norm == "bn_shared":
            self.norm = bt.BatchNorm1d(hidden_size, **norm_kwargs)
        else:  # ln
            self.norm = bt.LayerNorm(hidden_size, **norm_kwargs)
        self.head = nn.Linear(hidden_size, num_classes)

    def _normalize(self, pre: torch.Tensor, t: int) -> torch.Tensor:
        if self.norm is None:
            return pre + self.bias
        if isinstance(self.norm, TimeStepNorm):
            return self.norm(pre, t)
        return self.norm(pre)

    def hidden_states(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final hidden state of each sequence, ``(N, hidden_size)``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.input_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected (N, T, {self.input_size}) sequences, got {shape}")
        n, steps, _ = x.shape
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=x.device)
            if lengths.dtype.is_floating_point or lengths.shape != (n,):
                raise ValueError(f"lengths: expected {n} integer lengths, got shape {tuple(lengths.shape)}")
            if len(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
                raise ValueError(f"lengths: expected values in [1, {steps}], got min {int(lengths.min())} "
                                 f"and max {int(lengths.max())}")
            if bool((lengths == steps).all()):
                lengths = None
        h = x.new_zeros(n, self.hidden_size)
        inputs = self.w_x(x)  # (N, T, H) for all steps at once
        for t in range(steps):
            if lengths is None:
                h = torch.tanh(self._normalize(inputs[:, t] + self.w_h(h), t))
                continue
            active = torch.nonzero(lengths > t).flatten()
            if len(active) == 0:
                break
            pre = inputs[active, t] + self.w_h(h[active])
            h = h.index_copy(0, active, torch.tanh(self._normalize(pre, t)))
        return h

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.hidden_states(x, lengths))


def rows_as_sequence(images: torch.Tensor, *, blank_before: int = 0, blank_after: int = 0) -> torch.Tensor:
    """``(N, H, W)`` (or ``(N, 1, H, W)``) images as ``(N, T, W)`` sequences of rows, with ``blank_before``
    zero rows added above the digit and ``blank_after`` below (a longer sequence, same digit)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3:
        raise ValueError(f"images: expected (N, H, W) or (N, 1, H, W), got shape {tuple(images.shape)}")
    _checks.check_int("blank_before", blank_before, 0)
    _checks.check_int("blank_after", blank_after, 0)
    return F.pad(images, (0, 0, blank_before, blank_after))


def pad_rows(images: torch.Tensor, blank_before: torch.Tensor):
    """A variable-length batch: image ``i`` with ``blank_before[i]`` blank rows above it, right-padded to
    the longest; returns ``(sequences (N, T, W), lengths (N,))``."""
    blank_before = torch.as_tensor(blank_before, dtype=torch.long)
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or blank_before.shape != (len(images),):
        raise ValueError(f"images, blank_before: expected (N, H, W) images and N counts, got "
                         f"{tuple(images.shape)} and {tuple(blank_before.shape)}")
    if len(blank_before) and int(blank_before.min()) < 0:
        raise ValueError("blank_before: expected non-negative counts")
    n, rows, width = images.shape
    lengths = blank_before + rows
    total = int(lengths.max()) if n else rows
    out = images.new_zeros(n, total, width)
    for i in range(n):
        b = int(blank_before[i])
        out[i, b: b + rows] = images[i]
    return out, lengths.to(images.device)


def _check_labels(x, y) -> None:
    if len(x) != len(y):
        raise ValueError(f"y: expected {len(x)} labels to match x, got {len(y)}")


def _check_run(x, y, steps, batch_size) -> None:
    """The arguments every sequence-model training run shares: one label per sequence, and
    :func:`bnlib._checks.check_training_run`'s step and batch counts."""
    _check_labels(x, y)
    _checks.check_training_run(len(x), len(y), steps, batch_size)


def train_sequence_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int,
                         lengths: Optional[torch.Tensor] = None, lr: float = 1e-2, seed: int = 0, clip: float = 1.0,
                         progress: bool = False, desc: str = "train", callback: Optional[Callable] = None):
    """Adam on cross-entropy for ``steps`` mini-batches of ``(N, T, F)`` sequences (of ``lengths``, when
    given: a variable-length data set, padded), with gradient-norm clipping at ``clip``; the batches are
    :func:`bnlib.lab.train.run`'s (a permutation seeded by ``seed``, reshuffled each epoch). ``callback(step,
    model)`` runs after each step and may raise :class:`bnlib.lab.train.StopTraining`. Returns the list of
    training losses; training stops after a non-finite loss."""
    from .train import run

    _check_run(x, y, steps, batch_size)
    if lengths is not None and len(lengths) != len(x):
        raise ValueError(f"lengths: expected {len(x)} lengths to match x, got {len(lengths)}")
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(t, idx):
        idx = idx.to(x.device)
        loss = F.cross_entropy(model(x[idx], None if lengths is None else lengths[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        value = loss.item()
        if callback is not None:
            callback(t, model)
        return value

    model.train()
    return run(len(x), step, steps=steps, batch_size=batch_size, seed=seed, progress=progress,
               desc=desc).train_loss


class _SeedEnsemble(nn.Module):
    """``S`` :class:`NormRNN` of one configuration as one batched model, for training only.

    The linear maps are stacked along a leading member axis (``bmm``); the normalization is batched where that
    is exact: per-step batch norm over ``S * H`` features (each feature's statistics are over the batch only, so
    member ``s`` gets exactly its own), layer norm over the last axis of ``(S, N, H)``, batch-layer norm as the
    mix of the two that it is, all with stacked affines, and a stacked bias for ``none``. Anything else
    (``bn_shared``, unusual normalization settings) calls each member's own module on its slice.
    :meth:`write_back` copies the trained parameters and running statistics into the members.
    """

    def __init__(self, models) -> None:
        super().__init__()
        m0 = models[0]
        self.S, self.H, self.kind = len(models), m0.hidden_size, m0.norm_kind

        def stack(get):
            return nn.Parameter(torch.stack([get(m).detach().clone() for m in models]))

        self.wx = stack(lambda m: m.w_x.weight.t())      # (S, F, H)
        self.bx = stack(lambda m: m.w_x.bias)            # (S, H)
        self.wh = stack(lambda m: m.w_h.weight.t())      # (S, H, H)
        self.wo = stack(lambda m: m.head.weight.t())     # (S, H, C)
        self.bo = stack(lambda m: m.head.bias)           # (S, C)
        self.mode = "loop"
        bt = _bt()
        if self.kind == "none":
            self.mode = "bias"
            self.b = stack(lambda m: m.bias)
        elif self.kind == "ln" and all(m.norm.weight is not None and m.norm.bias is not None for m in models):
            self.mode = "ln"
            self.ln = bt.LayerNorm(self.H, eps=m0.norm.eps, elementwise_affine=False)
            self.g = stack(lambda m: m.norm.weight)
            self.b = stack(lambda m: m.norm.bias)
        elif self.kind in ("bn", "bln") and all(
                type(n) is (bt.BatchNorm1d if self.kind == "bn" else bt.BatchLayerNorm) and n.track_running_stats
                and n.momentum is not None and n.weight is None for m in models for n in m.norm.norms):
            # Per-step statistics over S * H features: each feature's batch statistics are its own member's.
            # Batch-layer norm = (alpha_L x_L + alpha_B x_B) / sqrt(H) with x_B this batch norm (the same eps)
            # and x_L the layer norm of each member's H units (bnlib.torch._batch_layer_norm).
            self.mode = self.kind
            t0 = m0.norm
            ref = m0.w_x.weight
            self.norm = TimeStepNorm(self.S * self.H, t0.max_steps, kind="bn", beyond=t0.beyond,
                                     min_batch=t0.min_batch).to(device=ref.device, dtype=ref.dtype)
            self.g = stack(lambda m: m.norm.weight)
            self.b = stack(lambda m: m.norm.bias)
            if self.kind == "bln":
                n0 = t0.norms[0]
                if len({(n.eps, n.batch_size) for m in models for n in m.norm.norms}) != 1 or n0.batch_size is None:
                    self.mode = "loop"
                else:
                    from ..torch._batch_layer_norm import bln_weights

                    self.bln_alpha = bln_weights(n0.batch_size)
                    self.ln = bt.LayerNorm(self.H, eps=n0.eps, elementwise_affine=False)
            self.norm.weight.requires_grad_(False)      # the stacked g, b are the affine
            self.norm.bias.requires_grad_(False)
            with torch.no_grad():
                for t, comb in enumerate(self.norm.norms):
                    src = [m.norm.norms[t] for m in models]
                    comb.eps, comb.momentum = src[0].eps, src[0].momentum
                    comb.running_mean.copy_(torch.cat([n.running_mean for n in src]))
                    comb.running_var.copy_(torch.cat([n.running_var for n in src]))
                    comb.num_batches_tracked.copy_(src[0].num_batches_tracked)
        if self.mode == "loop":
            self.member_norms = nn.ModuleList(m.norm for m in models)   # shared with the members, trained in place

    def _normalize(self, pre: torch.Tensor, t: int) -> torch.Tensor:
        if self.mode == "bias":
            return pre + self.b[:, None, :]
        if self.mode == "ln":
            return self.ln(pre) * self.g[:, None, :] + self.b[:, None, :]
        if self.mode in ("bn", "bln"):
            k = pre.shape[1]
            out = self.norm._normalize(pre.transpose(0, 1).reshape(k, self.S * self.H), t)
            out = out.reshape(k, self.S, self.H).transpose(0, 1)
            if self.mode == "bln":
                a_l, a_b = self.bln_alpha
                out = (a_l * self.ln(pre) + a_b * out) / math.sqrt(self.H)
            return out * self.g[:, None, :] + self.b[:, None, :]
        return torch.stack([norm(pre[s], t) if isinstance(norm, TimeStepNorm) else norm(pre[s])
                            for s, norm in enumerate(self.member_norms)])

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(S, N, C)`` of the members for the same batch (same conventions as :meth:`NormRNN.forward`)."""
        n, steps, _ = x.shape
        if lengths is not None and bool((lengths == steps).all()):
            lengths = None
        inputs = torch.einsum("ntf,sfh->snth", x, self.wx) + self.bx[:, None, None, :]
        h = x.new_zeros(self.S, n, self.H)
        for t in range(steps):
            if lengths is None:
                h = torch.tanh(self._normalize(inputs[:, :, t] + torch.bmm(h, self.wh), t))
                continue
            active = torch.nonzero(lengths > t).flatten()
            if len(active) == 0:
                break
            pre = inputs[:, active, t] + torch.bmm(h[:, active], self.wh)
            h = h.index_copy(1, active, torch.tanh(self._normalize(pre, t)))
        return torch.baddbmm(self.bo[:, None, :], h, self.wo)

    def member_grads(self, s: int):
        """The gradient tensors (views) that belong to member ``s``."""
        stacked = [self.wx, self.bx, self.wh, self.wo, self.bo] + [getattr(self, n) for n in ("b", "g")
                                                                   if hasattr(self, n)]
        grads = [p.grad[s] for p in stacked if p.grad is not None]
        if self.mode == "loop":
            grads += [p.grad for p in self.member_norms[s].parameters() if p.grad is not None]
        return grads

    @torch.no_grad()
    def clip_per_member(self, max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` applied to each member's gradients on its own."""
        for s in range(self.S):
            grads = self.member_grads(s)
            if not grads:
                continue
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)

    @torch.no_grad()
    def write_back(self, models, fallbacks_before: int = 0) -> None:
        for s, m in enumerate(models):
            m.w_x.weight.copy_(self.wx[s].t())
            m.w_x.bias.copy_(self.bx[s])
            m.w_h.weight.copy_(self.wh[s].t())
            m.head.weight.copy_(self.wo[s].t())
            m.head.bias.copy_(self.bo[s])
            if self.mode == "bias":
                m.bias.copy_(self.b[s])
            elif self.mode in ("ln", "bn", "bln"):
                m.norm.weight.copy_(self.g[s])
                m.norm.bias.copy_(self.b[s])
            if self.mode in ("bn", "bln"):
                sl = slice(s * self.H, (s + 1) * self.H)
                for comb, own in zip(self.norm.norms, m.norm.norms):
                    own.running_mean.copy_(comb.running_mean[sl])
                    own.running_var.copy_(comb.running_var[sl])
                    own.num_batches_tracked.copy_(comb.num_batches_tracked)
                m.norm.fallbacks += self.norm.fallbacks - fallbacks_before


def _ensemble_signature(m) -> tuple:
    return (type(m), m.norm_kind, m.input_size, m.hidden_size, m.head.out_features, repr(m.norm),
            next(m.parameters()).device, next(m.parameters()).dtype)


def train_sequence_models(models, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int,
                          lengths: Optional[torch.Tensor] = None, lr: float = 1e-2, seed: int = 0, clip: float = 1.0,
                          progress: bool = False, desc: str = "train"):
    """Train several :class:`NormRNN` of one configuration (typically different initial seeds) exactly as
    :func:`train_sequence_model` trains each of them -- same batches (from ``seed``), Adam, gradient-norm
    clipping per network -- but batched into one model, which is much cheaper than one after the other.

    The networks are trained in place (parameters and running statistics) and left in training mode. Returns
    one list of training losses per network. Training stops for all of them when one loss is not finite.
    """
    from .train import run

    models = list(models)
    if not models or not all(isinstance(m, NormRNN) for m in models):
        raise TypeError("models: expected a non-empty sequence of NormRNN")
    if len({_ensemble_signature(m) for m in models}) != 1:
        raise ValueError("models: expected networks of one configuration (norm, sizes, normalization settings, "
                         "device and dtype)")
    if len({id(m) for m in models}) != len(models):
        raise ValueError("models: the same network appears more than once")
    _check_run(x, y, steps, batch_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != models[0].input_size:
        raise ValueError(f"x: expected (N, T, {models[0].input_size}) sequences, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=x.device)
        if lengths.dtype.is_floating_point or lengths.shape != (len(x),):
            raise ValueError(f"lengths: expected {len(x)} integer lengths to match x, got shape {tuple(lengths.shape)}")
        if int(lengths.min()) < 1 or int(lengths.max()) > x.shape[1]:
            raise ValueError(f"lengths: expected values in [1, {x.shape[1]}], got min {int(lengths.min())} and "
                             f"max {int(lengths.max())}")
    for m in models:
        m.train()
    ens = _SeedEnsemble(models)
    fallbacks_before = ens.norm.fallbacks if ens.mode in ("bn", "bln") else 0
    opt = torch.optim.Adam([p for p in ens.parameters() if p.requires_grad], lr=lr)
    losses = [[] for _ in models]

    def step(t, idx):
        idx = idx.to(x.device)
        logits = ens(x[idx], None if lengths is None else lengths[idx])
        per_model = torch.stack([F.cross_entropy(out, y[idx]) for out in logits])
        opt.zero_grad(set_to_none=True)
        per_model.sum().backward()
        if clip:
            ens.clip_per_member(clip)
        opt.step()
        values = per_model.tolist()
        for record, value in zip(losses, values):
            record.append(value)
        return sum(values)  # not finite as soon as one network's loss is not: run stops for all

    try:
        run(len(x), step, steps=steps, batch_size=batch_size, seed=seed, progress=progress, desc=desc)
    finally:
        ens.write_back(models, fallbacks_before)
    return losses


@torch.no_grad()
def sequence_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lengths=None, *,
                      batch_size: int = 500) -> float:
    """Eval-mode accuracy of ``model`` on ``(N, T, F)`` sequences (optionally with ``lengths``); the model's
    mode is restored afterwards."""
    _check_labels(x, y)
    was = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            ln = None if lengths is None else lengths[i: i + batch_size]
            correct += (model(x[i: i + batch_size], ln).argmax(1) == y[i: i + batch_size]).sum().item()
    finally:
        model.train(was)
    return correct / len(x)


@torch.no_grad()
def pooled_statistics(model: NormRNN) -> NormRNN:
    """A copy of a per-step batch-statistics ``model`` (``norm='bn'`` or ``'bln'``) in which every time step
    uses the same running statistics: the mean and variance of all steps pooled (each step weighted equally:
    the mean of the means, and the mean of ``var + mean**2`` minus the square of that), the statistics one
    shared batch norm over all steps would estimate. ``model`` is not changed; the copy keeps its mode."""
    if not isinstance(model, NormRNN):
        raise TypeError(f"model: expected a NormRNN, got {type(model).__name__}")
    if not isinstance(model.norm, TimeStepNorm):
        raise ValueError(f"model: expected a network with per-step statistics (norm 'bn' or 'bln'), got norm "
                         f"{model.norm_kind!r}")
    out = copy.deepcopy(model)
    norms = out.norm.norms
    means = torch.stack([n.running_mean.double() for n in norms])
    second = torch.stack([(n.running_var + n.running_mean ** 2).double() for n in norms])
    mean = means.mean(0)
    var = (second.mean(0) - mean ** 2).clamp_min(0.0)
    for n in norms:
        n.running_mean.copy_(mean)
        n.running_var.copy_(var)
    return out
