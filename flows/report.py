"""``flows run caption-report``: how good are the captions, computed from the store without re-generation."""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from caption_pipeline.policy import GatePolicy
from flows.generate_captions import summarize
from manifests.atomic import atomic_write_text
from manifests.caption_store import KEY_COLUMNS, read_store, store_meta
from manifests.tile_index import read_tile_index

PRESENT_SHARE = 0.005
TAUS = np.round(np.linspace(0.0, 1.0, 101), 2)


def mentioned_classes(caption: str, words: dict[str, tuple[str, ...]]) -> set[str]:
    """Classes a caption names by one of their words (the tile index's class vocabulary; whole words, any case)."""
    text = caption.lower()
    return {
        name for name, names in words.items()
        if any(re.search(rf"\b{re.escape(word.lower())}\b", text) for word in names)
    }  # fmt: skip


@dataclass
class CaptionReport:
    summary: pd.DataFrame
    class_information: pd.DataFrame
    tau_sweep: pd.DataFrame
    lengths: pd.DataFrame
    class_quality: pd.DataFrame | None
    worst: pd.DataFrame
    similarities: dict[str, np.ndarray]
    tau: float


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


def class_quality(selected: pd.DataFrame, index_path: Path) -> pd.DataFrame:
    """Per expert: recall of the tile's classes and the classes it names that the tile lacks."""
    index = read_tile_index(index_path)
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


def build_report(store: str | Path, index: str | Path | None = None) -> CaptionReport:
    frame = read_store(store)
    meta = store_meta(store)
    policy = GatePolicy() if meta is None else GatePolicy(tau=meta.tau)
    selected = frame[frame["selected"]]
    scored = frame[frame["similarity"].notna()]
    lengths = scored.groupby("expert").agg(
        captions=("caption", "size"), mean_clip_tokens=("n_tokens", "mean"), max_clip_tokens=("n_tokens", "max"),
        over_77_tokens=("n_chunks", lambda c: int((c > 1).sum())),
        truncated_by_max_tokens=("finish_reason", lambda f: int((f == "length").sum())),
    ).reset_index()  # fmt: skip
    worst = selected.nsmallest(10, "similarity")[["tile_id", "expert", "prompt_id", "similarity", "caption"]]
    return CaptionReport(
        summary=summarize(frame),
        class_information=class_information(frame),
        tau_sweep=tau_sweep(frame, policy),
        lengths=lengths,
        class_quality=class_quality(selected, Path(index)) if index else None,
        worst=worst,
        similarities={e: g["similarity"].to_numpy(float) for e, g in scored.groupby("expert")},
        tau=policy.tau,
    )


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(report: CaptionReport) -> list[tuple[str, str]]:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for expert, values in report.similarities.items():
        axis.hist(values, bins=40, range=(0, 1), alpha=0.5, label=expert)
    axis.axvline(report.tau, color="black", linestyle="--", label=f"tau = {report.tau:g}")
    axis.set(xlabel="similarity (cos/2 + 1/2)", ylabel="attempts", title="CLIP similarity per expert")
    axis.legend()
    histogram = _png(figure)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for expert in report.tau_sweep.columns:
        axis.plot(report.tau_sweep.index, report.tau_sweep[expert], label=expert)
    axis.axvline(report.tau, color="black", linestyle="--", label=f"manifest tau = {report.tau:g}")
    axis.set(xlabel="tau", ylabel="pass rate (best attempt)", title="tau sweep", ylim=(0, 1.02))
    axis.legend()
    return [("Similarity histograms", histogram), ("Tau sweep", _png(figure))]


def render_markdown(report: CaptionReport) -> str:
    parts = ["# Caption quality", "", f"tau = {report.tau:g}", "", report.summary.to_markdown(index=False)]
    parts += ["", "## Class information in prompts", "", protocol_line(report.class_information), ""]
    parts += [report.class_information.to_markdown(index=False)]
    if report.class_quality is not None:
        parts += ["", "## Class recall and hallucinated classes", "", report.class_quality.to_markdown(index=False)]
    parts += ["", "## Caption length", "", report.lengths.to_markdown(index=False)]
    return "\n".join(parts)


def render_html(report: CaptionReport) -> str:
    sections = [("Pass rate and recovery by re-prompting", report.summary)]
    sections.append((f"Class information in prompts ({protocol_line(report.class_information)})",
                     report.class_information))  # fmt: skip
    if report.class_quality is not None:
        sections.append(("Class recall and hallucinated classes", report.class_quality))
    sections += [("Caption length and truncation", report.lengths), ("Worst selected captions", report.worst)]
    body = [f"<h1>Caption quality report</h1><p>tau = {report.tau:g}</p>"]
    for title, table in sections:
        body.append(f"<h2>{html.escape(title)}</h2>{table.to_html(index=False, float_format='{:.3f}'.format)}")
    for title, png in _plots(report):
        body.append(f'<h2>{title}</h2><img alt="{title}" src="data:image/png;base64,{png}">')
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}td,th{padding:2px 8px}"
    )
    head = f"<head><meta charset='utf-8'><title>Caption quality</title><style>{style}</style></head>"
    return f"<!doctype html><html>{head}<body>{''.join(body)}</body></html>"


def write_report(store: str | Path, out: str | Path, index: str | Path | None = None) -> tuple[Path, CaptionReport]:
    report = build_report(store, index)
    out = Path(out)
    atomic_write_text(out / "report.html", render_html(report))
    atomic_write_text(out / "report.md", render_markdown(report))
    report.tau_sweep.to_csv(out / "tau_sweep.csv")
    return out / "report.html", report


@flow(name="caption-report")
def caption_report_flow(store: str, out: str, index: str | None = None) -> Path:
    """Write the HTML report and publish it as Prefect Markdown and table artifacts."""
    path, report = write_report(store, out, index)
    create_markdown_artifact(render_markdown(report), key="caption-report", description="caption quality")
    create_table_artifact(report.summary.to_dict("records"), key="caption-pass-rates")
    return path
