from pathlib import Path

import pytest

from manifests.errors import InputError
from manifests.run_manifest import load_manifest, packaged_manifests


def test_packaged_manifests_parse_as_the_paper_ran():
    assert {"demo", "vaihingen", "potsdam", "syndrone"} <= set(packaged_manifests())
    for name in ("vaihingen", "potsdam", "syndrone"):
        manifest = load_manifest(name)
        assert manifest.tiling.size == 512 and manifest.tiling.effective_stride == 512
        assert manifest.captions.tau == 0.55
        assert manifest.captions.clip.model.startswith("ViT-B")
        models = {expert.model for expert in manifest.captions.experts}
        assert models == {"llava-hf/llava-1.5-7b-hf", "gpt-4o", "Qwen/Qwen2.5-VL-3B-Instruct"}
        assert manifest.dataset.split == "mpers"
        assert len(manifest.sha256) == 64
    demo = load_manifest("demo")
    assert demo.dataset.tile_prefix == "demo"
    assert [expert.backend for expert in demo.captions.experts] == ["annotation", "transformers", "transformers"]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
dataset: {name: vaihingen, root: data/v}
tiling: {size: 64, out: data/t}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "colour: red\n", r"unknown key 'colour'"),
        (BASE.replace("size: 64", "size: big"), r"key 'tiling.size': .*valid integer.*got 'big'"),
        (BASE.replace("size: 64", "size: 4"), r"key 'tiling.size': .*greater than or equal to 16"),
        (BASE.replace("name: vaihingen", "name: vaihinge"), r"key 'dataset.name': .*'vaihingen'.*got 'vaihinge'"),
        ("name: t\ndataset: {name: vaihingen, root: x}\n", r"missing key 'tiling'"),
        (BASE + "captions: {store: s, experts: [{name: a, backend: openai, model: m}]}\n", r"needs a base_url"),
        (BASE + "captions: {store: s, tau: high, experts: []}\n", r"key 'captions.tau'"),
        ("name: [unclosed\n", r"not valid YAML at line \d"),
        ("- a list\n", r"expected a mapping"),
    ],
)
def test_malformed_manifest_gives_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(InputError, match=message) as info:
        load_manifest(_write(tmp_path, text))
    assert "\n" not in str(info.value)
    assert str(tmp_path / "run.yaml") in str(info.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(InputError, match=r"manifest .*nope.yaml: file not found"):
        load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match=r"neither a YAML file nor a packaged manifest"):
        load_manifest("no-such-run")
