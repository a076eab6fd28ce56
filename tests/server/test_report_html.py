"""report.html renders the report's markdown as real HTML: tables, headings, escaped text."""

from __future__ import annotations

from fedlora_server.document import markdown_to_html


def test_pipe_tables_become_html_tables_with_a_row_per_line() -> None:
    markdown = "# Run `r<1>`\n\n- mode: **lora**\n\n| round | epsilon |\n|---:|---:|\n| 1 | 2.5 |\n| 2 | 3.1 |\n"

    page = markdown_to_html(markdown)

    assert page.count("<table>") == 1
    assert page.count("<tr>") == 3  # header + two rounds; the |---:| line is not a row
    assert ">epsilon</th>" in page  # the markdown library writes the column's alignment on each cell
    assert ">3.1</td>" in page
    assert "<h1>Run <code>r&lt;1&gt;</code></h1>" in page
    assert "<strong>lora</strong>" in page
    assert "|" not in page


def test_raw_html_in_the_text_is_escaped_not_passed_through() -> None:
    page = markdown_to_html("- failed: <script>alert(1)</script> & more\n")

    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "&amp; more" in page
