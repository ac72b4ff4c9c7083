"""The project's import graph: no cycle between modules, and the layering of DESIGN.md.

``manifests`` imports no other project package; ``caption_pipeline`` imports only ``manifests``; ``segmenter``
imports ``manifests`` and, from ``segmenter.text`` only, the leaf ``caption_pipeline.clip_models`` (which imports
nothing of the project but ``manifests.errors``); ``flows`` may import all of them. Imports inside functions count.

Inside ``segmenter``, the rooms follow the stages a tile goes through: ``data`` -> ``text`` -> ``model`` -> ``engine``
-> ``cli``. A room imports itself and the rooms before it (the data room no other room, the engine data, text and
model, the CLI all of them); no module sits loose beside the rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("manifests", "caption_pipeline", "segmenter", "flows")
CLIP_LEAF = "caption_pipeline.clip_models"
SEGMENTER_ROOMS = ("data", "text", "model", "engine", "cli")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the project packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` imports anywhere in its source (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up from this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*anchor, base]))
            # "from a import b" imports the module a.b when there is one, else the name b of module a
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "import a.b.c" of an object path: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the modules along it (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def segmenter_room(module: str) -> str | None:
    """The room of a ``segmenter`` module (``segmenter.engine.train`` -> ``engine``); None for a module outside them."""
    parts = module.split(".")
    return parts[1] if parts[0] == "segmenter" and len(parts) > 1 and parts[1] in SEGMENTER_ROOMS else None


def room_allows(source: str, target: str) -> bool:
    """Whether segmenter module ``source`` may import segmenter module ``target``: its own room or one before."""
    source_room, target_room = segmenter_room(source), segmenter_room(target)
    if source_room is None or target_room is None:
        return False  # the package's __init__ imports no room, and nothing imports it
    return SEGMENTER_ROOMS.index(target_room) <= SEGMENTER_ROOMS.index(source_room)


def allowed(source: str, target: str) -> bool:
    """Whether module ``source`` may import module ``target`` (both of the project)."""
    top, target_top = source.split(".")[0], target.split(".")[0]
    if top == target_top == "segmenter":
        return room_allows(source, target)
    if top == target_top and source != CLIP_LEAF:
        return True
    if source == CLIP_LEAF:
        return target == "manifests.errors"
    if top == "flows":
        return True
    if top == "caption_pipeline":
        return target_top == "manifests"
    if top == "segmenter":
        return target_top == "manifests" or (target == CLIP_LEAF and source.startswith("segmenter.text"))
    return False  # manifests imports nothing else of the project


def violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{source} imports {target}" for source, targets in sorted(graph.items())
            for target in sorted(targets) if not allowed(source, target)]  # fmt: skip


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    if cycle:
        print("import cycle:", " -> ".join(cycle))
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_packages_import_only_the_layers_below():
    found = violations(import_graph())
    print("\n".join(found))
    assert not found, "layering violations (DESIGN.md):\n" + "\n".join(found)


def test_every_segmenter_module_is_in_a_room():
    loose = [name for name in project_modules() if name.startswith("segmenter.") and segmenter_room(name) is None]
    assert not loose, f"modules outside the rooms {SEGMENTER_ROOMS}: {loose}"


def test_the_room_checks_see_an_import_against_the_stages():
    graph = {
        "segmenter.data.prepare": {"segmenter.data.tiling", "segmenter.text.features"},
        "segmenter.text.features": {"segmenter.data.samples", "segmenter.engine.runs"},
        "segmenter.model.segmenter": {"segmenter.text.cache", "segmenter.cli"},
        "segmenter.engine.train": {"segmenter.data.samples", "segmenter.model", "segmenter.engine.runs"},
        "segmenter.cli.engine": {"segmenter.engine.train", "segmenter.data.prepare"},
        "segmenter.loose": {"segmenter.data.tiling"},
    }
    assert violations(graph) == [
        "segmenter.data.prepare imports segmenter.text.features",
        "segmenter.loose imports segmenter.data.tiling",
        "segmenter.model.segmenter imports segmenter.cli",
        "segmenter.text.features imports segmenter.engine.runs",
    ]


def test_the_checks_see_a_cycle_in_a_function_and_a_violation():
    graph = {"flows.a": {"flows.b"}, "flows.b": {"flows.c"}, "flows.c": {"flows.a"}, "flows.d": set()}
    assert find_cycle(graph) == ["flows.a", "flows.b", "flows.c", "flows.a"]
    assert find_cycle({"flows.a": {"flows.b"}, "flows.b": set()}) is None
    graph = {"manifests.x": {"segmenter.y"}, "segmenter.model": {CLIP_LEAF}, "segmenter.text.e": {CLIP_LEAF},
             CLIP_LEAF: {"manifests.errors", "caption_pipeline.gate"}}  # fmt: skip
    assert violations(graph) == [
        f"{CLIP_LEAF} imports caption_pipeline.gate",
        "manifests.x imports segmenter.y",
        f"segmenter.model imports {CLIP_LEAF}",
    ]
    modules = project_modules()
    assert "flows.demo" in imports_of("flows.cli", modules["flows.cli"], modules)  # imported inside a function
