"""Prompts, the transformers / annotation / vllm backends, CLIP scoring and the tau gate."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from caption_pipeline.experts import build_expert
from caption_pipeline.experts.annotation import describe_label
from caption_pipeline.experts.base import CaptionRequest, CaptionResult, load_image
from caption_pipeline.gate import GateSettings, Resume, RunInfo, caption_tiles, tile_tasks
from caption_pipeline.policy import GatePolicy
from caption_pipeline.prompts import TileClasses, build_prompt, readable
from caption_pipeline.scoring import ClipScorer
from manifests.caption_store import StoreMeta, read_store, selected_captions, write_fragment
from manifests.class_predictions import write_class_predictions
from manifests.errors import InputError
from manifests.run_manifest import (
    AnnotationExpertConfig,
    OpenAIExpertConfig,
    PromptConfig,
    TransformersExpertConfig,
)
from segmenter.data.datasets import Vaihingen
from tests.helpers import SECRET, ChatServer, serving, write_predictions

CLASSES = TileClasses("labels", {"building": 0.5, "low_vegetation": 0.3, "car": 0.2, "tree": 0.0})


def test_prompt_templates():
    assert build_prompt("p1", CLASSES).startswith(
        "This image contains the following land cover types: building, low vegetation, car."
    )
    assert "building (50%), low vegetation (30%), car (20%)" in build_prompt("p2", CLASSES)
    assert "location and spatial relationships" in build_prompt("p3", CLASSES)
    refined = build_prompt("p3", CLASSES, attempt=1)
    assert "building (50%)" in refined and "number of objects" in refined
    agnostic = build_prompt("p1", TileClasses("none", {}))
    assert agnostic.startswith("Which land cover types") and "building" not in agnostic
    assert build_prompt("p1", CLASSES, override="Classes: {classes}.") == "Classes: building, low vegetation, car."


@pytest.mark.parametrize("classes", [CLASSES, TileClasses("none", {})], ids=["classes", "blind"])
@pytest.mark.parametrize("override", [None, "Describe: {classes}."])
def test_every_attempt_gets_its_own_wording(classes, override):
    for pid in ("p1", "p2", "p3"):
        texts = [build_prompt(pid, classes, attempt=attempt, override=override) for attempt in range(12)]
        assert len(set(texts)) == 12, pid
    first, second = (build_prompt("p3", classes, attempt=attempt) for attempt in (1, 2))
    assert "specific" in first and "count" in second and "position" in second  # specifics, then counts + positions
    assert ("building (50%)" in first) == (classes.source != "none")  # attempt 1 adds the proportions if allowed


def test_labels_on_evaluation_split_need_an_explicit_opt_in():
    config = PromptConfig(class_source={"train": "labels", "test": "labels"})
    assert config.source_for("train") == "labels"
    with pytest.raises(InputError, match="'test' is an evaluation split"):
        config.source_for("test")
    opted = config.model_copy(update={"allow_labels_on_eval": True})
    assert opted.source_for("test") == "labels"
    assert PromptConfig().source_for("val") == "none"
    assert PromptConfig(class_source={"test": "predictions"}, predictions="p.parquet").source_for("test") == (
        "predictions"
    )


def test_annotation_caption_counts_and_places_objects():
    classes = np.full((60, 60), 2, np.uint8)
    classes[2:12, 2:12] = 1  # a building in the north-west
    classes[40:55, 40:55] = 1  # another in the south-east
    classes[30:33, 5:10] = 4  # a car in the west
    classes[0, :] = 255
    names = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
    plurals = Vaihingen.plurals  # the dataset's vocabulary says which classes are counted as objects
    text = describe_label(classes, names, 255, "p3", plurals)
    assert "2 buildings" in text and "car mostly in the west" in text and "low vegetation" in text
    # a dataset that counts no class describes the same mask by areas only
    areas = describe_label(classes, names, 255, "p3")
    assert "buildings" not in areas and "building (" in areas and "car (" in areas
    assert describe_label(classes, names, 255, "p1") == "An aerial image showing low vegetation, building, car."
    assert "building (" in describe_label(classes, names, 255, "p2")


@pytest.mark.parametrize("kind", ["qwen", "llava"])
def test_transformers_backend_loads_saved_tiny_models(tiny_models, small_index, kind):
    expert = build_expert(TransformersExpertConfig(name=kind, backend="transformers", model=str(tiny_models[kind]),
                                       max_new_tokens=6, batch_size=2, device="cpu"))  # fmt: skip
    image = small_index.path(small_index.frame["image_path"].iloc[0])
    prompts = ["Describe the image.", "Which classes?", "Count cars."]
    results = expert.generate([CaptionRequest(f"t{i}", image, prompt) for i, prompt in enumerate(prompts)])
    assert len(results) == 3 and all(r.error is None and isinstance(r.caption, str) for r in results)
    assert all(r.finish_reason in {"stop", "length"} and 0 < r.n_generated <= 6 for r in results)


def test_similarity_is_eq2_of_a_direct_open_clip_computation(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    path = small_index.path(small_index.frame["image_path"].iloc[0])
    [score] = scorer.score(["k"], [path], ["an aerial image with buildings"])
    model, _, preprocess = open_clip.create_model_and_transforms(
        "demo-tiny-clip", pretrained=str(clip_config.checkpoint)
    )
    model.eval()  # inference: the tiny CLIP's ResNet tower has batch norm, which train mode would feed batch statistics
    with torch.no_grad():
        image = F.normalize(model.encode_image(preprocess(load_image(path))[None]), dim=-1)
        text = F.normalize(
            model.encode_text(open_clip.get_tokenizer("demo-tiny-clip")(["an aerial image with buildings"])), dim=-1
        )
    cosine = float((image * text).sum())
    assert score.raw_cosine == pytest.approx(cosine, abs=1e-5)
    assert score.similarity == pytest.approx(cosine / 2 + 0.5, abs=1e-5)
    assert (score.n_tokens, score.n_chunks) == (5, 1)


def test_long_caption_is_chunked(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    path = small_index.path(small_index.frame["image_path"].iloc[0])
    caption = " ".join(["roof"] * 200)  # 200 BPE tokens
    [score] = scorer.score(["k"], [path], [caption])
    assert score.n_tokens == 200 and score.n_chunks == 3
    chunks = [" ".join(["roof"] * 75)] * 2 + [" ".join(["roof"] * 50)]
    texts, _, _ = scorer.text_encoder.encode(chunks)
    expected = F.normalize(texts.mean(0), dim=0)
    image = scorer.image_embeddings(["k"], [path])[0]
    assert score.raw_cosine == pytest.approx(float(image @ expected), abs=1e-5)


@dataclass
class ScriptedExpert:
    """Answers from a script: ``script[attempt]`` per prompt (the last entry for later attempts); counts its calls."""

    script: list[str]
    name: str = "scripted"
    model: str = "script"
    backend: str = "annotation"
    pipeline_chunk: int | None = None
    reprompts: bool = True
    needs_class_mask: bool = False  # it answers from its script, whatever the backend name says
    asked: list[str] = dataclasses.field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.asked)

    def generate(self, requests):
        results = []
        for request in requests:
            self.asked.append(request.tile_id)
            attempt = request.seed or 0  # the gate seeds every attempt with its number
            results.append(CaptionResult(self.script[min(attempt, len(self.script) - 1)], "stop", 3, 0.01))
        return results


def test_gate_reprompts_a_failing_caption_and_selects_the_passing_attempt(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    tasks = tile_tasks(small_index, small_index.frame.head(1), PromptConfig())
    candidates = ["roof roof roof", "green trees and a road", "cars", "a building", "grass field"]
    scores = scorer.score(["x"] * 5, [tasks[0].image_path] * 5, candidates)
    low, high = sorted(zip(scores, candidates, strict=True), key=lambda item: item[0].similarity)[
        :: len(candidates) - 1
    ]
    tau = (low[0].similarity + high[0].similarity) / 2
    expert = ScriptedExpert([low[1], high[1]])
    rows = caption_tiles(tasks, expert, scorer, GateSettings(GatePolicy(tau=tau), prompt_ids=("p1",)), RunInfo("r"))
    assert [(r["attempt"], r["passed"], r["selected"]) for r in rows] == [(0, False, False), (1, True, True)]
    assert rows[1]["prompt_text"] != rows[0]["prompt_text"]


def test_empty_caption_always_fails_and_best_attempt_is_selected(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    tasks = tile_tasks(small_index, small_index.frame.head(1), PromptConfig())
    settings = GateSettings(GatePolicy(tau=1.0, max_attempts=3), prompt_ids=("p3",))
    rows = caption_tiles(tasks, ScriptedExpert(["   ", "a caption"]), scorer, settings, RunInfo("r"))
    assert [r["attempt"] for r in rows] == [0, 1, 2]
    assert rows[0]["passed"] is False and rows[0]["error"] == "empty caption" and rows[0]["similarity"] is None
    assert [r["selected"] for r in rows] == [False, True, False]  # attempts 1 and 2 tie: the earliest wins
    assert rows[1]["caption"] == rows[2]["caption"] == "a caption"


def test_one_image_encode_per_tile_across_prompts_experts_and_attempts(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    frame = small_index.frame[small_index.frame["split"] == "train"].head(3)
    tasks = tile_tasks(small_index, frame, PromptConfig())
    total_rows = 0
    for name in ("a", "b", "c"):
        expert = ScriptedExpert(["first", "second"], name=name)
        rows = caption_tiles(tasks, expert, scorer, GateSettings(GatePolicy(tau=1.0, max_attempts=3)), RunInfo("r"))
        assert expert.calls == 3 * 3 * 3
        total_rows += len(rows)
    assert total_rows == 3 * 3 * 3 * 3
    assert scorer.image_encodes == 3


def test_annotation_expert_runs_only_where_labels_are_allowed(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    tasks = tile_tasks(small_index, small_index.frame, PromptConfig())
    rows = caption_tiles(tasks, build_expert(AnnotationExpertConfig(name="annotation", backend="annotation")), scorer,
                         GateSettings(GatePolicy(tau=0.0, max_attempts=1)), RunInfo("r"))  # fmt: skip
    train = {tile.tile_id for tile in tasks if tile.split == "train"}
    assert {row["tile_id"] for row in rows} == train  # test tiles: labels not allowed, not asked
    assert all(row["passed"] and row["class_source"] == "labels" for row in rows)
    assert all(row["caption"].startswith("An aerial image") for row in rows)


def test_annotation_expert_is_never_re_prompted(clip_config, small_index):
    """Its caption depends on the mask alone: a re-prompt would repeat it word for word under a sampling record."""
    tasks = tile_tasks(small_index, small_index.frame, PromptConfig())
    rows = caption_tiles(tasks, build_expert(AnnotationExpertConfig(name="annotation", backend="annotation")),
                         ClipScorer(clip_config), GateSettings(GatePolicy(1.0, 3)), RunInfo("r"))  # fmt: skip
    assert rows and not any(row["passed"] for row in rows)
    assert {row["attempt"] for row in rows} == {0} and all(row["selected"] for row in rows)
    assert {(row["temperature"], row["seed"]) for row in rows} == {(0.0, 0)}


@pytest.mark.parametrize("pipeline_chunk", [None, 2])
def test_corrupt_tile_is_a_failed_attempt_and_the_rest_go_on(clip_config, small_index, tmp_path, pipeline_chunk):
    tasks = tile_tasks(small_index, small_index.frame.head(3), PromptConfig())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    tasks[1] = dataclasses.replace(tasks[1], image_path=broken)
    expert = ScriptedExpert(["a caption"], pipeline_chunk=pipeline_chunk)
    # tau above any similarity: every readable key is re-prompted up to max_attempts, the corrupt one never
    settings = GateSettings(GatePolicy(tau=1.01, max_attempts=3))
    rows = caption_tiles(tasks, expert, ClipScorer(clip_config), settings, RunInfo("r"))
    failed = [row for row in rows if row["tile_id"] == tasks[1].tile_id]
    assert len(failed) == 3 and {row["attempt"] for row in failed} == {0}
    assert all("unreadable image" in row["error"] and row["selected"] for row in failed)
    assert tasks[1].tile_id not in expert.asked
    for tile in (tasks[0], tasks[2]):
        attempts = [row for row in rows if row["tile_id"] == tile.tile_id]
        assert len(attempts) == 9 and all(row["error"] is None and row["similarity"] is not None for row in attempts)


def test_openai_expert_through_the_gate_never_writes_the_key(clip_config, small_index, tmp_path, monkeypatch):
    with serving(ChatServer()) as server:
        monkeypatch.setenv("MY_KEY", SECRET)
        config = OpenAIExpertConfig(name="gpt", backend="openai", model="gpt-4o", api_key_env="MY_KEY",
                              base_url=f"http://127.0.0.1:{server.server_port}/v1")  # fmt: skip
        tasks = tile_tasks(small_index, small_index.frame.head(2), PromptConfig())
        settings = GateSettings(GatePolicy(tau=0.0))
        rows = caption_tiles(tasks, build_expert(config), ClipScorer(clip_config), settings, RunInfo("r"))
        first_tries = len(server.bodies)
        reprompted = GateSettings(GatePolicy(tau=1.01, max_attempts=2), prompt_ids=("p3",), reprompt_temperature=0.9)
        caption_tiles(tasks, build_expert(config), ClipScorer(clip_config), reprompted, RunInfo("r2"))
    assert server.auth_headers == {f"Bearer {SECRET}"}
    decodings = sorted((body["temperature"], body["seed"]) for body in server.bodies[first_tries:])
    assert decodings == [(0.0, 0), (0.0, 0), (0.9, 1), (0.9, 1)]  # the re-prompts sample, seeded by attempt
    store = tmp_path / "store"
    write_fragment(store, rows, StoreMeta(small_index.class_names, "tiny", 0.0))
    assert len(selected_captions(store)) == 6 and read_store(store)["passed"].all()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@dataclass
class RecordingExpert:
    """Records every request it is sent and answers each with the same caption."""

    name: str = "recorder"
    model: str = "recorder"
    backend: str = "openai"
    pipeline_chunk: int | None = None
    reprompts: bool = True
    needs_class_mask: bool = False
    requests: list[CaptionRequest] = dataclasses.field(default_factory=list)

    def generate(self, requests):
        self.requests += requests
        return [CaptionResult("an aerial image of a town", "stop", 6, 0.0) for _ in requests]


def test_the_gate_asks_what_the_expert_declares_not_its_backend_name(clip_config, small_index):
    """``needs_class_mask`` decides whether splits without a class source are skipped, whatever the backend."""
    tasks = tile_tasks(small_index, small_index.frame, PromptConfig())  # train: labels, test: none
    train = {tile.tile_id for tile in tasks if tile.split == "train"}
    settings = GateSettings(GatePolicy(tau=0.0, max_attempts=1), prompt_ids=("p1",))
    scorer = ClipScorer(clip_config)
    reads_masks = RecordingExpert(backend="openai", needs_class_mask=True)
    rows = caption_tiles(tasks, reads_masks, scorer, settings, RunInfo("r"))
    assert {request.tile_id for request in reads_masks.requests} == train == {row["tile_id"] for row in rows}
    describes_images = RecordingExpert(name="named-annotation", backend="annotation")
    caption_tiles(tasks, describes_images, scorer, settings, RunInfo("r"))
    assert {request.tile_id for request in describes_images.requests} == {tile.tile_id for tile in tasks}


def sent_per_key(expert: RecordingExpert) -> dict[tuple[str, str], list[tuple[str, float, int]]]:
    sent = defaultdict(list)
    for request in expert.requests:
        sent[(request.tile_id, request.prompt_id)].append((request.prompt, request.temperature, request.seed))
    return sent


def test_no_two_attempts_of_a_key_send_the_same_request(clip_config, small_index, tmp_path):
    scorer = ClipScorer(clip_config)
    frame = small_index.frame.iloc[[0, 1, 8]]  # two train tiles (labels) and a test tile (no class information)
    tasks = tile_tasks(small_index, frame, PromptConfig())
    # nothing passes
    settings = GateSettings(GatePolicy(tau=1.01, max_attempts=4), temperature=0.0, reprompt_temperature=0.7)
    expert = RecordingExpert()
    rows = caption_tiles(tasks, expert, scorer, settings, RunInfo("r"))
    sent = sent_per_key(expert)
    assert len(sent) == 3 * 3
    for key, requests in sent.items():
        assert len(requests) == 4 and len(set(requests)) == 4, key
        assert len({prompt for prompt, _, _ in requests}) == 4, key  # the wording alone already differs
        assert [(temperature, seed) for _, temperature, seed in requests] == [(0.0, 0), (0.7, 1), (0.7, 2), (0.7, 3)]
    store = tmp_path / "store"
    write_fragment(store, rows, StoreMeta(small_index.class_names, scorer.model_id, 1.01))
    stored = read_store(store)
    assert stored["seed"].tolist() == stored["attempt"].tolist()
    assert stored["temperature"].tolist() == pytest.approx([0.0 if a == 0 else 0.7 for a in stored["attempt"]])
    provenance = set(zip(stored["split"], stored["protocol"], stored["class_source"], strict=True))
    assert provenance == {("train", "custom", "labels"), ("test", "custom", "none")}
    # A later run continues the attempt numbers of the failed keys: its requests repeat none of the earlier ones.
    later = RecordingExpert()
    previous = {(tile_id, expert.name, pid): 4 for tile_id, pid in sent}
    caption_tiles(tasks, later, scorer, settings, RunInfo("r2"), Resume(attempts=previous))
    for key, requests in sent_per_key(later).items():
        assert [seed for _, _, seed in requests] == [4, 5, 6, 7]
        assert len(set(requests + sent[key])) == 8, key


def test_transformers_sampling_is_seeded_and_do_sample_is_explicit(tiny_models, small_index):
    expert = build_expert(TransformersExpertConfig(name="qwen", backend="transformers", model=str(tiny_models["qwen"]),
                                       max_new_tokens=8, batch_size=2, device="cpu"))  # fmt: skip
    calls = []
    generate = expert.network.generate

    def spy(*args, **kwargs):  # on this instance only: what reaches `generate`
        seen = {key: kwargs.get(key, "unset") for key in ("do_sample", "temperature", "top_k", "repetition_penalty")}
        calls.append({"batch": int(kwargs["input_ids"].shape[0]), **seen})
        return generate(*args, **kwargs)

    expert.network.generate = spy
    image = small_index.path(small_index.frame["image_path"].iloc[0])

    def ask(temperature: float, seed: int, prompts=("Describe.", "Count.")) -> list[str]:
        requests = [
            CaptionRequest(f"t{i}", image, p, temperature=temperature, seed=seed) for i, p in enumerate(prompts)
        ]
        return [result.caption for result in expert.generate(requests)]

    ask(0.0, 0)
    # the repetition penalty is explicit in both (Qwen ships 1.05 in its generation config; the expert means 1)
    assert calls[-1] == {"batch": 2, "do_sample": False, "temperature": "unset", "top_k": "unset",
                         "repetition_penalty": 1.0}  # fmt: skip
    first = ask(1.5, 3)
    assert calls[-1] == {"batch": 2, "do_sample": True, "temperature": 1.5, "top_k": 0, "repetition_penalty": 1.0}
    assert ask(1.5, 3) == first  # same seed, same captions
    assert any(ask(1.5, seed) != first for seed in (4, 5, 6))  # it does sample
    # A mixed batch is split by (temperature, seed), in order: each part as if it had been sent alone.
    calls.clear()
    greedy = [CaptionRequest("a", image, "Describe.", temperature=0.0, seed=0),
              CaptionRequest("c", image, "Count.", temperature=0.0, seed=0)]  # fmt: skip
    sampled = CaptionRequest("b", image, "Describe.", temperature=1.5, seed=3)
    mixed = [result.caption for result in expert.generate([greedy[0], sampled, greedy[1]])]
    assert [call["batch"] for call in calls] == [2, 1]
    alone = [result.caption for result in expert.generate(greedy)] + [expert.generate([sampled])[0].caption]
    assert mixed == [alone[0], alone[2], alone[1]]


CLASS_WORDS = re.compile(r"\b(impervious|surfaces?|buildings?|low vegetation|vegetation|trees?|cars?|clutter)\b", re.I)


@pytest.fixture
def predictions(small_index, tmp_path) -> Path:
    return write_predictions(small_index, tmp_path)


def percentages(fractions, class_names) -> set[str]:
    """The "class (n%)" phrases a prompt built from these fractions would hold."""
    return {f"{readable(n)} ({share * 100:.0f}%)" for n, share in zip(class_names, fractions, strict=True) if share > 0}


@pytest.mark.parametrize("protocol", ["predicted", "blind", "custom", "oracle"])
def test_evaluation_prompts_carry_ground_truth_only_under_oracle(clip_config, small_index, predictions, protocol):
    prompts = PromptConfig(protocol=protocol, predictions=predictions if protocol == "predicted" else None)
    tasks = tile_tasks(small_index, small_index.frame, prompts)
    expert = RecordingExpert()
    settings = GateSettings(GatePolicy(tau=1.01, max_attempts=4))  # every wording of every attempt is sent
    caption_tiles(tasks, expert, ClipScorer(clip_config), settings, RunInfo("r"))
    truth = small_index.frame.set_index("tile_id")["class_fractions"]
    predicted = percentages([0, 0, 0, 0.703125, 0.296875, 0], small_index.class_names)
    assert predicted == {"tree (70%)", "car (30%)"}
    test_tiles = set(small_index.frame.loc[small_index.frame["split"] == "test", "tile_id"])
    for request in expert.requests:
        true = percentages(truth[request.tile_id], small_index.class_names)
        assert not true & predicted  # so the check below tells the two sources apart
        carries_truth = any(phrase in request.prompt for phrase in true)
        if request.tile_id not in test_tiles:
            continue
        if protocol != "oracle":
            assert not carries_truth, request.prompt
        if protocol == "predicted" and (request.prompt_id == "p2" or request.seed == 1):
            assert all(phrase in request.prompt for phrase in predicted), request.prompt
        if protocol in ("blind", "custom"):
            assert "%" not in request.prompt and not CLASS_WORDS.search(request.prompt), request.prompt
    if protocol == "oracle":  # the check above can see ground truth: oracle's test prompts show it
        assert any(any(p in r.prompt for p in percentages(truth[r.tile_id], small_index.class_names))
                   for r in expert.requests if r.tile_id in test_tiles)  # fmt: skip
    if protocol == "blind":
        assert all("%" not in r.prompt and not CLASS_WORDS.search(r.prompt) for r in expert.requests)


def test_predictions_missing_for_tiles_of_a_split_are_one_line(small_index, predictions, tmp_path):
    from manifests.class_predictions import read_class_predictions

    loaded = read_class_predictions(predictions, small_index.class_names)
    partial = loaded.frame[~loaded.frame["tile_id"].str.endswith("0064_0064")]
    path = write_class_predictions(
        tmp_path / "partial.parquet", partial.to_dict("records"), small_index.class_names, 255
    )
    prompts = PromptConfig(protocol="predicted", predictions=path)
    with pytest.raises(InputError) as info:
        tile_tasks(small_index, small_index.frame, prompts)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "1 of 4 tiles of split 'test'" in message
    assert "segmenter predict --run RUN --index TILES --predictions" in message
    assert len(tile_tasks(small_index, small_index.frame.head(8), prompts)) == 8  # train tiles read labels
    with pytest.raises(InputError, match=r"class predictions .*nowhere.parquet: file not found"):
        tile_tasks(
            small_index, small_index.frame, PromptConfig(protocol="predicted", predictions=tmp_path / "nowhere.parquet")
        )


def test_annotation_expert_describes_predicted_masks(clip_config, small_index, predictions):
    scorer = ClipScorer(clip_config)
    annotation = build_expert(AnnotationExpertConfig(name="annotation", backend="annotation"))
    settings = GateSettings(GatePolicy(tau=0.0, max_attempts=1), prompt_ids=("p1", "p2"))
    prompts = PromptConfig(protocol="predicted", predictions=predictions)
    rows = caption_tiles(
        tile_tasks(small_index, small_index.frame, prompts), annotation, scorer, settings, RunInfo("r")
    )
    assert len(rows) == 12 * 2
    test_rows = [row for row in rows if row["split"] == "test"]
    assert len(test_rows) == 4 * 2 and all(row["class_source"] == "predictions" for row in test_rows)
    assert {row["caption"] for row in test_rows} == {"An aerial image showing tree, car.",
                                                     "An aerial image covered by tree (70%), car (30%)."}  # fmt: skip
    assert all(row["class_source"] == "labels" and "tree (70%)" not in row["caption"] for row in rows
               if row["split"] == "train")  # fmt: skip
    blind = caption_tiles(tile_tasks(small_index, small_index.frame, PromptConfig(protocol="blind")), annotation,
                          scorer, settings, RunInfo("r"))  # fmt: skip
    assert blind == []  # no class mask may be read: the annotation expert does not run


def test_annotation_expert_without_a_predicted_mask_fails_once(clip_config, small_index, predictions):
    prompts = PromptConfig(protocol="predicted", predictions=predictions)
    tasks = [dataclasses.replace(task, label_path=None) if task.split == "test" else task
             for task in tile_tasks(small_index, small_index.frame, prompts)]  # fmt: skip
    rows = caption_tiles(tasks, build_expert(AnnotationExpertConfig(name="annotation", backend="annotation")),
                         ClipScorer(clip_config), GateSettings(GatePolicy(0.5, 3)), RunInfo("r"))  # fmt: skip
    failed = [row for row in rows if row["split"] == "test"]
    assert len(failed) == 4 * 3 and all(row["attempt"] == 0 and row["selected"] for row in failed)
    assert all("no class mask for this tile (class source 'predictions')" in row["error"] for row in failed)
