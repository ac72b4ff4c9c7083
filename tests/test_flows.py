"""The Prefect flows under ``prefect_test_harness``: store contents, resume, SIGKILL, Dask, the report."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from flows import generate_captions as flow_module
from flows import model_cache
from flows.generate_captions import CaptionRunSettings, frozen_heap, generate_captions
from flows.model_cache import ModelCache
from flows.report import build_report, caption_report_flow, mentioned_classes
from manifests.caption_store import ATTEMPT_KEY, read_store, selected_captions
from manifests.tile_index import ClassVocabulary
from tests.helpers import CheckedServer, demo_data_yaml, serving

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def manifest_path(tmp_path_factory, small_index, clip_config, tiny_models) -> Path:
    folder = tmp_path_factory.mktemp("flow")
    path = folder / "run.yaml"
    path.write_text(
        f"""
name: flow-test
{demo_data_yaml(small_index)}
captions:
  store: {folder / "store"}
  tau: 0.6
  max_attempts: 2
  shard_size: 4
  clip: {{model: demo-tiny-clip, pretrained: null, config: {clip_config.config}, checkpoint: {clip_config.checkpoint},
          device: cpu}}
  experts:
    - {{name: annotation, backend: annotation}}
    - {{name: qwen, backend: transformers, model: {tiny_models["qwen"]}, max_new_tokens: 4, device: cpu}}
"""
    )
    return path


class CountingExpert:
    def __init__(self, inner):
        self.inner, self.name, self.model, self.backend, self.calls = inner, inner.name, inner.model, inner.backend, 0
        self.reprompts, self.needs_class_mask = inner.reprompts, inner.needs_class_mask
        self.pipeline_chunk = inner.pipeline_chunk

    def generate(self, requests):
        self.calls += len(requests)
        return self.inner.generate(requests)


def attempt_keys(store: Path) -> set[tuple]:
    frame = read_store(store)
    assert not frame.duplicated(list(ATTEMPT_KEY)).any()
    return set(map(tuple, frame[list(ATTEMPT_KEY)].itertuples(index=False)))


@pytest.fixture(scope="session")
def threads_store(prefect_api_session, manifest_path) -> Path:
    store = manifest_path.parent / "threads"
    summary = generate_captions(CaptionRunSettings(manifest_path, store=store))
    assert summary.tiles == 12 and summary.skipped_keys == 0
    return store


def test_flow_store_rows_and_a_second_run_calls_no_expert(threads_store, manifest_path, monkeypatch):
    selected = selected_captions(threads_store)
    counts = selected.groupby("expert").size().to_dict()
    assert counts == {"annotation": 8 * 3, "qwen": 12 * 3}  # annotation: train tiles only
    assert len(list(threads_store.glob("*.parquet"))) == 1  # compacted
    built: list[CountingExpert] = []

    def counted(config):
        built.append(CountingExpert(real_build_expert(config)))
        return built[-1]

    real_build_expert = model_cache.build_expert
    monkeypatch.setattr(model_cache, "build_expert", counted)
    summary = generate_captions(CaptionRunSettings(manifest_path, store=threads_store))
    calls = [expert.calls for expert in built]
    assert calls == [0, 0] and summary.new_rows == 0 and summary.skipped_keys == 60
    assert gc.get_freeze_count() == 0  # the heap is frozen only while a run lasts
    assert ModelCache.of_process().keys() == []  # the run's experts and scorer went with it


def test_frozen_heap_is_released_when_the_run_fails():
    with pytest.raises(RuntimeError, match="run failed"), frozen_heap():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("run failed")
    assert gc.get_freeze_count() == 0


def test_dask_runner_gives_the_same_store(threads_store, manifest_path):
    store = manifest_path.parent / "dask"
    generate_captions(CaptionRunSettings(manifest_path, store=store, runner="dask"))
    assert attempt_keys(store) == attempt_keys(threads_store)
    a, b = selected_captions(store), selected_captions(threads_store)
    assert a["caption"].tolist() == b["caption"].tolist()


def test_sigkill_then_restart_ends_with_the_uninterrupted_store(prefect_api, threads_store, manifest_path):
    store = manifest_path.parent / "killed"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    command = [sys.executable, "-m", "flows.cli", "run", "generate-captions", "--manifest", str(manifest_path),
               "--store", str(store), "--shard-size", "1"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(store.glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = attempt_keys(store)
    assert 0 < len(partial) < len(attempt_keys(threads_store))
    generate_captions(CaptionRunSettings(manifest_path, store=store))
    assert attempt_keys(store) == attempt_keys(threads_store)


def test_unknown_expert_and_missing_captions_section(prefect_api, manifest_path, tmp_path):
    from manifests.errors import InputError

    with pytest.raises(InputError, match=r"--experts: unknown expert\(s\) \['gpt'\]"):
        generate_captions(CaptionRunSettings(manifest_path, experts=["gpt"]))
    bare = tmp_path / "bare.yaml"
    bare.write_text("name: b\ndataset: {name: vaihingen, root: x}\ntiling: {out: y}\n")
    with pytest.raises(InputError, match="has no captions section"):
        generate_captions(bare)


def test_a_manifest_without_captions_is_refused_before_prefect_starts(tmp_path, monkeypatch):
    """What `segmenter prepare` writes holds no captions section: the command says where to get one, at once."""
    from typer.testing import CliRunner

    from flows import prefect_api
    from flows.cli import app

    started = []
    monkeypatch.setattr(prefect_api, "process_api", lambda *args: started.append(args))
    bare = tmp_path / "manifest.yaml"
    bare.write_text("name: b\ndataset: {name: vaihingen, root: x}\ntiling: {out: y}\n")
    result = CliRunner().invoke(app, ["run", "generate-captions", "--manifest", str(bare)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"error: manifest {bare}: has no captions section") and "manifests/demo.yaml" in line
    assert not started  # no server started for a run that cannot start


def test_report_numbers_match_the_store(threads_store, small_index, tmp_path):
    report = build_report(threads_store, small_index.root)
    frame = read_store(threads_store)
    for row in report.summary.itertuples(index=False):
        keys = frame[(frame["expert"] == row.expert) & (frame["prompt_id"] == row.prompt_id)]
        passed = keys.groupby("tile_id")["passed"].any()
        assert row.keys == len(passed) and row.pass_rate == pytest.approx(passed.mean())
    best = frame.groupby(["tile_id", "expert", "prompt_id"])["similarity"].max()
    for tau in (0.0, 0.5, 0.6, 0.7):
        for expert in ("annotation", "qwen"):
            expected = (best.xs(expert, level="expert").fillna(-1) >= tau).mean()
            assert report.tau_sweep.loc[tau, expert] == pytest.approx(expected)
    quality = report.class_quality.set_index("expert")
    assert quality.loc["annotation", "class_recall"] > 0.95
    assert quality.loc["annotation", "hallucinated_per_caption"] == 0
    path = caption_report_flow(str(threads_store), str(tmp_path / "report"), str(small_index.root))
    page = path.read_text()
    assert page.count('<img class="plot"') == 2 and "Tau sweep" in page and "Worst selected captions" in page
    # The protocol and the class source of every split: annotation only runs on train (test has no class source).
    sources = report.class_information.set_index("split")["class_source"].to_dict()
    assert set(report.class_information["protocol"]) == {"custom"}
    splits = small_index.frame.set_index("tile_id")["split"]
    attempts = frame["tile_id"].map(splits).value_counts()
    assert sources == {"test": f"none ({attempts['test']} attempts)", "train": f"labels ({attempts['train']} attempts)"}
    assert "Class information in prompts (protocol: custom)" in page
    assert "protocol: custom" in (tmp_path / "report" / "report.md").read_text()


def test_class_mentions_use_the_datasets_words_and_whole_words(small_index):
    words = small_index.vocabulary.words  # from the dataset (ISPRS), recorded in the tile index
    assert mentioned_classes("Two houses beside a paved street, with trees.", words) == {
        "impervious_surfaces", "building", "tree"}  # fmt: skip
    assert mentioned_classes("A streetcar", words) == set()
    plain = ClassVocabulary.plain(list(words)).words  # a dataset without synonyms: the class names only
    assert mentioned_classes("Two houses beside a paved street, with trees.", plain) == set()
    assert mentioned_classes("Low vegetation and a building.", plain) == {"low_vegetation", "building"}


def test_cli_shows_progress_and_summary(prefect_api, manifest_path, threads_store, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    progress: list[tuple[int, int, str]] = []
    original = flow_module.generate_captions

    def spy(*args, on_shard, **kwargs):  # the CLI's bar is listening while the flow runs
        def recorded(done: int, total: int, note: str) -> None:
            progress.append((done, total, note))
            on_shard(done, total, note)

        return original(*args, on_shard=recorded, **kwargs)

    monkeypatch.setattr(flow_module, "generate_captions", spy)
    result = CliRunner().invoke(app, ["run", "generate-captions", "--manifest", str(manifest_path),
                                      "--store", str(threads_store), "--experts", "annotation"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [done for done, _, _ in progress] == [1, 2, 3] and {total for _, total, _ in progress} == {3}
    assert {note for _, _, note in progress} == {"annotation: 0 attempts"}
    assert "12 tiles, 0 new attempts, 24 keys already done" in result.output
    assert "class information in prompts: protocol custom (test: none, train: labels)" in result.output


def test_predicted_protocol_reads_predictions_and_says_so(prefect_api, manifest_path, small_index, tmp_path):
    from manifests.errors import InputError
    from tests.helpers import write_predictions

    predictions = write_predictions(small_index, tmp_path / "predictions")
    text = manifest_path.read_text().replace(
        "  experts:", f"  prompts: {{protocol: predicted, predictions: {predictions}}}\n  experts:"
    )
    manifest = tmp_path / "predicted.yaml"
    manifest.write_text(text.replace(str(manifest_path.parent / "store"), str(tmp_path / "store")))
    summary = generate_captions(CaptionRunSettings(manifest, experts=["annotation"]))
    assert (summary.protocol, summary.class_sources) == ("predicted", {"test": "predictions", "train": "labels"})
    frame = read_store(tmp_path / "store")
    assert set(zip(frame["split"], frame["protocol"], frame["class_source"], strict=True)) == {
        ("train", "predicted", "labels"), ("test", "predicted", "predictions")}  # fmt: skip
    test_captions = set(frame.loc[frame["split"] == "test", "caption"])
    assert "An aerial image covered by tree (70%), car (30%)." in test_captions  # the predicted mask, described
    report = build_report(tmp_path / "store")
    attempts = frame["tile_id"].map(small_index.frame.set_index("tile_id")["split"]).value_counts()
    assert report.class_information.to_dict("records") == [
        {"protocol": "predicted", "split": "test", "class_source": f"predictions ({attempts['test']} attempts)"},
        {"protocol": "predicted", "split": "train", "class_source": f"labels ({attempts['train']} attempts)"},
    ]
    predictions.unlink()  # before any shard task starts, a one-line error names the file
    with pytest.raises(InputError, match=r"class predictions .*class_predictions.parquet: file not found"):
        generate_captions(CaptionRunSettings(manifest, experts=["annotation"]))


def _variant(manifest_path: Path, folder: Path, experts: str) -> Path:
    """The test manifest with its own store and the given expert entries (YAML list items)."""
    text = manifest_path.read_text().replace(str(manifest_path.parent / "store"), str(folder / "store"))
    path = folder / "run.yaml"
    path.write_text(text.split("  experts:")[0] + "  experts:\n" + experts)
    return path


def test_a_store_scored_by_another_clip_is_refused(prefect_api, manifest_path, threads_store, tmp_path):
    from manifests.caption_store import StoreMeta, write_fragment
    from manifests.errors import InputError

    old = read_store(threads_store).assign(clip_model="demo-tiny-clip:demo-tiny-clip.pt")  # before the activation
    write_fragment(tmp_path / "old", old, StoreMeta(["a"], "demo-tiny-clip:demo-tiny-clip.pt", 0.6))
    with pytest.raises(InputError, match=r"scored by CLIP demo-tiny-clip:demo-tiny-clip.pt, this manifest scores "
                                         r"with demo-tiny-clip:demo-tiny-clip.pt@[0-9a-f]{12}:gelu"):  # fmt: skip
        generate_captions(CaptionRunSettings(manifest_path, store=tmp_path / "old"))
    assert len(read_store(tmp_path / "old")) == len(old)  # nothing written


class ScriptedEngineExpert:
    """Stands in for an in-process vLLM expert: records when it served and when its engine was released."""

    backend, reprompts, needs_class_mask, pipeline_chunk = "vllm", True, False, None

    def __init__(self, name: str, events: list[tuple[str, str]]):
        self.name, self.model, self.events = name, f"model-{name}", events

    def generate(self, requests):
        from caption_pipeline.experts.base import CaptionResult

        self.events.append((self.name, "generate"))
        return [CaptionResult(f"an aerial image for {self.name}", "stop", 5, 0.0) for _ in requests]

    def close(self):
        self.events.append((self.name, "close"))


def test_vllm_experts_run_one_after_another_and_each_engine_is_released(
    prefect_api, manifest_path, tmp_path, monkeypatch
):
    manifest = _variant(manifest_path, tmp_path, "    - {name: llava, backend: vllm, model: m1}\n"
                                                 "    - {name: qwen, backend: vllm, model: m2}\n")  # fmt: skip
    # every caption passes (no re-prompt), so each engine serves one batch per shard, whatever the tiny CLIP scores
    manifest.write_text(manifest.read_text().replace("tau: 0.6", "tau: 0.0"))

    events: list[tuple[str, str]] = []
    monkeypatch.setattr(model_cache, "build_expert", lambda config: ScriptedEngineExpert(config.name, events))
    summary = generate_captions(manifest)
    assert events.count(("llava", "close")) == 1 and events.count(("qwen", "close")) == 1  # each closed once
    released = events.index(("llava", "close"))
    assert {name for name, _ in events[:released]} == {"llava"}  # qwen's engine starts after llava's is gone
    assert [event for event in events if event[1] == "generate"].count(("qwen", "generate")) == 3  # 12 tiles / 4
    assert summary.new_rows == 2 * 12 * 3 and ModelCache.of_process().keys() == []


class Answer(BaseHTTPRequestHandler):
    """Answers every chat request with the server's ``status`` and ``message``, as a failing provider does."""

    server: AnsweringServer

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": {"message": self.server.message}}).encode())
        with self.server.lock:
            self.server.calls += 1

    def log_message(self, *args):
        pass


class AnsweringServer(CheckedServer):
    def __init__(self, status: int, message: str):
        super().__init__(Answer)
        self.status, self.message, self.calls = status, message, 0


def _run_cli(manifest: Path):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, ["run", "generate-captions", "--manifest", str(manifest)])


def test_a_rejected_key_stops_the_run_with_one_line_and_keeps_what_was_written(prefect_api, manifest_path, tmp_path):
    with serving(AnsweringServer(401, "Incorrect API key provided")) as server:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        gpt = f"    - {{name: gpt, backend: openai, model: gpt-4o, base_url: {url}}}\n"
        manifest = _variant(manifest_path, tmp_path, "    - {name: annotation, backend: annotation}\n" + gpt)
        result = _run_cli(manifest)
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: ") and "gpt" in message and url in message and "401" in message
    assert "Traceback" not in result.output
    assert server.calls <= 3 * 4  # no retries, and the shard tasks not started yet were cancelled
    frame = read_store(tmp_path / "store")
    assert set(frame["expert"]) == {"annotation"} and len(frame) == 8 * 3  # the other expert's work is kept


def test_a_run_whose_every_attempt_fails_says_why(prefect_api, manifest_path, tmp_path):
    refusal = "Unsupported value: 'temperature' does not support 0.0 with this model. Only the default (1) is."
    with serving(AnsweringServer(400, refusal)) as server:
        gpt = f"    - {{name: o3, backend: openai, model: o3, base_url: http://127.0.0.1:{server.server_port}/v1}}\n"
        result = _run_cli(_variant(manifest_path, tmp_path, gpt))
    assert result.exit_code == 0, result.output
    assert f"o3: 36 key(s) got no caption; most common error: HTTP 400: {refusal}" in result.output


@pytest.mark.parametrize(
    ("clip", "expert", "message"),
    [
        ("{model: ViT-B-32, pretrained: opanai}", "", r"unknown pretrained tag 'opanai'"),
        ("{model: ViT-B-32, pretrained: remoteclip}", "", r"'remoteclip' names where a checkpoint's weights come"),
        ("", "api_key_env: MPERS_TEST_UNSET_KEY", r"environment variable MPERS_TEST_UNSET_KEY \(api_key_env\)"),
    ],
)
def test_what_cannot_succeed_is_refused_before_the_run_starts(manifest_path, tmp_path, monkeypatch, clip, expert,
                                                               message):  # fmt: skip
    monkeypatch.delenv("MPERS_TEST_UNSET_KEY", raising=False)
    gpt = f"    - {{name: gpt, backend: openai, model: m, base_url: http://127.0.0.1:9/v1, {expert}}}\n"
    manifest = _variant(manifest_path, tmp_path, gpt)
    if clip:
        text = manifest.read_text()
        start = text.index("  clip: {")
        end = text.index("}", text.index("device: cpu", start)) + 1
        manifest.write_text(text[:start] + f"  clip: {clip}" + text[end:])
    result = _run_cli(manifest)  # no Prefect server here: the refusal comes before the flow would need one
    assert result.exit_code == 2 and re.search(message, result.output.strip().splitlines()[-1]), result.output
    assert "Traceback" not in result.output and not (tmp_path / "store").exists()


def test_model_cache_builds_once_and_closes_what_it_drops():
    from concurrent.futures import ThreadPoolExecutor

    class Model:
        built = 0

        def __init__(self):
            Model.built += 1
            self.closed = 0
            time.sleep(0.05)  # a racing caller would build its own

        def close(self):
            self.closed += 1

    cache = ModelCache()
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: cache.get("a", Model), range(4)))
    assert Model.built == 1 and all(model is models[0] for model in models)
    cache.release("a")
    cache.release("a")  # nothing left to drop
    assert models[0].closed == 1 and cache.keys() == []
    with cache.hold():
        with cache.hold():  # a second run in the same process
            b = cache.get("b", Model)
        assert cache.keys() == ["b"] and b.closed == 0  # still held by the first
    assert cache.keys() == [] and b.closed == 1
    c, text = cache.get("c", Model), cache.get("text", lambda: "no close method")
    cache.clear()
    assert c.closed == 1 and cache.keys() == [] and text == "no close method"


def test_the_run_summary_never_cuts_an_expert_name_in_80_columns():
    import io

    import pandas as pd
    from rich.console import Console

    from flows.console import print_summary
    from flows.generate_captions import CaptionRunSummary

    names = ["llava-1.5-7b-hf-vllm", "qwen2.5-vl-3b-instruct-serve"]
    table = pd.DataFrame([{"expert": name, "prompt_id": "p1", "keys": 256, "pass_rate": 0.9, "first_try": 0.8,
                           "recovered": 20, "not_passed": 3, "errored": 0} for name in names])  # fmt: skip
    out = io.StringIO()
    print_summary(CaptionRunSummary(Path("s"), 256, 512, 0, 1.0, table), Console(file=out, width=80))
    assert all(name in out.getvalue() for name in names), out.getvalue()
