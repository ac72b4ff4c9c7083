"""The synthetic expert (a study tool): captions of known quality, its corruption record, and the report's gate
precision and recall measured against that record."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from caption_pipeline.experts import build_expert
from caption_pipeline.experts.annotation import describe_label
from caption_pipeline.experts.base import CaptionRequest
from caption_pipeline.experts.synthetic import corruption_record
from flows.report import build_report, render_html, render_markdown
from manifests.caption_store import StoreMeta, write_fragment
from manifests.errors import InputError
from manifests.run_manifest import SyntheticExpertConfig, load_manifest
from tests.helpers import row


def requests_of(index, prompt: str, attempt: int = 0) -> list[CaptionRequest]:
    frame = index.frame[index.frame["label_path"].notna()]
    return [
        CaptionRequest(tile_id=tile, image_path=index.path(image), prompt="describe", prompt_id=prompt,
                       label_path=index.path(label), class_names=tuple(index.class_names),
                       plurals=index.vocabulary.plurals, ignore_index=index.ignore_index, seed=attempt)
        for tile, image, label in zip(frame["tile_id"], frame["image_path"], frame["label_path"], strict=True)
    ]  # fmt: skip


def faithful(index, request: CaptionRequest) -> str:
    with Image.open(request.label_path) as label:
        mask = np.asarray(label)
    return describe_label(mask, request.class_names, request.ignore_index, request.prompt_id, request.plurals)


def named(index, caption: str) -> set[str]:
    """The classes a ``p1`` caption lists."""
    listed = caption.removeprefix("An aerial image showing ").rstrip(".").split(", ")
    words = {index.vocabulary.words[name][0]: name for name in index.class_names}
    return {words[item] for item in listed}


def expert(**rates: float):
    return build_expert(SyntheticExpertConfig(name="synthetic", backend="synthetic", **rates))


def test_corruption_record_matches_the_captions(small_index):
    """Every drop the record names is missing from the caption, every insert is named, a faithful record is the
    annotation expert's caption word for word, and a proportions record changes the shares."""
    kinds_seen = set()
    for prompt in ("p1", "p2"):
        requests = requests_of(small_index, prompt)
        results = expert(drop=0.5, insert=0.5, proportions=0.5).generate(requests)
        for request, result in zip(requests, results, strict=True):
            record, truth = corruption_record(result.finish_reason), faithful(small_index, request)
            kinds_seen |= set(record)
            if not record:
                assert result.caption == truth
                continue
            assert result.caption != truth or set(record) == {"proportions"}
            if prompt == "p1":
                listed = named(small_index, result.caption)
                assert record.get("drop") not in listed
                if "insert" in record:
                    assert record["insert"] in listed and record["insert"] not in named(small_index, truth)
            elif set(record) == {"proportions"}:
                assert result.caption != truth  # the grown class's share, and the others', changed
    assert kinds_seen == {"drop", "insert", "proportions"}


def test_rates_zero_and_one(small_index):
    requests = requests_of(small_index, "p1")
    clean = expert().generate(requests)
    assert [result.caption for result in clean] == [faithful(small_index, request) for request in requests]
    assert {result.finish_reason for result in clean} == {"stop"}
    dropped = expert(drop=1.0).generate(requests)
    # every tile of the small index has more than one class to drop from
    assert all(set(corruption_record(result.finish_reason)) == {"drop"} for result in dropped)


def test_draws_are_seeded_per_key_and_attempt(small_index):
    requests = requests_of(small_index, "p1")
    synthetic = expert(drop=0.5, insert=0.5, proportions=0.5)
    first = [result.finish_reason for result in synthetic.generate(requests)]
    assert first == [result.finish_reason for result in expert(drop=0.5, insert=0.5, proportions=0.5).generate(
        requests)]  # fmt: skip
    assert first == [result.finish_reason for result in synthetic.generate(requests[::-1])][::-1]
    again = [result.finish_reason for result in synthetic.generate(requests_of(small_index, "p1", attempt=1))]
    assert again != first  # a re-prompt draws anew
    reseeded = expert(drop=0.5, insert=0.5, proportions=0.5, seed=1).generate(requests)
    assert [result.finish_reason for result in reseeded] != first


def test_a_tile_without_a_mask_fails_clearly(small_index):
    request = requests_of(small_index, "p1")[0]
    result = expert(drop=1.0).generate([CaptionRequest(request.tile_id, request.image_path, "describe")])[0]
    assert result.caption is None and "needs a class mask" in result.error


def test_manifest_entry_refuses_a_rate_outside_zero_one(tmp_path):
    data = {"name": "x", "dataset": {"name": "vaihingen", "root": str(tmp_path)}, "tiling": {"out": str(tmp_path)},
            "captions": {"store": str(tmp_path / "s"),
                         "experts": [{"name": "s", "backend": "synthetic", "drop": 1.5}]}}  # fmt: skip
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="drop"):
        load_manifest(path)


def test_report_gives_the_gates_precision_and_recall(small_index, tmp_path):
    """Rejected: 3 corrupted + 1 faithful; passed: 1 corrupted + 5 faithful -> precision 3/4, recall 3/4."""
    tiles = sorted(small_index.frame["tile_id"])[:10]
    corrupted = [True, True, True, False, True, False, False, False, False, False]
    rejected = [True, True, True, True, False, False, False, False, False, False]
    rows = [
        row(tile, similarity=0.3 if out else 0.8, expert="synthetic", backend="synthetic", passed=not out,
            finish_reason="corrupted: drop=tree" if bad else "stop")
        for tile, bad, out in zip(tiles, corrupted, rejected, strict=True)
    ]  # fmt: skip
    rows.append(row(tiles[0], similarity=0.2, expert="annotation", passed=False))  # not a synthetic expert: not counted
    store = tmp_path / "captions"
    write_fragment(store, rows, StoreMeta(small_index.class_names, "tiny:random", 0.55))
    report = build_report(store)
    quality = report.gate_quality.set_index("expert").loc["synthetic"]
    assert quality["attempts"] == 10
    assert quality["precision"] == pytest.approx(0.75) and quality["recall"] == pytest.approx(0.75)
    assert quality["corrupted"] == pytest.approx(0.4) and quality["rejected"] == pytest.approx(0.4)
    assert "Gate against corrupted captions" in render_markdown(report)
    assert "Gate against corrupted captions" in render_html(report)


def test_report_without_synthetic_experts_has_no_gate_quality(small_index, tmp_path):
    store = tmp_path / "captions"
    write_fragment(store, [row("t1"), row("t2", similarity=0.2)], StoreMeta(small_index.class_names, "m", 0.55))
    report = build_report(store)
    assert report.gate_quality is None and "corrupted captions" not in render_markdown(report)
