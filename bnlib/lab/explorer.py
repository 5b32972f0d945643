"""Explorers that respond in the browser with no kernel and no network.

An :class:`Explorer` computes its figure for **every** combination of its controls' values when the notebook
runs (a grid, like an ``ipywidgets.interact`` over lists), and ships the results with the page: one PNG per
combination and, beside it, the numbers the figure shows. A few lines of inline JavaScript switch between
them when the reader moves a control, on the website, in Jupyter (a trusted notebook) and in Colab, with no
Python kernel, no server and nothing fetched from the network.

>>> def draw(fig, batch_size, eps):
...     ax = fig.add_subplot()
...     ...                                   # draw with matplotlib
...     return {"noise of the mean": 0.12}    # the numbers shown under the figure (and compared by nbval)
>>> Explorer(draw, {"batch_size": [2, 8, 32], "eps": [1e-5, 1e-3]}, title="...", caption="...")

The numbers returned by ``draw`` are printed under the figure for the current combination and stored as
text in the page, so the book's nbval check compares them (numerically, ``tools/nbval_numeric.py``) while
the PNGs are not compared, as nbval skips images. The browser test (``tests/browser``) moves every control
and checks that the image and numbers shown are the ones stored for that combination.

Controls: a list of values becomes a slider (numbers) or a drop-down (anything else), or use :class:`Control`
for a label, a display format or an explicit kind (``'slider'``, ``'select'``, ``'buttons'``).
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["Control", "Explorer", "frame_key"]

KINDS = ("slider", "select", "buttons")
#: The most combinations an explorer may hold (each is one PNG in the page; the page budget is 6 MB).
MAX_FRAMES = 120


@dataclass(frozen=True)
class Control:
    """One control: the keyword ``name`` passed to ``draw``, its ``values`` (the grid), the ``label`` shown,
    the ``fmt`` of each value (a format string such as ``'{:g}'``, or a callable) and its ``kind``."""

    name: str
    values: Tuple[Any, ...]
    label: Optional[str] = None
    fmt: Any = None
    kind: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"name: expected a Python identifier (draw's keyword), got {self.name!r}")
        values = tuple(self.values)
        if not values:
            raise ValueError(f"values: expected at least one value for control {self.name!r}, got none")
        object.__setattr__(self, "values", values)
        kind = self.kind
        if kind is None:
            numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)
            kind = "slider" if numeric and len(values) > 2 else ("buttons" if len(values) <= 4 else "select")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        object.__setattr__(self, "kind", kind)
        labels = [self.show(v) for v in values]
        if len(set(labels)) != len(labels):
            raise ValueError(f"values: expected values that print differently for control {self.name!r}, got "
                             f"{labels}")

    def show(self, value) -> str:
        if callable(self.fmt):
            return str(self.fmt(value))
        if isinstance(self.fmt, str):
            return self.fmt.format(value)
        return f"{value:g}" if isinstance(value, float) else str(value)


#: Colours of each frame's palette: a plot quantized to 96 colours looks the same and weighs about a third
#: of the full-colour PNG (the page budget is 6 MB, about 3.6 MB of which is the site's own scripts and fonts).
PALETTE_COLORS = 96


def _png(fig, dpi: int) -> bytes:
    """The figure as a palette PNG (:data:`PALETTE_COLORS` colours, median cut: deterministic)."""
    from PIL import Image  # (a dependency of matplotlib)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=PALETTE_COLORS, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


def frame_key(indices: Sequence[int]) -> str:
    """The key of a combination of control positions, as the page's JavaScript forms it: ``'2-0-1'``."""
    return "-".join(str(int(i)) for i in indices)


def _as_controls(controls) -> Tuple[Control, ...]:
    if isinstance(controls, Mapping):
        out = tuple(c if isinstance(c, Control) else Control(name, tuple(c)) for name, c in controls.items())
    else:
        out = tuple(controls)
    if not out or not all(isinstance(c, Control) for c in out):
        raise TypeError("controls: expected a mapping name -> values (or Control) or a sequence of Control, got "
                        f"{controls!r}")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"controls: expected distinct names, got {names}")
    return out


def _format_summary(summary) -> Dict[str, str]:
    """``draw``'s numbers as text: floats with 3 significant digits (the output policy's default)."""
    if summary is None:
        return {}
    if not isinstance(summary, Mapping):
        raise TypeError(f"draw: expected it to return a mapping label -> number (or None), got "
                        f"{type(summary).__name__}")
    out = {}
    for k, v in summary.items():
        if isinstance(v, float):
            out[str(k)] = f"{v:.3g}"
        else:
            out[str(k)] = str(v)
    return out


class Explorer:
    """A precomputed explorer (see the module docstring).

    Args:
        draw: ``draw(fig, **values)`` draws into a fresh matplotlib figure for one combination of the controls'
            values and returns the numbers it shows (a mapping ``label -> number``) or ``None``.
        controls: ``{name: values}`` or a sequence of :class:`Control`.
        title: shown above the controls; caption: shown under the figure (what it shows, with units).
        initial: ``{name: value}`` shown first (default: each control's first value).
        figsize, dpi: of every frame.
    """

    def __init__(self, draw: Callable, controls, *, title: str, caption: str,
                 initial: Optional[Mapping[str, Any]] = None, figsize=(6.4, 3.4), dpi: int = 80):
        if not callable(draw):
            raise TypeError(f"draw: expected a callable draw(fig, **values), got {type(draw).__name__}")
        for name, text in (("title", title), ("caption", caption)):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{name}: expected a non-empty string, got {text!r}")
        self.controls = _as_controls(controls)
        n = 1
        for c in self.controls:
            n *= len(c.values)
        if n > MAX_FRAMES:
            raise ValueError(f"controls: expected at most {MAX_FRAMES} combinations (one image each), got {n}")
        self.title, self.caption = title, caption
        initial = dict(initial or {})
        unknown = set(initial) - {c.name for c in self.controls}
        if unknown:
            raise ValueError(f"initial: expected control names {[c.name for c in self.controls]}, got "
                             f"{sorted(unknown)}")
        self.initial = []
        for c in self.controls:
            if c.name in initial:
                if initial[c.name] not in c.values:
                    raise ValueError(f"initial: expected one of {list(c.values)} for {c.name!r}, got "
                                     f"{initial[c.name]!r}")
                self.initial.append(c.values.index(initial[c.name]))
            else:
                self.initial.append(0)
        self.frames: Dict[str, dict] = {}
        import matplotlib.pyplot as plt  # (lazily: the lab's modules import without a display)

        for idx in itertools.product(*(range(len(c.values)) for c in self.controls)):
            values = {c.name: c.values[i] for c, i in zip(self.controls, idx)}
            fig = plt.figure(figsize=figsize, dpi=dpi)
            try:
                summary = _format_summary(draw(fig, **values))
                png = base64.b64encode(_png(fig, dpi)).decode("ascii")
            finally:
                plt.close(fig)
            self.frames[frame_key(idx)] = {"img": png, "summary": summary}

    # ------------------------------------------------------------------------------------------------------
    def key(self, **values) -> str:
        """The frame key of a combination given by value (every control named)."""
        missing = {c.name for c in self.controls} - set(values)
        if missing:
            raise ValueError(f"values: expected a value for every control, missing {sorted(missing)}")
        idx = []
        for c in self.controls:
            if values[c.name] not in c.values:
                raise ValueError(f"{c.name}: expected one of {list(c.values)}, got {values[c.name]!r}")
            idx.append(c.values.index(values[c.name]))
        return frame_key(idx)

    def summary(self, **values) -> Dict[str, str]:
        """The numbers shown for a combination (as printed)."""
        return dict(self.frames[self.key(**values)]["summary"])

    @property
    def nbytes(self) -> int:
        return sum(len(f["img"]) for f in self.frames.values())

    def __repr__(self) -> str:
        grid = " x ".join(f"{c.name} ({len(c.values)})" for c in self.controls)
        return f"Explorer {self.title!r}: {grid} = {len(self.frames)} precomputed frames"

    def _uid(self) -> str:
        h = hashlib.sha1(self.title.encode())
        for c in self.controls:
            h.update(repr((c.name, [c.show(v) for v in c.values])).encode())
        return "bnx-" + h.hexdigest()[:10]

    def _control_html(self, pos: int, c: Control) -> str:
        label = html.escape(c.label or c.name.replace("_", " "))
        cur = self.initial[pos]
        shows = [html.escape(c.show(v)) for v in c.values]
        if c.kind == "slider":
            widget = (f'<input type="range" min="0" max="{len(c.values) - 1}" step="1" value="{cur}" '
                      f'data-control="{pos}" aria-label="{label}">'
                      f'<output class="bnx-value">{shows[cur]}</output>')
        elif c.kind == "select":
            opts = "".join(f'<option value="{i}"{" selected" if i == cur else ""}>{s}</option>'
                           for i, s in enumerate(shows))
            widget = f'<select data-control="{pos}" aria-label="{label}">{opts}</select>'
        else:
            widget = "".join(
                f'<button type="button" data-control="{pos}" value="{i}" aria-pressed="{str(i == cur).lower()}"'
                f'>{s}</button>' for i, s in enumerate(shows))
        return f'<div class="bnx-control"><span class="bnx-label">{label}</span> {widget}</div>'

    def _repr_html_(self) -> str:
        uid = self._uid()
        first = self.frames[frame_key(self.initial)]
        data = {
            "controls": [{"name": c.name, "labels": [c.show(v) for v in c.values]} for c in self.controls],
            "frames": self.frames,
        }
        payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
        controls = "".join(self._control_html(i, c) for i, c in enumerate(self.controls))
        return (
            f'<figure class="bnlib-explorer" id="{uid}" data-bnlib-explorer="1" data-key="{frame_key(self.initial)}">'
            f'<div class="bnx-title"><strong>{html.escape(self.title)}</strong></div>'
            f'<div class="bnx-controls">{controls}</div>'
            f'<img class="bnx-frame" alt="{html.escape(self.title)}" src="data:image/png;base64,{first["img"]}">'
            f'<div class="bnx-summary">{_summary_html(first["summary"])}</div>'
            f'<figcaption>{html.escape(self.caption)}</figcaption>'
            f'<script type="application/json" class="bnx-data">{payload}</script>'
            f'<script>{_SCRIPT.replace("__UID__", uid)}</script>'
            f'<style>{_STYLE}</style></figure>'
        )


def _summary_html(summary: Mapping[str, str]) -> str:
    return " &middot; ".join(f'<span class="bnx-num" data-label="{html.escape(k)}">{html.escape(k)}: '
                             f'<b>{html.escape(v)}</b></span>' for k, v in summary.items())


_STYLE = (".bnlib-explorer{margin:1em 0}.bnx-controls{display:flex;flex-wrap:wrap;gap:.4em 1.5em;margin:.3em 0}"
          ".bnx-control button{margin-right:.2em}.bnx-control button[aria-pressed=true]{font-weight:bold;"
          "outline:2px solid #0072B2}.bnx-value{margin-left:.4em;font-family:monospace}"
          ".bnlib-explorer img{max-width:100%;height:auto}.bnx-summary{font-size:90%}")

# The page's side: read the positions of the controls, form the key, show that frame's image and numbers.
_SCRIPT = """(function(){
var root=document.getElementById("__UID__");if(!root||root.dataset.ready)return;root.dataset.ready="1";
var data=JSON.parse(root.querySelector("script.bnx-data").textContent);
var pos=root.dataset.key.split("-").map(Number);
function esc(s){var d=document.createElement("div");d.textContent=s;return d.innerHTML;}
function show(){var key=pos.join("-"),f=data.frames[key];if(!f)return;root.dataset.key=key;
root.querySelector("img.bnx-frame").src="data:image/png;base64,"+f.img;
root.querySelector(".bnx-summary").innerHTML=Object.keys(f.summary).map(function(k){
return '<span class="bnx-num" data-label="'+esc(k)+'">'+esc(k)+': <b>'+esc(f.summary[k])+'</b></span>';})
.join(" &middot; ");
root.querySelectorAll("[data-control]").forEach(function(el){var c=+el.dataset.control;
if(el.tagName==="BUTTON"){el.setAttribute("aria-pressed",String(+el.value===pos[c]));}
else if(el.tagName==="INPUT"){var o=el.parentNode.querySelector("output");
if(o)o.textContent=data.controls[c].labels[pos[c]];}});}
root.querySelectorAll("[data-control]").forEach(function(el){var c=+el.dataset.control;
var ev=el.tagName==="BUTTON"?"click":(el.tagName==="SELECT"?"change":"input");
el.addEventListener(ev,function(){pos[c]=+el.value;show();});});
show();})();"""
