"""The registry of normalization methods: the one place a method is listed.

Everything that loops over methods reads this table -- the lab's models (:func:`bnlib.lab.models.make_norm`),
plot colours and styles (:mod:`bnlib.lab.plotting`), the packed-seed trainer and the batch-size sweep
(:mod:`bnlib.lab.small_batches`), the axes cube and the tables of chapter 6 -- so adding a method means: its
two implementations (``bnlib.numpy`` and ``bnlib.torch``), one :class:`NormMethod` entry below, and its tests
(the checklist is in CONTRIBUTING.md).

Implementations are named by dotted path (``"bnlib.torch.BatchNorm1d"``) and resolved on use, so reading
the registry imports neither torch nor the implementations.

>>> from bnlib import methods
>>> methods.get("bn").stat_axes
'N, H, W'
>>> layer = methods.make("gn", 16, dim=2, groups=4)      # bnlib.torch.GroupNorm(4, 16)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

__all__ = ["NormMethod", "REGISTRY", "NAMES", "get", "make", "resolve", "names"]


def resolve(path: str):
    """The object at a dotted path, e.g. ``"bnlib.torch.BatchNorm1d"``."""
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class NormMethod:
    """One normalization method.

    ``modules`` maps the layer's place to the class that builds it: ``1`` after a Linear (``(N, C)``
    features), ``2`` after a Conv2d (``(N, C, H, W)`` channels); a missing key means the method is not
    defined there. ``build`` optionally replaces the plain ``cls(num_features, **kwargs)`` call.
    """

    name: str                      # the short key used everywhere ('bn')
    title: str                     # 'batch norm (BN)'
    short: str                     # 'BN', for tick labels and legends
    paper: str                     # where it comes from
    numpy_forward: Optional[str]   # dotted paths: the NumPy reference and its hand-derived backward
    numpy_backward: Optional[str]
    torch_function: Optional[str]  # the functional form in bnlib.torch.functional
    modules: Mapping[int, str]     # dim -> module class (see above)
    stat_axes: str                 # the axes of an (N, C, H, W) activation its statistics are taken over
    running_stats: bool            # keeps running statistics for evaluation (train and eval differ)
    batch_dependent: bool          # one example's output depends on the other examples of its batch
    packable: bool                 # k seeds train as one packed network (bnlib.lab.packed)
    color: str                     # hex colour, the same in every chapter (Okabe-Ito palette)
    linestyle: str = "-"
    marker: str = "o"
    use: str = ""                  # the usual guidance (chapter 6's summary table), not a measurement
    build: Mapping[int, Callable] = field(default_factory=dict)  # dim -> fn(cls, num_features, **kw)

    def module_class(self, dim: int):
        if dim not in self.modules:
            raise ValueError(f"dim: {self.name!r} ({self.title}) is defined for dim in {tuple(self.modules)}, "
                             f"got {dim!r}")
        return resolve(self.modules[dim])

    def make(self, num_features: int, dim: int = 1, **kwargs):
        """The ``torch.nn.Module`` of this method for ``num_features`` features (dim=1) or channels (dim=2)."""
        cls = self.module_class(dim)
        builder = self.build.get(dim)
        return builder(cls, num_features, **kwargs) if builder else cls(num_features, **kwargs)

    def functions(self) -> Tuple[Callable, Callable, Callable]:
        """(NumPy forward, NumPy backward, torch functional) -- resolved; ``None`` where there is none."""
        return tuple(resolve(p) if p else None
                     for p in (self.numpy_forward, self.numpy_backward, self.torch_function))


def _identity(cls, num_features, **kwargs):
    return cls()


def _layer_norm_over_channels(cls, num_features, **kwargs):  # LN of a conv activation: GroupNorm(1, C)
    return cls(1, num_features, **kwargs)


def _group_norm(cls, num_features, **kwargs):
    groups = kwargs.pop("groups", min(8, num_features))
    return cls(groups, num_features, **kwargs)


def _instance_norm(cls, num_features, **kwargs):
    kwargs.setdefault("affine", True)
    return cls(num_features, **kwargs)


_NP, _T = "bnlib.numpy.", "bnlib.torch."
_F = _T + "functional."

REGISTRY: Dict[str, NormMethod] = {m.name: m for m in (
    NormMethod(
        name="none", title="no normalization", short="none", paper="-", numpy_forward=None, numpy_backward=None,
        torch_function=None, modules={1: "torch.nn.Identity", 2: "torch.nn.Identity"}, stat_axes="-",
        running_stats=False, batch_dependent=False, packable=True, color="#000000", linestyle=":", marker="x",
        use="a baseline; shallow networks", build={1: _identity, 2: _identity}
    ),
    NormMethod(
        name="bn", title="batch norm (BN)", short="BN", paper="Ioffe & Szegedy 2015",
        numpy_forward=_NP + "batch_norm", numpy_backward=_NP + "batch_norm_backward",
        torch_function=_F + "batch_norm", modules={1: _T + "BatchNorm1d", 2: _T + "BatchNorm2d"},
        stat_axes="N, H, W", running_stats=True, batch_dependent=True, packable=True, color="#0072B2", linestyle="-",
        marker="o", use="convolutions, or fully connected layers with batches of 8 or more"
    ),
    NormMethod(
        name="ghost", title="ghost BN", short="ghost BN", paper="Hoffer, Hubara & Soudry 2017", numpy_forward=None,
        numpy_backward=None, torch_function=_F + "ghost_batch_norm",
        modules={1: _T + "GhostBatchNorm1d", 2: _T + "GhostBatchNorm2d"}, stat_axes="N/k, H, W (k virtual batches)",
        running_stats=True, batch_dependent=True, packable=True, color="#56B4E9", linestyle="-.", marker="^",
        use="large batches, as a regularizer; not a small-batch fix"
    ),
    NormMethod(
        name="brn", title="batch renorm (BRN)", short="BRN", paper="Ioffe 2017", numpy_forward=_NP + "batch_renorm",
        numpy_backward=_NP + "batch_renorm_backward", torch_function=_F + "batch_renorm",
        modules={1: _T + "BatchRenorm1d", 2: _T + "BatchRenorm2d"},
        stat_axes="N, H, W (corrected towards the running statistics)", running_stats=True, batch_dependent=True,
        packable=True, color="#E69F00", linestyle="--", marker="s",
        use="BN models (running statistics, folding) at small batches; a partial fix"
    ),
    NormMethod(
        name="bln", title="batch-layer norm (BLN)", short="BLN", paper="Ziaee & Cano 2022",
        numpy_forward=_NP + "batch_layer_norm", numpy_backward=_NP + "batch_layer_norm_backward",
        torch_function=_F + "batch_layer_norm", modules={1: _T + "BatchLayerNorm", 2: _T + "BatchLayerNorm"},
        stat_axes="N, H, W (weight 1 - 1/N) and C, H, W (weight 1/N)", running_stats=True, batch_dependent=True,
        packable=True, color="#CC79A7", linestyle="-", marker="*",
        use="small batches when some batch statistics are wanted"
    ),
    NormMethod(
        name="ln", title="layer norm (LN)", short="LN", paper="Ba, Kiros & Hinton 2016",
        numpy_forward=_NP + "layer_norm", numpy_backward=_NP + "layer_norm_backward",
        torch_function=_F + "layer_norm", modules={1: _T + "LayerNorm", 2: _T + "GroupNorm"}, stat_axes="C, H, W",
        running_stats=False, batch_dependent=False, packable=True, color="#D55E00", linestyle="--", marker="v",
        use="per-example normalization: fully connected and sequence models, batch 1",
        build={2: _layer_norm_over_channels}
    ),
    NormMethod(
        name="gn", title="group norm (GN)", short="GN", paper="Wu & He 2018", numpy_forward=_NP + "group_norm",
        numpy_backward=_NP + "group_norm_backward", torch_function=_F + "group_norm",
        modules={1: _T + "GroupNorm", 2: _T + "GroupNorm"}, stat_axes="C/G, H, W", running_stats=False,
        batch_dependent=False, packable=True, color="#009E73", linestyle="-", marker="D",
        use="the small-batch replacement for BN in convolutional networks", build={1: _group_norm, 2: _group_norm}
    ),
    NormMethod(
        name="in", title="instance norm (IN)", short="IN", paper="Ulyanov, Vedaldi & Lempitsky 2016",
        numpy_forward=_NP + "instance_norm", numpy_backward=_NP + "instance_norm_backward",
        torch_function=_F + "instance_norm", modules={2: _T + "InstanceNorm2d"}, stat_axes="H, W",
        running_stats=False, batch_dependent=False, packable=True, color="#F0E442", linestyle="-.", marker="P",
        use="per-image contrast removal (style transfer); discards per-channel image statistics",
        build={2: _instance_norm}
    ),
    NormMethod(
        name="rms", title="RMS norm (RMSNorm)", short="RMS", paper="Zhang & Sennrich 2019",
        numpy_forward=_NP + "rms_norm", numpy_backward=_NP + "rms_norm_backward", torch_function=_F + "rms_norm",
        modules={1: _T + "RMSNorm"}, stat_axes="C (no mean: x / rms(x))", running_stats=False, batch_dependent=False,
        packable=False, color="#999999", linestyle=(0, (3, 1, 1, 1)), marker="h",
        use="transformers (T5, LLaMA): layer norm without the centring, one reduction cheaper"
    ),
)}

#: The registered names, in registry order.
NAMES: Tuple[str, ...] = tuple(REGISTRY)


def names(*, dim: Optional[int] = None, **flags) -> Tuple[str, ...]:
    """Registered names, optionally only those defined at ``dim`` and whose fields equal ``flags``.

    >>> names(dim=2, running_stats=True)
    ('bn', 'ghost', 'brn', 'bln')
    """
    for key in flags:
        if key not in NormMethod.__dataclass_fields__:
            raise TypeError(f"{key}: not a field of NormMethod")
    return tuple(n for n, m in REGISTRY.items()
                 if (dim is None or dim in m.modules) and all(getattr(m, k) == v for k, v in flags.items()))


def get(name: str) -> NormMethod:
    """The registered method called ``name``."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"kind: expected one of {NAMES}, got {name!r}") from None


def make(name: str, num_features: int, dim: int = 1, **kwargs):
    """The ``torch.nn.Module`` of method ``name`` (see :meth:`NormMethod.make`)."""
    if dim not in (1, 2):
        raise ValueError(f"dim: expected 1 (features) or 2 (image channels), got {dim!r}")
    return get(name).make(num_features, dim, **kwargs)
