"""report.html renders the report's markdown as real HTML: tables, headings, escaped text."""

from __future__ import annotations

from fedlora_server.report import markdown_to_html


def test_pipe_tables_become_html_tables_with_a_row_per_line() -> None:
    markdown = "# Run `r<1>`\n\n- mode: **lora**\n\n| round | epsilon |\n|---:|---:|\n| 1 | 2.5 |\n| 2 | 3.1 |\n"

    page = markdown_to_html(markdown)

    assert page.count("<table>") == 1
    assert page.count("<tr>") == 3  # header + two rounds; the |---:| line is not a row
    assert "<th>epsilon</th>" in page
    assert "<td>3.1</td>" in page
    assert "<h1>Run <code>r&lt;1&gt;</code></h1>" in page
    assert "<b>lora</b>" in page
    assert "|" not in page
