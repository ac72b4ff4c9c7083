"""Text from a store or a manifest (expert names, splits, protocols, captions) made safe for the renderer it reaches.

Such text is data: an expert name follows the name rule (``manifests.names``) but still may hold ``$``, ``<`` or
``|``. matplotlib reads a ``$`` as the start of mathtext (``ann$\\frac{$x`` crashes its parser), and Markdown passes
HTML through and splits table cells at ``|`` (the caption report's ``report.md`` is published as a Prefect Markdown
artifact). The HTML pages escape with :func:`html.escape`.
"""

from __future__ import annotations

import re

import pandas as pd

# Characters with a meaning in Markdown inline text and tables (HTML's are escaped as entities first).
_MARKDOWN = re.compile(r"([\\`*_\[\]|#])")


def for_matplotlib(text: object) -> str:
    """``text`` as matplotlib draws it, character for character: every ``$`` escaped, so no mathtext is parsed."""
    return str(text).replace("$", r"\$")


def markdown_text(text: object) -> str:
    """``text`` as Markdown shows it literally, on one line: ``&`` and ``<`` as entities (so no HTML tag or entity
    is read; ``>`` alone opens nothing and stays, as in ``similarity >= tau``), Markdown's marks backslash-escaped."""
    one_line = " ".join(str(text).split())
    return _MARKDOWN.sub(r"\\\1", one_line.replace("&", "&amp;").replace("<", "&lt;"))


def markdown_table(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table (no index) whose text cells and column names show literally."""
    cells = frame.rename(columns=markdown_text).map(
        lambda value: markdown_text(value) if isinstance(value, str) else value
    )
    return cells.to_markdown(index=False)
