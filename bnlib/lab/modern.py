r"""Normalization in modern networks (chapter 10): a tiny character-level transformer with pre- or post-LN and
a choice of norm, normalizer-free residual CNNs, and BN's dependence on padding and companions in a batch.

Data. :func:`load_stdlib_text` concatenates fixed source files of Python's standard library (they ship with
every Python) and cuts a fixed number of characters; a fixed vocabulary (printable ASCII, newline, one
"other" symbol) maps them to ids, so the same files give the same ids everywhere. The text itself changes
between Python versions (the files are edited between releases): :attr:`CharCorpus.source` records the
version it came from.

Transformer. :class:`CharTransformer` is a decoder-only (causal) transformer with learned position embeddings,
``n_layers`` blocks of multi-head self-attention and a ReLU feed-forward network, in one of two arrangements
(Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"):

.. math::
    \text{post-LN:}\quad x_{l+1/2} = \mathrm N(x_l + \mathrm{Attn}(x_l)), \quad
    x_{l+1} = \mathrm N(x_{l+1/2} + \mathrm{FFN}(x_{l+1/2}))

    \text{pre-LN:}\quad x_{l+1/2} = x_l + \mathrm{Attn}(\mathrm N(x_l)), \quad
    x_{l+1} = x_{l+1/2} + \mathrm{FFN}(\mathrm N(x_{l+1/2})), \quad \text{logits from } \mathrm N(x_L)

``N`` is a method of the registry (:mod:`bnlib.methods`, :data:`TOKEN_NORMS`): ``'ln'`` or ``'rms'`` per token,
or a batch-dependent one (``'bn'``...), which :class:`TokenNorm` applies to every token of the batch as one
sample (optionally only to the tokens a padding mask marks as real). ``k`` networks (seeds) can be packed into
one :class:`CharTransformer` and trained together (:func:`train_char_lm`), as :mod:`bnlib.lab.packed` does for
the book's MLPs and CNNs.

Normalizer-free CNNs. :func:`small_resnet` builds a small residual CNN whose blocks are
``x + alpha * branch(x)`` with ``kind`` 'bn' (batch norm in the branch, alpha fixed at 1), 'ws_gn' (weight-
standardized convolutions, :class:`WSConv2d`, and group norm; Qiao et al. 2019), 'skipinit' (no normalization,
a learnable scalar alpha initialized at 0, so every block is the identity at initialization: De & Smith 2020;
Fixup, Zhang et al. 2019, adds rescaled initializations and scalar biases) and 'none' (no normalization,
alpha fixed at 1).

Padding. :func:`padded_batch` pads sequences of different lengths into one batch with a mask;
:func:`target_output` is a model's output for one sequence inside such a batch, and :func:`batch_dependence`
measures how much it changes with the sequences that share the batch (and their padding).
"""
from __future__ import annotations

import math
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks, methods

__all__ = ["STDLIB_FILES", "VOCAB", "CharCorpus", "load_stdlib_text", "encode", "decode", "TOKEN_NORMS", "TokenNorm",
           "CharTransformer", "LMRun", "lm_batch", "lm_loss", "train_char_lm", "unigram_entropy", "block_grad_norms",
           "WSConv2d", "ResidualBlock", "small_resnet", "RESNET_KINDS", "train_resnet", "padded_batch", "target_output",
           "relative_change", "batch_dependence", "context_free_loss"]

# --------------------------------------------------------------------------------------------------------
# Data: text that ships with Python
# --------------------------------------------------------------------------------------------------------

#: Standard-library modules read in this order (files missing from an installation are skipped).
STDLIB_FILES = ("textwrap.py", "heapq.py", "shlex.py", "string.py", "calendar.py", "fnmatch.py", "bisect.py",
                "colorsys.py", "glob.py", "difflib.py")
#: The fixed vocabulary: newline, the 95 printable ASCII characters, and one id for anything else.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127)) + "\N{REPLACEMENT CHARACTER}"
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_OTHER = len(VOCAB) - 1


@dataclass
class CharCorpus:
    """A text as character ids: ``ids`` (int64), split into ``train`` and ``val`` (the last ``val_fraction``)."""

    text: str
    ids: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    files: tuple = field(default_factory=tuple)
    source: str = ""

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)


def encode(text: str) -> torch.Tensor:
    """Character ids of ``text`` in :data:`VOCAB` (tabs become a space, other characters the 'other' id)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    return torch.tensor([_INDEX.get(ch, _OTHER) for ch in text.replace("\t", " ")], dtype=torch.int64)


def decode(ids) -> str:
    """The text of character ids (the inverse of :func:`encode` on printable ASCII and newlines)."""
    return "".join(VOCAB[int(i)] for i in ids)


def load_stdlib_text(n_chars: int = 100_000, *, files: Sequence[str] = STDLIB_FILES, val_fraction: float = 0.1,
                     stdlib: Optional[str] = None) -> CharCorpus:
    """The first ``n_chars`` characters of the standard-library ``files`` (in order, joined by a blank line),
    as a :class:`CharCorpus` with the last ``val_fraction`` held out.

    Deterministic for a given Python version (``stdlib``: the folder, default ``sysconfig``'s); a file the
    installation lacks is skipped; too little text in all files together is a ``ValueError``.
    """
    _checks.check_positive_int("n_chars", n_chars)
    _checks.check_real("val_fraction", val_fraction, 0.0, 0.5, open_low=True)
    if isinstance(files, str) or not files:
        raise ValueError(f"files: expected a non-empty sequence of file names, got {files!r}")
    folder = stdlib or sysconfig.get_paths()["stdlib"]
    parts, used = [], []
    total = 0
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        parts.append(text)
        used.append(name)
        total += len(text) + 2
        if total >= n_chars:
            break
    text = "\n\n".join(parts)[:n_chars]
    if len(text) < n_chars:
        raise ValueError(f"n_chars: the files {list(files)} in {folder} hold {len(text)} characters, fewer than "
                         f"the {n_chars} asked for")
    ids = encode(text)
    n_val = int(round(val_fraction * len(ids)))
    version = ".".join(map(str, sys.version_info[:3]))
    return CharCorpus(text=text, ids=ids, train=ids[: len(ids) - n_val], val=ids[len(ids) - n_val:],
                      files=tuple(used), source=f"Python {version} standard library: {', '.join(used)}")


def context_free_loss(corpus: CharCorpus, context: int, windows: int = 64) -> float:
    """The validation loss (nats per character, on the windows :func:`train_char_lm` evaluates) of the best
    model that ignores the context: the training text's character frequencies (add-one smoothed)."""
    counts = torch.bincount(corpus.train, minlength=len(VOCAB)).double() + 1.0
    logp = (counts / counts.sum()).log()
    _, y = lm_batch(corpus.val, _eval_starts(corpus.val, context, windows), context)
    return float(-logp[y].mean())


def unigram_entropy(ids: torch.Tensor, vocab_size: int = len(VOCAB)) -> float:
    """The entropy (nats per character) of the character frequencies of ``ids``: the loss of the best model
    that ignores the context."""
    counts = torch.bincount(ids.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# --------------------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------------------

class _PackedLinear(nn.Module):
    """``k`` independent ``Linear(in, out)`` maps on ``(k, ..., in)`` input: weight ``(k, in, out)``."""

    def __init__(self, k: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(k, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, shape = x.shape[0], x.shape[1:-1]
        y = torch.baddbmm(self.bias[:, None, :], x.reshape(k, -1, x.shape[-1]), self.weight)
        return y.reshape(k, *shape, y.shape[-1])


#: The methods a transformer's :class:`TokenNorm` can apply: the per-token ones it gives a per-member affine,
#: and every batch-dependent method defined after a Linear.
TOKEN_NORMS = ("none", "ln", "rms") + tuple(n for n in methods.names(dim=1, batch_dependent=True))


class TokenNorm(nn.Module):
    """A normalization method of the registry applied to every token of a ``(k, B, T, C)`` activation of ``k``
    packed networks (see :class:`CharTransformer`), each with its own affine parameters.

    Per-token methods (layer norm, RMS norm): the registry's module without its affine
    (``methods.make(kind, C, elementwise_affine=False)``) normalizes each token over its ``C`` features, then
    member ``j``'s own ``weight[j]`` (and ``bias[j]`` where the method has one) apply: the same as ``k``
    separate modules with their affine. A batch-dependent method (batch norm...) sees the ``B * T`` tokens of
    a member as one batch of samples, through one registry module over ``k * C`` features (so statistics and
    affine stay per member): its statistics are taken over all tokens of all sequences, or, when ``forward``
    gets a padding ``mask`` (``(B, T)`` or ``(k, B, T)``, True at real tokens), over the real tokens only (the
    padded positions then come out as zeros).
    """

    def __init__(self, kind: str, num_features: int, members: int = 1) -> None:
        super().__init__()
        if kind not in TOKEN_NORMS:
            raise ValueError(f"kind: expected one of {TOKEN_NORMS}, got {kind!r}")
        method = methods.get(kind)
        self.kind, self.members, self.num_features = kind, members, num_features
        self.batch_dependent = method.batch_dependent
        if self.batch_dependent:
            self.norm = methods.make(kind, members * num_features, 1)
            return
        self.norm = methods.make(kind, num_features, 1, elementwise_affine=False)
        reference = methods.make(kind, num_features, 1)  # which affine parameters the method has, initialized
        for name, p in reference.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().expand(members, *p.shape).clone()))
        self.affine = tuple(name for name, _ in reference.named_parameters())

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        k, C = self.members, self.num_features
        if x.dim() != 4 or x.shape[0] != k or x.shape[-1] != C:
            raise ValueError(f"x: expected ({k}, B, T, {C}), got {tuple(x.shape)}")
        if not self.batch_dependent:
            y = self.norm(x)
            view = (k, 1, 1, C)
            if "weight" in self.affine:
                y = y * self.weight.view(view)
            if "bias" in self.affine:
                y = y + self.bias.view(view)
            return y
        flat = x.permute(1, 2, 0, 3).reshape(-1, k * C)  # (B * T tokens, k * C features)
        if mask is None:
            out = self.norm(flat)
        else:
            keep = mask.reshape(-1, *mask.shape[-2:])[0].reshape(-1)  # the members share their padding
            out = flat.new_zeros(flat.shape)
            out[keep] = self.norm(flat[keep])
        return out.reshape(x.shape[1], x.shape[2], k, C).permute(2, 0, 1, 3)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, members={self.members}"


class _Block(nn.Module):
    def __init__(self, k: int, d_model: int, n_heads: int, norm: str, position: str, d_ffn: int) -> None:
        super().__init__()
        self.n_heads, self.position = n_heads, position
        self.norm1, self.norm2 = TokenNorm(norm, d_model, k), TokenNorm(norm, d_model, k)
        self.qkv = _PackedLinear(k, d_model, 3 * d_model)
        self.proj = _PackedLinear(k, d_model, d_model)
        self.ff1 = _PackedLinear(k, d_model, d_ffn)
        self.ff2 = _PackedLinear(k, d_ffn, d_model)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, B, T, C = x.shape
        h = self.n_heads
        q, kk, v = (t.reshape(k * B, T, h, C // h).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        att = F.scaled_dot_product_attention(q, kk, v, is_causal=True)   # softmax(q k^T / sqrt(C/h) + causal mask) v
        return self.proj(att.transpose(1, 2).reshape(k, B, T, C))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(F.relu(self.ff1(x)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.position == "pre":
            x = x + self.attention(self.norm1(x, mask))
            return x + self.ffn(self.norm2(x, mask))
        x = self.norm1(x + self.attention(x), mask)
        return self.norm2(x + self.ffn(x), mask)


class CharTransformer(nn.Module):
    """A causal character-level transformer (see the module's docstring), or ``k = len(seeds)`` of them
    packed side by side.

    ``norm``: a registry name in :data:`TOKEN_NORMS` (``'ln'``, ``'rms'``, ``'bn'``...), applied by
    :class:`TokenNorm`; ``position``: ``'pre'`` (norm at the start of each residual branch, and once more
    before the output layer) or ``'post'`` (norm after each residual addition, the original Transformer's).
    ``d_ffn``: the width of the feed-forward networks (default ``4 * d_model``).

    Packing: every parameter has a leading axis of ``k`` members and member ``j`` never reads another's
    parameters or activations, so training the pack on the *sum* of the members' mean losses with Adam trains
    ``k`` independent networks (as :mod:`bnlib.lab.packed` does for MLPs and CNNs), at little more than the
    cost of one. Member ``j`` is initialized from ``bnlib.generator(seeds[j])``: Xavier-normal linear weights
    and zero biases (Xiong et al.'s setting), token and position embeddings N(0, 1).

    ``forward(idx, mask=None)``: ``(B, T)`` ids (one network, ``k = 1``) -> ``(B, T, vocab_size)`` logits, or
    ``(k, B, T)`` ids (member ``j`` reads ``idx[j]``) -> ``(k, B, T, vocab_size)``; ``T <= context``.
    ``mask`` (True at real tokens) only matters for a batch-dependent norm (:class:`TokenNorm`).
    """

    def __init__(self, vocab_size: int = len(VOCAB), *, d_model: int = 32, n_layers: int = 2, n_heads: int = 4,
                 context: int = 32, norm: str = "ln", position: str = "pre", d_ffn: Optional[int] = None,
                 seeds: Sequence[int] = (0,)) -> None:
        super().__init__()
        d_ffn = 4 * d_model if d_ffn is None else d_ffn
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                        ("n_heads", n_heads), ("context", context), ("d_ffn", d_ffn)):
            _checks.check_positive_int(name, v)
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads!r}")
        if position not in ("pre", "post"):
            raise ValueError(f"position: expected 'pre' or 'post', got {position!r}")
        if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or not seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise ValueError(f"seeds: expected a non-empty sequence of non-negative ints, got {seeds!r}")
        if norm not in TOKEN_NORMS:
            raise ValueError(f"norm: expected one of {TOKEN_NORMS}, got {norm!r}")
        k = len(seeds)
        self.config = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                           context=context, norm=norm, position=position, d_ffn=d_ffn)
        self.members, self.seeds = k, tuple(seeds)
        self.context, self.position, self.norm_kind = context, position, norm
        self.tok = nn.Parameter(torch.empty(k, vocab_size, d_model))
        self.pos = nn.Parameter(torch.empty(k, context, d_model))
        self.blocks = nn.ModuleList(_Block(k, d_model, n_heads, norm, position, d_ffn) for _ in range(n_layers))
        self.final_norm = TokenNorm(norm, d_model, k) if position == "pre" else None
        self.head = _PackedLinear(k, d_model, vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Member ``j``'s initialization from ``bnlib.generator(seeds[j])`` (see the class docstring)."""
        from .._setup import generator

        for j, seed in enumerate(self.seeds):
            g = generator(seed)
            for p in (self.tok, self.pos):
                p[j] = torch.randn(p.shape[1:], generator=g)
            for m in self.modules():
                if isinstance(m, _PackedLinear):
                    fan_in, fan_out = m.weight.shape[1:]
                    m.weight[j] = torch.randn(m.weight.shape[1:], generator=g) * math.sqrt(2.0 / (fan_in + fan_out))
                    m.bias[j] = 0.0

    def member(self, j: int) -> "CharTransformer":
        """Member ``j`` as a network of its own (``k = 1``), with a copy of its parameters and buffers."""
        _checks.check_int("j", j, 0, self.members - 1)
        single = CharTransformer(**self.config, seeds=(self.seeds[j],)).to(self.tok.device)
        own = single.state_dict()
        state = {}
        for name, t in self.state_dict().items():
            n = own[name].shape[0] if own[name].dim() else 0
            if t.dim() == 0:                           # counters
                state[name] = t.clone()
            elif own[name].shape[1:] == t.shape[1:] and n == 1 and t.shape[0] == self.members:
                state[name] = t[j: j + 1].clone()      # stacked along the member axis
            else:                                      # a batch norm's k * C features: member j's C
                state[name] = t[j * n: (j + 1) * n].clone()
        single.load_state_dict(state)
        single.train(self.training)
        return single

    def forward(self, idx: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        k = self.members
        single = isinstance(idx, torch.Tensor) and idx.dim() == 2 and k == 1
        if single:
            idx = idx[None]
            mask = None if mask is None else mask[None]
        if not isinstance(idx, torch.Tensor) or idx.dim() != 3 or idx.shape[0] != k or idx.dtype != torch.int64:
            raise ValueError(f"idx: expected ({k}, B, T) int64 ids" + (" or (B, T)" if k == 1 else "") +
                             f", got {getattr(idx, 'shape', type(idx).__name__)}")
        if idx.shape[2] > self.context:
            raise ValueError(f"idx: expected at most context={self.context} positions, got {idx.shape[2]}")
        if mask is not None and mask.shape != idx.shape:
            raise ValueError(f"mask: expected the shape of idx {tuple(idx.shape)}, got {tuple(mask.shape)}")
        members = torch.arange(k, device=idx.device)[:, None, None]
        x = self.tok[members, idx] + self.pos[:, None, : idx.shape[2]]
        for block in self.blocks:
            x = block(x, mask)
        if self.final_norm is not None:
            x = self.final_norm(x, mask)
        logits = self.head(x)
        return logits[0] if single else logits


def lm_batch(ids: torch.Tensor, starts: torch.Tensor, context: int):
    """Inputs and next-character targets (``starts.shape + (context,)`` each) for the windows of ``ids``
    starting at ``starts`` (any shape, e.g. ``(B,)`` or ``(k, B)``)."""
    offsets = torch.arange(context + 1, device=ids.device)
    windows = ids[starts.to(ids.device)[..., None] + offsets]
    return windows[..., :-1], windows[..., 1:]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, per_member: bool = False) -> torch.Tensor:
    """Mean next-character cross-entropy (nats per character); ``per_member``: one value per member of a
    packed model (``x`` of shape ``(k, B, T)``)."""
    logits = model(x)
    if not per_member:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return loss.reshape(y.shape[0], -1).mean(1)


def _eval_starts(ids: torch.Tensor, context: int, windows: int) -> torch.Tensor:
    return torch.linspace(0, len(ids) - context - 2, windows).long()


@torch.no_grad()
def _eval_losses(model: CharTransformer, ids: torch.Tensor, windows: int = 64) -> list:
    x, y = lm_batch(ids, _eval_starts(ids, model.context, windows), model.context)
    k = model.members
    was = model.training
    model.eval()
    try:
        return lm_loss(model, x.expand(k, *x.shape), y.expand(k, *y.shape), per_member=True).tolist()
    finally:
        model.train(was)


@dataclass
class LMRun:
    """One member's training run: its training losses (one per step, until it diverged), whether it
    diverged (a non-finite loss), and its validation loss before and after training (``nan`` if it diverged)."""

    train_loss: list
    diverged: bool
    val_loss_init: float
    val_loss: float


def train_char_lm(model: CharTransformer, corpus: CharCorpus, *, steps: int, batch_size: int, lr: float,
                  warmup: int = 0, eval_windows: int = 64) -> list:
    """Adam (no weight decay, no gradient clipping) on next-character prediction for ``steps`` batches of
    ``batch_size`` windows of ``model.context`` characters; returns one :class:`LMRun` per member.

    Member ``j`` trains on the batches :func:`bnlib.lab.train.run` draws for ``seed=model.seeds[j]`` (one batch
    stream per member), and the pack on the sum of the members' losses, which gives each member its own
    gradient. ``warmup`` steps of linear learning-rate warm-up (0: constant ``lr``). A member whose loss is not
    finite has diverged: it drops out of the sum (its parameters are lost, the others train on). The
    validation loss is the mean over ``eval_windows`` evenly spaced windows of the held-out text."""
    from .train import run

    _checks.check_int("warmup", warmup, 0)
    _checks.check_real("lr", lr, 0.0, open_low=True)
    context, k = model.context, model.members
    device = next(model.parameters()).device
    train_ids, val_ids = corpus.train.to(device), corpus.val.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    losses = [[] for _ in range(k)]
    alive = torch.ones(k, dtype=torch.bool)

    def step(t, idx):
        if warmup:
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, t / warmup)
        x, y = lm_batch(train_ids, idx.reshape(k, -1), context)
        per_member = lm_loss(model, x, y, per_member=True)
        values = per_member.detach().cpu()
        alive.logical_and_(torch.isfinite(values))
        for j in torch.nonzero(alive).flatten().tolist():
            losses[j].append(float(values[j]))
        if not bool(alive.any()):
            return float("nan")
        opt.zero_grad(set_to_none=True)
        per_member[alive.to(device)].sum().backward()
        opt.step()
        return float(values[alive].sum())

    initial = _eval_losses(model, val_ids, eval_windows)
    model.train()
    run(len(train_ids) - context - 1, step, steps=steps, batch_size=batch_size, seed=list(model.seeds))
    final = _eval_losses(model, val_ids, eval_windows)
    return [LMRun(losses[j], not bool(alive[j]), initial[j], final[j] if bool(alive[j]) else float("nan"))
            for j in range(k)]


def block_grad_norms(model: CharTransformer, x: torch.Tensor, y: torch.Tensor, *, part: str = "ffn"):
    """The gradient norm of each block's feed-forward weights (``part='ffn'``: ``ff1`` and ``ff2`` together,
    the quantity of Xiong et al.'s Figure 3) or of all its parameters (``'all'``), for the mean loss on the
    batch ``x, y`` (``(B, T)``, the same batch for every member), as a ``(members, n_layers)`` tensor. The
    model's gradients are cleared before and after."""
    if part not in ("ffn", "all"):
        raise ValueError(f"part: expected 'ffn' or 'all', got {part!r}")
    k = model.members
    model.zero_grad(set_to_none=True)
    lm_loss(model, x.expand(k, *x.shape), y.expand(k, *y.shape), per_member=True).sum().backward()
    out = torch.zeros(k, len(model.blocks))
    for l, block in enumerate(model.blocks):
        params = [block.ff1.weight, block.ff2.weight] if part == "ffn" else list(block.parameters())
        out[:, l] = torch.stack([(p.grad.detach() ** 2).reshape(k, -1).sum(1) for p in params]).sum(0).sqrt()
    model.zero_grad(set_to_none=True)
    return out


# --------------------------------------------------------------------------------------------------------
# Normalizer-free residual CNNs
# --------------------------------------------------------------------------------------------------------

class WSConv2d(nn.Conv2d):
    """A convolution with weight standardization (Qiao et al. 2019): each output filter's weights are
    centred and scaled to unit variance over their ``in_channels * kH * kW`` entries before the convolution,
    ``W_hat = (W - mean) / sqrt(var + eps)`` (the gradient flows through the standardization)."""

    def __init__(self, *args, ws_eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = _checks.check_eps(ws_eps, "ws_eps")

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + self.ws_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


#: The residual CNNs' kinds (see :func:`small_resnet`).
RESNET_KINDS = ("bn", "ws_gn", "skipinit", "none")


class ResidualBlock(nn.Module):
    """``x + alpha * branch(x)``, then ReLU; branch = conv3x3 -> norm -> ReLU -> conv3x3 -> norm.

    ``kind`` (:data:`RESNET_KINDS`): 'bn' (batch norm from the registry), 'ws_gn' (:class:`WSConv2d` and
    group norm with ``groups`` groups from the registry), 'skipinit' (no norm; ``alpha`` a learnable scalar
    starting at 0, so the block is ``ReLU(x)``, the identity on the non-negative activations it receives,
    at initialization), 'none' (no norm, ``alpha`` = 1 fixed)."""

    def __init__(self, channels: int, kind: str = "bn", *, groups: int = 4) -> None:
        super().__init__()
        if kind not in RESNET_KINDS:
            raise ValueError(f"kind: expected one of {RESNET_KINDS}, got {kind!r}")
        _checks.check_positive_int("channels", channels)
        self.kind = kind
        conv = WSConv2d if kind == "ws_gn" else nn.Conv2d
        bias = kind in ("skipinit", "none")
        layers = []
        for i in range(2):
            layers.append(conv(channels, channels, 3, padding=1, bias=bias))
            if kind == "bn":
                layers.append(methods.make("bn", channels, 2))
            elif kind == "ws_gn":
                layers.append(methods.make("gn", channels, 2, groups=groups))
            if i == 0:
                layers.append(nn.ReLU())
        self.branch = nn.Sequential(*layers)
        if kind == "skipinit":
            self.alpha = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("alpha", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.alpha * self.branch(x))


def small_resnet(kind: str = "bn", *, width: int = 16, blocks: int = 2, num_classes: int = 10,
                 in_channels: int = 1, groups: int = 4) -> nn.Sequential:
    """stem (conv3x3 -> norm -> ReLU -> MaxPool2) -> ``blocks`` :class:`ResidualBlock` of ``kind`` ->
    MaxPool2 -> global average pool -> Linear. The stem's norm: BN for 'bn', group norm (with a
    weight-standardized convolution) for 'ws_gn', none for 'skipinit' and 'none'."""
    if kind not in RESNET_KINDS:
        raise ValueError(f"kind: expected one of {RESNET_KINDS}, got {kind!r}")
    _checks.check_positive_int("width", width)
    _checks.check_positive_int("blocks", blocks)
    if kind == "bn":
        stem = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), methods.make("bn", width, 2)]
    elif kind == "ws_gn":
        stem = [WSConv2d(in_channels, width, 3, padding=1, bias=False), methods.make("gn", width, 2, groups=groups)]
    else:
        stem = [nn.Conv2d(in_channels, width, 3, padding=1)]
    layers = stem + [nn.ReLU(), nn.MaxPool2d(2)]
    layers += [ResidualBlock(width, kind, groups=groups) for _ in range(blocks)]
    layers += [nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():  # He initialization (what Fixup and SkipInit start from); irrelevant to BN and WS
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def train_resnet(kind: str, x_train, y_train, x_eval, y_eval, *, batch_size: int, steps: int, lr: float,
                 seed: int = 0, width: int = 16, blocks: int = 2, momentum: float = 0.9, warmup: float = 0.1):
    """Build :func:`small_resnet` of ``kind`` after ``bnlib.seed_everything(seed)`` and train it with
    :func:`bnlib.lab.train.train` (SGD with ``momentum``; ``lr`` with a linear warm-up over the first ``warmup``
    fraction of the steps and a linear decay to 0, :func:`bnlib.lab.packed.lr_at`; batches seeded by
    ``seed``); returns ``(model, history)``, with the test accuracy evaluated at the end (eval mode)."""
    from .._setup import seed_everything
    from .packed import lr_at
    from .train import train

    seed_everything(seed)
    model = small_resnet(kind, width=width, blocks=blocks).to(x_train.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, foreach=True)

    def schedule(t, _model):
        for group in opt.param_groups:
            group["lr"] = lr_at(t, steps, lr, "warmup-linear", warmup)

    history = train(model, x_train, y_train, steps=steps, batch_size=batch_size, lr=lr, optimizer=opt, seed=seed,
                    before_step=schedule, x_eval=x_eval, y_eval=y_eval, eval_every=steps)
    return model, history


# --------------------------------------------------------------------------------------------------------
# Padding and the batch
# --------------------------------------------------------------------------------------------------------

def padded_batch(seqs: Sequence[torch.Tensor], *, length: Optional[int] = None, pad_id: int = 0):
    """Right-pad 1-D id sequences to ``length`` (default: the longest): ``(ids (B, L), mask (B, L))`` with
    ``mask`` True at real tokens."""
    seqs = list(seqs)
    if not seqs or any(not isinstance(s, torch.Tensor) or s.dim() != 1 or len(s) == 0 for s in seqs):
        raise ValueError("seqs: expected a non-empty list of non-empty 1-D tensors")
    longest = max(len(s) for s in seqs)
    length = longest if length is None else _checks.check_int("length", length, longest)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.int64, device=seqs[0].device)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool, device=seqs[0].device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return ids, mask


@torch.no_grad()
def target_output(model: CharTransformer, target: torch.Tensor, companions: Sequence[torch.Tensor] = (), *,
                  length: Optional[int] = None, use_mask: bool = False, train_mode: bool = True) -> torch.Tensor:
    """The logits ``(len(target), vocab_size)`` of a one-network ``model`` for the 1-D id sequence ``target``,
    run as the first sequence of the right-padded batch ``[target, *companions]`` (:func:`padded_batch`,
    padded to ``length``; without companions and ``length``, a batch of one, unpadded).

    ``use_mask`` passes the padding mask to the model (a batch-dependent :class:`TokenNorm` then leaves the
    padded positions out of its statistics); ``train_mode`` runs the model in training mode (batch statistics).
    The model's mode and buffers (running statistics) are restored afterwards."""
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or len(target) == 0:
        raise ValueError("target: expected a non-empty 1-D tensor of ids")
    if getattr(model, "members", 1) != 1:
        raise ValueError(f"model: expected one network (members=1), got {model.members}; use model.member(j)")
    was = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.train(train_mode)
    try:
        ids, mask = padded_batch([target, *companions], length=length)
        return model(ids, mask if use_mask else None)[0, : len(target)]
    finally:
        model.train(was)
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def relative_change(new: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |new - reference| / max |reference|``."""
    if new.shape != reference.shape:
        raise ValueError(f"new, reference: expected the same shape, got {tuple(new.shape)} and "
                         f"{tuple(reference.shape)}")
    return float((new - reference).abs().max() / reference.abs().max())


def batch_dependence(model: CharTransformer, target: torch.Tensor, companions: Sequence[torch.Tensor], *,
                     length: Optional[int] = None, use_mask: bool = False, train_mode: bool = True) -> float:
    """How much ``model``'s output for ``target`` changes when it shares a batch with ``companions`` (padded to
    ``length``): :func:`relative_change` of :func:`target_output` in that batch against ``target`` alone."""
    alone = target_output(model, target, train_mode=train_mode)
    return relative_change(target_output(model, target, companions, length=length, use_mask=use_mask,
                                         train_mode=train_mode), alone)
