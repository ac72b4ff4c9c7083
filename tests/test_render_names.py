"""Names that reach a renderer are safe: an expert name from a store written by another tool reaches matplotlib and
Markdown literally (no mathtext, no raw HTML, no broken table), and the HTML pages escape it."""

from __future__ import annotations

import re

from flows.escaping import for_matplotlib, markdown_table, markdown_text
from flows.report import write_report
from manifests.caption_store import write_fragment
from tests.helpers import META, row

MATH = "ann$\\frac{$x"
HTML = "<img src=x onerror=alert(1)>|x"


def test_expert_names_from_a_store_render_literally_in_plots_markdown_and_html(tmp_path):
    store = tmp_path / "store"
    write_fragment(store, [row("t1", expert=MATH), row("t2", expert=HTML, similarity=0.4)], META)
    path, _ = write_report(store, tmp_path / "report")  # matplotlib drew both names into the legends
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "<img" not in markdown and "&lt;img src=x onerror=alert(1)>\\|x" in markdown
    assert "ann$\\\\frac{$x" in markdown  # the backslash shown, not read as Markdown's escape
    tables = re.findall(r"(?:^\|.*\n?)+", markdown, flags=re.MULTILINE)
    for table in tables:  # every row of a table has its header's cells: the name's "|" splits none
        assert len({len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}) == 1, table
    assert any("onerror" in table for table in tables)
    for page in (path, path.parent / "captions.html"):
        assert "<img src=x" not in page.read_text()


def test_the_escapes_keep_the_text():
    assert for_matplotlib(MATH) == "ann\\$\\frac{\\$x"
    assert markdown_text("a_b *c* [d](e) `f` #g") == "a\\_b \\*c\\* \\[d\\](e) \\`f\\` \\#g"
    assert markdown_text("two\nlines") == "two lines"
    import pandas as pd

    table = markdown_table(pd.DataFrame({"expert<": ["x|y"], "n": [3]}))
    assert "expert&lt;" in table and "x\\|y" in table and table.endswith("3 |")
    assert markdown_text("a >= b & c") == "a >= b &amp; c"  # '>' opens no tag: the gate summary's '>=' stays
