"""Small models the chapters train: an MLP and a CNN with a pluggable normalization layer.

Every normalization layer comes from the registry :mod:`bnlib.methods` (drop-in twins of ``torch.nn`` from
:mod:`bnlib.torch`), chosen by its short name so that sweeps can loop over methods: ``bn``, ``ghost``,
``brn``, ``bln``, ``ln`` (``GroupNorm(1, C)`` after a Conv2d), ``gn``, ``in`` (after a Conv2d only),
``rms`` (after a Linear only) and ``none`` (identity).
"""
from __future__ import annotations

from torch import nn

from .. import methods

#: Every registered method (:data:`bnlib.methods.NAMES`); ``methods.names(dim=2)`` are those a CNN can use.
NORMS = methods.NAMES
_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def make_norm(kind: str, num_features: int, dim: int = 1, **kwargs) -> nn.Module:
    """The normalization layer called ``kind`` (a name in :mod:`bnlib.methods`) for ``num_features``
    features (dim=1, after a Linear) or channels (dim=2, after a Conv2d).

    Extra keyword arguments go to the layer (e.g. ``momentum``, ``groups`` for 'gn', ``virtual_batch_size``
    for 'ghost', ``r_max``/``d_max`` for 'brn').
    """
    return methods.make(kind, num_features, dim, **kwargs)


def mlp(
    in_features: int = 784,
    hidden=(100, 100, 100),
    out_features: int = 10,
    *,
    activation: str = "sigmoid",
    norm: str = "none",
    norm_position: str = "before",
    bias: bool = True,
    dropout: float = 0.0,
    **norm_kwargs,
) -> nn.Sequential:
    """Flatten -> [Linear -> norm -> activation (-> dropout)] * len(hidden) -> Linear.

    ``norm_position='before'`` puts the normalization before the activation (Ioffe & Szegedy, eq. (6)),
    'after' puts it after. Layers are plain ``nn.Sequential`` children so hooks and folding can find them.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    if norm_position not in ("before", "after"):
        raise ValueError(f"norm_position: expected 'before' or 'after', got {norm_position!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h, bias=bias))
        block = [make_norm(norm, h, 1, **norm_kwargs), _ACTIVATIONS[activation]()]
        if norm_position == "after":
            block.reverse()
        layers += [m for m in block if not isinstance(m, nn.Identity)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def small_cnn(
    norm: str = "bn",
    channels=(16, 32),
    num_classes: int = 10,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    **norm_kwargs,
) -> nn.Sequential:
    """[Conv3x3 -> norm -> ReLU -> MaxPool2] per entry of ``channels``, then global average pool -> Linear."""
    if image_size < 2 ** len(channels):
        raise ValueError(f"image_size: {image_size} is too small for {len(channels)} pooling stages")
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in channels:
        # a norm layer's shift makes the convolution's bias redundant
        layers.append(nn.Conv2d(c_in, c, 3, padding=1, bias=(norm == "none")))
        norm_layer = make_norm(norm, c, 2, **norm_kwargs)
        if not isinstance(norm_layer, nn.Identity):
            layers.append(norm_layer)
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["NORMS", "make_norm", "mlp", "small_cnn", "count_parameters"]
