"""``flows run calibrate-gate``: own-tile vs shuffled-tile similarities, their AUC and the suggested tau.

The tiny CLIP is random, so its distributions are noise: these tests check the structure and recompute every number
independently; a fake scorer whose own pairs score higher checks that separation shows as AUC 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from typer.testing import CliRunner

from caption_pipeline.scoring import ClipScorer
from flows.calibrate import (
    AUC_FLOOR,
    DEFAULT_KEEP_TOP,
    DEFAULT_MARGIN,
    TileSample,
    _gate_setting,
    calibrate_gate,
    derangement,
    print_calibration,
    roc_auc,
    tau_at_false_pass,
)
from flows.cli import app
from manifests.caption_store import StoreMeta, read_store, write_fragment
from manifests.errors import InputError
from tests.helpers import annotation_store

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_index, clip_config) -> tuple[Path, Path]:
    """A manifest with a captions section over the small index, and a store the annotation expert wrote."""
    folder = tmp_path_factory.mktemp("calibrate")
    store = annotation_store(folder, small_index, clip_config)
    manifest = folder / "run.yaml"
    manifest.write_text(
        f"name: tiny\ndataset: {{name: vaihingen, id: demo, root: {small_index.root.parent / 'raw'}, split: custom, "
        f"custom_splits: {{train: ['1', '3'], test: ['7']}}}}\ntiling: {{size: 64, out: {small_index.root}}}\n"
        f"captions:\n  store: {store}\n  tau: 0.55\n"
        f"  clip: {{model: demo-tiny-clip, pretrained: null, config: {clip_config.config}, "
        f"checkpoint: {clip_config.checkpoint}, device: cpu}}\n"
        "  experts:\n    - {name: annotation, backend: annotation}\n"
    )
    return manifest, store


def brute_force_auc(own: np.ndarray, shuffled: np.ndarray) -> float:
    wins = sum(float(a > b) + 0.5 * float(a == b) for a in own for b in shuffled)
    return wins / (len(own) * len(shuffled))


def test_helpers_compute_what_they_say():
    rng = np.random.default_rng(3)
    for n in (2, 3, 7):
        for _ in range(20):
            assert not (derangement(n, rng) == np.arange(n)).any()
    own, shuffled = np.array([0.6, 0.5, 0.5, 0.9]), np.array([0.5, 0.4, 0.7, 0.5, 0.5])
    assert roc_auc(own, shuffled) == pytest.approx(brute_force_auc(own, shuffled))
    values = rng.random(37)
    values[:5] = values[5]  # ties at the top must not let more through
    for share in (0.01, 0.05, 0.2, 0.5):
        tau = tau_at_false_pass(values, share)
        assert (values >= tau).mean() <= share < (values >= np.nextafter(tau, -np.inf)).mean()
    assert _gate_setting(SimpleNamespace(), "keep_top", DEFAULT_KEEP_TOP) == 0.3
    assert _gate_setting(SimpleNamespace(gate=SimpleNamespace(margin=0.1)), "margin", DEFAULT_MARGIN) == 0.1
    assert _gate_setting(SimpleNamespace(gate=None), "margin", DEFAULT_MARGIN) == 0.02


def test_calibration_draws_from_one_split(inputs, small_index):
    manifest, _ = inputs
    train = set(small_index.split("train")["tile_id"])
    result = calibrate_gate(manifest, TileSample(64, split="train"))
    assert set(result.pairs["tile_id"]) == train and set(result.pairs["image_tile_id"]) <= train
    with pytest.raises(InputError, match=r"--split: tile index .* has no tiles of split 'val' \(it has: test, train\)"):
        calibrate_gate(manifest, TileSample(64, split="val"))
    test = set(small_index.split("test")["tile_id"])
    assert set(calibrate_gate(manifest, TileSample(64, split="test")).pairs["image_tile_id"]) == test


def _scores(manifest: Path, store: Path, scorer: ClipScorer, tile_ids, texts: list[str]) -> list:
    """The scorer's scores of ``texts`` against the images of ``tile_ids``, pair by pair."""
    images = index_frame(manifest).set_index("tile_id").loc[list(tile_ids)]
    paths = [manifest_root(manifest) / path for path in images["image_path"]]
    return scorer.score(images["image_sha256"].tolist(), paths, texts)


def test_calibration_numbers_are_exact_on_the_tiny_clip(inputs, clip_config):
    manifest, store = inputs
    result = calibrate_gate(manifest, TileSample(8, seed=1), false_pass=0.1)
    pairs = result.pairs
    assert result.sample_size == 8 and pairs["tile_id"].nunique() == 8
    assert set(pairs["expert"]) == {"annotation"} and set(pairs["prompt_id"]) == {"p1", "p2", "p3"}
    own, shuffled = pairs[pairs["kind"] == "own"], pairs[pairs["kind"] == "shuffled"]
    assert (own["tile_id"] == own["image_tile_id"]).all()
    assert (shuffled["tile_id"] != shuffled["image_tile_id"]).all()  # never a caption with its own tile
    partner = shuffled.drop_duplicates("tile_id").set_index("tile_id")["image_tile_id"]
    assert sorted(partner) == sorted(partner.index)  # one derangement of the sample, shared by every prompt
    assert (shuffled.groupby("tile_id")["image_tile_id"].nunique() == 1).all()
    np.testing.assert_allclose(pairs["similarity"], pairs["raw_cosine"] / 2 + 0.5)

    # Own and shuffled similarities are what the scorer gives each pair, and every number follows from them.
    scorer = ClipScorer(clip_config)
    for frame_kind in (own, shuffled):
        scores = _scores(manifest, store, scorer, frame_kind["image_tile_id"], read_selected(store, frame_kind))
        np.testing.assert_allclose(frame_kind["raw_cosine"], [score.raw_cosine for score in scores], atol=1e-5)
    group = result.experts["annotation"]
    own_values, shuffled_values = own["similarity"].to_numpy(), shuffled["similarity"].to_numpy()
    assert group.auc == pytest.approx(brute_force_auc(own_values, shuffled_values))
    for prompt, by_prompt in result.prompts["annotation"].items():
        mine = pairs[pairs["prompt_id"] == prompt]
        assert by_prompt.auc == pytest.approx(
            brute_force_auc(mine.loc[mine["kind"] == "own", "similarity"].to_numpy(),
                            mine.loc[mine["kind"] == "shuffled", "similarity"].to_numpy())
        )  # fmt: skip
    assert (shuffled_values >= group.tau_at_false_pass).mean() <= 0.1
    assert group.false_pass_at_suggested == (shuffled_values >= group.tau_at_false_pass).mean()
    assert group.pass_rates["absolute"] == (own_values >= 0.55).mean() and group.pass_rates["percentile"] == 0.3
    assert group.own.mean == pytest.approx(own_values.mean()) and group.own.n == len(own) == 24
    thresholds = np.unique(np.concatenate([own_values, shuffled_values]))
    best = max((own_values >= t).mean() - (shuffled_values >= t).mean() for t in thresholds)
    assert group.youden_j == pytest.approx(best)

    # Contrastive: own minus the mean over the sample's other tiles, from the scorer pair by pair.
    tiles = sorted(partner.index)
    contrasts = []
    for row in own.itertuples():
        others = [tile for tile in tiles if tile != row.tile_id]
        text = read_selected(store, pd.DataFrame([row._asdict()]))[0]
        scores = _scores(manifest, store, scorer, others, [text] * len(others))
        contrasts.append(row.similarity - np.mean([score.similarity for score in scores]))
    assert group.pass_rates["contrastive"] == pytest.approx((np.array(contrasts) >= 0.02 - 1e-6).mean())

    written = json.loads((store / "calibration" / "calibration.json").read_text())
    assert written["raw_cosine_tau"] == pytest.approx(2 * written["tau"] - 1) and written["tau"] == 0.55
    assert written["clip_model"] == scorer.model_id and written["sample_size"] == 8 and written["seed"] == 1
    assert written["experts"]["annotation"]["auc"] == pytest.approx(group.auc)
    assert set(written["experts"]["annotation"]["pass_rates"]) == {"absolute", "percentile", "contrastive"}
    csv = pd.read_csv(store / "calibration" / "similarities.csv")
    assert list(csv.columns[:6]) == ["expert", "prompt_id", "tile_id", "kind", "similarity", "raw_cosine"]
    assert len(csv) == 48 and set(csv["kind"]) == {"own", "shuffled"}
    assert (store / "calibration" / "distributions.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((store / "calibration").glob(".*.tmp"))

    again = calibrate_gate(manifest, TileSample(8, seed=1), false_pass=0.1)
    pd.testing.assert_frame_equal(again.pairs, pairs)  # the seed draws the same sample and shuffle


def index_frame(manifest: Path) -> pd.DataFrame:
    from manifests.run_manifest import load_manifest
    from manifests.tile_index import read_tile_index

    return read_tile_index(load_manifest(manifest).tiling.out).frame


def manifest_root(manifest: Path) -> Path:
    from manifests.run_manifest import load_manifest

    return Path(load_manifest(manifest).tiling.out)


def read_selected(store: Path, pairs: pd.DataFrame) -> list[str]:
    from manifests.caption_store import selected_captions

    captions = selected_captions(store).set_index(["tile_id", "expert", "prompt_id"])["caption"]
    return [captions[key] for key in zip(pairs["tile_id"], pairs["expert"], pairs["prompt_id"], strict=True)]


class FakeScorer:
    """Each tile image is its own axis; a caption naming a tile points mostly along that tile's axis."""

    model_id = "fake:clip:gelu"

    def __init__(self, sha_of_tile: dict[str, str]) -> None:
        self.axis = {sha: i for i, sha in enumerate(sorted(set(sha_of_tile.values())))}
        self.sha_of_tile = sha_of_tile
        self.dim = len(self.axis) + 1
        self.text_encoder = SimpleNamespace(encode=self.encode)

    def image_embeddings(self, keys: list[str], paths: list[Path]) -> torch.Tensor:
        return F.one_hot(torch.tensor([self.axis[key] for key in keys]), self.dim).float()

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[int], list[int]]:
        rows = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            rows[row, self.axis[self.sha_of_tile[text.split("|")[0]]]] = 0.8
            rows[row, -1] = 0.6
        return rows, [1] * len(texts), [1] * len(texts)


def test_a_scorer_that_tells_own_from_shuffled_gives_auc_one(inputs, tmp_path):
    manifest, store = inputs
    frame = read_store(store)
    named = frame.assign(caption=frame["tile_id"] + "|" + frame["prompt_id"])
    write_fragment(tmp_path / "named", named, StoreMeta(["a"], "tiny", 0.0))
    tiles = index_frame(manifest)
    scorer = FakeScorer(dict(zip(tiles["tile_id"], tiles["image_sha256"], strict=True)))
    result = calibrate_gate(manifest, TileSample(64), store=tmp_path / "named", scorer=scorer)
    group = result.experts["annotation"]
    assert result.sample_size == 12 and group.auc == 1.0 and group.youden_j == 1.0
    assert group.own.mean == pytest.approx(0.9) and group.shuffled.mean == pytest.approx(0.5)
    assert group.own_pass_at_suggested == 1.0 and group.false_pass_at_suggested == 0.0
    assert group.pass_rates == {"absolute": 1.0, "percentile": 0.3, "contrastive": 1.0}
    assert json.loads((tmp_path / "named" / "calibration" / "calibration.json").read_text())["clip_model"] == (
        "fake:clip:gelu"
    )


def test_cli_prints_both_distributions_the_auc_and_the_suggested_tau(inputs):
    manifest, store = inputs
    result = runner.invoke(app, ["run", "calibrate-gate", "--manifest", str(manifest), "--sample", "6"])
    assert result.exit_code == 0, result.output
    written = json.loads((store / "calibration" / "calibration.json").read_text())
    group = written["experts"]["annotation"]
    own, shuffled = group["own"], group["shuffled"]
    line = next(line for line in result.output.splitlines() if line.startswith("annotation: own"))
    assert f"own {own['mean']:.3f} [{own['quantiles']['q05']:.3f}" in line
    assert f"shuffled {shuffled['mean']:.3f} [{shuffled['quantiles']['q05']:.3f}" in line
    assert f"AUC {group['auc']:.3f}" in line and f"false-pass tau {group['tau_at_false_pass']:.3f}" in line
    assert "Youden tau only measures" in result.output and "random tiles of the sample" in result.output
    if not group["low_auc"]:
        assert f"absolute: set captions.tau: {group['tau_at_false_pass']:.3f} (false-pass" in result.output
        assert f"captions.gate.margin: {group['margin_at_false_pass']:.3f}" in result.output
    else:
        assert "CLIP cannot tell this expert's captions from shuffled ones" in result.output
    assert "raw cosine 0.100" in result.output and "6 tiles (seed 0)" in result.output


@pytest.mark.parametrize("case", ["empty store", "no usable captions", "no tile index", "unknown manifest"])
def test_cli_exits_2_with_one_line_on_bad_input(inputs, tmp_path, case):
    manifest, store = inputs
    args = ["run", "calibrate-gate", "--manifest", str(manifest), "--store", str(tmp_path / "store")]
    (tmp_path / "store").mkdir()
    if case == "no usable captions":
        frame = read_store(store)
        write_fragment(tmp_path / "store", frame.assign(caption="", usable=False), StoreMeta(["a"], "tiny", 0.0))
    elif case == "no tile index":
        text = manifest.read_text().replace(f"out: {manifest_root(manifest)}", f"out: {tmp_path / 'none'}")
        args[3] = str(tmp_path / "run.yaml")
        Path(args[3]).write_text(text)
    elif case == "unknown manifest":
        args[3] = "no-such-manifest"
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    if case in ("empty store", "no usable captions"):
        assert f"flows run generate-captions --manifest {manifest} --limit N" in lines[0]


class BlindScorer(FakeScorer):
    """Every caption embeds the same: own and shuffled pairs score alike (AUC 0.5)."""

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[int], list[int]]:
        rows = torch.zeros(len(texts), self.dim)
        rows[:, -1] = 1.0
        return rows, [1] * len(texts), [1] * len(texts)


def _named_store(inputs, folder: Path) -> tuple[Path, dict[str, str]]:
    manifest, store = inputs
    frame = read_store(store)
    write_fragment(folder, frame.assign(caption=frame["tile_id"] + "|" + frame["prompt_id"]),
                   StoreMeta(["a"], "tiny", 0.0))  # fmt: skip
    tiles = index_frame(manifest)
    return folder, dict(zip(tiles["tile_id"], tiles["image_sha256"], strict=True))


def test_suggestions_per_gate_mode_and_the_contrastive_margin(inputs, tmp_path):
    manifest, _ = inputs
    store, shas = _named_store(inputs, tmp_path / "named")
    result = calibrate_gate(manifest, TileSample(64), store=store, scorer=FakeScorer(shas), false_pass=0.05)
    group = result.experts["annotation"]
    # A shuffled caption scores 0.5 with the tile it is scored against, 0.9 with its own tile and 0.5 with the rest:
    # its own-minus-others is 0.5 - (0.9 + 0.5 * (n - 2)) / (n - 1); an own caption's is 0.9 - 0.5.
    n = result.sample_size
    shuffled = 0.5 - (0.9 + 0.5 * (n - 2)) / (n - 1)
    pairs = result.pairs
    np.testing.assert_allclose(pairs.loc[pairs["kind"] == "shuffled", "contrast"], shuffled, atol=1e-6)
    np.testing.assert_allclose(pairs.loc[pairs["kind"] == "own", "contrast"], 0.4, atol=1e-6)
    # Every shuffled caption scores the same: the false-pass margin is just above it, and lets none through.
    highest = pairs.loc[pairs["kind"] == "shuffled", "contrast"].max()
    assert group.margin_at_false_pass == pytest.approx(shuffled, abs=1e-6) and group.margin_at_false_pass > highest
    assert group.own_pass_at_margin == 1.0 and not group.low_auc
    written = json.loads((store / "calibration" / "calibration.json").read_text())
    tips = written["experts"]["annotation"]["suggestions"]
    assert tips["absolute"].startswith(f"captions.tau: {group.tau_at_false_pass:.3f} (false-pass 0.0%")
    assert tips["percentile"].startswith("captions.gate.keep_top: 1.00 (share of own captions above")
    assert tips["contrastive"].startswith(f"captions.gate.margin: {group.margin_at_false_pass:.3f}")
    assert "warning" not in written["experts"]["annotation"] and written["auc_floor"] == AUC_FLOOR
    assert "random tiles of the sample" in written["contrastive_note"]
    assert not (store / "calibration" / "calibration.prev.json").exists() and not result.replaced


def test_low_auc_warns_instead_of_recommending_and_keeps_the_previous_calibration(inputs, tmp_path):
    manifest, _ = inputs
    store, shas = _named_store(inputs, tmp_path / "named")
    first = calibrate_gate(manifest, TileSample(64), store=store, scorer=FakeScorer(shas))
    before = (store / "calibration" / "calibration.json").read_text()
    result = calibrate_gate(manifest, TileSample(64), store=store, scorer=BlindScorer(shas))
    group = result.experts["annotation"]
    assert group.auc == 0.5 < AUC_FLOOR and group.low_auc and not first.experts["annotation"].low_auc
    assert result.replaced and (store / "calibration" / "calibration.prev.json").read_text() == before
    written = json.loads((store / "calibration" / "calibration.json").read_text())["experts"]["annotation"]
    assert written["low_auc"] is True and written["suggestions"] == {}
    assert "CLIP cannot tell this expert's captions from shuffled ones (AUC 0.50" in written["warning"]
    out = Console(record=True, width=300)
    print_calibration(result, out)
    text = out.export_text()
    warning = next(line for line in text.splitlines() if line.startswith("warning: annotation"))
    assert "no threshold will filter by fit; check the CLIP weights" in warning
    assert "set captions.tau" not in text and "set captions.gate" not in text
    assert "calibration.prev.json" in text and "replaced" in text
