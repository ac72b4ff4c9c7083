"""Prompts, the transformers / annotation / vllm backends, CLIP scoring and the tau gate."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from caption_pipeline.experts import build_expert
from caption_pipeline.experts.annotation import describe_label
from caption_pipeline.experts.base import CaptionRequest, CaptionResult, load_image
from caption_pipeline.experts.vllm_backend import build_conversations, engine_args, sampling_args
from caption_pipeline.gate import GateSettings, RunInfo, caption_tiles, tile_tasks
from caption_pipeline.prompts import TileClasses, build_prompt, class_source_for
from caption_pipeline.scoring import ClipScorer
from manifests.caption_store import StoreMeta, read_store, selected_captions, write_fragment
from manifests.errors import InputError
from manifests.run_manifest import ExpertConfig, PromptConfig

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


def test_labels_on_evaluation_split_need_an_explicit_opt_in():
    config = PromptConfig(class_source={"train": "labels", "test": "labels"})
    assert class_source_for("train", config) == "labels"
    with pytest.raises(InputError, match="'test' is an evaluation split"):
        class_source_for("test", config)
    opted = config.model_copy(update={"allow_labels_on_eval": True})
    assert class_source_for("test", opted) == "labels"
    assert class_source_for("val", PromptConfig()) == "none"
    with pytest.raises(InputError, match="'test: predictions' needs class fractions predicted by the segmenter"):
        class_source_for("test", PromptConfig(class_source={"test": "predictions"}))


def test_annotation_caption_counts_and_places_objects():
    classes = np.full((60, 60), 2, np.uint8)
    classes[2:12, 2:12] = 1  # a building in the north-west
    classes[40:55, 40:55] = 1  # another in the south-east
    classes[30:33, 5:10] = 4  # a car in the west
    classes[0, :] = 255
    names = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
    text = describe_label(classes, names, 255, "p3")
    assert "2 buildings" in text and "car mostly in the west" in text and "low vegetation" in text
    assert describe_label(classes, names, 255, "p1") == "An aerial image showing low vegetation, building, car."
    assert "building (" in describe_label(classes, names, 255, "p2")


@pytest.mark.parametrize("kind", ["qwen", "llava"])
def test_transformers_backend_loads_saved_tiny_models(tiny_models, small_index, kind):
    expert = build_expert(ExpertConfig(name=kind, backend="transformers", model=str(tiny_models[kind]),
                                       max_new_tokens=6, batch_size=2, device="cpu"))  # fmt: skip
    image = small_index.path(small_index.frame["image_path"].iloc[0])
    prompts = ["Describe the image.", "Which classes?", "Count cars."]
    results = expert.generate([CaptionRequest(f"t{i}", image, prompt) for i, prompt in enumerate(prompts)])
    assert len(results) == 3 and all(r.error is None and isinstance(r.caption, str) for r in results)
    assert all(r.finish_reason in {"stop", "length"} and 0 < r.n_generated <= 6 for r in results)


def test_vllm_requests_are_built_without_vllm(small_index):
    assert "vllm" not in sys.modules
    config = ExpertConfig(name="qwen", backend="vllm", model="Qwen/Qwen2.5-VL-3B-Instruct", max_side=448,
                          engine_kwargs={"max_model_len": 8192})  # fmt: skip
    args = engine_args(config)
    assert args["limit_mm_per_prompt"] == {"image": 1} and args["max_model_len"] == 8192
    assert args["mm_processor_kwargs"]["max_pixels"] == 448 * 448
    assert "mm_processor_kwargs" not in engine_args(config.model_copy(update={"model": "llava-hf/llava-1.5-7b-hf"}))
    assert sampling_args(config)["max_tokens"] == config.max_new_tokens
    image = small_index.path(small_index.frame["image_path"].iloc[0])
    [conversation] = build_conversations([CaptionRequest("t", image, "Describe.")], config)
    parts = conversation[0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[1]["text"] == "Describe."
    with pytest.raises(InputError, match="needs the vllm extra"):
        build_expert(config).generate([CaptionRequest("t", image, "x")])


def test_similarity_is_eq2_of_a_direct_open_clip_computation(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    path = small_index.path(small_index.frame["image_path"].iloc[0])
    [score] = scorer.score(["k"], [path], ["an aerial image with buildings"])
    model, _, preprocess = open_clip.create_model_and_transforms(
        "demo-tiny-clip", pretrained=str(clip_config.checkpoint)
    )
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
    """Answers from a script: ``script[attempt]`` per prompt; counts its calls."""

    script: list[str]
    name: str = "scripted"
    model: str = "script"
    backend: str = "annotation"
    pipeline_chunk: int | None = None
    asked: list[str] = dataclasses.field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.asked)

    def generate(self, requests):
        results = []
        for request in requests:
            self.asked.append(request.tile_id)
            attempt = int("number of objects" in request.prompt)
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
    rows = caption_tiles(tasks, expert, scorer, GateSettings(tau=tau, prompt_ids=("p1",)), RunInfo("r"))
    assert [(r["attempt"], r["passed"], r["selected"]) for r in rows] == [(0, False, False), (1, True, True)]
    assert rows[1]["prompt_text"] != rows[0]["prompt_text"]


def test_empty_caption_always_fails_and_best_attempt_is_selected(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    tasks = tile_tasks(small_index, small_index.frame.head(1), PromptConfig())
    rows = caption_tiles(tasks, ScriptedExpert(["   ", "a caption"]), scorer,
                         GateSettings(tau=1.0, max_attempts=3, prompt_ids=("p3",)), RunInfo("r"))  # fmt: skip
    assert [r["attempt"] for r in rows] == [0, 1, 2]
    assert rows[0]["passed"] is False and rows[0]["error"] == "empty caption" and rows[0]["similarity"] is None
    assert [r["selected"] for r in rows] == [False, True, False]  # attempts 1 and 2 tie: the earliest wins


def test_one_image_encode_per_tile_across_prompts_experts_and_attempts(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    frame = small_index.frame[small_index.frame["split"] == "train"].head(3)
    tasks = tile_tasks(small_index, frame, PromptConfig())
    total_rows = 0
    for name in ("a", "b", "c"):
        expert = ScriptedExpert(["first", "second"], name=name)
        rows = caption_tiles(tasks, expert, scorer, GateSettings(tau=1.0, max_attempts=3), RunInfo("r"))
        assert expert.calls == 3 * 3 * 3
        total_rows += len(rows)
    assert total_rows == 3 * 3 * 3 * 3
    assert scorer.image_encodes == 3


def test_annotation_expert_runs_only_where_labels_are_allowed(clip_config, small_index):
    scorer = ClipScorer(clip_config)
    tasks = tile_tasks(small_index, small_index.frame, PromptConfig())
    rows = caption_tiles(tasks, build_expert(ExpertConfig(name="annotation", backend="annotation")), scorer,
                         GateSettings(tau=0.0, max_attempts=1), RunInfo("r"))  # fmt: skip
    train = {tile.tile_id for tile in tasks if tile.split == "train"}
    assert {row["tile_id"] for row in rows} == train  # test tiles: labels not allowed, not asked
    assert all(row["passed"] and row["class_source"] == "labels" for row in rows)
    assert all(row["caption"].startswith("An aerial image") for row in rows)


@pytest.mark.parametrize("pipeline_chunk", [None, 2])
def test_corrupt_tile_is_a_failed_attempt_and_the_rest_go_on(clip_config, small_index, tmp_path, pipeline_chunk):
    tasks = tile_tasks(small_index, small_index.frame.head(3), PromptConfig())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    tasks[1] = dataclasses.replace(tasks[1], image_path=broken)
    expert = ScriptedExpert(["a caption"], pipeline_chunk=pipeline_chunk)
    # tau above any similarity: every readable key is re-prompted up to max_attempts, the corrupt one never
    rows = caption_tiles(tasks, expert, ClipScorer(clip_config), GateSettings(tau=1.01, max_attempts=3), RunInfo("r"))
    failed = [row for row in rows if row["tile_id"] == tasks[1].tile_id]
    assert len(failed) == 3 and {row["attempt"] for row in failed} == {0}
    assert all("unreadable image" in row["error"] and row["selected"] for row in failed)
    assert tasks[1].tile_id not in expert.asked
    for tile in (tasks[0], tasks[2]):
        attempts = [row for row in rows if row["tile_id"] == tile.tile_id]
        assert len(attempts) == 9 and all(row["error"] is None and row["similarity"] is not None for row in attempts)


def test_openai_expert_through_the_gate_never_writes_the_key(clip_config, small_index, tmp_path, monkeypatch):
    from tests.test_openai_backend import SECRET, ChatServer

    server = ChatServer()
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MY_KEY", SECRET)
        config = ExpertConfig(name="gpt", backend="openai", model="gpt-4o", api_key_env="MY_KEY",
                              base_url=f"http://127.0.0.1:{server.server_port}/v1")  # fmt: skip
        tasks = tile_tasks(small_index, small_index.frame.head(2), PromptConfig())
        rows = caption_tiles(tasks, build_expert(config), ClipScorer(clip_config), GateSettings(tau=0.0), RunInfo("r"))
    finally:
        server.shutdown()
    assert server.auth_headers == {f"Bearer {SECRET}"}
    store = tmp_path / "store"
    write_fragment(store, rows, StoreMeta(small_index.class_names, "tiny", 0.0))
    assert len(selected_captions(store)) == 6 and read_store(store)["passed"].all()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
