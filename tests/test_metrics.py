"""Metrics against an independent computation (scikit-learn's confusion matrix, per-class numpy loops)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, jaccard_score

from segmenter.data.datasets import Vaihingen
from segmenter.engine.metrics import CaptionFacts, ConfusionMatrix, compute_metrics
from segmenter.engine.options import F1WithoutTruePositive

NAMES = ["impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter"]
MAIN = [name for name in NAMES if name not in Vaihingen.excluded_from_mean]  # the ISPRS rule, from the dataset


def random_images(seed: int, n: int = 4, absent: tuple[int, ...] = (4,)):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        target = rng.integers(0, 6, size=(16, 16))
        prediction = np.where(rng.random((16, 16)) < 0.6, target, rng.integers(0, 6, size=(16, 16)))
        for cls in absent:  # absent from both prediction and GT
            target[target == cls] = 0
            prediction[prediction == cls] = 1
        target[rng.random((16, 16)) < 0.1] = 255
        images.append((prediction, target))
    return images


def test_pooled_matrix_and_metrics_match_sklearn():
    images = random_images(0)
    matrix = ConfusionMatrix(6, 255)
    per_image = [matrix.update(prediction, target) for prediction, target in images]
    np.testing.assert_array_equal(sum(per_image), matrix.matrix)
    targets = np.concatenate([t.ravel() for _, t in images])
    predictions = np.concatenate([p.ravel() for p, _ in images])
    keep = targets != 255
    expected = confusion_matrix(targets[keep], predictions[keep], labels=range(6))
    np.testing.assert_array_equal(matrix.matrix, expected)
    metrics = compute_metrics(matrix.matrix, NAMES, MAIN)
    present = [0, 1, 2, 3, 5]  # car (4) absent from both
    iou = jaccard_score(targets[keep], predictions[keep], labels=present, average=None)
    f1 = f1_score(targets[keep], predictions[keep], labels=present, average=None)
    np.testing.assert_allclose([metrics.iou[i] for i in present], iou)
    np.testing.assert_allclose([metrics.f1[i] for i in present], f1)
    assert np.isnan(metrics.iou[4]) and np.isnan(metrics.f1[4])
    assert metrics.oa == pytest.approx((targets[keep] == predictions[keep]).mean())
    # the five ISPRS classes without clutter, car absent -> left out
    assert metrics.miou == pytest.approx(iou[:4].mean()) and metrics.mf1 == pytest.approx(f1[:4].mean())
    assert metrics.miou_all == pytest.approx(iou.mean()) and metrics.mf1_all == pytest.approx(f1.mean())
    assert metrics.main_classes == [NAMES[i] for i in range(6) if i != 5]


def test_per_class_loop_oracle():
    prediction, target = random_images(3, n=1, absent=())[0]
    metrics = compute_metrics(ConfusionMatrix(6).update(prediction, target), NAMES, MAIN)
    keep = target != 255
    for cls in range(6):
        tp = np.sum((prediction == cls) & (target == cls) & keep)
        fp = np.sum((prediction == cls) & (target != cls) & keep)
        fn = np.sum((prediction != cls) & (target == cls) & keep)
        assert metrics.iou[cls] == pytest.approx(tp / (tp + fp + fn))
        assert metrics.f1[cls] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_markdown_table_layout():
    metrics = compute_metrics(ConfusionMatrix(6).update(np.zeros((4, 4), int), np.zeros((4, 4), int)), NAMES, MAIN)
    table = metrics.markdown("demo")
    assert "| metric | impervious_surfaces |" in table and "| IoU | 100.00 | - |" in table
    assert "mIoU/mF1 over impervious_surfaces, building, low_vegetation, tree, car" in table


def test_caption_facts_are_typed_in_the_report(tmp_path):
    metrics = compute_metrics(ConfusionMatrix(6).update(np.zeros((4, 4), int), np.zeros((4, 4), int)), NAMES, MAIN)
    metrics.save(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["captions"] == {}  # a text-free model
    metrics.captions = CaptionFacts(store="s", experts=["a", "b"], tiles=4, masked_experts={"a": 0, "b": 4},
                                    class_sources={"a": ["labels"], "b": []}, windows=9, windows_on_grid=4)  # fmt: skip
    metrics.save(tmp_path / "guided")
    report = json.loads((tmp_path / "guided" / "metrics.json").read_text())
    assert report["captions"]["masked_experts"] == {"a": 0, "b": 4} and report["iou"][1] is None
    note = (tmp_path / "guided" / "metrics.md").read_text()
    assert (
        "experts a, b from s; class sources of their prompts: a: labels; b: -. Of 4 tiles, experts masked: b on 4"
        in note
    )
    assert "4 of 9 windows are captioned tiles" in note


def test_the_headline_mean_covers_the_main_classes_the_dataset_names():
    prediction, target = random_images(3, n=1, absent=())[0]
    matrix = ConfusionMatrix(6).update(prediction, target)
    every = compute_metrics(matrix, NAMES, NAMES)  # a dataset without an ISPRS clutter rule (SynDrone, folder)
    assert every.miou == pytest.approx(every.miou_all) and every.main_classes == NAMES
    isprs = compute_metrics(matrix, NAMES, MAIN)
    assert isprs.miou == pytest.approx(np.mean(isprs.iou[:5])) and isprs.miou != pytest.approx(every.miou)
    with pytest.raises(ValueError, match=r"main classes \['water'\] are not classes"):
        compute_metrics(matrix, NAMES, ["water"])


def _field_f1(matrix: np.ndarray) -> np.ndarray:
    """F1 per class as GeoSeg's ``Evaluator.F1`` (tools/metric.py) and mmsegmentation's ``f_score`` compute it: from
    precision and recall, so 0/0 (NaN) for a class without a true positive."""
    tp = np.diag(matrix).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tp / matrix.sum(0)
        recall = tp / matrix.sum(1)
        return 2 * precision * recall / (precision + recall)


def test_f1_of_a_class_without_a_true_positive_follows_the_field():
    # cars (4) are in the ground truth but never predicted; clutter (5) is predicted but never there
    matrix = np.array([
        [50, 5, 0, 0, 0, 5],
        [4, 40, 0, 0, 0, 3],
        [0, 0, 30, 6, 0, 2],
        [0, 0, 5, 25, 0, 1],
        [6, 2, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ])  # fmt: skip
    field = compute_metrics(matrix, NAMES, MAIN)
    expected = _field_f1(matrix)
    assert np.isnan(field.f1[4]) and np.isnan(field.f1[5]) and np.isnan(expected[4])
    np.testing.assert_allclose(field.f1, expected, equal_nan=True)
    assert field.mf1_all == pytest.approx(np.nanmean(expected)) and field.mf1 == pytest.approx(np.nanmean(expected[:5]))
    assert field.iou[4] == 0.0 and field.miou == pytest.approx(np.mean(field.iou[:5]))  # IoU 0 still counts
    zero = compute_metrics(matrix, NAMES, MAIN, f1_without_tp=F1WithoutTruePositive.zero)
    assert zero.f1[4] == 0.0 and zero.mf1 == pytest.approx(np.mean(expected[:4]) * 4 / 5)
    assert zero.mf1 < field.mf1 and zero.miou == field.miou
    # the report says which convention its mF1 follows
    assert "left out of mF1 (mmsegmentation, GeoSeg)" in field.markdown() and '"f1_without_tp": "undefined"' in (
        field.to_json()
    )
    assert "counts as 0 in mF1" in zero.markdown() and "| F1 |" in zero.markdown()
