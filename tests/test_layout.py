"""Test modules share helpers through ``tests/helpers.py`` only: none imports another test module or conftest."""

from __future__ import annotations

import ast
import contextlib
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(source: str) -> set[str]:
    """Every module ``source`` imports at any depth (inside functions too, and in the scripts that tests hand to a
    subprocess as string constants), as dotted names; ``from tests import x`` counts as ``tests.x``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(filter(None, ["tests" if node.level else "", node.module or ""]))
            names.add(module)
            if module == "tests":
                names.update(f"tests.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
            with contextlib.suppress(SyntaxError):
                names |= imported_modules(node.value)
    return names


def forbidden(name: str) -> bool:
    """Whether ``name`` is a test module or conftest, which no other module may import."""
    parts = name.split(".")
    return parts[0] == "tests" and len(parts) > 1 and (parts[1].startswith("test_") or parts[1] == "conftest")


def test_no_test_module_imports_another_or_conftest():
    modules = [*sorted(TESTS.glob("test_*.py")), TESTS / "conftest.py", TESTS / "helpers.py"]
    offenders = {path.name: sorted(filter(forbidden, imported_modules(path.read_text()))) for path in modules}
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"import shared helpers from tests/helpers.py instead: {offenders}"


def test_the_check_sees_imports_inside_functions_and_scripts():
    probe = (  # spelt "IMPORT" here so that this module itself passes the check above
        "def f():\n    from tests.test_other IMPORT thing\n\n"
        'SCRIPT = """\n    IMPORT sys\n    from tests.conftest IMPORT x\n"""\n'
        "IMPORT tests.test_third\nfrom tests IMPORT test_fourth, helpers\nfrom . IMPORT test_fifth\n"
    ).replace("IMPORT", "import")
    found = sorted(filter(forbidden, imported_modules(probe)))
    assert found == ["tests.conftest", "tests.test_fifth", "tests.test_fourth", "tests.test_other", "tests.test_third"]
