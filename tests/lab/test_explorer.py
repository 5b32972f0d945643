"""bnlib.lab.explorer: every combination precomputed, the page's data, the checks on bad input."""
from __future__ import annotations

import base64
import json
import re

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from bnlib.lab.explorer import MAX_FRAMES, Control, Explorer, frame_key  # noqa: E402


def _draw(calls):
    def draw(fig, m, mode):
        calls.append((m, mode))
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, m if mode == "up" else -m])
        ax.set_xlabel("x")
        return {"slope": (m if mode == "up" else -m) / 3.0, "m": m}
    return draw


def _payload(page_html):
    return json.loads(re.search(r'<script type="application/json" class="bnx-data">(.*?)</script>',
                                page_html, re.S).group(1).replace("<\\/", "</"))


def test_every_combination_is_drawn_once_and_shipped():
    calls = []
    ex = Explorer(_draw(calls), {"m": [1, 2, 4], "mode": ["up", "down"]}, title="t", caption="c")
    assert sorted(calls) == sorted((m, d) for m in (1, 2, 4) for d in ("up", "down"))
    assert len(ex.frames) == 6
    assert ex.summary(m=4, mode="down") == {"slope": "-1.33", "m": "4"}
    data = _payload(ex._repr_html_())
    assert [c["labels"] for c in data["controls"]] == [["1", "2", "4"], ["up", "down"]]
    assert data["frames"][frame_key([2, 1])]["summary"] == {"slope": "-1.33", "m": "4"}
    png = base64.b64decode(data["frames"]["0-0"]["img"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert repr(ex) == "Explorer 't': m (3) x mode (2) = 6 precomputed frames"


def test_page_html_is_self_contained_and_starts_at_initial():
    ex = Explorer(_draw([]), {"m": [1, 2, 4], "mode": ["up", "down"]}, title="t", caption="A caption.",
                  initial={"m": 2, "mode": "down"})
    page = ex._repr_html_()
    assert 'data-key="1-1"' in page
    assert "<figcaption>A caption.</figcaption>" in page
    assert 'type="range"' in page and "<button" in page  # a numeric grid is a slider, 2 strings are buttons
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from the network
    first_img = re.search(r'class="bnx-frame" alt="t" src="data:image/png;base64,([^"]+)"', page).group(1)
    assert first_img == ex.frames["1-1"]["img"]
    assert ex._repr_html_() == page  # deterministic (the id too): reruns store the same page


def test_control_kinds_and_formats():
    c = Control("eps", (1e-5, 1e-3, 1e-1), label="epsilon", fmt="{:.0e}")
    assert c.kind == "slider" and c.show(1e-3) == "1e-03"
    assert Control("m", (1, 2)).kind == "buttons"
    assert Control("act", tuple("abcdef")).kind == "select"
    ex = Explorer(lambda fig, eps, act: None, [c, Control("act", ("relu", "tanh"), kind="select")],
                  title="t", caption="c")
    assert "<select" in ex._repr_html_() and ex.summary(eps=1e-5, act="relu") == {}


@pytest.mark.parametrize("kwargs, match", [
    (dict(controls={"m": []}), "values: expected at least one value"),
    (dict(controls={"not a name": [1]}), "name: expected a Python identifier"),
    (dict(controls={"m": [1, 1.0]}), "values: expected values that print differently"),
    (dict(controls={"m": [1, 2]}, initial={"m": 3}), "initial: expected one of"),
    (dict(controls={"m": [1, 2]}, initial={"q": 1}), "initial: expected control names"),
    (dict(controls={"m": list(range(MAX_FRAMES + 1))}), "controls: expected at most"),
    (dict(controls={"m": [1]}, caption=""), "caption: expected a non-empty string"),
])
def test_bad_input_is_named(kwargs, match):
    base = dict(title="t", caption="c")
    base.update(kwargs)
    controls = base.pop("controls")
    with pytest.raises((ValueError, TypeError), match=match):
        Explorer(lambda fig, **kw: None, controls, **base)


def test_bad_kind_is_named():
    with pytest.raises(ValueError, match="kind: expected one of slider, select, buttons, got 'knob'"):
        Control("m", (1,), kind="knob")


def test_draw_must_return_numbers_or_none():
    with pytest.raises(TypeError, match="draw: expected it to return a mapping"):
        Explorer(lambda fig, m: 3.0, {"m": [1]}, title="t", caption="c")
    ex = Explorer(lambda fig, m: None, {"m": [1]}, title="t", caption="c")
    with pytest.raises(ValueError, match="m: expected one of"):
        ex.key(m=2)
