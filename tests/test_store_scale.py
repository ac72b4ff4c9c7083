"""The caption store at scale: shard lookups that open only their fragments, streamed compaction, fragments written
by other tools, and a read-only store's text-feature cache."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import manifests.caption_store as caption_store
from caption_pipeline.policy import GatePolicy
from manifests.caption_store import (
    ATTEMPT_KEY,
    CAPTION_STORE_SCHEMA,
    attempt_counts,
    compact,
    done_keys,
    read_store,
    selected_captions,
    write_fragment,
)
from manifests.errors import InputError
from manifests.locks import LOCK_FILE
from tests.helpers import META, row

POLICY = GatePolicy()


def shard_store(store: Path, shards: int = 6, tiles: int = 4) -> list[list[str]]:
    """One fragment per shard of ``tiles`` tiles, rows written in reverse order (the writer sorts them); tile
    ``s{shard}-t{i}`` has attempts 0..i%3, the last one selected."""
    parts = []
    for shard in range(shards):
        ids = [f"s{shard:02d}-t{i}" for i in range(tiles)]
        rows = [row(tile, attempt=a, selected=a == i % 3) for i, tile in enumerate(ids) for a in range(i % 3 + 1)]
        write_fragment(store, rows[::-1], META)
        parts.append(ids)
    return parts


def scanned(monkeypatch) -> list[list[Path]]:
    """Record the fragments every scan of the store opens."""
    calls: list[list[Path]] = []
    original = caption_store._scan

    def spy(fragments, *args, **kwargs):
        calls.append([fragment.path for fragment in fragments])
        return original(fragments, *args, **kwargs)

    monkeypatch.setattr(caption_store, "_scan", spy)
    return calls


def test_a_shard_lookup_opens_only_the_fragments_of_its_tiles(tmp_path, monkeypatch):
    store = tmp_path / "store"
    parts = shard_store(store)
    whole_done, whole_counts = attempt_counts(store, done=POLICY.done)
    calls = scanned(monkeypatch)
    done, counts = attempt_counts(store, parts[3], done=POLICY.done)
    (opened,) = calls
    assert len(opened) == 1 and pq.read_table(opened[0], columns=["tile_id"])["tile_id"][0].as_py() == "s03-t0"
    assert counts == {key: n for key, n in whole_counts.items() if key[0] in parts[3]}
    assert done == {key for key in whole_done if key[0] in parts[3]} and len(done) == 4
    assert counts[("s03-t2", "e", "p1")] == 3
    written = pq.read_table(opened[0])
    assert written.sort_by([(name, "ascending") for name in ATTEMPT_KEY]).equals(written)  # the writer sorted it


def test_fragments_without_statistics_or_unsorted_are_still_found(tmp_path):
    """A fragment from an older writer (unsorted) or another tool (no statistics) may hold any tile: it is read."""
    store = tmp_path / "store"
    parts = shard_store(store, shards=3)
    table = pa.Table.from_pylist([row("s01-t1", attempt=5), row("s99-t0")], schema=CAPTION_STORE_SCHEMA)
    pq.write_table(table.replace_schema_metadata(META.encode()), store / "part-old.parquet", write_statistics=False)
    spread = pa.Table.from_pylist([row("s02-t3", attempt=7), row("s00-t0", attempt=6)], schema=CAPTION_STORE_SCHEMA)
    pq.write_table(spread.replace_schema_metadata(META.encode()), store / "part-unsorted.parquet")
    _, counts = attempt_counts(store, parts[1], done=POLICY.done)
    assert counts[("s01-t1", "e", "p1")] == 6
    _, counts = attempt_counts(store, ["s00-t0"], done=POLICY.done)
    assert counts == {("s00-t0", "e", "p1"): 7}


def test_a_fragment_rewritten_in_place_is_checked_again(tmp_path):
    """The per-process check of a fragment is keyed on the file itself: replacing it is noticed."""
    store = tmp_path / "store"
    path = write_fragment(store, [row("t1")], META)
    assert len(read_store(store)) == 1
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"schema_version": b"99"}), path)
    with pytest.raises(InputError, match="schema_version '99'"):
        attempt_counts(store, ["t1"], done=POLICY.done)


def other_tool_fragment(path: Path, tiles: list[str], **columns) -> None:
    """A fragment as pandas writes it: every field nullable, ``attempt`` as int64, plus ``columns``."""
    frame = pd.DataFrame([row(tile, attempt=1, similarity=0.9) for tile in tiles]).astype({"attempt": "int64"})
    frame = frame.assign(**columns)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    assert all(field.nullable for field in table.schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(META.encode()), path)


def test_a_fragment_of_another_tool_is_read_and_compaction_keeps_its_extra_column(tmp_path):
    store = tmp_path / "store"
    write_fragment(store, [row("a"), row("b", similarity=None)], META)
    other_tool_fragment(store / "part-duckdb.parquet", ["b", "c"], reviewer=["ann", None])
    frame = read_store(store)
    assert list(frame.columns) == CAPTION_STORE_SCHEMA.names and len(frame) == 4
    assert done_keys(store, done=POLICY.done) == {("a", "e", "p1"), ("b", "e", "p1"), ("c", "e", "p1")}
    assert selected_captions(store)[["tile_id", "attempt"]].values.tolist() == [["a", 0], ["b", 1], ["c", 1]]
    merged = compact(store, select=POLICY.select)
    assert [path.name for path in store.glob("*.parquet")] == [merged.name]
    kept = {(r["tile_id"], r["attempt"]): r for r in pq.read_table(merged).to_pylist()}
    assert {key: r["reviewer"] for key, r in kept.items()} == {("a", 0): None, ("b", 0): None, ("b", 1): "ann",
                                                               ("c", 1): None}  # fmt: skip
    assert kept[("b", 1)]["selected"] and not kept[("b", 0)]["selected"]
    assert pq.read_schema(merged).field("attempt").type == pa.int16()
    other_tool_fragment(store / "part-again.parquet", ["d"], reviewer=["bob"])
    compact(store, select=POLICY.select)  # a compacted fragment with the extra column merges again
    assert pq.read_table(next(store.glob("*.parquet")), columns=["reviewer"])["reviewer"].to_pylist().count("bob") == 1


def test_a_null_where_the_contract_needs_a_value_names_the_fragment_and_column(tmp_path):
    store = tmp_path / "store"
    other_tool_fragment(store / "part-nulls.parquet", ["a", "b"], run_id=["r", None])
    for read in (read_store, selected_captions, lambda s: attempt_counts(s, ["a"], done=POLICY.done)):
        with pytest.raises(InputError, match=r"part-nulls.parquet: column run_id has 1 null value") as info:
            read(store)
        assert "\n" not in str(info.value)


def listing(store: Path) -> list[str]:
    """The store folder's files, but for the lock compaction takes (``manifests.locks``: it stays, empty)."""
    return sorted(path.name for path in store.iterdir() if path.name != LOCK_FILE)


def test_compaction_refuses_an_extra_column_it_cannot_merge_and_keeps_the_store(tmp_path):
    store = tmp_path / "store"
    other_tool_fragment(store / "part-1.parquet", ["a"], reviewer=["ann"])
    other_tool_fragment(store / "part-2.parquet", ["b"], reviewer=[3])
    before = listing(store)
    with pytest.raises(InputError, match=r"extra column reviewer is int64 here but \w*string in .*part-1.parquet"):
        compact(store, select=POLICY.select)
    assert listing(store) == before


def test_compaction_streams_by_key_range_with_the_same_result(tmp_path, monkeypatch):
    """Ranges of a few rows give the store one range gives; no scan holds more than a range (plus one tile)."""
    one, streamed = tmp_path / "one", tmp_path / "streamed"
    for store in (one, streamed):
        shard_store(store, shards=5)
        write_fragment(store, [row("s02-t1", attempt=9, similarity=0.95), row("s04-t0", attempt=1)], META)
    compact(one, select=POLICY.select)
    calls: list[int] = []
    original = caption_store._scan
    monkeypatch.setattr(caption_store, "_scan", lambda *a, **k: calls.append((t := original(*a, **k)).num_rows) or t)
    merged = compact(streamed, select=POLICY.select, rows_per_range=5)
    assert len(calls) >= 6 and max(calls) <= 5 + 3
    assert pq.ParquetFile(merged).metadata.num_row_groups == len(calls)
    expected, got = read_store(one), read_store(streamed)
    pd.testing.assert_frame_equal(got.drop(columns="created_at"), expected.drop(columns="created_at"))
    assert got.loc[got["selected"] & got["tile_id"].eq("s02-t1"), "attempt"].tolist() == [9]


def test_a_crash_in_the_middle_of_compaction_leaves_the_old_store_complete(tmp_path):
    store = tmp_path / "store"
    shard_store(store, shards=4)
    before, names = read_store(store), listing(store)
    ranges = []

    def failing(frame: pd.DataFrame) -> pd.Series:
        ranges.append(len(frame))
        if len(ranges) == 2:
            raise KeyboardInterrupt  # as a kill would, after one range was written
        return POLICY.select(frame)

    with pytest.raises(KeyboardInterrupt):
        compact(store, select=failing, rows_per_range=4)
    assert listing(store) == names  # no temporary file left, no fragment lost
    pd.testing.assert_frame_equal(read_store(store), before)


def test_the_newest_of_two_selected_rows_of_a_key_wins(tmp_path):
    store = tmp_path / "store"
    now = datetime.now(UTC)
    write_fragment(store, [row("t1", attempt=0, caption="old", created_at=now), row("t0")], META)
    write_fragment(store, [row("t1", attempt=1, caption="new", created_at=now + timedelta(seconds=1))], META)
    view = selected_captions(store)
    assert view[["tile_id", "caption"]].values.tolist() == [["t0", "caption t0"], ["t1", "new"]]
    assert list(view.columns) == caption_store.VIEW_COLUMNS


def test_a_read_only_store_puts_the_text_cache_in_the_run_folder(tmp_path, capsys):
    from segmenter.engine.text_input import text_cache_folder

    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    if os.access(probe, os.W_OK):
        pytest.skip("a read-only chmod does not restrict this user (root)")
    shared = tmp_path / "shared"
    store = shared / "captions"
    write_fragment(store, [row("t1")], META)
    assert text_cache_folder(store, None, None) == shared / "text_cache"
    for folder in (store, shared):
        folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match=r"is not writable for the text-feature cache; pass --text-cache DIR"):
            text_cache_folder(store, None, None)
        assert text_cache_folder(store, None, tmp_path / "run") == tmp_path / "run" / "text_cache"
        assert text_cache_folder(store, tmp_path / "given", tmp_path / "run") == tmp_path / "given"
        assert len(selected_captions(store)) == 1  # reading needs no write access
    finally:
        for folder in (shared, store):
            folder.chmod(0o755)
    printed = capsys.readouterr().out
    assert printed.count(f"text-feature cache: {tmp_path / 'run' / 'text_cache'} (in the run folder") == 1
    assert f"text-feature cache: {tmp_path / 'given'} (--text-cache)" in printed


def test_text_cache_option_of_the_commands():
    from typer.testing import CliRunner

    from segmenter.cli import app

    for command in ("train", "evaluate", "predict"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "--text-cache" in result.output


def test_a_text_cache_that_is_a_file_is_refused_in_one_line(tmp_path):
    from segmenter.engine.text_input import text_cache_folder

    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(InputError, match=r"--text-cache: .* is a file"):
        text_cache_folder(tmp_path / "store", tmp_path / "afile", tmp_path / "run")


def test_done_keys_read_only_the_rows_the_policy_requires_and_still_apply_it(tmp_path):
    rows = [
        row("a", selected=True, usable=True),
        row("b", selected=True, usable=False, passed=False),
        row("c", attempt=0, selected=False, usable=True),
        row("c", attempt=1, selected=True, usable=True),
    ]
    write_fragment(tmp_path / "s", rows, META)
    every = done_keys(tmp_path / "s", done=POLICY.done)
    assert done_keys(tmp_path / "s", done=POLICY.done, requires=POLICY.DONE_REQUIRES) == every
    assert every == {("a", "e", "p1"), ("c", "e", "p1")}
    # the rule still decides among the rows read: a stricter rule than the requirement keeps fewer keys
    stricter = done_keys(tmp_path / "s", done=lambda f: f["tile_id"] == "a", requires=POLICY.DONE_REQUIRES)
    assert stricter == {("a", "e", "p1")}
