"""``flows run caption-report``: how good are the captions, computed from the store without re-generation.

Writes ``report.html`` (numbers, plots and captions next to thumbnails of their tiles: the worst and best per expert
and prompt, keys the gate rejected and re-prompting recovered, tiles the experts disagree on) and ``captions.html``
(every selected caption of a sample of tiles, filterable by expert, prompt and verdict). Both are single files: the
thumbnails are embedded as downscaled JPEG data URLs, the filter is inline JavaScript, nothing is fetched.

The store records the gate every attempt was judged by (``gate_mode``, ``gate_threshold``, ``gate_score``): the
header names the mode and its threshold(s), captions are ordered (worst, best) by ``gate_score`` (the similarity for
rows without one), and the tau sweep, an absolute-mode quantity, is labelled as such for other modes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from caption_pipeline.experts.synthetic import SyntheticExpert, corruption_record
from caption_pipeline.policy import GATE_MODES, GatePolicy
from flows.calibrate import AUC_FLOOR, low_auc_warning
from flows.escaping import for_matplotlib, markdown_table, markdown_text
from flows.generate_captions import summarize
from manifests.atomic import atomic_write_text
from manifests.caption_store import (
    CAPTION_COLUMNS,
    CAPTION_STORE_SCHEMA,
    CUT_FINISH_REASON,
    KEY_COLUMNS,
    latest_attempts,
    read_attempts,
    selected_captions,
    store_meta,
)
from manifests.tile_index import TileIndex, read_tile_index

PRESENT_SHARE = 0.005
TAUS = np.round(np.linspace(0.0, 1.0, 101), 2)
# Size bounds of the two pages (README "Orchestration"): a thumbnail is at most THUMB_PX on its longer side and at
# most THUMB_MAX_BYTES as JPEG, so report.html holds at most (2 * EXAMPLES * experts * prompts + 2 * MAX_RECOVERED +
# experts * MAX_DISAGREEMENTS) thumbnails and captions.html one per sampled tile (CAPTION_TILES).
THUMB_PX = 96
THUMB_MAX_BYTES = 6_000
EXAMPLES = 3
MAX_RECOVERED = 12
MAX_DISAGREEMENTS = 8
CAPTION_TILES = 200
CALIBRATION_FILE = Path("calibration") / "calibration.json"
GATE_COLUMNS = ("gate_mode", "gate_threshold")


def mentioned_classes(caption: str, words: dict[str, tuple[str, ...]]) -> set[str]:
    """Classes a caption names by one of their words (the tile index's class vocabulary; whole words, any case)."""
    text = caption.lower()
    return {
        name for name, names in words.items()
        if any(re.search(rf"\b{re.escape(word.lower())}\b", text) for word in names)
    }  # fmt: skip


class Thumbnails:
    """Downscaled JPEG data URLs of the tiles of a tile index, made once per tile."""

    def __init__(self, index: TileIndex, size: int = THUMB_PX, max_bytes: int = THUMB_MAX_BYTES):
        self.paths = index.frame.set_index("tile_id")["image_path"]
        self.index = index
        self.size = size
        self.max_bytes = max_bytes
        self.cache: dict[str, str | None] = {}

    def __call__(self, tile_id: str) -> str | None:
        """The tile's thumbnail as a ``data:image/jpeg;base64,...`` URL; None for a tile not in the index or an
        unreadable image."""
        if tile_id not in self.cache:
            path = self.index.path(self.paths.get(tile_id))
            self.cache[tile_id] = None if path is None else thumbnail(path, self.size, self.max_bytes)
        return self.cache[tile_id]


def thumbnail(path: Path, size: int = THUMB_PX, max_bytes: int = THUMB_MAX_BYTES) -> str | None:
    """An image downscaled (bilinear) to at most ``size`` px on its longer side, as a JPEG data URL of at most
    ``max_bytes`` (lower quality first, then half the size, until it fits); None when the image cannot be read."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError):
        return None
    while True:
        scale = min(1.0, size / max(rgb.size))
        small = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                           Image.Resampling.BILINEAR)  # fmt: skip
        for quality in (80, 60, 40, 25):
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=quality)
            if buffer.tell() <= max_bytes or (quality == 25 and size <= 16):
                return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        size //= 2


@dataclass
class TileClasses:
    """The classes of the tiles of an index, to flag what a caption misses or invents."""

    index: TileIndex

    def __post_init__(self) -> None:
        self.fractions = self.index.frame.set_index("tile_id")["class_fractions"]

    def flags(self, tile_id: str, caption: object) -> tuple[list[str], list[str]] | None:
        """Classes covering more than PRESENT_SHARE of the tile that the caption does not name (missed), and classes
        it names without a pixel in the tile (invented); None for a tile without class fractions or no caption."""
        shares = self.fractions.get(tile_id)
        if shares is None or not isinstance(caption, str):
            return None
        named = mentioned_classes(caption, self.index.vocabulary.words)
        pairs = list(zip(self.index.class_names, shares, strict=True))
        missed = [name for name, share in pairs if share > PRESENT_SHARE and name not in named]
        invented = [name for name, share in pairs if share == 0 and name in named]
        return missed, invented

    def mentioned(self, caption: object) -> set[str]:
        """The classes a caption names (none for a missing caption)."""
        return mentioned_classes(caption, self.index.vocabulary.words) if isinstance(caption, str) else set()


@dataclass
class CaptionReport:
    """Every number, table and caption example of the report (:func:`build_report`), which the renderers lay out."""

    summary: pd.DataFrame
    class_information: pd.DataFrame
    tau_sweep: pd.DataFrame
    lengths: pd.DataFrame
    class_quality: pd.DataFrame | None
    worst: pd.DataFrame
    similarities: dict[str, np.ndarray]
    tau: float
    # Captions to look at: worst and best per expert and prompt (column ``which``), recovered keys (attempt 0 and
    # the first attempt that passed), tiles the experts disagree on (one row per expert, ``group`` numbers them).
    examples: pd.DataFrame = field(default_factory=pd.DataFrame)
    recovered: pd.DataFrame = field(default_factory=pd.DataFrame)
    recovered_total: int = 0
    disagreement: pd.DataFrame = field(default_factory=pd.DataFrame)
    selected: pd.DataFrame = field(default_factory=pd.DataFrame)
    gate: pd.DataFrame | None = None
    calibration: pd.DataFrame | None = None
    calibration_note: str | None = None
    index: TileIndex | None = None
    gate_quality: pd.DataFrame | None = None


def class_information(frame: pd.DataFrame) -> pd.DataFrame:
    """Per protocol and split: the class sources the prompts (and annotation masks) used, with attempt counts.

    Read from the rows, so a store filled by runs under different protocols shows each of them.
    """
    columns = ["protocol", "split", "class_source"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    counts = frame.groupby(columns).size()
    rows = [
        {"protocol": protocol, "split": split,
         "class_source": ", ".join(f"{source} ({n} attempts)" for (_, _, source), n in group.items())}
        for (protocol, split), group in counts.groupby(level=["protocol", "split"])
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def protocol_line(table: pd.DataFrame) -> str:
    """The protocol(s) of a store in words."""
    protocols = sorted(table["protocol"].unique())
    if len(protocols) > 1:
        return f"protocols: {', '.join(protocols)} (runs with different protocols share this store)"
    return f"protocol: {protocols[0]}" if protocols else "protocol: none recorded (empty store)"


def tau_sweep(frame: pd.DataFrame, policy: GatePolicy) -> pd.DataFrame:
    """Per expert and tau, the share of keys with an attempt that would pass the gate at that tau (what a re-run at
    that tau would keep), asked of the gate policy: at the store's own tau it is the store's pass rate."""
    grouped = frame.groupby(list(KEY_COLUMNS))
    key_of_row = grouped.ngroup().to_numpy()
    experts = grouped["expert"].first().to_numpy()
    curves: dict[str, list[float]] = {expert: [] for expert in sorted(set(experts))}
    for tau in TAUS:
        passes = policy.with_tau(float(tau)).passes(frame["similarity"], frame["usable"])
        # A key passes when any of its attempts does (counted per key with one bincount, not a groupby per tau).
        key_passes = np.bincount(key_of_row, weights=passes, minlength=len(experts)) > 0
        for expert in curves:
            curves[expert].append(float(key_passes[experts == expert].mean()))
    return pd.DataFrame(curves, index=pd.Index(TAUS, name="tau"))


def class_quality(selected: pd.DataFrame, index_path: Path | TileIndex) -> pd.DataFrame:
    """Per expert: recall of the tile's classes and the classes it names that the tile lacks."""
    index = index_path if isinstance(index_path, TileIndex) else read_tile_index(index_path)
    fractions = index.frame.set_index("tile_id")["class_fractions"]
    rows = []
    for expert, group in selected.groupby("expert"):
        hits = present_total = hallucinated = captions = 0
        invented: dict[str, int] = {}
        for tile_id, caption in zip(group["tile_id"], group["caption"], strict=True):
            shares = fractions.get(tile_id)
            if shares is None or not isinstance(caption, str):
                continue
            # Recall counts classes that cover a visible share; a class is invented only if it has no pixel at all.
            present = {name for name, share in zip(index.class_names, shares, strict=True) if share > PRESENT_SHARE}
            absent = {name for name, share in zip(index.class_names, shares, strict=True) if share == 0}
            named = mentioned_classes(caption, index.vocabulary.words)
            captions += 1
            hits += len(named & present)
            present_total += len(present)
            for name in named & absent:
                hallucinated += 1
                invented[name] = invented.get(name, 0) + 1
        rows.append({
            "expert": expert, "captions": captions,
            "class_recall": hits / present_total if present_total else float("nan"),
            "hallucinated_per_caption": hallucinated / captions if captions else float("nan"),
            "most_hallucinated": ", ".join(f"{k} ({v})" for k, v in sorted(invented.items(), key=lambda i: -i[1])[:3]),
        })  # fmt: skip
    return pd.DataFrame(rows)


GATE_QUALITY_NOTE = (
    "Synthetic experts (a study tool) record what they corrupted in each caption: the gate's precision is the share "
    "of the attempts it rejected that were corrupted, its recall the share of corrupted attempts it rejected (scored "
    "attempts only)."
)


def gate_quality(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Per synthetic expert, how well the gate rejected corrupted captions, measured against the experts' own record
    of what they corrupted; None for a store without synthetic experts."""
    rows = frame[(frame["backend"] == SyntheticExpert.backend) & frame["usable"] & frame["similarity"].notna()]
    if rows.empty:
        return None
    records = []
    for expert, group in rows.groupby("expert", sort=True):
        corrupted = group["finish_reason"].map(lambda reason: bool(corruption_record(reason))).to_numpy(bool)
        rejected = ~group["passed"].to_numpy(bool)
        caught = int((corrupted & rejected).sum())
        records.append({
            "expert": expert, "attempts": len(group), "corrupted": float(corrupted.mean()),
            "rejected": float(rejected.mean()),
            "precision": caught / rejected.sum() if rejected.any() else float("nan"),
            "recall": caught / corrupted.sum() if corrupted.any() else float("nan"),
        })  # fmt: skip
    return pd.DataFrame.from_records(records)


def _extra_columns(frame: pd.DataFrame) -> list[str]:
    return [column for column in ("gate_score", "gate_threshold") if column in frame.columns]


def gate_order(frame: pd.DataFrame) -> pd.Series:
    """The number the gate judged each row by: its ``gate_score``, or its similarity where it has none (older stores,
    a contrastive attempt without other tiles)."""
    if "gate_score" not in frame.columns:
        return frame["similarity"].astype("float64")
    return frame["gate_score"].astype("float64").fillna(frame["similarity"].astype("float64"))


def worst_and_best(selected: pd.DataFrame, n: int = EXAMPLES) -> pd.DataFrame:
    """Per expert and prompt, the ``n`` scored selected captions with the lowest and the ``n`` with the highest
    ``gate_score`` (the similarity for rows without one; column ``which``: worst | best; a key is shown once even
    when a pair has fewer than 2n keys)."""
    columns = ["which", *CAPTION_COLUMNS, *_extra_columns(selected)]
    scored = selected[selected["similarity"].notna()]
    scored = scored.assign(_order=gate_order(scored))
    parts = []
    for _, group in scored.groupby(["expert", "prompt_id"], sort=True):
        ordered = group.sort_values(["_order", "tile_id"], kind="stable")
        worst = ordered.head(n)
        best = ordered.drop(worst.index).tail(n).iloc[::-1]
        parts += [worst.assign(which="worst"), best.assign(which="best")]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def recovered_keys(frame: pd.DataFrame, limit: int = MAX_RECOVERED) -> tuple[pd.DataFrame, int]:
    """Keys whose attempt 0 did not pass and a later attempt did: both attempts (attempt 0 and the first that
    passed), the keys with the largest similarity gain first (at most ``limit`` keys), and how many there are."""
    columns = ["key", *CAPTION_COLUMNS, *_extra_columns(frame)]
    attempts = latest_attempts(frame)
    first = attempts[(attempts["attempt"] == 0) & ~attempts["passed"]]
    later = attempts[(attempts["attempt"] > 0) & attempts["passed"]].sort_values("attempt")
    later = later.drop_duplicates(list(KEY_COLUMNS), keep="first")
    pairs = first.merge(later, on=list(KEY_COLUMNS), suffixes=("_0", "_1"))
    if pairs.empty:
        return pd.DataFrame(columns=columns), 0
    gain = pairs["similarity_1"] - pairs["similarity_0"].fillna(0.0)
    pairs = pairs.assign(gain=gain).sort_values(["gain", *KEY_COLUMNS], ascending=[False, True, True, True])
    rows = []
    for number, pair in enumerate(pairs.head(limit).itertuples(index=False)):
        for suffix in ("_0", "_1"):
            values = pair._asdict()
            rows.append({"key": number, "tile_id": pair.tile_id, "expert": pair.expert, "prompt_id": pair.prompt_id,
                         **{c: values[c + suffix] for c in columns if c + suffix in values}})  # fmt: skip
    return pd.DataFrame(rows, columns=columns), len(pairs)


def disagreements(selected: pd.DataFrame, classes: TileClasses | None, limit: int = MAX_DISAGREEMENTS) -> pd.DataFrame:
    """Tiles and prompts the experts disagree on most: the largest spread of selected similarity across experts (at
    least two scored), then (with a tile index) the lowest overlap (Jaccard) of the classes their captions name.
    One row per expert; ``group`` numbers the (tile, prompt) pairs, ``spread`` and ``class_overlap`` are per pair."""
    columns = ["group", "spread", "class_overlap", *CAPTION_COLUMNS, *_extra_columns(selected)]
    scored = selected[selected["similarity"].notna()]
    candidates = []
    for (tile_id, prompt_id), group in scored.groupby(["tile_id", "prompt_id"], sort=True):
        if group["expert"].nunique() < 2:
            continue
        overlap = float("nan")
        if classes is not None:
            named = [classes.mentioned(caption) for caption in group["caption"]]
            union = set().union(*named)
            overlap = len(set.intersection(*named)) / len(union) if union else 1.0
        spread = float(group["similarity"].max() - group["similarity"].min())
        candidates.append((-spread, 0.0 if np.isnan(overlap) else overlap, tile_id, prompt_id, overlap, group))
    candidates.sort(key=lambda c: c[:4])
    parts = [
        group.sort_values("expert").assign(group=number, spread=-negative, class_overlap=overlap)
        for number, (negative, _, _, _, overlap, group) in enumerate(candidates[:limit])
    ]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def gate_table(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Per expert and prompt, the gate mode(s) and threshold(s) its attempts were judged by, with attempt counts and
    pass rate; None for a store without the gate columns."""
    if not all(column in frame.columns for column in GATE_COLUMNS) or frame.empty:
        return None
    table = frame.groupby(["expert", "prompt_id", *GATE_COLUMNS], dropna=False).agg(
        attempts=("passed", "size"), pass_rate=("passed", "mean")
    )
    return table.reset_index()


def gate_modes(gate: pd.DataFrame | None) -> list[str]:
    """The gate modes a store's attempts were judged by (empty for a store that records none: absolute, tau)."""
    return [] if gate is None else sorted(map(str, gate["gate_mode"].dropna().unique()))


def gate_summary(gate: pd.DataFrame | None, tau: float) -> str:
    """The store's gate in words: per mode, what is compared with which threshold(s)."""
    if gate is None:
        return f"gate mode absolute (the store records no gate mode): similarity >= tau = {tau:g}"
    parts = []
    for mode in gate_modes(gate):
        values = sorted(float(t) for t in gate.loc[gate["gate_mode"] == mode, "gate_threshold"].dropna().unique())
        if not values:
            shown = "?"
        elif len(values) == 1:
            shown = f"{values[0]:.3f}"
        else:
            shown = f"{values[0]:.3f}-{values[-1]:.3f}"
        rule = GATE_MODES.get(mode)  # a mode another version of the toolkit wrote is named as recorded
        parts.append(rule.store_summary(shown) if rule is not None else f"gate mode {mode}: gate_score >= {shown}")
    return "; ".join(parts)


def _absolute(report: CaptionReport) -> bool:
    """Whether every attempt of the store was judged against tau (or the store records no mode): the tau sweep is
    then the store's own gate."""
    return all(mode in GATE_MODES and GATE_MODES[mode].threshold_is_tau for mode in gate_modes(report.gate))


def _calibration_fields(values: dict) -> dict[str, object]:
    """The scalar fields of one expert's calibration, plus the means of its own / shuffled distributions and its
    pass rates per gate mode (one level of nesting, prefixed)."""
    scalar = str | int | float | bool
    fields = {k: v for k, v in values.items() if k not in ("expert", "warning") and isinstance(v, scalar)}
    for name in ("own", "shuffled"):
        if isinstance(values.get(name), dict) and isinstance(values[name].get("mean"), int | float):
            fields[f"{name}_mean"] = values[name]["mean"]
    if isinstance(values.get("pass_rates"), dict):
        fields |= {f"pass_{k}": v for k, v in values["pass_rates"].items() if isinstance(v, int | float)}
    return fields


def read_calibration(store: str | Path) -> tuple[pd.DataFrame | None, str | None]:
    """The own-vs-shuffled separation per expert from ``<store>/calibration/calibration.json`` (written by
    ``calibrate-gate``), read defensively: experts as a mapping (top level or under ``experts``) or a list of
    records with ``expert``; their scalar fields become columns, ``auc`` and ``suggested_tau`` first.

    Returns:
        The table (None when there is no file or nothing usable in it) and a note when the file could not be read.
    """
    path = Path(store) / CALIBRATION_FILE
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{path} could not be read ({type(exc).__name__})"
    entries = data.get("experts", data) if isinstance(data, dict) else data
    if isinstance(entries, dict):
        items = [(str(name), value) for name, value in entries.items() if isinstance(value, dict)]
    elif isinstance(entries, list):
        items = [(str(value.get("expert", "?")), value) for value in entries if isinstance(value, dict)]
    else:
        items = []
    rows = [{"expert": name, **_calibration_fields(values)} for name, values in items]
    if not rows:
        return None, f"{path} holds no per-expert results"
    table = pd.DataFrame(rows)
    order = ("expert", "auc", "suggested_tau", "tau_at_false_pass", "youden_tau", "own_mean", "shuffled_mean")
    first = [column for column in order if column in table.columns]
    return table[first + [column for column in table.columns if column not in first]], None


def build_report(store: str | Path, index: str | Path | None = None) -> CaptionReport:
    """Every number, table and caption example of the report, from the store (and the tile index, when given)."""
    frame = read_attempts(store)  # an attempt the store holds twice counts once: the store's rule
    meta = store_meta(store)
    policy = GatePolicy() if meta is None else GatePolicy(tau=meta.tau)
    tile_index = read_tile_index(index) if index else None
    classes = TileClasses(tile_index) if tile_index is not None else None
    selected = selected_captions(store, CAPTION_STORE_SCHEMA.names)
    scored = frame[frame["similarity"].notna()]
    lengths = scored.groupby("expert").agg(
        captions=("caption", "size"), mean_clip_tokens=("n_tokens", "mean"), max_clip_tokens=("n_tokens", "max"),
        over_77_tokens=("n_chunks", lambda c: int((c > 1).sum())),
        truncated_by_max_tokens=("finish_reason", lambda f: int((f == "length").sum())),
        cut_at_max_chars=("finish_reason", lambda f: int((f == CUT_FINISH_REASON).sum())),
    ).reset_index()  # fmt: skip
    worst_columns = ["tile_id", "expert", "prompt_id", "similarity", *_extra_columns(selected), "caption"]
    scored_selected = selected[selected["similarity"].notna()]
    worst = (
        scored_selected.assign(_order=gate_order(scored_selected))
        .sort_values(["_order", "tile_id"], kind="stable")
        .head(10)[worst_columns]
    )
    recovered, recovered_total = recovered_keys(frame)
    calibration, calibration_note = read_calibration(store)
    return CaptionReport(
        summary=summarize(frame),
        class_information=class_information(frame),
        tau_sweep=tau_sweep(frame, policy),
        lengths=lengths,
        class_quality=class_quality(selected, tile_index) if tile_index is not None else None,
        worst=worst,
        similarities={e: g["similarity"].to_numpy(float) for e, g in scored.groupby("expert")},
        tau=policy.tau,
        examples=worst_and_best(selected),
        recovered=recovered,
        recovered_total=recovered_total,
        disagreement=disagreements(selected, classes),
        selected=selected,
        gate=gate_table(frame),
        calibration=calibration,
        calibration_note=calibration_note,
        index=tile_index,
        gate_quality=gate_quality(frame),
    )


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(report: CaptionReport) -> list[tuple[str, str]]:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for expert, values in report.similarities.items():
        axis.hist(values, bins=40, range=(0, 1), alpha=0.5, label=for_matplotlib(expert))
    absolute = _absolute(report)
    if absolute:
        axis.axvline(report.tau, color="black", linestyle="--", label=f"tau = {report.tau:g}")
    axis.set(xlabel="similarity (cos/2 + 1/2)", ylabel="attempts", title="CLIP similarity per expert")
    axis.legend()
    histogram = _png(figure)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for expert in report.tau_sweep.columns:
        axis.plot(report.tau_sweep.index, report.tau_sweep[expert], label=for_matplotlib(expert))
    if absolute:
        axis.axvline(report.tau, color="black", linestyle="--", label=f"manifest tau = {report.tau:g}")
    title = "tau sweep" if absolute else "what absolute mode at tau t would pass"
    axis.set(xlabel="tau", ylabel="pass rate (best attempt)", title=title, ylim=(0, 1.02))
    axis.legend()
    sweep = "Tau sweep" if absolute else SWEEP_OTHER_MODE
    return [("Similarity histograms", histogram), (sweep, _png(figure))]


SWEEP_OTHER_MODE = "Tau sweep: what absolute mode at tau t would pass (not this store's gate)"


def calibration_warnings(table: pd.DataFrame | None) -> list[str]:
    """A warning per expert of a calibration whose AUC is below ``AUC_FLOOR`` (its ``low_auc`` flag, or its AUC)."""
    if table is None or "auc" not in table.columns:
        return []
    flags = table["low_auc"] if "low_auc" in table.columns else pd.Series(False, index=table.index)
    low = flags.fillna(False).astype(bool) | (pd.to_numeric(table["auc"], errors="coerce") < AUC_FLOOR)
    return [low_auc_warning(str(e), float(a)) for e, a in zip(table["expert"], table["auc"], strict=True)
            if low[table["expert"] == e].any()]  # fmt: skip


def render_markdown(report: CaptionReport) -> str:
    """The report's tables as Markdown (the Prefect artifact and ``report.md``); every text that comes from the store
    (expert names, splits, protocols, gate modes) is escaped (:mod:`flows.escaping`)."""
    parts = ["# Caption quality", "", markdown_text(gate_summary(report.gate, report.tau)), ""]
    parts += [markdown_table(report.summary)]
    parts += ["", "## Class information in prompts", "", markdown_text(protocol_line(report.class_information)), ""]
    parts += [markdown_table(report.class_information)]
    if report.gate is not None:
        parts += ["", "## Gate", "", markdown_table(report.gate)]
    if report.calibration is not None:
        parts += ["", "## Own vs shuffled captions (calibration)", "", markdown_table(report.calibration)]
        parts += [f"\n**warning**: {markdown_text(warning)}" for warning in calibration_warnings(report.calibration)]
    if report.gate_quality is not None:
        parts += ["", "## Gate against corrupted captions", "", GATE_QUALITY_NOTE, ""]
        parts += [markdown_table(report.gate_quality)]
    if report.class_quality is not None:
        parts += ["", "## Class recall and hallucinated classes", "", markdown_table(report.class_quality)]
    parts += ["", "## Caption length", "", markdown_table(report.lengths)]
    parts += ["", f"Keys recovered by re-prompting: {report.recovered_total}"]
    return "\n".join(parts)


def _text(value: object) -> str:
    """A table cell: numbers to 3 decimals, missing values empty, everything escaped."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.3f}"
    return html.escape(str(value))


def _flags(classes: TileClasses | None, tile_id: str, caption: object) -> str:
    """The class-recall and hallucination flags of a caption as HTML (empty without a tile index)."""
    flags = None if classes is None else classes.flags(tile_id, caption)
    if flags is None:
        return ""
    missed, invented = flags
    parts = [f'<span class="miss">missed: {html.escape(", ".join(missed))}</span>'] if missed else []
    parts += [f'<span class="halluc">invented: {html.escape(", ".join(invented))}</span>'] if invented else []
    return "<br>".join(parts) or '<span class="ok">all classes named, none invented</span>'


def _img(url: str | None, tile_id: str) -> str:
    return "" if url is None else f'<img class="thumb" alt="{html.escape(tile_id)}" src="{url}">'


def _caption_table(
    rows: pd.DataFrame, columns: list[str], thumbs: Thumbnails | None, classes: TileClasses | None,
    group: str | None = None,
) -> str:  # fmt: skip
    """Captions as an HTML table: the tile's thumbnail (with an index) first, then ``columns``, then the class
    flags; rows with the same ``group`` value share one thumbnail cell."""
    if rows.empty:
        return "<p>none</p>"
    head = ["tile"] if thumbs is not None else []
    head += columns + (["classes"] if classes is not None else [])
    lines = ["<table class='captions'><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    records = rows.to_dict("records")
    for number, record in enumerate(records):
        cells = []
        if thumbs is not None:
            previous = records[number - 1] if number else None
            if group is None or previous is None or previous[group] != record[group]:
                span = 1 if group is None else sum(1 for other in records if other[group] == record[group])
                cells.append(f"<td rowspan='{span}'>{_img(thumbs(record['tile_id']), record['tile_id'])}</td>")
        cells += [f"<td class='{c}'>{_text(record[c])}</td>" for c in columns]
        if classes is not None:
            cells.append(f"<td>{_flags(classes, record['tile_id'], record['caption'])}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(lines) + "</table>"


STYLE = (
    "body{font-family:sans-serif;max-width:72em;margin:auto}table{border-collapse:collapse}"
    "td,th{padding:2px 8px;vertical-align:top;border-bottom:1px solid #ddd}img.thumb{display:block}"
    ".caption{max-width:36em}.miss{color:#a60}.halluc{color:#c00}.ok{color:#080}.note{color:#555}"
    ".warn{color:#c00;font-weight:bold}tr.tile-head td{background:#f4f4f4;border-top:2px solid #999}"
)


def _page(title: str, body: Iterable[str], script: str = "") -> str:
    head = f"<head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head>"
    tail = f"<script>{script}</script>" if script else ""
    return f"<!doctype html><html>{head}<body>{''.join(body)}{tail}</body></html>"


def render_html(report: CaptionReport) -> str:
    """``report.html``: tables, plots and captions next to their tiles' thumbnails, one self-contained file."""
    thumbs = Thumbnails(report.index) if report.index is not None else None
    classes = TileClasses(report.index) if report.index is not None else None
    sections = [("Pass rate and recovery by re-prompting", report.summary)]
    sections.append((f"Class information in prompts ({protocol_line(report.class_information)})",
                     report.class_information))  # fmt: skip
    if report.gate is not None:
        sections.append(("Gate mode and threshold", report.gate))
    if report.gate_quality is not None:
        sections.append(("Gate against corrupted captions (synthetic experts)", report.gate_quality))
    if report.class_quality is not None:
        sections.append(("Class recall and hallucinated classes", report.class_quality))
    sections += [("Caption length and truncation", report.lengths), ("Worst selected captions", report.worst)]
    body = [f"<h1>Caption quality report</h1><p class='gate'>{html.escape(gate_summary(report.gate, report.tau))}</p>"]
    if report.index is None:
        body.append("<p class='note'>No tile index given (<code>--index</code>): the captions below are shown "
                    "without thumbnails and without class flags.</p>")  # fmt: skip
    if report.calibration is not None:
        table = report.calibration.to_html(index=False, float_format="{:.3f}".format)
        body.append(f"<h2>Own vs shuffled captions (calibration)</h2><p class='note'>CLIP similarity of each "
                    f"expert's captions with their own tile against shuffled tiles: AUC of the separation and the "
                    f"suggested threshold.</p>{table}")  # fmt: skip
        body += [f"<p class='warn'>warning: {html.escape(w)}</p>" for w in calibration_warnings(report.calibration)]
    elif report.calibration_note:
        body.append(f"<h2>Own vs shuffled captions (calibration)</h2><p class='note'>"
                    f"{html.escape(report.calibration_note)}</p>")  # fmt: skip
    for title, table in sections:
        body.append(f"<h2>{html.escape(title)}</h2>{table.to_html(index=False, float_format='{:.3f}'.format)}")
    extra = _extra_columns(report.selected)
    columns = ["expert", "prompt_id", "attempt", "similarity", *extra, "passed", "caption"]
    body.append(f"<h2>Worst and best selected captions per expert and prompt ({EXAMPLES} each)</h2>")
    for which in ("worst", "best"):
        rows = report.examples[report.examples["which"] == which] if not report.examples.empty else report.examples
        body.append(f"<h3>{which}</h3>{_caption_table(rows, ['tile_id', *columns], thumbs, classes)}")
    shown = report.recovered["key"].nunique() if not report.recovered.empty else 0
    body.append(f"<h2>Rejected by the gate, recovered by re-prompting</h2><p class='note'>{report.recovered_total} "
                f"keys whose attempt 0 did not pass and a later attempt did; {shown} shown (largest similarity gain "
                f"first): attempt 0 and the first attempt that passed.</p>")  # fmt: skip
    body.append(_caption_table(report.recovered, ["tile_id", *columns], thumbs, classes, group="key"))
    body.append("<h2>Where the experts disagree</h2><p class='note'>Tiles and prompts with the largest spread of "
                "selected similarity across experts (then the lowest overlap of the classes their captions name); "
                "one row per expert.</p>")  # fmt: skip
    body.append(_caption_table(report.disagreement, ["tile_id", "spread", "class_overlap", *columns], thumbs, classes,
                               group="group"))  # fmt: skip
    body.append("<p>All selected captions of a sample of tiles: <a href='captions.html'>captions.html</a></p>")
    for title, png in _plots(report):
        body.append(f'<h2>{title}</h2><img class="plot" alt="{title}" src="data:image/png;base64,{png}">')
    return _page("Caption quality", body)


# Each tile is one ``tbody.tile``: a ``tr.tile-head`` (its thumbnail and id, never filtered itself) and one
# ``tr.caption-row`` per caption. The filter hides caption rows, and a tile (head included) only when it hides every
# caption row of the tile, so a shown caption always has its tile's thumbnail above it.
FILTER_SCRIPT = """
function applyFilter() {
  var expert = document.getElementById('filter-expert').value;
  var prompt = document.getElementById('filter-prompt').value;
  var passed = document.getElementById('filter-passed').value;
  var shown = 0;
  document.querySelectorAll('tbody.tile').forEach(function (body) {
    var visible = 0;
    body.querySelectorAll('tr.caption-row').forEach(function (row) {
      var ok = (expert === '' || row.dataset.expert === expert) && (prompt === '' || row.dataset.prompt === prompt)
        && (passed === '' || row.dataset.passed === passed);
      row.style.display = ok ? '' : 'none';
      if (ok) { visible += 1; }
    });
    body.style.display = visible ? '' : 'none';
    shown += visible;
  });
  document.getElementById('shown').textContent = shown;
}
['filter-expert', 'filter-prompt', 'filter-passed'].forEach(function (id) {
  document.getElementById(id).addEventListener('change', applyFilter);
});
applyFilter();
"""


def sample_tiles(tile_ids: Iterable[str], n: int = CAPTION_TILES, seed: int | None = None) -> list[str]:
    """Up to ``n`` tile ids, sorted: the first ``n`` by id, or (with ``seed``) a seeded random sample."""
    ids = sorted(set(tile_ids))
    if len(ids) <= n:
        return ids
    if seed is None:
        return ids[:n]
    return sorted(np.random.default_rng(seed).choice(ids, n, replace=False).tolist())


def _select(name: str, label: str, values: Iterable[str]) -> str:
    options = "".join(f"<option value='{html.escape(v)}'>{html.escape(v)}</option>" for v in values)
    return f"<label>{label} <select id='filter-{name}'><option value=''>all</option>{options}</select></label> "


def render_captions_html(report: CaptionReport, n_tiles: int = CAPTION_TILES, seed: int | None = None) -> str:
    """``captions.html``: every selected caption of a sample of tiles, filterable by expert, prompt and passed with
    inline JavaScript. One table body per tile: a head row with its thumbnail and id, then a row per caption (its
    similarity, and the gate score and threshold it was judged by); the filter hides caption rows, and the head row
    only with the last caption row of its tile."""
    selected = report.selected
    tiles = sample_tiles(selected["tile_id"], n_tiles, seed) if not selected.empty else []
    rows = selected[selected["tile_id"].isin(tiles)]
    thumbs = Thumbnails(report.index) if report.index is not None else None
    total = selected["tile_id"].nunique() if not selected.empty else 0
    how = "the first by tile id" if seed is None else f"a random sample, seed {seed}"
    body = [f"<h1>Selected captions</h1><p class='note'>{len(rows)} captions of {len(tiles)} of {total} tiles "
            f"({how}).{'' if thumbs else ' No tile index given (--index): no thumbnails.'}</p>"]  # fmt: skip
    body.append(
        "<p>"
        + _select("expert", "expert", sorted(rows["expert"].unique()))
        + _select("prompt", "prompt", sorted(rows["prompt_id"].unique()))
        + _select("passed", "passed", ["true", "false"])
        + "<span id='shown'></span> captions shown</p>"
    )
    body.append(f"<p class='note'>{html.escape(gate_summary(report.gate, report.tau))}</p>")
    columns = ["expert", "prompt_id", "similarity", *_extra_columns(rows), "passed", "caption"]
    body.append("<table class='captions'><thead><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr></thead>")
    for tile_id, group in rows.groupby("tile_id", sort=True):
        image = _img(thumbs(tile_id), tile_id) if thumbs is not None else ""
        lines = [f"<tr class='tile-head'><td colspan='{len(columns)}'>{image}"
                 f"<span class='tile-id'>{html.escape(tile_id)}</span></td></tr>"]  # fmt: skip
        for record in group.to_dict("records"):
            passed = "true" if record["passed"] else "false"
            cells = "".join(f"<td class='{c}'>{_text(record[c])}</td>" for c in columns)
            data = (f"data-expert='{html.escape(record['expert'])}' data-prompt='{html.escape(record['prompt_id'])}' "
                    f"data-passed='{passed}'")  # fmt: skip
            lines.append(f"<tr class='caption-row' {data}>{cells}</tr>")
        body.append(f"<tbody class='tile' data-tile='{html.escape(tile_id)}' data-captions='{len(group)}'>"
                    f"{''.join(lines)}</tbody>")  # fmt: skip
    body.append("</table>")
    return _page("Selected captions", body, FILTER_SCRIPT)


def write_report(
    store: str | Path, out: str | Path, index: str | Path | None = None, n_tiles: int = CAPTION_TILES,
    seed: int | None = None,
) -> tuple[Path, CaptionReport]:  # fmt: skip
    """Write ``report.html``, ``captions.html``, ``report.md`` and ``tau_sweep.csv`` into ``out``.

    Args:
        store: the caption store.
        out: the report folder.
        index: the tile index, for thumbnails and class recall / hallucination flags.
        n_tiles: how many tiles ``captions.html`` shows.
        seed: None shows the first ``n_tiles`` tiles by id, a seed a random sample of them.
    """
    report = build_report(store, index)
    out = Path(out)
    atomic_write_text(out / "report.html", render_html(report))
    atomic_write_text(out / "captions.html", render_captions_html(report, n_tiles, seed))
    atomic_write_text(out / "report.md", render_markdown(report))
    report.tau_sweep.to_csv(out / "tau_sweep.csv")
    return out / "report.html", report


@flow(name="caption-report")
def caption_report_flow(
    store: str, out: str, index: str | None = None, n_tiles: int = CAPTION_TILES, seed: int | None = None
) -> Path:
    """Write the HTML report and publish it as Prefect Markdown and table artifacts.

    Args:
        store: the caption store.
        out: the report folder.
        index: the tile index, for thumbnails, class recall and hallucinations.
        n_tiles: how many tiles ``captions.html`` shows.
        seed: None shows the first ``n_tiles`` tiles by id, a seed a random sample of them.

    Returns:
        The path of ``report.html`` (``captions.html`` is beside it).
    """
    path, report = write_report(store, out, index, n_tiles, seed)
    create_markdown_artifact(render_markdown(report), key="caption-report", description="caption quality")
    create_table_artifact(report.summary.to_dict("records"), key="caption-pass-rates")
    return path
