from pathlib import Path

import pytest

from manifests.errors import InputError
from manifests.run_manifest import PromptConfig, load_manifest, packaged_manifests


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
        prompts = manifest.captions.prompts  # runnable without predictions: no class information in test prompts
        assert prompts.protocol == "custom" and prompts.predictions is None
        assert (prompts.source_for("train"), prompts.source_for("test")) == ("labels", "none")
    demo = load_manifest("demo")
    assert demo.dataset.tile_prefix == "demo"
    assert [expert.backend for expert in demo.captions.experts] == ["annotation", "transformers", "transformers"]
    prompts = demo.captions.prompts
    assert prompts.protocol == "predicted"
    assert prompts.predictions == Path("data/demo/predictions/class_predictions.parquet")
    assert (prompts.source_for("train"), prompts.source_for("test")) == ("labels", "predictions")
    models = [expert for expert in demo.captions.experts if expert.backend != "annotation"]
    assert all(expert.temperature == 0 and expert.reprompt_temperature == 0.7 for expert in models)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
dataset: {name: vaihingen, root: data/v}
tiling: {size: 64, out: data/t}
"""


def with_prompts(prompts: str) -> str:
    """BASE with a captions section whose ``prompts`` mapping holds ``prompts``."""
    return BASE + "captions: {store: s, experts: [{name: a, backend: annotation}], prompts: {" + prompts + "}}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "colour: red\n", r"unknown key 'colour'"),
        (BASE.replace("size: 64", "size: big"), r"key 'tiling.size': .*valid integer.*got 'big'"),
        (BASE.replace("size: 64", "size: 4"), r"key 'tiling.size': .*greater than or equal to 16"),
        (
            BASE.replace("name: vaihingen", "name: vaihinge"),
            r"key 'dataset.name': unknown dataset 'vaihinge' \(expected one of vaihingen,",
        ),
        ("name: t\ndataset: {name: vaihingen, root: x}\n", r"missing key 'tiling'"),
        (
            BASE + "captions: {store: s, experts: [{name: a, backend: openai, model: m}]}\n",
            r"missing key 'captions.experts.0.base_url' \(backend 'openai' needs it\)$",
        ),
        (
            BASE + "captions: {store: s, experts: [{name: a, backend: ollama, model: m}]}\n",
            r"key 'captions.experts.0.backend': unknown backend 'ollama' \(expected one of annotation, synthetic, "
            r"openai, vllm, transformers\)$",
        ),
        (BASE + "captions: {store: s, experts: [{name: a, model: m}]}\n", r"missing key 'captions.experts.0.backend'"),
        (
            BASE + "captions: {store: s, experts: [{name: a, backend: openai, model: m, base_url: u, "
            "gpu_memory_utilization: 0.4}]}\n",
            r"key 'captions.experts.0.gpu_memory_utilization' is not a setting of backend 'openai' \(its settings: ",
        ),
        (
            BASE + "captions: {store: s, experts: [{name: a, backend: vllm, model: m, concurrency: 4}]}\n",
            r"key 'captions.experts.0.concurrency' is not a setting of backend 'vllm'",
        ),
        (
            BASE + "captions: {store: s, experts: [{name: a, backend: annotation, temperature: 0.7}]}\n",
            r"key 'captions.experts.0.temperature' is not a setting of backend 'annotation' \(its settings: "
            r"backend, name\)$",
        ),
        (
            BASE + "captions: {store: s, experts: [{name: a, backend: openai, model: m, base_url: u, "
            "batch_size: 2, dtype: bf16}]}\n",
            r"'captions.experts.0.batch_size' is not .*; key 'captions.experts.0.dtype' is not",
        ),
        (
            "name: x\ndataset: {name: vaihingen, root: r, coarse: false}\ntiling: {out: t}\n",
            r"key 'dataset.coarse' is not a setting of dataset 'vaihingen' \(its settings: custom_splits, id, "
            r"ignore_index, labels, name, root, split\)$",
        ),
        (
            "name: x\ndataset: {name: potsdam, root: r, classes: []}\ntiling: {out: t}\n",
            r"key 'dataset.classes' is not a setting of dataset 'potsdam'",
        ),
        (
            "name: x\ndataset: {name: isaid, root: r}\ntiling: {out: t}\n",
            r"key 'dataset.name': unknown dataset 'isaid' \(expected one of vaihingen, potsdam, syndrone, loveda, "
            r"folder\)$",
        ),
        ("name: x\ndataset: {name: folder, root: r}\ntiling: {out: t}\n", r"missing key 'dataset.classes' \(dataset "),
        (
            "name: x\ndataset: {name: vaihingen, root: r, split: custom}\ntiling: {out: t}\n",
            r"dataset: split 'custom' needs custom_splits",
        ),
        (
            BASE + "captions: {store: s, experts: [{name: a, backend: annotation}, {name: a, backend: annotation}]}\n",
            r"captions: expert names must be unique, got \['a', 'a'\]$",
        ),
        (BASE + "captions: {store: s, tau: high, experts: []}\n", r"key 'captions.tau'"),
        (
            with_prompts("protocol: predicted, class_source: {test: none}, predictions: p"),
            r"'predicted' and .*both set",
        ),
        (
            with_prompts("protocol: oracle, class_source: {train: labels}"),
            r"'oracle' and captions.prompts.class_source",
        ),
        (with_prompts("protocol: predicted"), r"'predicted' needs captions.prompts.predictions"),
        (with_prompts("class_source: {test: predictions}"), r"'predictions' needs captions.prompts.predictions"),
        (with_prompts("protocol: sneaky"), r"key 'captions.prompts.protocol': .*'blind' or 'custom'.*got 'sneaky'"),
        (with_prompts("protocol: blind, allow_labels_on_eval: true"), r"allow_labels_on_eval has no effect"),
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
    with pytest.raises(InputError, match=r"manifest no-such-run: no packaged manifest of that name \(demo, "):
        load_manifest("no-such-run")


@pytest.mark.parametrize(
    ("prompts", "expected"),
    [
        ({"protocol": "oracle"}, {"train": "labels", "test": "labels", "val": "labels", "new": "labels"}),
        ({"protocol": "predicted", "predictions": "p.parquet"},
         {"train": "labels", "test": "predictions", "val": "predictions", "new": "predictions"}),
        ({"protocol": "blind"}, {"train": "none", "test": "none", "val": "none", "new": "none"}),
        ({}, {"train": "labels", "test": "none", "val": "none", "new": "none"}),
        ({"class_source": {"train": "labels", "new": "predictions"}, "predictions": "p.parquet"},
         {"train": "labels", "test": "none", "new": "predictions"}),
    ],
)  # fmt: skip
def test_protocols_resolve_the_class_source_of_every_split(prompts, expected):
    config = PromptConfig(**prompts)
    assert {split: config.source_for(split) for split in expected} == expected


def test_only_oracle_or_an_explicit_opt_in_puts_labels_on_evaluation_splits():
    leaky = PromptConfig(class_source={"train": "labels", "test": "labels"})
    with pytest.raises(InputError, match=r"'test' is an evaluation split.*use protocol predicted"):
        leaky.source_for("test")
    assert leaky.model_copy(update={"allow_labels_on_eval": True}).source_for("test") == "labels"
    assert PromptConfig(protocol="oracle").source_for("test") == "labels"  # oracle is itself the opt-in


BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\nname: *i\n"
)
FOLDER = "name: x\ntiling: {out: t}\ndataset: {name: folder, root: r, classes: [%s]}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BOMB, r"not valid YAML at line \d+: more than 64 aliases$"),
        ("a: " + "[" * 40 + "]" * 40 + "\n", r"not valid YAML at line 1: nested deeper than 32 levels$"),
        (BASE + "name: again\n", r"not valid YAML at line \d+: key 'name' given twice$"),
        (
            FOLDER % "{name: water, color: [300, 0, 0]}",
            r"key 'dataset.classes.0.color.0': input should be less than or",
        ),
        (
            FOLDER % "{name: water, color: [0, 0, 255]}, {name: water, color: [0, 255, 0]}",
            r"dataset: classes: name water given to more than one class$",
        ),
        (
            FOLDER % "{name: water, color: [0, 0, 255]}, {name: lake, color: [0, 0, 255]}",
            r"dataset: classes: color \(0, 0, 255\) given to more than one class$",
        ),
        (BASE + "captions: {store: s, tau: '" + "x" * 5000 + "', experts: []}\n", r"\.\.\. \(5002 characters\)\)$"),
    ],
)
def test_hostile_or_contradictory_yaml_is_refused_in_one_short_line(tmp_path, text, message):
    with pytest.raises(InputError, match=message) as info:
        load_manifest(_write(tmp_path, text))
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


def test_a_manifest_that_is_not_utf8_or_too_large_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte \d+\)$"):
        load_manifest(path)
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(InputError, match=r"over 1 MiB"):
        load_manifest(path)


def test_a_packaged_name_is_the_packaged_manifest_even_beside_a_folder_of_that_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # what `make demo` leaves under data/ is often copied up as ./demo
    assert load_manifest("demo").source == packaged_manifests()["demo"]
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and str(packaged_manifests()["demo"]) in note[0] and "./demo" in note[0]
    demo_text = packaged_manifests()["demo"].read_text()
    (tmp_path / "mine").write_text(demo_text.replace("name: demo", "name: mine", 1))
    with pytest.raises(InputError, match=r"manifest mine: no packaged manifest of that name .* pass ./mine"):
        load_manifest("mine")
    assert load_manifest("./mine").name == "mine"  # a separator makes it a path
    (tmp_path / "demo.yaml").write_text(demo_text.replace("name: demo", "name: local", 1))
    assert load_manifest("demo.yaml").name == "local"  # so does a YAML suffix
    with pytest.raises(InputError, match=r"manifest other.yml: file not found"):
        load_manifest("other.yml")
