"""The caption headroom study's bookkeeping, on a toy: rows paired by seed, its manifests, its corruption rates."""

from __future__ import annotations

import argparse

import pytest
import yaml

from bench.caption_headroom import (
    TEXT_FREE_ROW,
    Headroom,
    kind_rate,
    paired_differences,
    studies,
    study_manifest,
    table,
)


def test_differences_are_paired_by_seed_not_by_order():
    guided = {2: 0.50, 0: 0.40, 1: 0.45}
    plain = {0: 0.30, 1: 0.44, 2: 0.51, 3: 0.9}  # seed 3 has no text-guided run: left out
    assert paired_differences(guided, plain) == pytest.approx([0.10, 0.01, -0.01])
    with pytest.raises(ValueError, match="no seed in common"):
        paired_differences({5: 0.5}, plain)


def test_table_gives_the_paired_mean_and_spread(tmp_path):
    bench = Headroom(argparse.Namespace(steps=10, seeds=[0, 1, 2], work=tmp_path))
    bench.by_seed = {TEXT_FREE_ROW: {0: 0.30, 1: 0.40, 2: 0.50}, "oracle": {2: 0.60, 0: 0.40, 1: 0.50}}
    bench.gate_quality = {"synthetic, corruption 0.5, gate on": {"corrupted": 0.5, "precision": 0.8, "recall": 0.6}}
    lines = table(bench, ["oracle"])
    # by seed: +10 points each time (std 0); unpaired, sorted by value, the spread would be the same only by chance
    assert "| oracle | 50.00 +- 10.00 | +10.00 +- 0.00 |" in lines
    assert f"| {TEXT_FREE_ROW} | 40.00 +- 10.00 | - |" in lines
    assert any("precision 0.80, recall 0.60" in line for line in lines)


def test_kind_rate_corrupts_a_caption_with_the_studied_probability():
    for corruption in (0.25, 0.5):
        assert 1 - (1 - kind_rate(corruption)) ** 3 == pytest.approx(corruption)


def test_study_manifests_set_protocol_expert_and_gate(tmp_path):
    rows = {study.name: study for study in studies()}
    assert set(rows) == {"oracle", "synthetic25_gate_off", "synthetic25_gate_on", "synthetic50_gate_off",
                         "synthetic50_gate_on", "predicted", "blind"}  # fmt: skip
    on = yaml.safe_load(study_manifest(rows["synthetic50_gate_on"], tmp_path, tau=0.61).read_text())
    off = yaml.safe_load(study_manifest(rows["synthetic50_gate_off"], tmp_path, tau=0.61).read_text())
    assert on["captions"]["tau"] == 0.61 and on["captions"]["max_attempts"] > 1
    assert off["captions"]["tau"] == 0.0 and off["captions"]["max_attempts"] == 1
    assert on["captions"]["prompts"]["protocol"] == "oracle"
    assert [expert["backend"] for expert in on["captions"]["experts"]] == ["synthetic"]
    assert on["captions"]["store"] != off["captions"]["store"]
    blind = yaml.safe_load(study_manifest(rows["blind"], tmp_path).read_text())
    assert blind["captions"]["prompts"] == {"protocol": "blind"}
    assert blind["captions"]["tau"] == 0.0 and blind["captions"]["max_attempts"] == 1  # only synthetic rows filter
    assert [expert["backend"] for expert in blind["captions"]["experts"]] == ["transformers"]
