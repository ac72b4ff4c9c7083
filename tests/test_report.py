"""The caption report you can look at: thumbnails next to captions, recovered keys, disagreements, captions.html."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from flows.calibrate import AUC_FLOOR
from flows.cli import app
from flows.report import (
    CAPTION_TILES,
    EXAMPLES,
    MAX_DISAGREEMENTS,
    MAX_RECOVERED,
    SWEEP_OTHER_MODE,
    THUMB_MAX_BYTES,
    THUMB_PX,
    build_report,
    gate_summary,
    gate_table,
    render_captions_html,
    render_html,
    render_markdown,
    sample_tiles,
    worst_and_best,
    write_report,
)
from manifests.caption_store import StoreMeta, write_fragment
from manifests.tile_index import ClassVocabulary, IndexClasses, read_tile_index, write_tile_index
from tests.helpers import row

MB = 1_000_000
IMG = re.compile(r'<img class="thumb" alt="([^"]+)" src="data:image/jpeg;base64,([^"]+)">')


def caption_of(index, tile_id: str) -> str:
    """A caption naming every class that covers more than 1% of the tile."""
    shares = index.frame.set_index("tile_id").loc[tile_id, "class_fractions"]
    names = [name for name, share in zip(index.class_names, shares, strict=True) if share > 0.01]
    return "a tile with " + ", ".join(index.vocabulary.words[name][0] for name in names)


def absent_class(index, tile_id: str) -> str:
    shares = index.frame.set_index("tile_id").loc[tile_id, "class_fractions"]
    return next(name for name, share in zip(index.class_names, shares, strict=True) if share == 0)


@pytest.fixture(scope="module")
def report_store(tmp_path_factory, small_index) -> Path:
    """The annotation expert names every class (similarity 0.7-0.9, passes at once); a scripted expert names one
    class that is not there, its attempt 0 of the first tile's p1 fails (0.3) and attempt 1 passes (0.8)."""
    store = tmp_path_factory.mktemp("report") / "captions"
    tiles = sorted(small_index.frame["tile_id"])
    rows = []
    for number, tile in enumerate(tiles):
        for prompt in ("p1", "p2"):
            similarity = 0.7 + 0.2 * number / len(tiles)
            rows.append(row(tile, prompt, similarity=similarity, expert="annotation",
                            caption=caption_of(small_index, tile)))  # fmt: skip
            scripted = f"a {small_index.vocabulary.words[absent_class(small_index, tile)][0]} on tile {number}"
            if tile == tiles[0] and prompt == "p1":
                rows.append(row(tile, prompt, 0, 0.3, expert="scripted", caption="blurry nothing", selected=False))
                rows.append(row(tile, prompt, 1, 0.8, expert="scripted", caption=scripted))
            else:
                rows.append(row(tile, prompt, similarity=0.6 - 0.02 * number, expert="scripted", caption=scripted))
    write_fragment(store, rows, StoreMeta(small_index.class_names, "tiny:random", 0.55))
    return store


def decode(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image.convert("RGB"), dtype=float)


def test_report_shows_thumbnails_next_to_their_captions(report_store, small_index, tmp_path):
    path, report = write_report(report_store, tmp_path / "out", small_index.root)
    page = path.read_text()
    thumbs = IMG.findall(page)
    assert thumbs and page.count('<img class="plot"') == 2
    # Every thumbnail is the tile it is named after, downscaled: close to PIL's resize of the tile, far from others.
    tile_id, data = thumbs[0]
    image = decode(data)
    assert max(image.shape[:2]) == min(THUMB_PX, 64) and len(base64.b64decode(data)) <= THUMB_MAX_BYTES
    paths = small_index.frame.set_index("tile_id")["image_path"]
    errors = {}
    for other in paths.index:
        with Image.open(small_index.path(paths[other])) as tile:
            size = (image.shape[1], image.shape[0])
            errors[other] = np.abs(np.asarray(tile.convert("RGB").resize(size, Image.Resampling.BILINEAR)) - image)
    assert (
        errors[tile_id].mean() < 8 and min(e.mean() for t, e in errors.items() if t != tile_id) > errors[tile_id].mean()
    )
    # The thumbnail sits in the same table row as its tile's caption, with the class flags beside it.
    worst = report.examples[(report.examples["which"] == "worst") & (report.examples["expert"] == "scripted")]
    first = worst.iloc[0]
    row_html = next(r for r in page.split("<tr>") if f'alt="{first.tile_id}"' in r and "scripted" in r)
    assert first.caption in row_html and "invented: " in row_html and "missed: " in row_html
    assert len(report.examples) == 2 * 2 * 2 * EXAMPLES  # experts x prompts x (worst, best)
    # The annotation captions name every class of their tile and nothing else.
    annotation = next(r for r in page.split("<tr>") if "annotation" in r and "a tile with" in r and "<img" in r)
    assert "all classes named, none invented" in annotation


def test_recovered_section_lists_both_attempts(report_store, small_index, tmp_path):
    path, report = write_report(report_store, tmp_path / "out", small_index.root)
    assert report.recovered_total == 1
    recovered = report.recovered
    assert recovered["attempt"].tolist() == [0, 1] and recovered["passed"].tolist() == [False, True]
    assert recovered["similarity"].tolist() == pytest.approx([0.3, 0.8])
    page = path.read_text()
    section = page.split("Rejected by the gate, recovered by re-prompting")[1].split("<h2>")[0]
    assert "blurry nothing" in section and "0.300" in section and "0.800" in section
    assert section.count("<img") == 1  # one thumbnail for both attempts (rowspan)


def test_disagreement_lists_the_largest_spread(report_store, small_index):
    report = build_report(report_store, small_index.root)
    table = report.disagreement
    assert table["group"].nunique() == min(MAX_DISAGREEMENTS, 2 * len(small_index.frame))
    spreads = table.drop_duplicates("group")["spread"].to_numpy()
    assert (np.diff(spreads) <= 1e-9).all()
    top = table[table["group"] == 0]
    assert set(top["expert"]) == {"annotation", "scripted"}
    assert top["spread"].iloc[0] == pytest.approx(top["similarity"].max() - top["similarity"].min())
    assert (table["class_overlap"] == 0).all()  # the scripted expert names only a class the tile lacks


def test_captions_page_holds_every_sampled_caption_and_filters(report_store, small_index, tmp_path):
    write_report(report_store, tmp_path / "out", small_index.root)
    page = (tmp_path / "out" / "captions.html").read_text()
    report = build_report(report_store, small_index.root)
    tiles = sample_tiles(report.selected["tile_id"])
    assert tiles == sorted(small_index.frame["tile_id"])  # fewer than CAPTION_TILES: all of them
    for caption in report.selected["caption"]:
        assert caption in page
    assert page.count("class='caption-row'") == len(report.selected)
    assert len(IMG.findall(page)) == len(tiles)  # one thumbnail per tile
    assert "http://" not in page and "https://" not in page and ' src="http' not in page
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page)  # inline script only, no external files
    for name in ("expert", "prompt", "passed"):
        assert f"<select id='filter-{name}'>" in page and f"getElementById('filter-{name}')" in page
    assert "<option value='scripted'>" in page and "<option value='p2'>" in page
    assert "data-expert='scripted' data-prompt='p1' data-passed='true'" in page
    assert "addEventListener('change', applyFilter)" in page
    # The sample is reproducible: the first n by tile id, or a seeded sample.
    assert sample_tiles(tiles, 5) == tiles[:5]
    assert sample_tiles(tiles, 5, seed=1) == sample_tiles(reversed(tiles), 5, seed=1) != tiles[:5]


def test_without_index_the_same_tables_without_images(report_store, tmp_path):
    path, report = write_report(report_store, tmp_path / "out")
    page = path.read_text()
    assert "No tile index given" in page and not IMG.findall(page) and "blurry nothing" in page
    captions = (tmp_path / "out" / "captions.html").read_text()
    assert "<img" not in captions and "no thumbnails" in captions
    assert all(caption in captions for caption in report.selected["caption"])


def test_gate_columns_and_calibration_are_shown_when_present(report_store, small_index, tmp_path):
    report = build_report(report_store)
    assert report.calibration is None and report.calibration_note is None  # no calibrate-gate run yet
    frame = report.selected
    if "gate_mode" in frame.columns:  # stores of schema 4 record the gate of every attempt
        assert set(report.gate["gate_mode"]) == {"absolute"} and report.gate[
            "gate_threshold"
        ].tolist() == pytest.approx([0.55] * 4)
    assert gate_table(frame.drop(columns=["gate_mode", "gate_threshold"], errors="ignore")) is None
    gate = gate_table(frame.assign(gate_mode="percentile", gate_threshold=0.61))
    assert gate is not None and set(gate["gate_mode"]) == {"percentile"} and len(gate) == 4  # experts x prompts
    (report_store / "calibration").mkdir()
    try:
        calibration = {"experts": {"annotation": {"auc": 0.91, "tau_at_false_pass": 0.62, "own": {"mean": 0.7},
                                                  "pass_rates": {"absolute": 0.8}}}}  # fmt: skip
        (report_store / "calibration" / "calibration.json").write_text(json.dumps(calibration))
        path, report = write_report(report_store, tmp_path / "out", small_index.root)
        assert report.calibration.to_dict("records") == [
            {"expert": "annotation", "auc": 0.91, "tau_at_false_pass": 0.62, "own_mean": 0.7, "pass_absolute": 0.8}
        ]
        page = path.read_text()
        assert "Own vs shuffled captions" in page and "0.910" in page
        if report.gate is not None:
            assert "gate mode absolute: similarity &gt;= tau = 0.550" in page
        (report_store / "calibration" / "calibration.json").write_text("{not json")
        assert "could not be read" in build_report(report_store).calibration_note
        (report_store / "calibration" / "calibration.json").write_text("[1, 2]")
        assert build_report(report_store).calibration is None
    finally:
        for file in (report_store / "calibration").iterdir():
            file.unlink()
        (report_store / "calibration").rmdir()


def test_report_size_is_bounded(report_store, small_index, tmp_path_factory):
    """The fixture's pages, and a demo-sized store: 256 tiles of 256 px (``manifests/demo.yaml``) of noise (the worst
    case for JPEG), 3 experts x 3 prompts, every caption 200 characters, half of the keys recovered."""
    out = tmp_path_factory.mktemp("size")
    write_report(report_store, out / "small", small_index.root)
    assert (out / "small" / "report.html").stat().st_size < MB and (out / "small" / "captions.html").stat().st_size < MB
    folder = out / "demo"
    rng = np.random.default_rng(0)
    names = ["impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter"]
    index_rows, rows = [], []
    for number in range(256):
        tile_id = f"demo/area{number // 16}/{number:04d}"
        image_path = f"images/{number}.png"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / image_path)
        fractions = rng.dirichlet(np.ones(len(names))).tolist()
        index_rows.append({"tile_id": tile_id, "dataset": "demo", "split": "train", "image_path": image_path,
                           "label_path": None, "eval_label_path": None, "source_id": "a", "x": 0, "y": number,
                           "width": 256, "height": 256, "class_fractions": fractions, "image_sha256": "x"})  # fmt: skip
        for expert in ("annotation", "qwen-tiny", "llava-tiny"):
            for prompt in ("p1", "p2", "p3"):
                caption = (f"{expert} {prompt} {tile_id} " + "a building next to a tree and a car " * 6)[:200]
                similarity = float(rng.uniform(0.55 if number % 2 else 0.3, 0.9))
                if number % 2:
                    rows.append(row(tile_id, prompt, 0, 0.4, expert=expert, caption=caption, selected=False))
                    rows.append(row(tile_id, prompt, 1, similarity, expert=expert, caption=caption))
                else:
                    rows.append(row(tile_id, prompt, 0, similarity, expert=expert, caption=caption))
    classes = IndexClasses(names, 255, [(0, 0, 0)] * len(names), ClassVocabulary.plain(names))
    write_tile_index(folder, index_rows, classes)
    write_fragment(folder / "captions", rows, StoreMeta(names, "tiny:random", 0.55))
    path, report = write_report(folder / "captions", folder / "report", folder)
    report_size = path.stat().st_size
    captions_size = (folder / "report" / "captions.html").stat().st_size
    assert report.recovered_total == 128 * 9 and read_tile_index(folder).frame.shape[0] == 256
    # The bound: report.html has at most 2 * EXAMPLES per (expert, prompt), MAX_RECOVERED recovered keys (one
    # thumbnail each) and MAX_DISAGREEMENTS groups; captions.html one thumbnail per sampled tile.
    page = path.read_text()
    assert len(IMG.findall(page)) <= 2 * EXAMPLES * 9 + MAX_RECOVERED + MAX_DISAGREEMENTS
    assert len(IMG.findall((folder / "report" / "captions.html").read_text())) == CAPTION_TILES
    thumb = THUMB_MAX_BYTES * 4 / 3  # base64
    assert report_size < 1.5 * MB and captions_size < 2.5 * MB
    assert CAPTION_TILES * thumb < 2 * MB  # the thumbnails alone, whatever the images
    print(f"demo-sized report.html {report_size / MB:.2f} MB, captions.html {captions_size / MB:.2f} MB")
    assert report_size + captions_size < 5 * MB


class TileBlocks(HTMLParser):
    """The table bodies of captions.html: per ``tbody.tile`` its rows, each with its class, data attributes, whether
    it holds a thumbnail and any rowspan."""

    def __init__(self) -> None:
        super().__init__()
        self.tiles: list[dict] = []
        self.row: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tbody" and values.get("class") == "tile":
            self.tiles.append({"tile": values["data-tile"], "captions": int(values["data-captions"]), "rows": []})
        elif tag == "tr" and self.tiles:
            self.row = {"class": values.get("class"), "data": values, "img": None, "rowspan": False}
            self.tiles[-1]["rows"].append(self.row)
        elif tag == "td" and self.row is not None and "rowspan" in values:
            self.row["rowspan"] = True
        elif tag == "img" and self.row is not None:
            self.row["img"] = values.get("alt")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self.row = None


def visible_tiles(blocks: TileBlocks, expert: str = "", prompt: str = "", passed: str = "") -> dict[str, tuple]:
    """What FILTER_SCRIPT shows for a filter: per shown tile, whether its head row (with the thumbnail) is shown and
    which caption rows are (the script's rule: a caption row by its data attributes, the tile while any is shown)."""
    shown = {}
    for tile in blocks.tiles:
        rows = [row for row in tile["rows"] if row["class"] == "caption-row"]
        ok = [(expert in ("", row["data"]["data-expert"])) and (prompt in ("", row["data"]["data-prompt"]))
              and (passed in ("", row["data"]["data-passed"])) for row in rows]  # fmt: skip
        if any(ok):
            shown[tile["tile"]] = (tile["rows"][0], [row for row, keep in zip(rows, ok, strict=True) if keep])
    return shown


def test_captions_page_filter_never_hides_a_shown_captions_thumbnail(report_store, small_index, tmp_path):
    write_report(report_store, tmp_path / "out", small_index.root, n_tiles=5)
    page = (tmp_path / "out" / "captions.html").read_text()
    blocks = TileBlocks()
    blocks.feed(page)
    assert len(blocks.tiles) == 5
    for tile in blocks.tiles:
        head, *rows = tile["rows"]
        # The thumbnail and the tile id sit in a head row of their own, which carries no filter attributes.
        assert head["class"] == "tile-head" and head["img"] == tile["tile"] and "data-expert" not in head["data"]
        assert len(rows) == tile["captions"] == 4 and all(row["class"] == "caption-row" for row in rows)
        assert not any(row["img"] or row["rowspan"] for row in rows) and not head["rowspan"]
    # The script filters only caption rows and hides a tile's body (its head row with it) when none is left.
    assert "querySelectorAll('tr.caption-row')" in page and "body.style.display = visible ? '' : 'none'" in page
    assert "tile-head" not in page.split("<script>")[1]
    # Hiding any tile's first caption row (here: the annotation expert, which sorts first) keeps its thumbnail.
    for filters in ({"expert": "scripted"}, {"prompt": "p2"}, {"passed": "false"}, {"expert": "annotation"}, {}):
        for tile, (head, rows) in visible_tiles(blocks, **filters).items():
            assert head["class"] == "tile-head" and head["img"] == tile and rows
    first = {tile["tile"]: tile["rows"][1]["data"]["data-expert"] for tile in blocks.tiles}
    assert set(first.values()) == {"annotation"} and set(visible_tiles(blocks, expert="scripted")) == set(first)
    # Next to the similarity: the gate score and the threshold the caption was judged by.
    assert "<th>similarity</th><th>gate_score</th><th>gate_threshold</th><th>passed</th>" in page
    assert "<td class='gate_threshold'>0.550</td>" in page


def test_reports_show_the_gate_mode_and_order_by_gate_score(report_store, small_index, tmp_path):
    report = build_report(report_store)
    assert "gate mode absolute: similarity >= tau = 0.550" in render_markdown(report)
    assert "Tau sweep" in render_html(report) and SWEEP_OTHER_MODE not in render_html(report)
    selected = report.selected
    # Contrastive: the gate score orders, against the similarity; rows without one fall back to their similarity.
    score = 1.0 - selected["similarity"]
    contrastive = selected.assign(gate_mode="contrastive", gate_threshold=0.02, gate_score=score)
    contrastive.loc[contrastive.index[0], "gate_score"] = np.nan
    examples = worst_and_best(contrastive)
    for (expert, prompt), group in examples.groupby(["expert", "prompt_id"]):
        pool = contrastive[(contrastive["expert"] == expert) & (contrastive["prompt_id"] == prompt)]
        order = pool["gate_score"].fillna(pool["similarity"])
        worst = group[group["which"] == "worst"]
        assert sorted(worst["tile_id"]) == sorted(pool.loc[order.nsmallest(EXAMPLES).index, "tile_id"])
    report.gate = gate_table(contrastive)
    report.selected = contrastive
    summary = gate_summary(report.gate, report.tau)
    assert summary == "gate mode contrastive: own similarity minus the mean similarity to the shard's other tiles " \
        ">= margin = 0.020"  # fmt: skip
    markdown, page = render_markdown(report), render_html(report)
    assert summary in markdown and "tau = " not in markdown and "tau = 0.55" not in page
    assert SWEEP_OTHER_MODE in page and "<h2>Tau sweep</h2>" not in page
    captions = render_captions_html(report)
    assert "gate mode contrastive" in captions and "<td class='gate_threshold'>0.020</td>" in captions
    thresholds = np.where(selected["prompt_id"] == "p1", 0.61, 0.64)
    percentile = gate_table(selected.assign(gate_mode="percentile", gate_threshold=thresholds))
    assert "gate mode percentile: similarity >= a threshold per expert and prompt (0.610-0.640" in gate_summary(
        percentile, 0.55
    )
    legacy = gate_summary(None, 0.55)
    assert legacy == "gate mode absolute (the store records no gate mode): similarity >= tau = 0.55"


def test_low_auc_calibration_is_flagged_in_the_report(report_store, tmp_path):
    (report_store / "calibration").mkdir()
    try:
        calibration = {"experts": {"annotation": {"auc": 0.49, "low_auc": True, "tau_at_false_pass": 0.7},
                                   "scripted": {"auc": 0.93, "low_auc": False, "tau_at_false_pass": 0.6}}}  # fmt: skip
        (report_store / "calibration" / "calibration.json").write_text(json.dumps(calibration))
        report = build_report(report_store)
        warning = "annotation: CLIP cannot tell this expert's captions from shuffled ones (AUC 0.49"
        assert warning in render_markdown(report) and html_escape(warning) in render_html(report)
        assert "scripted: CLIP cannot tell" not in render_html(report) and AUC_FLOOR > 0.49
    finally:
        for file in (report_store / "calibration").iterdir():
            file.unlink()
        (report_store / "calibration").rmdir()


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_cli_prints_both_pages_and_passes_sample_and_seed(report_store, small_index, tmp_path, monkeypatch):
    import flows.report as module

    calls = []

    def flow(store, out, index, n_tiles, seed):  # the Prefect flow, without an API server
        calls.append((n_tiles, seed))
        return module.write_report(store, out, index, n_tiles, seed)[0]

    monkeypatch.setattr(module, "caption_report_flow", flow)
    out = tmp_path / "out"
    args = ["run", "caption-report", "--store", str(report_store), "--out", str(out), "--index", str(small_index.root)]
    result = CliRunner().invoke(app, [*args, "--sample", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert calls == [(3, 2)]
    lines = result.output.splitlines()
    assert f"report: {out / 'report.html'}" in lines and f"captions: {out / 'captions.html'}" in lines
    assert len(IMG.findall((out / "captions.html").read_text())) == 3
    assert "a random sample, seed 2" in (out / "captions.html").read_text()
    command = typer.main.get_command(app).commands["run"].commands["caption-report"]  # type: ignore[attr-defined]
    helps = {param.name: param.help for param in command.params}
    assert helps["index"] == "tile index, for thumbnails, class recall and hallucinations"
    assert helps["sample"] == "tiles shown in captions.html" and "random" in helps["seed"]
