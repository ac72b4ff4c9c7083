"""Functions of at most 60 lines, from ``def`` to their last line (decorators and docstrings counted).

ruff keeps the other two limits of the project's style (complexity, ``C901``; arguments, ``PLR0913``); no ruff rule
counts lines, so this test does. It covers every package of the project and the bench scripts.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
CHECKED = ("manifests", "caption_pipeline", "segmenter", "flows", "bench")


def long_functions(source: str, name: str, limit: int = MAX_LINES) -> list[str]:
    """``name:line function (N lines)`` for each function of ``source`` longer than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_60_lines():
    files = [path for item in CHECKED for path in ((ROOT / item).rglob("*.py") if (ROOT / item).is_dir()
                                                    else [ROOT / item])]  # fmt: skip
    found = [line for path in sorted(files) for line in long_functions(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "functions over 60 lines:\n" + "\n".join(found)


def test_the_count_sees_a_long_function_and_a_method():
    body = "".join(f"    x = {i}\n" for i in range(60))
    method = body.replace("    ", "        ")
    source = f"def short():\n    pass\n\n\ndef long():\n{body}\n\nclass A:\n    def method(self):\n{method}"
    assert long_functions(source, "m.py") == ["m.py:5 long (61 lines)", "m.py:69 method (61 lines)"]
    assert long_functions(source, "m.py", limit=61) == []
