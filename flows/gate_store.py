"""What a caption store must agree with before a run adds to it (scorer, gate mode, thresholds), and a percentile
gate's thresholds: derived once from a calibration sample, kept beside the store, reused on resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from caption_pipeline.experts import expert_class
from caption_pipeline.gate import (
    GateSettings,
    RunInfo,
    calibrate_thresholds,
    calibration_ids,
    class_sources,
    tile_tasks,
)
from caption_pipeline.policy import GatePolicy
from flows import model_cache
from manifests.caption_store import (
    THRESHOLDS_FILE,
    gate_thresholds,
    read_gate_thresholds,
    scorers,
    write_gate_thresholds,
)
from manifests.errors import InputError
from manifests.run_manifest import CaptionsConfig, ExpertConfig, RunManifest
from manifests.tile_index import TileIndex, read_tile_index


def run_policy(captions: CaptionsConfig, store: str | Path) -> GatePolicy:
    """The gate policy of a run into ``store``: the manifest's, with the thresholds derived before the run (the
    store's sidecar) where its gate mode derives them."""
    policy = GatePolicy.from_captions(captions)
    return policy.with_thresholds(stored_thresholds(store)) if policy.gate_mode.derives_thresholds else policy


def stored_thresholds(store: str | Path) -> dict[tuple[str, str], float]:
    """A percentile gate's thresholds per (expert, prompt id) from the store's sidecar (none where it has none)."""
    content = read_gate_thresholds(store) or {}
    return {
        (expert, pid): float(value)
        for expert, prompts in content.get("thresholds", {}).items()
        for pid, value in prompts.items()
    }


def check_thresholds(store: str | Path, captions: CaptionsConfig, model_id: str) -> None:
    """Refuse to resume a percentile gate whose stored thresholds were derived otherwise (another ``keep_top``,
    calibration sample size or CLIP network): they are reused, never re-derived silently.

    Raises:
        InputError: the sidecar disagrees with the manifest.
    """
    content = read_gate_thresholds(store)
    if content is None:
        return
    wanted = {"keep_top": captions.gate.keep_top, "calibration_tiles": captions.gate.calibration_tiles,
              "clip_model": model_id}  # fmt: skip
    differ = [f"{key} {content.get(key)!r} (manifest: {value!r})" for key, value in wanted.items()
              if content.get(key) != value]  # fmt: skip
    if differ:
        raise InputError(
            f"gate thresholds {Path(store) / THRESHOLDS_FILE}: derived with {', '.join(differ)}; they are reused, "
            "not re-derived: caption into a new store, or delete the file together with the store's rows"
        )


def derive_thresholds(
    manifest: RunManifest, store: str, experts: list[str], tile_ids: list[str], run_id: str
) -> dict[tuple[str, str], float]:
    """A percentile gate's thresholds for ``experts``: those in the store's sidecar are reused as stored; the
    missing (expert, prompt) pairs are derived from attempt 0 on each expert's calibration sample and added to the
    sidecar, which the shard tasks then read.

    The sample is ``calibration_tiles`` of the run's tiles ``tile_ids``, evenly spaced over their sorted ids
    (:func:`calibration_ids`), drawn from the tiles the expert can caption: an expert that describes the class mask
    (``needs_class_mask``) only from splits whose class source is not ``none``. An expert that can caption none of
    the run's tiles needs no threshold for this run and gets none. The sidecar records each expert's sample.

    Raises:
        InputError: an expert without a usable caption for a prompt on its sample (one line, with what to do).
    """
    captions = manifest.captions
    content = read_gate_thresholds(store) or {}
    thresholds = stored_thresholds(store)
    missing = [name for name in experts if any((name, pid) not in thresholds for pid in captions.prompts.ids)]
    if not missing:
        return thresholds
    index = read_tile_index(manifest.tiling.out)
    frame = index.frame[index.frame["tile_id"].isin(set(tile_ids))]
    sources = class_sources(frame, captions.prompts)
    with_mask = frame[frame["split"].map(sources) != "none"]
    samples = content.get("tiles") or {}
    if isinstance(samples, list):  # a sidecar of one sample for every expert
        samples = {expert: samples for expert in content.get("thresholds", {})}
    sizes = content.get("captions", {})
    for name in missing:
        config = next(expert for expert in captions.experts if expert.name == name)
        derived = _calibrate(manifest, index, frame, with_mask, config, run_id)
        if derived is None:  # it captions nothing in this run: no threshold needed yet
            continue
        samples[name], values, counts = derived
        thresholds.update(values)
        for (expert_name, pid), count in counts.items():
            sizes.setdefault(expert_name, {})[pid] = count
    by_expert: dict[str, dict[str, float]] = {}
    for (expert_name, pid), value in thresholds.items():
        by_expert.setdefault(expert_name, {})[pid] = value
    write_gate_thresholds(store, {
        "gate_mode": captions.gate.mode, "keep_top": captions.gate.keep_top,
        "calibration_tiles": captions.gate.calibration_tiles, "clip_model": model_cache.scorer(manifest).model_id,
        "tiles": samples, "thresholds": by_expert, "captions": sizes,
    })  # fmt: skip
    return thresholds


def _calibrate(
    manifest: RunManifest,
    index: TileIndex,
    frame: pd.DataFrame,
    with_mask: pd.DataFrame,
    config: ExpertConfig,
    run_id: str,
) -> tuple[list[str], dict[tuple[str, str], float], dict[tuple[str, str], int]] | None:
    """One expert's calibration sample (of ``with_mask``, the run's tiles with a class mask, for an expert that
    describes the mask), its thresholds and the captions each was derived from; None where the sample is empty."""
    captions = manifest.captions
    expert = model_cache.expert(config)
    try:
        eligible = with_mask if expert.needs_class_mask else frame
        sample_ids = calibration_ids(list(eligible["tile_id"]), captions.gate.calibration_tiles)
        if not sample_ids:
            return None
        chosen = frame[frame["tile_id"].isin(set(sample_ids))].sort_values("tile_id")
        settings = GateSettings.for_expert(GatePolicy.from_captions(captions), captions, config)
        thresholds, counts = calibrate_thresholds(
            tile_tasks(index, chosen, captions.prompts), expert, model_cache.scorer(manifest), settings,
            RunInfo(f"{run_id}-calibration"),
        )  # fmt: skip
    finally:
        if expert_class(config.backend).runs_alone:  # engines run one at a time, each with most of the GPU
            model_cache.release_expert(config)
    return sample_ids, thresholds, counts


def check_gate(store: str | Path, captions: CaptionsConfig, experts: list[str]) -> None:
    """Refuse to add to a store judged by another gate, read from the store's gate columns once.

    - Rows of another gate mode: their done keys would count as passed alike.
    - Rows of ``experts`` gated at another threshold than the manifest's (the mode's ``setting``: ``captions.tau``,
      ``captions.gate.margin``): a resume would write rows that ``compact`` then refuses to merge, and on a complete
      store the new value would pass silently. A mode whose thresholds are derived (percentile) is checked against
      its sidecar instead (:func:`check_thresholds`).

    Raises:
        InputError: one line naming the store, the recorded and the manifest's mode or value, and what to do.
    """
    policy = GatePolicy.from_captions(captions)
    mode = policy.mode
    gated = gate_thresholds(store)
    others = sorted({row_mode for gates in gated.values() for row_mode, _ in gates} - {mode})
    if others:
        raise InputError(
            f"caption store {store}: gated in mode {', '.join(others)}, this manifest gates in mode {mode}; "
            "caption into a new store"
        )
    setting, wanted = policy.gate_mode.setting, policy.gate_mode.fixed_threshold(policy)
    if setting is None or wanted is None:  # derived thresholds: checked against the sidecar (check_thresholds)
        return
    recorded: dict[float, list[str]] = {}
    for (expert, pid), gates in sorted(gated.items()):
        if expert not in experts or pid not in captions.prompts.ids:
            continue
        for _, threshold in gates:
            if float(np.float32(threshold)) != float(np.float32(wanted)):
                recorded.setdefault(round(threshold, 6), []).append(f"{expert}/{pid}")
    if recorded:
        values = ", ".join(f"{value:g} ({', '.join(pairs)})" for value, pairs in sorted(recorded.items()))
        raise InputError(
            f"caption store {store}: gated in mode {mode} at {setting} {values}, this manifest sets {setting} "
            f"{wanted:g}; caption into a new store, or set {setting} back to the recorded value"
        )


def check_scorer(store: str | Path, model_id: str) -> None:
    """Refuse to add to a store scored by another CLIP network: its done keys would be kept as if scored alike.

    Raises:
        InputError: the store holds rows of another scorer (another model, weights or activation).
    """
    others = sorted(scorers(store) - {model_id})
    if others:
        raise InputError(
            f"caption store {store}: scored by CLIP {', '.join(others)}, this manifest scores with {model_id} "
            "(another model, weights or activation: the activation follows the weights since QuickGELU came in); "
            "caption into a new store"
        )
