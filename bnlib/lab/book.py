"""The book's own results, read back from the outputs its notebooks stored.

The synthesis pages (*Why does batch norm work?*, the cheat sheet) quote numbers that other chapters measured.
They neither re-run those experiments nor copy the numbers by hand: they read what each chapter stored when it
was last executed and validated,

- the values a chapter glued for its prose (``bnlib.lab.report.glue``, i.e. myst-nb's ``glue``), with
  :func:`stored_glue`;
- where a chapter glues nothing, the text of one cell's stored output, with :func:`stored_output` and
  :func:`stored_match`;

and link each number to the section it comes from (:func:`section_of`, :func:`html_table`). Under nbval the page
is checked like any chapter, so when a chapter's stored number changes, the page's stored output no longer
matches and ``make test`` fails until the page is re-executed: the synthesis cannot go stale.

How myst-nb stores a glued value in the ``.ipynb`` JSON: a ``display_data`` output whose metadata holds
``{"scrapbook": {"name": <key>, "mime_prefix": "application/papermill.record/"}}`` and whose data holds the
value's MIME bundle under that prefix; ``application/papermill.record/text/plain`` is the value's ``repr``
(``"'2.8'"`` for the string ``'2.8'``).

Notebooks are found by name (``"05_internal_covariate_shift"``) in the working directory (a chapter runs in
``chapters/``), in ``chapters/`` below it, and in the ``chapters/`` folder of the repository this package was
installed from (editable install). Elsewhere (a reader's Colab) the notebook is downloaded once from the book's
repository into ``bnlib.data.cache_dir() / "book"``, unless ``BNLIB_OFFLINE=1``.
"""
from __future__ import annotations

import ast
import html
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

__all__ = [
    "GlueKeyError", "Glued", "Section", "Markup", "find_notebook", "stored_glue", "stored_output",
    "stored_match", "section_of", "section_anchor", "link", "bold", "html_table",
]

GLUE_PREFIX = "application/papermill.record/"
REPOSITORY_RAW = "https://raw.githubusercontent.com/bnbook/batch-norm-book/main/"
_ROOT = Path(__file__).resolve().parents[2]  # the repository, for an editable install

Cell = Union[int, str]


class GlueKeyError(KeyError):
    """A glued name the notebook does not have; the message names the ones it has."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class Glued(dict):
    """``{name: value}`` of one notebook's glued values.

    A value is the Python literal its stored ``text/plain`` spells (the book glues strings, so ``'2.8'``); a
    ``repr`` that is not a literal is kept as its text. ``cells[name]`` is the index of the cell that glued it,
    ``notebook`` the notebook's name, ``path`` its file. A missing name raises :class:`GlueKeyError` (a
    ``KeyError``) listing the names there are.
    """

    def __init__(self, notebook: str, values: dict, cells: dict, path: Optional[Path] = None):
        super().__init__(values)
        self.notebook = notebook
        self.cells = dict(cells)
        self.path = path

    def __missing__(self, key):
        raise GlueKeyError(f"key: expected one of {', '.join(sorted(self)) or '(none)'} "
                           f"(the values glued in {self.notebook}), got {key!r}")

    def section(self, key: str) -> "Section":
        """The section of the notebook whose cell glued ``key``."""
        self[key]  # noqa: B018 - raises GlueKeyError for an unknown key
        return section_of(self.path or self.notebook, self.cells[key])


@dataclass(frozen=True)
class Section:
    """A place in the book: the notebook (name without ``.ipynb``), the heading a cell sits under and its
    HTML anchor (``""`` for the page itself, i.e. a cell before the first ``##`` heading)."""

    notebook: str
    title: str
    anchor: str

    @property
    def label(self) -> str:
        """How a link to it reads: ``"ch. 5, §3 Noisy BN"``, ``"ch. 7, Forgetting model.eval()"``, ``"ch. 5"``
        for a chapter's page itself; without a chapter number in the notebook's name, the heading alone."""
        title = re.sub(r"^(\d+(?:\.\d+)*)\.?\s+", "\u00a7\\1 ", self.title) if self.anchor else self.title
        number = re.match(r"(\d+)_", self.notebook)
        if number is None:
            return title
        chapter = f"ch. {int(number.group(1))}"
        return f"{chapter}, {title}" if self.anchor else chapter

    @property
    def href(self) -> str:
        """The link from another page of ``chapters/`` on the website: ``05_name.html#anchor``."""
        return f"{self.notebook}.html" + (f"#{self.anchor}" if self.anchor else "")

    def link(self, text: Optional[str] = None) -> "Markup":
        """An HTML link to the section, labelled ``text`` (default: :attr:`label`)."""
        return link(self.label if text is None else text, self.href)


class Markup(str):
    """Trusted HTML for :func:`html_table` (plain ``str`` cells are escaped)."""


def link(text: str, href: str) -> Markup:
    """``<a href="href">text</a>`` with the text escaped."""
    return Markup(f"<a href=\"{html.escape(href, quote=True)}\">{html.escape(str(text))}</a>")


def bold(text: str) -> Markup:
    return Markup(f"<b>{html.escape(str(text))}</b>")


def _cell_html(cell) -> str:
    if isinstance(cell, Markup):
        return str(cell)
    if isinstance(cell, Section):
        return str(cell.link())
    if isinstance(cell, (list, tuple)):
        return "<br>".join(_cell_html(c) for c in cell)
    return html.escape(str(cell))


def html_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A plain HTML table, every cell left-aligned: ``str`` cells escaped, :class:`Markup` (:func:`link`,
    :func:`bold`) kept, a :class:`Section` shown as a link to it, a list or tuple as lines."""
    header = list(header)
    rows = [list(r) for r in rows]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"rows: expected {len(header)} cells per row (one per column), got {len(row)} in row {i}")
    style = " style='text-align:left'"
    head = "".join(f"<th{style}>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{style}>{_cell_html(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------------------------- notebooks
def _offline() -> bool:
    return os.environ.get("BNLIB_OFFLINE", "") not in ("", "0")


def _download(name: str, timeout: float = 30.0) -> Path:
    from ..data import cache_dir

    folder = cache_dir() / "book"
    folder.mkdir(parents=True, exist_ok=True)
    url = REPOSITORY_RAW + "chapters/" + name if name != "intro.ipynb" else REPOSITORY_RAW + name
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            out.write(response.read())
        json.loads(Path(tmp).read_text(encoding="utf-8"))  # a notebook, not an error page
        final = folder / name
        os.replace(tmp, final)
        return final
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def find_notebook(notebook: Union[str, os.PathLike]) -> Path:
    """The path of a book notebook given as a path or a name (``"05_internal_covariate_shift"``, with or
    without ``.ipynb``); see the module docstring for where it looks."""
    if not isinstance(notebook, (str, os.PathLike)) or not str(notebook):
        raise TypeError(f"notebook: expected a path or a notebook name such as '05_internal_covariate_shift', "
                        f"got {notebook!r}")
    path = Path(notebook)
    if path.suffix != ".ipynb":
        path = path.with_name(path.name + ".ipynb")
    bare = not path.is_absolute() and len(path.parts) == 1  # a name: searched in the book's folders
    candidates = [path]
    if bare:
        candidates += [Path("chapters") / path, _ROOT / "chapters" / path, _ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(c.parent.resolve()) for c in candidates)
    if not bare:
        raise FileNotFoundError(f"notebook: expected an existing notebook, got {str(notebook)!r} (not found)")
    from ..data import cache_dir

    cached = cache_dir() / "book" / path.name
    if cached.is_file():
        return cached
    if _offline():
        why = "BNLIB_OFFLINE is set, so no download was tried"
    else:
        try:
            return _download(path.name)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            why = f"the download from {REPOSITORY_RAW} failed ({type(exc).__name__}: {exc})"
    raise FileNotFoundError(f"notebook: expected a notebook of the book, got {str(notebook)!r}: not in "
                            f"{searched} or {cached.parent}; {why}")


_CACHE: dict = {}


def _load(notebook) -> tuple:
    """``(name, cells, path)`` of a notebook, read once per version of the file."""
    path = find_notebook(notebook).resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        _CACHE[key] = (path.stem, cells, path)
    return _CACHE[key]


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _cell_index(name: str, cells: list, cell: Cell) -> int:
    if isinstance(cell, bool) or not isinstance(cell, (int, str)):
        raise TypeError(f"cell: expected a cell id (str) or index (int), got {cell!r}")
    if isinstance(cell, int):
        if 0 <= cell < len(cells):
            return cell
    else:
        for i, c in enumerate(cells):
            if c.get("id") == cell:
                return i
    raise ValueError(f"cell: expected a cell id of {name} or an index in [0, {len(cells)}), got {cell!r}")


# ------------------------------------------------------------------------------------------------ glue
def _glue_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def stored_glue(notebook) -> Glued:
    """Every value glued in a notebook's stored outputs, as ``{name: value}`` (:class:`Glued`).

    >>> stored_glue("05_internal_covariate_shift")["ch05_loss_var_ratio"]   # doctest: +SKIP
    '28'
    """
    name, cells, path = _load(notebook)
    values, where = {}, {}
    for i, cell in enumerate(cells):
        for out in cell.get("outputs", []) or []:
            meta = (out.get("metadata") or {}).get("scrapbook")
            if not isinstance(meta, dict) or "name" not in meta:
                continue
            prefix = meta.get("mime_prefix", GLUE_PREFIX)
            data = out.get("data") or {}
            plain = data.get(prefix + "text/plain")
            values[meta["name"]] = _glue_value(_text(plain)) if plain is not None else {
                k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
            where[meta["name"]] = i
    return Glued(name, values, where, path)


# ------------------------------------------------------------------------------------------------ outputs
def stored_output(notebook, cell: Cell, mime: str = "stream") -> str:
    """The stored output of one cell (by id or index): ``mime="stream"`` joins what it printed (stdout),
    another MIME type (``"text/markdown"``, ``"text/html"``, ``"text/plain"``) joins that representation of
    its displayed results (glued values excluded)."""
    name, cells, _ = _load(notebook)
    index = _cell_index(name, cells, cell)
    parts, kinds = [], []
    for out in cells[index].get("outputs", []) or []:
        if (out.get("metadata") or {}).get("scrapbook"):
            continue
        if out.get("output_type") == "stream":
            kinds.append("stream")
            if mime == "stream" and out.get("name") == "stdout":
                parts.append(_text(out.get("text", "")))
        else:
            data = out.get("data") or {}
            kinds.extend(data)
            if mime in data:
                parts.append(_text(data[mime]))
    if not parts:
        raise ValueError(f"mime: expected a kind of output that {name} cell {cell!r} stored "
                         f"(one of {sorted(set(kinds)) or 'none'}), got {mime!r}")
    return ("" if mime == "stream" else "\n").join(parts)


def stored_match(notebook, cell: Cell, pattern: str, mime: str = "stream"):
    """Search one cell's stored output (:func:`stored_output`) for the regular expression ``pattern``: its
    only group as a string, a tuple for several groups, the whole match for none. No match raises
    ``ValueError`` showing the text searched, so a changed output format is reported where it is read."""
    name = _load(notebook)[0]
    text = stored_output(notebook, cell, mime)
    found = re.search(pattern, text, flags=re.MULTILINE)
    if found is None:
        raise ValueError(f"pattern: expected a match in the stored output of {name} cell {cell!r}, got none "
                         f"for {pattern!r} in:\n{text[:2000]}")
    groups = found.groups()
    return found.group(0) if not groups else groups[0] if len(groups) == 1 else groups


# ------------------------------------------------------------------------------------------------ sections
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _headings(source: str) -> list:
    """``(level, text)`` of the Markdown headings of a cell's source, outside code fences."""
    found, fenced = [], False
    for line in source.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            found.append((len(m.group(1)), m.group(2)))
    return found


def _plain(title: str) -> str:
    """A heading as the page shows it, without Markdown and TeX markup."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # [text](url) -> text
    title = re.sub(r"\\([A-Za-z]+)", r"\1", title)  # \gamma -> gamma
    return re.sub(r"[`*$]", "", title).strip()


def section_anchor(title: str) -> str:
    """The HTML id Sphinx gives a section with this heading: docutils' ``make_id`` of its text (lower case,
    runs of other characters turned into one hyphen, leading digits and hyphens dropped): ``"3. Noisy BN"``
    -> ``"noisy-bn"``."""
    text = _plain(title)
    try:
        from docutils.nodes import make_id
    except ImportError:  # the same rule for ASCII text, where docutils is not installed (Colab has it)
        import unicodedata

        ascii_text = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode("ascii")
        slug = re.sub(r"[^a-z0-9]+", "-", " ".join(ascii_text.split()))
        return re.sub(r"^[-0-9]+|-+$", "", slug)
    return make_id(text)


def section_of(notebook, cell: Cell) -> Section:
    """The section a cell (by id or index) belongs to: the last ``##``-or-deeper heading at or before it.
    Before the first one, and when two headings of the page would get the same anchor, the section is the page
    itself (anchor ``""``, title the page's ``#`` title)."""
    name, cells, _ = _load(notebook)
    index = _cell_index(name, cells, cell)
    page_title, current, seen, duplicated = name, None, {}, set()
    for i, c in enumerate(cells):
        if c.get("cell_type") != "markdown":
            continue
        for level, text in _headings(_text(c.get("source", ""))):
            if level == 1:
                page_title = _plain(text)
                continue
            anchor = section_anchor(text)
            if anchor in seen:
                duplicated.add(anchor)
            seen.setdefault(anchor, i)
            if i <= index:
                current = (_plain(text), anchor)
    if current is None or not current[1] or current[1] in duplicated:
        return Section(name, page_title, "")
    return Section(name, current[0], current[1])
