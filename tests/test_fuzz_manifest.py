"""Fuzz of the manifest loader: whatever a file holds (random text or bytes, random YAML structures, the shipped
manifests with a value replaced, a key dropped or added, or a span of text overwritten), ``load_manifest`` returns
a manifest or raises its documented ``InputError`` with one line. Anything else (a TypeError, a RecursionError, a
pydantic or YAML exception) is a traceback a user would see, and fails here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from manifests.errors import InputError
from manifests.run_manifest import RunManifest, load_manifest, packaged_manifests

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PACKAGED = {name: yaml.safe_load(path.read_text()) for name, path in sorted(packaged_manifests().items())}
PACKAGED_TEXT = {name: path.read_text() for name, path in sorted(packaged_manifests().items())}

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["", "~", "auto", "cpu", "openai", "vaihingen", "/nonexistent", "..", "-1", "1e400", "0x10"])
)
keys = st.text(max_size=12) | st.integers() | st.booleans() | st.none()
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=16,
)


@pytest.fixture(scope="module")
def manifest_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "manifest.yaml"


def check_loads_or_refuses(path: Path) -> None:
    """The property: a manifest, or an InputError of one line that names the file."""
    try:
        manifest = load_manifest(path)
    except InputError as exc:
        message = str(exc)
        assert "\n" not in message and message, repr(message)
        assert str(path) in message, message
    else:
        assert isinstance(manifest, RunManifest)


def containers(tree: Any, path: tuple = ()) -> list[tuple]:
    """The paths of every mapping and list in a YAML tree (the root included)."""
    found = [path] if isinstance(tree, (dict, list)) else []
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, child in children:
        found += containers(child, (*path, key))
    return found


def at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@FUZZ
@given(text=st.text(max_size=400))
@example(text="? [a, b]\n: 1\n")  # a key YAML cannot hash
@example(text="a: &x [*x]\n")  # an alias to its own anchor
@example(text="name: !!python/object:os.system ls\n")  # a tag the safe loader refuses
@example(text="name: [" * 40)
@example(text="- 1\n- 2\n")
@example(text='name: t\n"a\\nb": 1\n')  # a key with a newline, named in the one line
def test_random_text(manifest_file, text):
    manifest_file.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_loads_or_refuses(manifest_file)


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"\xff\xfe\x00n\x00a\x00m\x00e")
@example(data=b"name: t\x00\n")
def test_random_bytes(manifest_file, data):
    manifest_file.write_bytes(data)
    check_loads_or_refuses(manifest_file)


@FUZZ
@given(tree=values)
def test_random_yaml_structures(manifest_file, tree):
    manifest_file.write_text(yaml.safe_dump(tree, allow_unicode=True))
    check_loads_or_refuses(manifest_file)


@FUZZ
@given(name=st.sampled_from(sorted(PACKAGED)), data=st.data())
def test_shipped_manifests_with_one_value_changed(manifest_file, name, data):
    tree = copy.deepcopy(PACKAGED[name])
    path = data.draw(st.sampled_from(containers(tree)), label="container")
    holder = at(tree, path)
    action = data.draw(st.sampled_from(["replace", "drop", "add"]), label="action")
    if isinstance(holder, dict):
        key = data.draw(st.sampled_from(sorted(holder, key=str)) if holder and action != "add" else keys, label="key")
    else:
        key = data.draw(st.integers(0, len(holder) - 1) if holder and action != "add" else st.just(None), label="key")
    if action == "drop" and key in (holder if isinstance(holder, dict) else range(len(holder))):
        del holder[key]
    elif isinstance(holder, list) and key is None:
        holder.append(data.draw(values, label="value"))
    else:
        holder[key] = data.draw(values, label="value")
    manifest_file.write_text(yaml.safe_dump(tree, allow_unicode=True))
    check_loads_or_refuses(manifest_file)


@FUZZ
@given(name=st.sampled_from(sorted(PACKAGED_TEXT)), data=st.data())
def test_shipped_manifests_with_a_span_of_text_overwritten(manifest_file, name, data):
    text = PACKAGED_TEXT[name]
    start = data.draw(st.integers(0, len(text)), label="start")
    end = data.draw(st.integers(start, min(len(text), start + 40)), label="end")
    filler = data.draw(st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#%@`, \n\tab01.~")), max_size=12))
    manifest_file.write_text(text[:start] + filler + text[end:])
    check_loads_or_refuses(manifest_file)


def test_the_shipped_manifests_load(manifest_file):
    """The seeds of the mutations are valid, so the mutated ones test the refusals, not a broken start."""
    for name, text in PACKAGED_TEXT.items():
        manifest_file.write_text(text)
        assert load_manifest(manifest_file).name, name
