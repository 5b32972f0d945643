"""bnlib.lab.book: the numbers the book's notebooks stored, read back (glued values, cell outputs, sections)."""
import io
import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from bnlib.lab import book
from bnlib.lab.report import glue


def glue_output(name, text_plain):
    """A glued value as myst-nb stores it in the .ipynb (display_data with scrapbook metadata)."""
    return new_output("display_data", data={book.GLUE_PREFIX + "text/plain": text_plain},
                      metadata={"scrapbook": {"name": name, "mime_prefix": book.GLUE_PREFIX}})


def write_notebook(path, cells):
    nb = new_notebook(cells=cells)
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def small(tmp_path):
    """# Title, a cell before any section, '## 1. First part' with a glueing cell, '## 2. Second' with output."""
    cells = [
        new_markdown_cell("# Title\n\nIntro."),
        new_code_cell("print('set-up')", outputs=[new_output("stream", name="stdout", text="set-up\n")]),
        new_markdown_cell("## 1. First part\n\n```python\n## not a heading\n```"),
        new_code_cell("glue(...)", outputs=[
            new_output("stream", name="stdout", text="speed-up 12.0x, steps 150 vs 1,800\n"),
            glue_output("t_speedup", "'12.0'"), glue_output("t_count", "3"),
            glue_output("t_numpy", "np.float64(0.5)"),
        ]),
        new_markdown_cell("## 2. Second `part`"),
        new_code_cell("display(Markdown(...))", outputs=[
            new_output("display_data", data={"text/markdown": "| a |\n| --- |\n| 1 |", "text/plain": "<Markdown>"}),
            new_output("stream", name="stderr", text="a warning\n"),
        ]),
    ]
    cells[3]["id"] = "glueing"
    return write_notebook(tmp_path / "t.ipynb", cells)


def test_stored_glue_reads_what_myst_nb_stored(small):
    glued = book.stored_glue(small)
    assert dict(glued) == {"t_speedup": "12.0", "t_count": 3, "t_numpy": "np.float64(0.5)"}  # a non-literal: text
    assert glued.notebook == "t" and glued.cells["t_speedup"] == 3
    assert glued.section("t_count") == book.Section("t", "1. First part", "first-part")


def test_stored_glue_reads_the_book_s_own_glue_without_myst_nb(tmp_path, monkeypatch):
    """What bnlib.lab.report.glue displays (here its fallback for a Colab without myst-nb) reads back."""
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.append((a, k)))
    monkeypatch.setitem(__import__("sys").modules, "myst_nb", None)
    glue("ch99_ratio", "28")
    (bundle,), kwargs = shown[-1]
    out = new_output("display_data", data=bundle, metadata=kwargs["metadata"])
    path = write_notebook(tmp_path / "g.ipynb", [new_code_cell("glue", outputs=[out])])
    assert book.stored_glue(path)["ch99_ratio"] == "28"


def test_a_missing_glue_key_says_which_there_are(small):
    glued = book.stored_glue(small)
    with pytest.raises(KeyError) as info:
        glued["t_speed"]
    assert str(info.value) == ("key: expected one of t_count, t_numpy, t_speedup (the values glued in t), "
                               "got 't_speed'")
    with pytest.raises(KeyError, match="key: expected one of"):
        glued.section("nope")
    assert glued.get("nope") is None  # dict.get still works


def test_stored_glue_of_a_real_chapter():
    """Chapter 5, found by name (in chapters/ of the repository): every value is a string the chapter glued in
    a cell that glues, and each sits in a section of the chapter."""
    glued = book.stored_glue("05_internal_covariate_shift")
    assert glued.notebook == "05_internal_covariate_shift" and len(glued) >= 5
    _, cells, _ = book._load("05_internal_covariate_shift")
    headings = {book._plain(t) for c in cells if c["cell_type"] == "markdown"
                for _, t in book._headings("".join(c["source"]))}
    for key, value in glued.items():
        assert key.startswith("ch05_") and isinstance(value, str)
        source = "".join(cells[glued.cells[key]]["source"])
        # the cell glues: by name, or through a template (f"ch05_{name}_matched", the chapter's verdict() helper)
        assert key in source or "glue(" in source or "verdict(" in source, key
        assert glued.section(key).title in headings
    assert book.find_notebook("05_internal_covariate_shift.ipynb") == book.find_notebook("05_internal_covariate_shift")


def test_stored_output_by_id_or_index_and_kind(small):
    assert book.stored_output(small, "glueing") == "speed-up 12.0x, steps 150 vs 1,800\n"  # glue not included
    assert book.stored_output(small, 3) == book.stored_output(small, "glueing")
    assert book.stored_output(small, 5, "text/markdown").startswith("| a |")
    with pytest.raises(ValueError, match=r"mime: expected a kind of output .*\['stream', 'text/markdown', "
                                         r"'text/plain'\].*got 'stream'"):
        book.stored_output(small, 5)  # only stderr was printed
    with pytest.raises(ValueError, match=r"cell: expected a cell id of t or an index in \[0, 6\), got 'zzz'"):
        book.stored_output(small, "zzz")
    with pytest.raises(ValueError, match="cell: "):
        book.stored_output(small, 6)
    with pytest.raises(TypeError, match="cell: expected a cell id"):
        book.stored_output(small, True)


def test_stored_match_returns_the_groups(small):
    assert book.stored_match(small, "glueing", r"speed-up ([\d.]+)x") == "12.0"
    assert book.stored_match(small, "glueing", r"steps ([\d,]+) vs ([\d,]+)") == ("150", "1,800")
    assert book.stored_match(small, "glueing", r"\d+\.\dx") == "12.0x"
    with pytest.raises(ValueError, match=r"(?s)pattern: expected a match in the stored output of t cell 'glueing'.*"
                                         r"speed-up 12\.0x"):
        book.stored_match(small, "glueing", r"slow-down ([\d.]+)")


@pytest.mark.parametrize("title, anchor", [
    ("3. Noisy BN", "noisy-bn"),
    ("Forgetting `model.eval()`", "forgetting-model-eval"),
    (r"What $\gamma$ and $\beta$ learn", "what-gamma-and-beta-learn"),
    ("2. Ioffe & Szegedy's Figure 1", "ioffe-szegedy-s-figure-1"),
    ("Non-i.i.d. batches, and batch renormalization", "non-i-i-d-batches-and-batch-renormalization"),
    ("Part 1 — Sequence models", "part-1-sequence-models"),
])
def test_section_anchor_is_the_id_sphinx_gives_the_heading(title, anchor, monkeypatch):
    assert book.section_anchor(title) == anchor
    monkeypatch.setitem(__import__("sys").modules, "docutils.nodes", None)  # the fallback: same rule
    assert book.section_anchor(title) == anchor


def test_section_of_a_cell(small, tmp_path):
    assert book.section_of(small, 1) == book.Section("t", "Title", "")  # before the first section: the page
    assert book.section_of(small, "glueing").href == "t.html#first-part"
    assert book.section_of(small, 5) == book.Section("t", "2. Second part", "second-part")
    twice = write_notebook(tmp_path / "d.ipynb", [new_markdown_cell("# D\n## Summary"), new_code_cell("1"),
                                                   new_markdown_cell("## Summary"), new_code_cell("2")])
    assert book.section_of(twice, 3).anchor == ""  # two headings, one anchor: link the page


def test_a_section_s_label_names_the_chapter_and_the_section():
    assert book.Section("05_ics", "3. Noisy BN", "noisy-bn").label == "ch. 5, \u00a73 Noisy BN"
    assert book.Section("06_small", "2.2 Where it fails", "where-it-fails").label == "ch. 6, \u00a72.2 Where it fails"
    assert book.Section("07_tve", "Forgetting model.eval()", "forgetting-model-eval").label == (
        "ch. 7, Forgetting model.eval()")
    assert book.Section("07_tve", "Train vs eval", "").label == "ch. 7"  # the page itself
    assert book.Section("cheat_sheet", "Pitfalls", "pitfalls").label == "Pitfalls"
    assert book.Section("05_ics", "3. Noisy BN", "noisy-bn").link("here") == '<a href="05_ics.html#noisy-bn">here</a>'


def test_html_table_escapes_text_and_keeps_links():
    section = book.Section("05_x", "3. Noisy <BN>", "noisy-bn")
    table = book.html_table(["claim", "where"], [["a < b & c", section], [book.bold("yes"), ("one", "two")]])
    assert "<td style='text-align:left'>a &lt; b &amp; c</td>" in table
    assert "<a href=\"05_x.html#noisy-bn\">ch. 5, \u00a73 Noisy &lt;BN&gt;</a>" in table
    assert "<b>yes</b>" in table and "one<br>two" in table
    assert table.startswith("<table><thead><tr><th style='text-align:left'>claim</th>")
    with pytest.raises(ValueError, match="rows: expected 2 cells per row"):
        book.html_table(["a", "b"], [["only one"]])


def test_find_notebook_by_name_and_when_missing(tmp_path, monkeypatch, small):
    monkeypatch.chdir(tmp_path)
    assert book.find_notebook("t") == small.relative_to(tmp_path)
    (tmp_path / "chapters").mkdir()
    other = write_notebook(tmp_path / "chapters" / "u.ipynb", [new_code_cell("1")])
    assert book.find_notebook("u").resolve() == other.resolve()
    monkeypatch.setenv("BNLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="notebook: expected a notebook of the book, got 'nope'.*"
                                                "BNLIB_OFFLINE is set"):
        book.stored_glue("nope")
    with pytest.raises(FileNotFoundError, match="notebook: expected an existing notebook"):
        book.find_notebook(tmp_path / "folder" / "t.ipynb")
    with pytest.raises(TypeError, match="notebook: expected a path"):
        book.find_notebook(5)


def test_a_notebook_missing_here_is_downloaded_once(tmp_path, monkeypatch, small):
    """In a reader's Colab the chapters are not next to the page: the notebook comes from the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BNLIB_OFFLINE", raising=False)
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(small.read_bytes())

    monkeypatch.setattr(book.urllib.request, "urlopen", fake_urlopen)
    assert book.stored_glue("99_remote")["t_count"] == 3
    assert urls == [book.REPOSITORY_RAW + "chapters/99_remote.ipynb"]
    assert book.stored_glue("99_remote")["t_count"] == 3 and len(urls) == 1  # from the cache now
    monkeypatch.setattr(book.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"<html>404</html>"))
    with pytest.raises(FileNotFoundError, match="the download from .* failed"):
        book.find_notebook("98_missing")
    assert not list((tmp_path / "cache" / "book").glob(".*part"))  # no partial file left


def test_a_rewritten_notebook_is_read_again(tmp_path):
    path = write_notebook(tmp_path / "r.ipynb", [new_code_cell("g", outputs=[glue_output("k", "'1'")])])
    assert book.stored_glue(path)["k"] == "1"
    nb = json.loads(path.read_text())
    nb["cells"][0]["outputs"][0]["data"][book.GLUE_PREFIX + "text/plain"] = "'2.50'"
    path.write_text(json.dumps(nb))
    assert book.stored_glue(path)["k"] == "2.50"


@pytest.mark.parametrize("page", ["why_batch_norm_works", "cheat_sheet", "claims_audit"])
def test_the_synthesis_pages_are_stored_executed(page):
    """nbval compares only cells that were run: a page saved without outputs would pass whatever the chapters
    store, so the pages that quote the chapters must be stored executed, glued values included."""
    _, cells, _ = book._load(page)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{page}: re-run scripts/run_notebook.py on it"
    assert any(book.GLUE_PREFIX + "text/plain" in out.get("data", {}) for c in code for out in c.get("outputs", []))
    assert not [out for c in code for out in c.get("outputs", []) if out.get("output_type") == "error"]
