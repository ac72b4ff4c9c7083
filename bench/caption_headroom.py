"""How much can captions give, and how much caption noise must the gate remove: the caption headroom study.

On the demo (its own work folder, default ``data/bench/caption_headroom``, resumable): the scenes and tiles, a tiny
CLIP trained on the train tiles' label captions (``caption_pipeline.clip_training``: the gate's scorer and the text
tower of ``test_tiny``), then, for every seed, ``test_tiny_notext`` (no captions) against ``test_tiny`` trained and
evaluated with (both without geometric augmentation, the text-guided default, so rows differ by their captions alone)

- ``oracle``: the annotation expert's captions of the labels on every split. The ceiling: it reads the ground truth
  at test time, which no deployment can;
- ``synthetic c``: the synthetic expert (``caption_pipeline.experts.synthetic``) corrupting that caption with
  probability about ``c`` (each of drop / insert / proportions at rate ``1 - (1 - c) ** (1 / 3)``), with the gate
  off (every caption kept) and on (the absolute gate at the tau that lets ``GATE_FALSE_PASS`` of shuffled clean
  captions of the test tiles through, as ``flows run calibrate-gate --split test`` suggests, and up to
  ``GATE_ATTEMPTS`` attempts, each a new draw); the gate's precision and recall at rejecting corrupted captions come
  from the caption report;
- ``predicted``: the annotation expert's captions of the labels on train, of the text-free model's predicted masks
  elsewhere (what a user can deploy);
- ``blind``: no class information in any prompt: the demo's tiny Qwen2-VL (random weights, gibberish captions).

It prints mIoU (5 classes, eroded GT, windows on the tile grid) per row as mean +- std over seeds, each row's
difference to the text-free model paired by seed, and writes ``results.json`` and ``headroom.png`` (gain against
corruption, gate off and on, with the oracle and predicted rows as references).
Usage: ``python bench/caption_headroom.py [--steps 150] [--seeds 0 1 2] [--scene-size 1024]`` (a smaller scene size
gives fewer tiles: 512 px scenes give a quarter of the demo's 256 tiles).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the project root may not be
    sys.path.insert(0, str(ROOT))

from bench.caption_effect import Bench, prepare_demo, protocol_manifest  # noqa: E402
from flows.demo import DEMO_SCENE_SIZE, TEXT_FREE, TEXT_GUIDED  # noqa: E402

CORRUPTIONS = (0.5, 0.25)  # the heavier first: its gate precision and recall are the ones to report
KINDS = 3  # drop, insert, proportions
GATE_FALSE_PASS = 0.2
GATE_ATTEMPTS = 3
TEXT_FREE_ROW = f"{TEXT_FREE} (no captions)"


@dataclass(frozen=True)
class Study:
    """One text-guided row: its caption protocol, its one expert and its gate.

    Attributes:
        row: the row's name in the table.
        protocol: the caption protocol (oracle, predicted, blind).
        expert: the manifest entry of its expert.
        corruption: the synthetic expert's corruption level (None for the other experts).
        gate: whether the gate filters (False: every usable caption passes, one attempt; only synthetic rows filter).
    """

    row: str
    protocol: str
    expert: dict
    corruption: float | None = None
    gate: bool = False

    @property
    def name(self) -> str:
        """The folder-safe name of the row (its store and runs)."""
        if self.corruption is None:
            return self.protocol
        return f"synthetic{round(100 * self.corruption)}_gate_{'on' if self.gate else 'off'}"


def kind_rate(corruption: float) -> float:
    """The rate of each corruption kind that corrupts a caption with probability ``corruption`` (kinds independent;
    fewer where a kind cannot apply, which the corruption record shows)."""
    return 1 - (1 - corruption) ** (1 / KINDS)


def studies() -> list[Study]:
    """The text-guided rows of the study, in table order."""
    annotation = {"name": "annotation", "backend": "annotation"}
    rows = [Study("oracle (labels at train and test: the ceiling, reads ground truth at test time)", "oracle",
                  annotation)]  # fmt: skip
    for corruption in CORRUPTIONS:
        rate = kind_rate(corruption)
        expert = {"name": "synthetic", "backend": "synthetic", "drop": rate, "insert": rate, "proportions": rate}
        for gate in (False, True):
            label = f"synthetic, corruption {corruption:g}, gate {'on' if gate else 'off'} (labels at test)"
            rows.append(Study(label, "oracle", expert, corruption, gate))
    qwen = {"name": "qwen-tiny", "backend": "transformers", "model": "data/demo/models/qwen2-vl-tiny",
            "max_new_tokens": 24, "device": "cpu"}  # fmt: skip
    rows.append(Study("predicted (labels at train, text-free predictions at test)", "predicted", annotation))
    rows.append(Study("blind (no class information; tiny Qwen2-VL)", "blind", qwen))
    return rows


def paired_differences(guided: dict[int, float], plain: dict[int, float]) -> list[float]:
    """``guided - plain`` per seed, for the seeds both have, in seed order.

    Raises:
        ValueError: the two rows share no seed.
    """
    seeds = sorted(set(guided) & set(plain))
    if not seeds:
        raise ValueError("no seed in common: nothing to pair")
    return [guided[seed] - plain[seed] for seed in seeds]


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value), in mIoU points."""
    mean = 100 * statistics.mean(values)
    return mean, 100 * statistics.stdev(values) if len(values) > 1 else float("nan")


def study_manifest(study: Study, folder: Path, tau: float | None = None) -> Path:
    """The demo manifest with the study's protocol, its one expert, its own store and its gate (``tau`` when on)."""
    path = protocol_manifest(study.protocol, folder)
    data = yaml.safe_load(path.read_text())
    data["name"] = f"headroom_{study.name}"
    data["captions"]["store"] = f"data/demo/captions_headroom_{study.name}"
    data["captions"]["experts"] = [study.expert]
    # Only the gate-on rows filter: every other row keeps every usable caption, so rows differ by their captions.
    data["captions"]["tau"] = tau if study.gate else 0.0
    data["captions"]["max_attempts"] = GATE_ATTEMPTS if study.gate else 1
    path = folder / f"headroom_{study.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Headroom(Bench):
    """The study's runs: the text-free model per seed, then each text-guided row on its own caption store."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.by_seed: dict[str, dict[int, float]] = {}
        self.gate_quality: dict[str, dict] = {}

    def run(self, row: str, preset: str, name: str, manifest: str, seed: int, store=None, augmentation="auto") -> Path:
        """:meth:`Bench.run`, keeping each result under its seed for the pairing."""
        out = super().run(row, preset, name, manifest, seed, store, augmentation)
        self.by_seed.setdefault(row, {})[seed] = self.results[row][-1]
        return out

    def caption(self, study: Study, manifest: Path) -> Path:
        """Caption the tiles for ``study`` (quietly); the store, with its report beside it."""
        from flows.generate_captions import generate_captions
        from flows.report import write_report
        from manifests.run_manifest import load_manifest

        store = load_manifest(manifest).captions.store
        with self.quiet:
            generate_captions(manifest)
        _, report = write_report(store, store.parent / f"report_{study.name}", "data/demo/tiles")
        if report.gate_quality is not None:
            self.gate_quality[study.row] = report.gate_quality.iloc[0].to_dict()
        return store

    def gate_tau(self, oracle_manifest: Path) -> float:
        """The tau that lets ``GATE_FALSE_PASS`` of shuffled clean captions through, calibrated on the test tiles (the
        CLIP was trained on the train tiles, whose captions it fits better than a user's new tiles)."""
        from flows.calibrate import TileSample, calibrate_gate

        with self.quiet:
            calibration = calibrate_gate(oracle_manifest, TileSample(10_000, split="test"), false_pass=GATE_FALSE_PASS)
        group = calibration.experts["annotation"]
        self.console.print(f"gate: test AUC {group.auc:.3f}, tau {group.tau_at_false_pass:.3f} (passes "
                           f"{group.own_pass_at_suggested:.0%} of clean own captions)")  # fmt: skip
        return group.tau_at_false_pass


def run_study(bench: Headroom, predictor: Path) -> list[str]:
    """Caption and train every text-guided row; returns their names."""
    from flows.demo import write_predicted_classes
    from manifests.run_manifest import load_manifest
    from segmenter.engine.options import TEXT_GUIDED_AUGMENTATION

    tau = None
    names = []
    for study in studies():
        manifest = study_manifest(study, bench.args.work, tau)
        if study.protocol == "predicted":
            write_predicted_classes(bench.console, load_manifest(manifest), predictor)
        store = bench.caption(study, manifest)
        if study.protocol == "oracle" and study.corruption is None:
            tau = bench.gate_tau(manifest)
        for seed in bench.args.seeds:
            bench.run(study.row, TEXT_GUIDED, f"headroom_{study.name}", str(manifest), seed, store=store,
                      augmentation=TEXT_GUIDED_AUGMENTATION.value)  # fmt: skip
        names.append(study.row)
    return names


def table(bench: Headroom, rows: list[str]) -> list[str]:
    """The Markdown table: mIoU per row and its difference to the text-free model, paired by seed."""
    args = bench.args
    lines = [
        f"mIoU (5 classes, eroded GT) on the demo test areas; seeds {args.seeds}, {args.steps} steps each",
        "",
        f"| model | mIoU mean +- std | difference to {TEXT_FREE}, paired by seed |",
        "|---|---|---|",
    ]
    plain = bench.by_seed[TEXT_FREE_ROW]
    for row in [TEXT_FREE_ROW, *rows]:
        mean, std = spread(list(bench.by_seed[row].values()))
        diff = "-" if row == TEXT_FREE_ROW else "{:+.2f} +- {:.2f}".format(*spread(
            paired_differences(bench.by_seed[row], plain)))  # fmt: skip
        lines.append(f"| {row} | {mean:.2f} +- {std:.2f} | {diff} |")
    for row, quality in bench.gate_quality.items():
        if "gate on" in row:
            lines.append(f"\n{row}: {quality['corrupted']:.0%} of attempts corrupted, gate precision "
                         f"{quality['precision']:.2f}, recall {quality['recall']:.2f}")  # fmt: skip
    return lines


def plot(bench: Headroom, path: Path) -> None:
    """Gain over the text-free model (mean +- std, paired by seed) against corruption, gate off and on."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plain = bench.by_seed[TEXT_FREE_ROW]
    gain = {
        row: spread(paired_differences(values, plain)) for row, values in bench.by_seed.items() if row != TEXT_FREE_ROW
    }
    oracle = next(row for row in gain if row.startswith("oracle"))
    figure = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for gate, color in (("off", "tab:orange"), ("on", "tab:blue")):
        points = [(0.0, gain[oracle])] + [(s.corruption, gain[s.row]) for s in studies()
                                          if s.corruption is not None and s.gate == (gate == "on")]  # fmt: skip
        ax.errorbar([p[0] for p in points], [p[1][0] for p in points], [p[1][1] for p in points], marker="o",
                    capsize=3, color=color, label=f"gate {gate}")  # fmt: skip
    predicted = next(row for row in gain if row.startswith("predicted"))
    ax.axhline(gain[predicted][0], color="tab:green", linestyle="--", label="predicted protocol")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("share of corrupted captions (0: oracle)")
    ax.set_ylabel(f"mIoU gain over {TEXT_FREE} (points)")
    ax.legend(fontsize="small")
    figure.savefig(path, format="png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scene-size", type=int, default=DEMO_SCENE_SIZE, help="side of each demo scene (px)")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "bench" / "caption_headroom")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)  # the demo manifest's relative paths resolve here

    from segmenter.engine.options import TEXT_GUIDED_AUGMENTATION

    bench = Headroom(args)
    prepare_demo(bench, args.scene_size)
    # The text-free model under the text-guided default augmentation (none), so rows differ by their captions alone.
    augmentation = TEXT_GUIDED_AUGMENTATION.value
    for seed in args.seeds:
        bench.run(TEXT_FREE_ROW, TEXT_FREE, f"notext_{augmentation}", "demo", seed, augmentation=augmentation)
    rows = run_study(bench, bench.runs / f"notext_{augmentation}_seed{args.seeds[0]}")
    lines = table(bench, rows)
    print("\n".join(lines))
    plot(bench, args.work / "headroom.png")
    results = {"steps": args.steps, "seeds": args.seeds, "by_seed": bench.by_seed, "gate_quality": bench.gate_quality}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{time.perf_counter() - bench.started:.0f} s in all; plot: {args.work / 'headroom.png'}")


if __name__ == "__main__":
    main()
