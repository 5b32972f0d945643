"""Plot style and small plotting helpers shared by the chapters.

Colours are the Okabe-Ito palette, which stays distinguishable for the common forms of colour blindness.
"""
from __future__ import annotations

import matplotlib as mpl

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

#: Fixed colours for the methods that appear across chapters, so a method keeps its colour everywhere.
METHOD_COLORS = {
    "none": OKABE_ITO["black"],
    "bn": OKABE_ITO["blue"],
    "ln": OKABE_ITO["vermillion"],
    "in": OKABE_ITO["yellow"],
    "gn": OKABE_ITO["green"],
    "brn": OKABE_ITO["orange"],
    "bln": OKABE_ITO["purple"],
    "ghost": OKABE_ITO["sky_blue"],
}


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
