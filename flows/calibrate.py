"""``flows run calibrate-gate``: how well the manifest's CLIP tells a caption's own tile from another tile.

Before a night of captioning, a user needs to know whether the gate's ``tau`` means anything for this CLIP on these
tiles. For a reproducible sample of tiles that already have usable selected captions in the store, every caption is
scored against its own tile and against a shuffled other tile of the sample (a derangement: never its own tile).
Per expert (and per prompt) this gives two distributions; their overlap says what the gate can do:

- the ROC AUC own vs shuffled (0.5: CLIP cannot tell them apart; 1: every own pair scores above every shuffled one),
- the tau that lets at most ``false_pass`` of the shuffled pairs through (a caption of another tile passing the gate),
- the tau that best separates the two (maximum Youden J; a measure of separation, not the tau to set: the
  false-pass tau bounds how many captions of other tiles pass, which is what the gate is for),
- the pass rate each gate mode would give: ``absolute`` (own >= the manifest's tau), ``percentile`` (the top
  ``keep_top`` share, by definition) and ``contrastive`` (own minus the mean over the sample's other tiles >= margin),
- what to set per gate mode: ``captions.tau`` (the false-pass tau), ``captions.gate.keep_top`` (the share of own
  captions at or above it) and ``captions.gate.margin`` (the false-pass quantile of the shuffled captions' own minus
  others: a caption scored against another tile, minus its mean over the rest of the sample).

Where the AUC is below ``AUC_FLOOR`` CLIP cannot tell an expert's captions from shuffled ones: no threshold will
filter by fit, and the output says so instead of recommending one. The contrastive numbers compare against random
tiles of the sample, while a run compares against the other tiles of the same shard (neighbours, often alike): they
are an estimate, and a run's contrastive scores tend to be lower.

This is a plain function, not a Prefect flow: it is one short, sequential computation on one machine (a few
hundred CLIP text encodings) with nothing to shard, retry or resume, and its results are files on disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from caption_pipeline.policy import GATE_MODES, GatePolicy
from caption_pipeline.scoring import normalized_similarity
from flows.console import console
from flows.escaping import for_matplotlib
from manifests.atomic import atomic_path, atomic_write_text
from manifests.caption_store import selected_captions
from manifests.errors import InputError
from manifests.run_manifest import load_caption_manifest
from manifests.tile_index import TileIndex, read_tile_index

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DEFAULT_KEEP_TOP = 0.3
DEFAULT_MARGIN = 0.02
# Below this own-vs-shuffled AUC an expert's captions barely fit their own tile better than another one: any threshold
# mostly filters at random, so no threshold is recommended (a warning says what to check instead).
AUC_FLOOR = 0.6
PREVIOUS_FILE = "calibration.prev.json"
# The gate mode that compares the similarity with the manifest's tau: its pass rate is the one "at tau".
TAU_MODE = next(name for name, rule in GATE_MODES.items() if rule.threshold_is_tau)


class _TextEncoder(Protocol):
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[int], list[int]]: ...


class Scorer(Protocol):
    """What calibration needs of a CLIP scorer (``caption_pipeline.scoring.ClipScorer`` has it)."""

    model_id: str
    text_encoder: _TextEncoder

    def image_embeddings(self, keys: list[str], paths: list[Path]) -> torch.Tensor:
        """Normalised image embeddings, one row per key (cached by key)."""
        ...


@dataclass(frozen=True)
class Distribution:
    """Summary of a set of eq. 2 similarities."""

    n: int
    mean: float
    quantiles: dict[str, float]

    @classmethod
    def of(cls, values: np.ndarray) -> Distribution:
        """The count, mean and quantiles (``QUANTILES``) of ``values``."""
        quantiles = {f"q{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}
        return cls(len(values), float(values.mean()), quantiles)

    def describe(self) -> str:
        """``mean [q05 q50 q95]``."""
        q = self.quantiles
        return f"{self.mean:.3f} [{q['q05']:.3f} {q['q50']:.3f} {q['q95']:.3f}]"


@dataclass(frozen=True)
class GroupCalibration:
    """The calibration of one expert (all its prompts) or one (expert, prompt).

    Attributes:
        own: similarities of the captions to their own tiles.
        shuffled: similarities of the same captions to a deranged tile of the sample.
        auc: ROC AUC own vs shuffled (the chance that an own pair scores above a shuffled one, ties count half).
        tau_at_false_pass: the lowest tau at which at most ``false_pass`` of the shuffled pairs pass.
        false_pass_at_suggested: the share of shuffled pairs that pass at that tau.
        own_pass_at_suggested: the share of own pairs that pass at that tau.
        youden_tau: the threshold (one of the observed similarities) of maximum TPR - FPR.
        youden_j: that maximum.
        false_pass_at_tau: the share of shuffled pairs that pass at the manifest's tau.
        pass_rates: per gate mode (absolute, percentile, contrastive), the share of captions it would pass.
        margin_at_false_pass: the lowest contrastive margin at which at most ``false_pass`` of the shuffled captions
            pass (their own-minus-others, a caption scored against another tile minus its mean over the rest).
        own_pass_at_margin: the share of own captions whose own-minus-others reaches that margin.
        low_auc: the AUC is below ``AUC_FLOOR``: no threshold will filter by fit.
    """

    own: Distribution
    shuffled: Distribution
    auc: float
    tau_at_false_pass: float
    false_pass_at_suggested: float
    own_pass_at_suggested: float
    youden_tau: float
    youden_j: float
    false_pass_at_tau: float
    pass_rates: dict[str, float]
    margin_at_false_pass: float = float("nan")
    own_pass_at_margin: float = float("nan")
    low_auc: bool = False


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate_gate`` measured and where it wrote it (``calibration.json`` holds all but ``pairs``)."""

    clip_model: str
    tau: float
    raw_cosine_tau: float
    false_pass: float
    keep_top: float
    margin: float
    sample_size: int
    seed: int
    store: str
    experts: dict[str, GroupCalibration]
    prompts: dict[str, dict[str, GroupCalibration]]
    folder: Path
    pairs: pd.DataFrame = field(repr=False, compare=False)
    auc_floor: float = AUC_FLOOR
    replaced: bool = False

    def to_json(self) -> dict[str, Any]:
        """What ``calibration.json`` holds: every field but the pairs, each expert's suggestions (or warning), and
        the note of every gate mode whose estimate has one (``<mode>_note``)."""
        data = asdict(self)
        del data["pairs"], data["replaced"]
        data["folder"] = str(self.folder)
        data |= {f"{rule.name}_note": rule.calibration_note for rule in GATE_MODES.values() if rule.calibration_note}
        for expert, values in data["experts"].items():
            values["suggestions"] = suggestions(self.experts[expert], self.false_pass)
            if self.experts[expert].low_auc:
                values["warning"] = low_auc_warning(expert, self.experts[expert].auc)
        return data


def low_auc_warning(expert: str, auc: float) -> str:
    """The line printed (and stored) for an expert whose AUC is below ``AUC_FLOOR``."""
    return (
        f"{expert}: CLIP cannot tell this expert's captions from shuffled ones (AUC {auc:.2f} < {AUC_FLOOR}): no "
        "threshold will filter by fit; check the CLIP weights (captions.clip), or rely on the captions without a "
        "fit filter (the gate then only drops unusable answers), or caption a larger sample"
    )


def suggestions(group: GroupCalibration, false_pass: float) -> dict[str, str]:
    """What to set per gate mode for at most ``false_pass`` of shuffled captions passing (empty when the AUC is below
    ``AUC_FLOOR``: no setting filters by fit then)."""
    if group.low_auc:
        return {}
    return {name: rule.suggestion(group, false_pass) for name, rule in GATE_MODES.items()}


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC of ``positive`` over ``negative`` from average ranks (Mann-Whitney U; ties count half)."""
    ranks = pd.Series(np.concatenate([positive, negative])).rank(method="average").to_numpy()
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tau_at_false_pass(negative: np.ndarray, false_pass: float) -> float:
    """The (1 - false_pass) quantile of ``negative``, taken upwards: the lowest tau with ``mean(negative >= tau)``
    at most ``false_pass`` (ties and small samples never let more through)."""
    allowed = int(np.floor(false_pass * len(negative) + 1e-9))
    ranked = np.sort(negative)[::-1]
    return float(np.nextafter(ranked[allowed], np.inf))


def youden(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """(threshold, J) maximising TPR - FPR over the observed values (``>= threshold`` passes; lowest on ties)."""
    thresholds = np.unique(np.concatenate([positive, negative]))
    tpr = (positive[None, :] >= thresholds[:, None]).mean(axis=1)
    fpr = (negative[None, :] >= thresholds[:, None]).mean(axis=1)
    best = int(np.argmax(tpr - fpr))
    return float(thresholds[best]), float(tpr[best] - fpr[best])


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn permutation of ``range(n)`` without fixed points (n >= 2)."""
    while True:
        order = rng.permutation(n)
        if not (order == np.arange(n)).any():
            return order


@torch.inference_mode()
def cosine_matrix(scorer: Scorer, keys: list[str], paths: list[Path], captions: list[str], batch: int) -> np.ndarray:
    """Raw cosines of every caption (rows) with every image (columns), as ``ClipScorer.score`` computes them."""
    images = scorer.image_embeddings(keys, paths)
    texts = [scorer.text_encoder.encode(captions[start : start + batch])[0] for start in range(0, len(captions), batch)]
    return (torch.cat(texts).to(images.device) @ images.T).clamp(-1, 1).double().cpu().numpy()


def _group(frame: pd.DataFrame, policy: GatePolicy, false_pass: float) -> GroupCalibration:
    """The calibration of the own and shuffled pairs of ``frame`` against the manifest's gate settings ``policy``."""
    own = frame.loc[frame["kind"] == "own", "similarity"].to_numpy()
    shuffled = frame.loc[frame["kind"] == "shuffled", "similarity"].to_numpy()
    contrast = frame.loc[frame["kind"] == "own", "contrast"].to_numpy()
    shuffled_contrast = frame.loc[frame["kind"] == "shuffled", "contrast"].to_numpy()
    suggested = tau_at_false_pass(shuffled, false_pass)
    suggested_margin = tau_at_false_pass(shuffled_contrast, false_pass)
    youden_tau, youden_j = youden(own, shuffled)
    auc = roc_auc(own, shuffled)
    return GroupCalibration(
        own=Distribution.of(own),
        shuffled=Distribution.of(shuffled),
        auc=auc,
        tau_at_false_pass=suggested,
        false_pass_at_suggested=float((shuffled >= suggested).mean()),
        own_pass_at_suggested=float((own >= suggested).mean()),
        youden_tau=youden_tau,
        youden_j=youden_j,
        false_pass_at_tau=float((shuffled >= policy.tau).mean()),
        pass_rates={name: rule.calibration_pass_rate(own, contrast, policy) for name, rule in GATE_MODES.items()},
        margin_at_false_pass=suggested_margin,
        own_pass_at_margin=float((contrast >= suggested_margin).mean()),
        low_auc=bool(auc < AUC_FLOOR),
    )


def _gate_setting(captions: Any, name: str, default: float) -> float:
    """A setting of ``captions.gate`` (a newer manifest section) or its default where the manifest has none."""
    value = getattr(getattr(captions, "gate", None), name, None)
    return default if value is None else float(value)


@dataclass(frozen=True)
class TileSample:
    """Which tiles a calibration draws.

    Attributes:
        size: how many (fewer where the store has fewer tiles with usable selected captions).
        seed: draws the sample and the derangement.
        split: only tiles of this split of the tile index (the demo judges its CLIP on the test tiles, which its
            training never saw); None draws from every split.
    """

    size: int = 64
    seed: int = 0
    split: str | None = None


def calibrate_gate(
    manifest: str | Path,
    sample: TileSample = TileSample(),
    store: str | Path | None = None,
    false_pass: float = 0.05,
    scorer: Scorer | None = None,
) -> Calibration:
    """Score a sample of captions against their own and against shuffled tiles; write ``<store>/calibration/``.

    Args:
        manifest: run manifest (path or packaged name); its ``captions.clip`` scores, its ``captions.tau`` is the
            gate being judged.
        sample: which tiles to draw (how many, the seed, the split).
        store: the caption store (default: the manifest's).
        false_pass: the share of shuffled pairs the suggested tau may let through.
        scorer: a CLIP scorer to use instead of the manifest's (tests).

    Returns:
        The calibration; ``similarities.csv``, ``calibration.json`` and ``distributions.png`` are in its ``folder``.

    Raises:
        InputError: a bad setting, an unknown manifest or one without captions, no tile index, no store, a store
            without usable captions of the index's tiles (of ``split``), a split the index does not have.
    """
    _check_options(sample.size, false_pass)
    loaded, config = load_caption_manifest(manifest)
    index = read_tile_index(loaded.tiling.out)
    if sample.split is not None:
        index = _only_split(index, sample.split)
    store_path = Path(store or config.store)
    captions = _usable_captions(store_path, index, f"run `flows run generate-captions --manifest {manifest} --limit N` "
                                "first")  # fmt: skip
    rng = np.random.default_rng(sample.seed)
    candidates = sorted(set(captions["tile_id"]))
    tiles = sorted(rng.choice(candidates, size=min(sample.size, len(candidates)), replace=False).tolist())
    partner = dict(zip(tiles, (tiles[i] for i in derangement(len(tiles), rng)), strict=True))
    if scorer is None:
        from caption_pipeline.scoring import ClipScorer

        scorer = ClipScorer(config.clip)
    pairs = _pairs(scorer, index, captions, partner, config.clip.batch_size)
    policy = GatePolicy(tau=config.tau, keep_top=_gate_setting(config, "keep_top", DEFAULT_KEEP_TOP),
                        margin=_gate_setting(config, "margin", DEFAULT_MARGIN))  # fmt: skip
    experts = {expert: _group(group, policy, false_pass) for expert, group in pairs.groupby("expert", sort=True)}
    prompts: dict[str, dict[str, GroupCalibration]] = {}
    for (expert, prompt), group in pairs.groupby(["expert", "prompt_id"], sort=True):
        prompts.setdefault(str(expert), {})[str(prompt)] = _group(group, policy, false_pass)
    calibration = Calibration(
        clip_model=scorer.model_id, tau=config.tau, raw_cosine_tau=2 * config.tau - 1, false_pass=false_pass,
        keep_top=policy.keep_top, margin=policy.margin, sample_size=len(tiles), seed=sample.seed, store=str(store_path),
        experts=experts, prompts=prompts, folder=store_path / "calibration", pairs=pairs,
    )  # fmt: skip
    replaced = _write(calibration)
    return replace(calibration, replaced=replaced)


def _only_split(index: TileIndex, split: str) -> TileIndex:
    """The index restricted to the tiles of ``split``.

    Raises:
        InputError: the index has no tile of that split.
    """
    if not (index.frame["split"] == split).any():
        known = ", ".join(sorted(index.frame["split"].unique()))
        raise InputError(f"--split: tile index {index.root} has no tiles of split '{split}' (it has: {known})")
    return replace(index, frame=index.split(split))


def _check_options(sample: int, false_pass: float) -> None:
    """Refuse a sample too small to shuffle and a false-pass share outside (0, 1)."""
    if sample < 2:
        raise InputError(f"--sample: need at least 2 tiles to shuffle captions between them (got {sample})")
    if not 0 < false_pass < 1:
        raise InputError(f"--false-pass: a share between 0 and 1, exclusive (got {false_pass})")


def _usable_captions(store: Path, index: TileIndex, hint: str) -> pd.DataFrame:
    """The store's usable selected captions of the index's tiles.

    Raises:
        InputError: no store, or usable captions of fewer than 2 of the index's tiles (``hint`` says what to run).
    """
    if not store.exists() or (store.is_dir() and not any(store.glob("[!.]*.parquet"))):
        raise InputError(f"caption store {store}: no captions yet ({hint})")
    captions = selected_captions(store)
    captions = captions[captions["usable"] & captions["tile_id"].isin(set(index.frame["tile_id"]))]
    tiles = captions["tile_id"].nunique()
    if not tiles:
        raise InputError(f"caption store {store}: no usable captions of the index's tiles ({hint})")
    if tiles < 2:
        raise InputError(f"caption store {store}: usable captions of only 1 tile, need 2 to shuffle ({hint})")
    return captions


def _pairs(
    scorer: Scorer, index: TileIndex, captions: pd.DataFrame, partner: dict[str, str], batch_size: int
) -> pd.DataFrame:
    """Every caption of the sampled tiles (the keys of ``partner``) scored against its own tile and against its
    tile's partner (``kind`` own | shuffled), with its similarity minus its mean over the rest of the sample."""
    tiles = list(partner)
    column = {tile: i for i, tile in enumerate(tiles)}
    rows = index.frame.set_index("tile_id").loc[tiles]
    paths = [index.path(path) for path in rows["image_path"]]
    chosen = captions[captions["tile_id"].isin(column)].sort_values(["expert", "prompt_id", "tile_id"])
    cosines = cosine_matrix(scorer, rows["image_sha256"].tolist(), paths, chosen["caption"].tolist(), batch_size)
    records = []
    labels = zip(chosen["tile_id"], chosen["expert"], chosen["prompt_id"], strict=True)
    for row, (tile, expert, prompt) in enumerate(labels):
        similarities = normalized_similarity(cosines[row])
        for kind, col in (("own", column[tile]), ("shuffled", column[partner[tile]])):
            # Own minus the mean over the rest of the sample, with the image it is scored against as "own".
            contrast = similarities[col] - np.delete(similarities, col).mean()
            records.append({"expert": expert, "prompt_id": prompt, "tile_id": tile, "kind": kind,
                            "image_tile_id": tiles[col], "similarity": float(similarities[col]),
                            "raw_cosine": float(cosines[row, col]), "contrast": float(contrast)})  # fmt: skip
    return pd.DataFrame.from_records(records)


def _write(calibration: Calibration) -> bool:
    """Write the calibration's files; a previous ``calibration.json`` is kept as ``calibration.prev.json``.

    Returns:
        Whether a previous calibration was replaced.
    """
    folder = calibration.folder
    previous = folder / "calibration.json"
    replaced = previous.is_file()
    if replaced:
        previous.replace(folder / PREVIOUS_FILE)
    columns = ["expert", "prompt_id", "tile_id", "kind", "similarity", "raw_cosine", "image_tile_id"]
    atomic_write_text(folder / "similarities.csv", calibration.pairs[columns].to_csv(index=False))
    atomic_write_text(folder / "calibration.json", json.dumps(calibration.to_json(), indent=2) + "\n")
    _plot(calibration, folder / "distributions.png")
    return replaced


def _plot(calibration: Calibration, path: Path) -> None:
    """Own vs shuffled histograms per expert, the manifest's tau and the suggested tau marked (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    experts = list(calibration.experts)
    figure = Figure(figsize=(5, 2.6 * len(experts)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(experts), 1, squeeze=False)[:, 0]
    pairs = calibration.pairs
    for ax, expert in zip(axes, experts, strict=True):
        group = pairs[pairs["expert"] == expert]
        values = group["similarity"].to_numpy()
        bins = np.linspace(values.min(), values.max() + 1e-6, 30)
        for kind, color in (("own", "tab:blue"), ("shuffled", "tab:orange")):
            ax.hist(group.loc[group["kind"] == kind, "similarity"], bins=bins, alpha=0.6, color=color, label=kind)
        result = calibration.experts[expert]
        ax.axvline(calibration.tau, color="black", linestyle="--", label=f"tau {calibration.tau:.3f}")
        ax.axvline(result.tau_at_false_pass, color="tab:red", linestyle=":",
                   label=f"tau @ {calibration.false_pass:.0%} false pass {result.tau_at_false_pass:.3f}")  # fmt: skip
        ax.set_title(f"{for_matplotlib(expert)}: AUC {result.auc:.3f}")
        ax.set_xlabel("similarity (eq. 2)")
        ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def print_calibration(calibration: Calibration, out: Console = console) -> None:
    """The per-expert (and per-prompt) table, then per expert what the numbers say and what to set per gate mode."""
    table = Table("expert", "prompt", "n", r"own mean \[q05 q50 q95]", r"shuffled mean \[q05 q50 q95]", "AUC",
                  f"tau @ {calibration.false_pass:.0%} false pass", "Youden tau", *GATE_MODES,
                  title="gate calibration (similarity = cos/2 + 1/2)")  # fmt: skip
    for expert, result in calibration.experts.items():
        groups = [("all", result), *calibration.prompts[expert].items()]
        for prompt, group in groups if len(groups) > 2 else groups[:1]:
            rates = [f"{group.pass_rates[mode]:.1%}" for mode in GATE_MODES]
            taus = [f"{group.auc:.3f}", f"{group.tau_at_false_pass:.3f}", f"{group.youden_tau:.3f}"]
            table.add_row(
                expert, prompt, str(group.own.n), group.own.describe(), group.shuffled.describe(), *taus, *rates
            )
    out.print(table)
    say = lambda text: out.print(text, markup=False, highlight=False)  # noqa: E731
    say(
        f"clip {calibration.clip_model}; {calibration.sample_size} tiles (seed {calibration.seed}); manifest tau "
        f"{calibration.tau:.3f} (raw cosine {calibration.raw_cosine_tau:.3f}); pass rates: absolute at tau, "
        f"percentile keep_top {calibration.keep_top:.2f}, contrastive margin {calibration.margin:.3f}"
    )
    say(
        f"set the false-pass tau (at most {calibration.false_pass:.0%} of captions of other tiles pass); the Youden "
        "tau only measures how well own and shuffled separate, it bounds no false-pass share"
    )
    for expert, result in calibration.experts.items():
        say(
            f"{expert}: own {result.own.describe()}, shuffled {result.shuffled.describe()}, AUC {result.auc:.3f}; "
            f"at tau {calibration.tau:.3f} {result.pass_rates[TAU_MODE]:.1%} own and "
            f"{result.false_pass_at_tau:.1%} shuffled pass; false-pass tau {result.tau_at_false_pass:.3f} "
            f"(raw cosine {2 * result.tau_at_false_pass - 1:.3f}) passes {result.own_pass_at_suggested:.1%} own, "
            f"{result.false_pass_at_suggested:.1%} shuffled"
        )
        if result.low_auc:
            say(f"warning: {low_auc_warning(expert, result.auc)}")
            continue
        for mode, text in suggestions(result, calibration.false_pass).items():
            say(f"  {mode}: set {text}")
    for rule in GATE_MODES.values():
        if rule.calibration_note:
            say(f"note: {rule.calibration_note}")
    if calibration.replaced:
        say(f"the previous calibration.json was replaced (kept as {calibration.folder / PREVIOUS_FILE})")
    say(f"written: {calibration.folder}")
