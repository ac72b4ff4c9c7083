"""Gate modes (``captions.gate``): absolute (the paper's tau), percentile (a threshold per expert and prompt derived
from a calibration sample) and contrastive (a caption must fit its own tile better than the other tiles of its
shard). Each row records ``gate_mode``, ``gate_threshold`` and ``gate_score``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from caption_pipeline.gate import (
    GateSettings,
    RunInfo,
    TileTask,
    calibrate_thresholds,
    calibration_ids,
    caption_tiles,
)
from caption_pipeline.policy import GatePolicy
from caption_pipeline.prompts import TileClasses
from caption_pipeline.scoring import ClipScorer, Score
from flows import gate_store
from flows import generate_captions as flow_module
from flows.console import print_summary
from flows.gate_store import check_gate
from flows.generate_captions import CaptionRunSettings, CaptionRunSummary, generate_captions, shards, summarize
from manifests.caption_store import THRESHOLDS_FILE, compact, read_store, write_fragment
from manifests.errors import InputError
from manifests.run_manifest import CaptionsConfig, GateConfig, load_manifest
from tests.helpers import META, AnsweringExpert, CaptionScorer, demo_data_yaml, flat_tiles, row


class TileScorer:
    """Stands in for CLIP: a caption ``"about tX"`` has similarity 0.9 to tile tX's image and 0.5 to any other
    image; a caption about nothing in particular has 0.5 to every image."""

    model_id = "fake:tile-in-text"

    def __init__(self) -> None:
        self.pools: list[list[str]] = []

    @staticmethod
    def _similarity(caption: str, key: str) -> float:
        return 0.9 if caption == f"about t{key.removeprefix('sha')}" else 0.5

    def score(self, keys, paths, captions, pool=None) -> list[Score]:
        scores = []
        if pool is not None:
            self.pools.append(list(pool[0]))
        for key, caption in zip(keys, captions, strict=True):
            similarity = self._similarity(caption, key)
            others = None
            if pool is not None:
                values = [self._similarity(caption, other) for other in pool[0] if other != key]
                others = float(np.mean(values)) if values else None
            scores.append(Score(2 * similarity - 1, similarity, 2, 1, others))
        return scores


@pytest.fixture
def tiles(tmp_path) -> list[TileTask]:
    return flat_tiles(tmp_path)


def test_the_manifest_gate_and_the_policy_of_each_mode():
    captions = CaptionsConfig(store="s", tau=0.6, experts=[])
    gate = captions.gate
    assert (gate.mode, gate.keep_top, gate.calibration_tiles, gate.margin) == ("absolute", 0.3, 64, 0.02)
    with pytest.raises(ValueError, match="mode"):
        GateConfig(mode="relative")
    with pytest.raises(ValueError, match="extra"):
        GateConfig(tau=0.5)
    absolute = GatePolicy.from_captions(captions)
    assert (absolute.mode, absolute.threshold("e", "p1"), absolute.gate_score(0.7, 0.9)) == ("absolute", 0.6, 0.7)
    contrastive = GatePolicy.from_captions(captions.model_copy(update={"gate": GateConfig(mode="contrastive")}))
    assert contrastive.threshold("e", "p1") == 0.02 and contrastive.gate_score(0.7, 0.6) == pytest.approx(0.1)
    assert contrastive.gate_score(0.7, None) is None and contrastive.gate_score(None, 0.5) is None
    assert contrastive.passes([0.1, 0.01, None], [True, True, True]).tolist() == [True, False, False]
    percentile = GatePolicy.from_captions(
        captions.model_copy(update={"gate": GateConfig(mode="percentile", keep_top=0.25)}), {("e", "p1"): 0.4}
    )
    assert percentile.threshold("e", "p1") == 0.4
    with pytest.raises(InputError, match="no derived threshold for expert 'e', prompt p2"):
        percentile.threshold("e", "p2")
    assert percentile.percentile_threshold([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(0.4)  # 75% quantile
    with pytest.raises(InputError, match="no usable caption"):
        percentile.percentile_threshold([None, float("nan")])
    assert percentile.passes([0.39, 0.4], [True, True], [0.4, 0.4]).tolist() == [False, True]


def test_absolute_records_tau_and_the_similarity(tiles):
    policy = GatePolicy(tau=0.6, max_attempts=2)
    expert = AnsweringExpert(lambda tile, pid, attempt: {"t0": "sim 0.7", "t1": "sim 0.5"}.get(tile) or None)
    rows = caption_tiles(tiles, expert, CaptionScorer(), GateSettings(policy, prompt_ids=("p1",)), RunInfo("r"))
    assert {row["gate_mode"] for row in rows} == {"absolute"} and {row["gate_threshold"] for row in rows} == {0.6}
    assert all(row["gate_score"] == row["similarity"] for row in rows)
    assert [(r["tile_id"], r["attempt"], r["passed"]) for r in rows] == [
        ("t0", 0, True), ("t1", 0, False), ("t2", 0, False), ("t1", 1, False), ("t2", 1, False)]  # fmt: skip


def test_contrastive_fails_another_tiles_caption_and_generic_text_and_passes_the_own(tiles):
    policy = GatePolicy(tau=0.0, max_attempts=2, mode="contrastive", margin=0.02)
    scripts = {
        "t0": ["about t0"],  # its own caption: 0.9 - 0.5 passes at once
        "t1": ["about t2", "about t1"],  # another tile's caption first: 0.5 - (0.5 + 0.9) / 2 < 0; then its own
        "t2": ["roofs and trees", "roofs and trees"],  # generic text fits every tile alike: 0 < margin
    }
    expert = AnsweringExpert(lambda tile, pid, attempt: scripts[tile][attempt])
    scorer = TileScorer()
    rows = caption_tiles(tiles, expert, scorer, GateSettings(policy, prompt_ids=("p1",)), RunInfo("r"))
    got = {(r["tile_id"], r["attempt"]): (r["gate_score"], r["passed"], r["selected"]) for r in rows}
    assert got[("t0", 0)] == (pytest.approx(0.4), True, True)
    assert got[("t1", 0)] == (pytest.approx(-0.2), False, False)
    assert got[("t1", 1)] == (pytest.approx(0.4), True, True)
    assert got[("t2", 0)] == (pytest.approx(0.0), False, True) and got[("t2", 1)][1:] == (False, False)
    assert {(r["gate_mode"], r["gate_threshold"]) for r in rows} == {("contrastive", 0.02)}
    assert all(sorted(pool) == ["sha0", "sha1", "sha2"] for pool in scorer.pools)  # the whole shard, every round
    # Every one of those captions reaches an absolute tau of 0.5: only the contrastive gate tells them apart.
    assert all(r["similarity"] >= 0.5 for r in rows)
    with pytest.raises(InputError, match="contrastive gate: a shard of 1 tile"):
        caption_tiles(tiles[:1], expert, scorer, GateSettings(policy, prompt_ids=("p1",)), RunInfo("r"))


def test_contrastive_score_with_clip_is_own_minus_mean_of_the_other_tiles(clip_config, small_index):
    frame = small_index.frame.sort_values("tile_id").head(4)
    tasks = [
        TileTask(r.tile_id, r.split, small_index.path(r.image_path), None, r.image_sha256,
                 TileClasses("none", {}), "none")
        for r in frame.itertuples(index=False)
    ]  # fmt: skip
    captions = {task.tile_id: f"an aerial image number {n} with roofs" for n, task in enumerate(tasks)}
    expert = AnsweringExpert(lambda tile, pid, attempt: captions[tile])
    scorer = ClipScorer(clip_config)
    policy = GatePolicy(max_attempts=1, mode="contrastive", margin=0.0)
    rows = caption_tiles(tasks, expert, scorer, GateSettings(policy, prompt_ids=("p1",)), RunInfo("r"))
    assert scorer.image_encodes == 4  # the shard's images, each encoded once
    for task, got in zip(tasks, rows, strict=True):
        others = [t for t in tasks if t is not task]
        direct = scorer.score([t.image_sha256 for t in others], [t.image_path for t in others],
                              [captions[task.tile_id]] * len(others))  # fmt: skip
        expected = got["similarity"] - np.mean([s.similarity for s in direct])
        assert got["gate_score"] == pytest.approx(expected, abs=1e-5)
        assert got["passed"] == (got["gate_score"] >= 0.0)


def test_flow_shards_keep_two_tiles_for_contrast():
    assert shards(list("abcde"), 4) == [list("abcd"), ["e"]]
    assert shards(list("abcde"), 4, min_size=2) == [list("abcde")]
    assert shards(list("abcdef"), 4, min_size=2) == [list("abcd"), list("ef")]


def test_compact_refuses_a_store_mixing_modes_or_thresholds(tmp_path):
    store = tmp_path / "mixed"
    write_fragment(store, [row("t1")], META)
    write_fragment(store, [row("t2", gate_mode="contrastive", gate_threshold=0.02, gate_score=0.1)], META)
    with pytest.raises(InputError, match=r"mixes gate modes absolute \(run r\), contrastive \(run r\)") as info:
        compact(store, select=GatePolicy().select)
    assert "\n" not in str(info.value)
    store = tmp_path / "thresholds"
    write_fragment(store, [row("t1", gate_mode="percentile", gate_threshold=0.5)], META)
    write_fragment(store, [row("t2", gate_mode="percentile", gate_threshold=0.6)], META)
    write_fragment(store, [row("t3", gate_mode="percentile", gate_threshold=0.6, run_id="late")], META)
    with pytest.raises(InputError, match=r"gate mode percentile with several thresholds, e/p1: ") as info:
        compact(store, select=GatePolicy().select)
    # The runs behind each threshold are named, so the user knows whose rows to remove.
    assert "0.5 (run r)" in str(info.value) and "0.6 (run late, r)" in str(info.value)
    assert "\n" not in str(info.value)


def test_settings_of_another_gate_mode_are_refused(gated_manifest):
    for mode, setting, owner in [("absolute", "keep_top: 0.5", "percentile"), ("contrastive", "calibration_tiles: 8",
                                 "percentile"), ("percentile", "margin: 0.05", "contrastive"),
                                 ("absolute", "margin: 0.05", "contrastive")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"is a setting of mode {owner}, not {mode}"):
            GateConfig.model_validate({"mode": mode, **dict([setting.split(": ")])})
    with pytest.raises(InputError) as info:
        load_manifest(gated_manifest("{mode: percentile, margin: 0.05}"))
    assert "captions.gate: margin is a setting of mode contrastive, not percentile" in str(info.value)
    assert "\n" not in str(info.value)
    assert load_manifest(gated_manifest("{mode: percentile, keep_top: 0.5}")).captions.gate.keep_top == 0.5


def test_a_store_gated_at_another_threshold_is_refused(tmp_path):
    store = tmp_path / "store"
    write_fragment(store, [row("t1"), row("t2", prompt="p2")], META)  # absolute, tau 0.55
    captions = CaptionsConfig(store=store, tau=0.6, experts=[])
    with pytest.raises(InputError) as info:
        check_gate(store, captions, ["e"])
    message = str(info.value)
    assert message == (
        f"caption store {store}: gated in mode absolute at captions.tau 0.55 (e/p1, e/p2), this manifest sets "
        "captions.tau 0.6; caption into a new store, or set captions.tau back to the recorded value"
    )
    check_gate(store, captions.model_copy(update={"tau": 0.55}), ["e"])  # the recorded tau: accepted
    check_gate(store, captions, ["other"])  # another expert's rows are not this run's concern
    contrastive = tmp_path / "contrastive"
    write_fragment(contrastive, [row("t1", gate_mode="contrastive", gate_threshold=0.02)], META)
    margin = captions.model_copy(update={"gate": GateConfig(mode="contrastive", margin=0.05)})
    with pytest.raises(
        InputError,
        match=r"at captions.gate.margin 0.02 \(e/p1\), this manifest sets captions.gate."
        r"margin 0.05; caption into a new store, or set captions.gate.margin back",
    ):
        check_gate(contrastive, margin, ["e"])
    check_gate(contrastive, captions.model_copy(update={"gate": GateConfig(mode="contrastive")}), ["e"])


def test_calibration_sample_spreads_over_the_run_and_is_reproducible():
    ids = [f"t{n:02d}" for n in range(12)]
    assert calibration_ids(ids, 4) == ["t00", "t04", "t07", "t11"]
    assert calibration_ids(list(reversed(ids)), 4) == calibration_ids(ids, 4)  # sorted ids: the same sample
    assert calibration_ids(ids[:3], 4) == ids[:3] and calibration_ids([], 4) == []
    assert calibration_ids(ids, 1) == ["t00"] and len(calibration_ids(ids, 11)) == 11


def test_calibration_without_a_usable_caption_says_what_to_do_in_one_line(tiles):
    expert = AnsweringExpert(lambda tile, pid, attempt: None)  # never a usable caption
    settings = GateSettings(GatePolicy(mode="percentile"), prompt_ids=("p1",))
    with pytest.raises(InputError) as info:
        calibrate_thresholds(tiles, expert, CaptionScorer(), settings, RunInfo("r"))
    message = str(info.value)
    assert "\n" not in message and "raise captions.gate.calibration_tiles" in message and "--experts" in message


def test_gate_description_and_the_summary_show_the_gate():
    assert GatePolicy(tau=0.55).describe() == "gate: absolute, tau 0.55"
    contrastive = GatePolicy(mode="contrastive", margin=0.02).describe()
    assert contrastive == "gate: contrastive, margin 0.02 against the other tiles of each shard"
    thresholds = {(f"e{n}", "p1"): 0.6621 + n / 100 for n in range(8)}
    percentile = GatePolicy(mode="percentile", keep_top=0.3, thresholds=thresholds).describe()
    assert percentile.startswith(
        "gate: percentile keep_top 0.3, thresholds per expert/prompt: e0/p1 0.662, e1/p1 0.672"
    )
    assert percentile.endswith("e5/p1 0.712, ... (2 more)")
    summary = CaptionRunSummary(Path("s"), 1, 0, 0, 0.1, summarize(pd.DataFrame()), gate="gate: absolute, tau 0.55")
    out = io.StringIO()
    print_summary(summary, Console(file=out, width=200))
    assert "gate: absolute, tau 0.55" in out.getvalue().splitlines()


@pytest.fixture
def gated_manifest(tmp_path, small_index, clip_config):
    def write(gate: str, name: str = "run.yaml", test_source: str = "labels") -> Path:
        path = tmp_path / name
        path.write_text(
            f"""
name: gate-test
{demo_data_yaml(small_index)}
captions:
  store: {tmp_path / "store"}
  tau: 0.6
  max_attempts: 2
  shard_size: 4
  gate: {gate}
  clip: {{model: demo-tiny-clip, pretrained: null, config: {clip_config.config}, checkpoint: {clip_config.checkpoint},
          device: cpu}}
  prompts: {{class_source: {{train: labels, test: {test_source}}}, allow_labels_on_eval: true}}
  experts:
    - {{name: annotation, backend: annotation}}
"""
        )
        return path

    return write


def test_percentile_derives_thresholds_records_them_and_a_resume_reuses_them(
    prefect_api, gated_manifest, small_index, tmp_path, monkeypatch
):
    manifest = gated_manifest("{mode: percentile, keep_top: 0.5, calibration_tiles: 4}")
    store = tmp_path / "store"
    generate_captions(CaptionRunSettings(manifest, store=store, limit=6))
    sidecar = json.loads((store / THRESHOLDS_FILE).read_text())
    calibration = calibration_ids(sorted(small_index.frame["tile_id"])[:6], 4)  # spread over the run's 6 tiles
    assert (
        sidecar["tiles"] == {"annotation": calibration}
        and sidecar["keep_top"] == 0.5
        and sidecar["calibration_tiles"] == 4
    )
    frame = read_store(store)
    assert set(frame["gate_mode"]) == {"percentile"} and frame["tile_id"].nunique() == 6
    for pid, group in frame.groupby("prompt_id"):
        threshold = sidecar["thresholds"]["annotation"][pid]
        # derived from attempt 0 on the calibration tiles (annotation is deterministic: the run's rows are the same)
        sample = group[group["tile_id"].isin(calibration) & (group["attempt"] == 0)]
        assert threshold == pytest.approx(np.quantile(sample["similarity"].astype(float), 0.5), abs=1e-6)
        assert group["gate_threshold"].to_numpy() == pytest.approx(threshold, abs=1e-6)
        assert sample["passed"].sum() == 2  # keep_top 0.5 of 4 distinct scores
        assert (group["passed"] == (group["gate_score"] >= np.float32(threshold))).all()
    # A resumed run reuses the stored thresholds: no calibration, the same numbers on the new rows.
    before = (store / THRESHOLDS_FILE).read_text()

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed run re-derived the thresholds")

    monkeypatch.setattr(gate_store, "calibrate_thresholds", no_calibration)
    summary = generate_captions(CaptionRunSettings(manifest, store=store))
    assert summary.tiles == 12 and summary.skipped_keys == 6 * 3
    assert (store / THRESHOLDS_FILE).read_text() == before
    frame = read_store(store)
    assert frame["tile_id"].nunique() == 12
    for pid, group in frame.groupby("prompt_id"):
        assert group["gate_threshold"].to_numpy() == pytest.approx(sidecar["thresholds"]["annotation"][pid], abs=1e-6)
    # Thresholds derived otherwise are refused, not re-derived; so is another gate mode on this store.
    other = gated_manifest("{mode: percentile, keep_top: 0.2, calibration_tiles: 4}", name="other.yaml")
    with pytest.raises(InputError, match=r"keep_top 0.5 \(manifest: 0.2\)"):
        generate_captions(CaptionRunSettings(other, store=store))
    contrastive = gated_manifest("{mode: contrastive}", name="contrastive.yaml")
    with pytest.raises(InputError, match="gated in mode percentile, this manifest gates in mode contrastive"):
        generate_captions(CaptionRunSettings(contrastive, store=store))


def test_contrastive_flow_scores_every_usable_caption(prefect_api, gated_manifest, tmp_path):
    manifest = gated_manifest("{mode: contrastive, margin: 0.0}")
    store = tmp_path / "contrastive"
    generate_captions(
        CaptionRunSettings(manifest, store=store, limit=5)
    )  # shards of 4 and 1: the last tile joins the first shard
    frame = read_store(store)
    assert set(frame["gate_mode"]) == {"contrastive"} and set(frame["gate_threshold"]) == {0.0}
    usable = frame[frame["usable"]]
    assert len(usable) == 5 * 3 and usable["gate_score"].notna().all()
    assert (frame["passed"] == (frame["usable"] & (frame["gate_score"] >= 0.0))).all()
    assert (usable["gate_score"] < usable["similarity"]).any()  # a score, not the similarity


def test_contrastive_refuses_shards_of_one_tile_and_another_margin_up_front(gated_manifest, tmp_path, monkeypatch):
    def no_flow(**options):
        def run(*args):
            raise AssertionError("the flow started")

        return run

    monkeypatch.setattr(flow_module.generate_captions_flow, "with_options", no_flow)
    manifest = gated_manifest("{mode: contrastive}")
    with pytest.raises(InputError, match=r"a shard size of 1 .* raise --shard-size") as info:
        generate_captions(CaptionRunSettings(manifest, store=tmp_path / "new", shard_size=1))
    assert "\n" not in str(info.value) and not (tmp_path / "new").exists()
    store = tmp_path / "store"  # the manifest's store: a run gated at margin 0.0 wrote it
    write_fragment(store, [row("t1", expert="annotation", gate_mode="contrastive", gate_threshold=0.0,
                               clip_model=flow_module.clip_weights(load_manifest(manifest).captions.clip).model_id)],
                   META)  # fmt: skip
    before = sorted(store.iterdir())
    with pytest.raises(InputError, match=r"gated in mode contrastive at captions.gate.margin 0 \(annotation/p1\)"):
        generate_captions(manifest)
    assert sorted(store.iterdir()) == before


def test_percentile_samples_only_tiles_the_expert_can_caption_and_fails_before_the_flow(
    gated_manifest, small_index, tmp_path, monkeypatch
):
    manifest = gated_manifest("{mode: percentile, calibration_tiles: 3}", test_source="none")
    loaded = load_manifest(manifest)
    tile_ids = sorted(small_index.frame["tile_id"])
    store = tmp_path / "sampled"
    thresholds = gate_store.derive_thresholds(loaded, str(store), ["annotation"], tile_ids, "r")
    sidecar = json.loads((store / THRESHOLDS_FILE).read_text())
    train = sorted(small_index.frame.loc[small_index.frame["split"] == "train", "tile_id"])
    assert sidecar["tiles"] == {"annotation": calibration_ids(train, 3)}  # no test tile: its class source is none
    assert set(thresholds) == {("annotation", pid) for pid in ("p1", "p2", "p3")}
    tests = sorted(small_index.frame.loc[small_index.frame["split"] == "test", "tile_id"])
    assert gate_store.derive_thresholds(loaded, str(tmp_path / "none"), ["annotation"], tests, "r") == {}

    def no_caption(tiles, expert, *args):
        raise InputError(f"percentile gate: expert '{expert.name}' gave no usable caption (stand-in)")

    def no_flow(**options):
        def run(*args):
            raise AssertionError("the flow started")

        return run

    monkeypatch.setattr(gate_store, "calibrate_thresholds", no_caption)
    monkeypatch.setattr(flow_module.generate_captions_flow, "with_options", no_flow)
    with pytest.raises(InputError, match="gave no usable caption"):
        generate_captions(CaptionRunSettings(manifest, store=tmp_path / "failing"))
