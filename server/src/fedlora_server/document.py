"""Report documents: titled tables with notes, and figures, rendered to markdown and to HTML.

The coordinator's run report and the lab's experiment report are both a ``Document``. The
markdown is the contract readers see (report.md); the HTML is the `markdown` library's rendering
of that same text (tables extension, raw HTML escaped rather than passed through), with each
figure embedded as a PNG data URI, so the two documents never say different things.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import markdown

from fedlora_common.files import atomic_write

__all__ = [
    "Align",
    "Document",
    "Figure",
    "Table",
    "figure_png",
    "markdown_to_html",
    "new_figure",
    "to_html",
    "to_markdown",
    "write_document",
]

Align = Literal["left", "right", "center"] | None
"""A column's alignment; None leaves it to the reader (plain ``---``)."""

_MARKERS: Final[dict[Align, str]] = {None: "---", "left": ":---", "right": "---:", "center": ":---:"}
_STYLE: Final = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto}"
    "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:.2em .6em}"
    "img{max-width:100%}"
)


@dataclass(frozen=True)
class Table:
    """A section: an optional title, notes (bullets) under it, then the table (cells already formatted).

    A table without columns is a section of notes only.
    """

    title: str | None = None
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    notes: tuple[str, ...] = ()
    align: tuple[Align, ...] = ()

    def __post_init__(self) -> None:
        for index, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"rows.{index}: {len(row)} cells for {len(self.columns)} columns")
        if self.align and len(self.align) != len(self.columns):
            raise ValueError(f"align: {len(self.align)} alignments for {len(self.columns)} columns")


@dataclass(frozen=True)
class Figure:
    """A plot: linked by file name from the markdown, embedded in the HTML."""

    caption: str
    file: str
    png: bytes


@dataclass(frozen=True)
class Document:
    """A title, introductory paragraphs (markdown), then tables and figures in reading order."""

    title: str
    intro: tuple[str, ...] = ()
    blocks: tuple[Table | Figure, ...] = ()


def _cells(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _table_markdown(table: Table) -> str:
    parts = [f"## {table.title}"] if table.title else []
    if table.notes:
        parts.append("\n".join(f"- {note}" for note in table.notes))
    if table.columns:
        align = table.align or (None,) * len(table.columns)
        lines = [_cells(table.columns), "|" + "".join(f"{_MARKERS[a]}|" for a in align)]
        parts.append("\n".join([*lines, *(_cells(row) for row in table.rows)]))
    return "\n\n".join(parts)


def _markdown(document: Document, source: Callable[[Figure], str]) -> str:
    blocks = [f"# {document.title}", *document.intro]
    for block in document.blocks:
        blocks.append(_table_markdown(block) if isinstance(block, Table) else f"![{block.caption}]({source(block)})")
    return "\n\n".join(blocks) + "\n"


def to_markdown(document: Document) -> str:
    """The document as markdown; figures are linked by their file names (written beside it)."""
    return _markdown(document, lambda figure: figure.file)


def markdown_to_html(text: str) -> str:
    """Markdown (with pipe tables) as an HTML fragment; raw HTML in the text is escaped, never passed through."""
    converter = markdown.Markdown(extensions=["tables"])
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    html: str = converter.convert(text)
    return html


def to_html(document: Document) -> str:
    """A standalone page: the markdown rendered, each figure embedded as a PNG data URI."""
    body = markdown_to_html(
        _markdown(document, lambda figure: "data:image/png;base64," + base64.b64encode(figure.png).decode())
    )
    title = html.escape(document.title.replace("`", ""))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib figure on the Agg canvas, made without pyplot: no backend switch, no global figure registry."""
    from matplotlib.figure import Figure as MatplotlibFigure

    return MatplotlibFigure(**kwargs)


def figure_png(fig: Any) -> bytes:
    """Render a matplotlib figure to PNG bytes."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_document(document: Document, out_dir: Path, *, name: str = "report") -> list[Path]:
    """Write each figure's PNG, ``<name>.md`` and ``<name>.html`` into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {b.file: b.png for b in document.blocks if isinstance(b, Figure)}
    files[f"{name}.md"] = to_markdown(document).encode()
    files[f"{name}.html"] = to_html(document).encode()
    written = []
    for file, data in files.items():
        atomic_write(out_dir / file, data)
        written.append(out_dir / file)
    return written
