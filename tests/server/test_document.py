"""One document model for both reports: the same tables and figures in report.md and report.html."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora_server.document import (
    Document,
    Figure,
    Table,
    figure_png,
    new_figure,
    to_html,
    to_markdown,
    write_document,
)

PNG = b"\x89PNG\r\n\x1a\nfake"


def _document() -> Document:
    return Document(
        title="Run `r1`",
        intro=("What this is.",),
        blocks=(
            Table(columns=("round", "loss"), rows=(("1", "2.50"), ("2", "2.25")), notes=("mode: **lora**",)),
            Table(title="Privacy", notes=("Goldfish loss: k = 4",)),
            Table(title="Groups", columns=("group", "rate"), rows=(("a|b", "0.1"),), align=(None, "right")),
            Figure("loss per round", "loss.png", PNG),
        ),
    )


def test_markdown_has_titled_sections_pipe_tables_and_linked_figures() -> None:
    markdown = to_markdown(_document())

    assert markdown.startswith("# Run `r1`\n\nWhat this is.\n\n- mode: **lora**\n\n| round | loss |\n|---|---|\n")
    assert "| 2 | 2.25 |\n\n## Privacy\n\n- Goldfish loss: k = 4\n\n## Groups\n\n" in markdown
    assert "|---|---:|\n| a\\|b | 0.1 |" in markdown  # a pipe in a cell does not split it
    assert markdown.endswith("\n\n![loss per round](loss.png)\n")


def test_html_renders_the_same_tables_and_embeds_the_figures() -> None:
    page = to_html(_document())

    assert page.count("<table>") == 2
    assert "<td>2.25</td>" in page
    assert "<td>a|b</td>" in page
    assert "<h2>Privacy</h2>" in page
    assert page.count("data:image/png;base64,") == 1
    assert "loss.png" not in page


def test_write_document_writes_markdown_html_and_the_pngs(tmp_path: Path) -> None:
    written = write_document(_document(), tmp_path)

    assert {p.name for p in written} == {"loss.png", "report.md", "report.html"}
    assert (tmp_path / "loss.png").read_bytes() == PNG


def test_a_row_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rows\.0: 1 cells for 2 columns"):
        Table(columns=("a", "b"), rows=(("1",),))


def test_figures_render_to_png_without_pyplot() -> None:
    fig = new_figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])

    assert figure_png(fig).startswith(b"\x89PNG")
