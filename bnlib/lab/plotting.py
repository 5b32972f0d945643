"""Plot style and small plotting helpers shared by the chapters.

Colours are the Okabe-Ito palette, which stays distinguishable for the common forms of colour blindness.
"""
from __future__ import annotations

import matplotlib as mpl

from .. import methods as _methods

#: Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
#: The order colours are used in: first "without BN" (grey-ish black), then "with BN" (blue), ...
PALETTE = [OKABE_ITO[k] for k in ("blue", "vermillion", "green", "orange", "purple", "sky_blue", "black", "yellow")]

#: Fixed colours, line styles and markers of the methods (read from the registry :mod:`bnlib.methods`), so a
#: method keeps its look everywhere.
METHOD_COLORS = {name: m.color for name, m in _methods.REGISTRY.items()}
METHOD_STYLES = {name: m.linestyle for name, m in _methods.REGISTRY.items()}
METHOD_MARKERS = {name: m.marker for name, m in _methods.REGISTRY.items()}


def use_book_style() -> None:
    """Apply the book's matplotlib defaults (palette, sizes, grid)."""
    mpl.rcParams.update(
        {
            "axes.prop_cycle": mpl.cycler(color=PALETTE),
            "figure.figsize": (6.4, 4.0),
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
            "font.size": 10,
        }
    )


def plot_curves(ax, curves, *, title: str, xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
                legend: bool = True, legend_loc: str = "best"):
    """Draw several labelled curves on ``ax`` and label it: the one plotting helper for "y against x, per arm".

    ``curves`` is an iterable of dicts with keys ``x``, ``y``, ``label`` and optionally ``color``,
    ``linestyle``, ``marker``, ``linewidth``, ``alpha`` and ``low``/``high`` (a shaded band, e.g. the min-max
    over seeds). A ``color`` may be a key of :data:`METHOD_COLORS` (``'bn'``, ``'none'``, ...).
    Returns ``ax``.
    """
    import numpy as np

    if not title or not xlabel or not ylabel:
        raise ValueError("title, xlabel, ylabel: every figure needs a title and labelled axes")
    n = 0
    for i, c in enumerate(curves):
        missing = {"x", "y", "label"} - set(c)
        if missing:
            raise ValueError(f"curves[{i}]: missing keys {sorted(missing)}")
        color = c.get("color", PALETTE[i % len(PALETTE)])
        color = METHOD_COLORS.get(color, color)
        x, y = np.asarray(c["x"], dtype=float), np.asarray(c["y"], dtype=float)
        if x.shape != y.shape:
            raise ValueError(f"curves[{i}]: x and y differ in shape, {x.shape} vs {y.shape}")
        ax.plot(x, y, label=c["label"], color=color, linestyle=c.get("linestyle", "-"), marker=c.get("marker"),
                linewidth=c.get("linewidth", 1.8), alpha=c.get("alpha", 1.0))
        if "low" in c and "high" in c:
            ax.fill_between(x, np.asarray(c["low"], dtype=float), np.asarray(c["high"], dtype=float),
                            color=color, alpha=0.18, linewidth=0)
        n += 1
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend and n:
        ax.legend(loc=legend_loc)
    return ax
