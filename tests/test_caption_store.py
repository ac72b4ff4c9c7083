"""The caption store contract: atomic fragments, validation, compaction, resume keys, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caption_pipeline.policy import GatePolicy
from manifests.caption_store import (
    ATTEMPT_KEY,
    CAPTION_STORE_SCHEMA,
    CAPTION_STORE_SCHEMA_VERSION,
    attempt_counts,
    compact,
    done_keys,
    read_store,
    selected_captions,
    write_fragment,
)
from manifests.errors import InputError
from tests.helpers import META, row

POLICY = GatePolicy()  # the rules the store applies (selection, done keys) come from the gate policy


def test_fragments_and_single_file_read_the_same(tmp_path):
    store = tmp_path / "store"
    write_fragment(store, [row("t1"), row("t2")], META)
    write_fragment(store, [row("t3")], META)
    frame = read_store(store)
    assert sorted(frame["tile_id"]) == ["t1", "t2", "t3"]
    merged = compact(store, select=POLICY.select)
    assert [p.name for p in store.glob("*.parquet")] == [merged.name]
    pd.testing.assert_frame_equal(
        read_store(merged).sort_values("tile_id").reset_index(drop=True),
        frame.sort_values("tile_id").reset_index(drop=True),
    )
    assert list(read_store(store).columns) == CAPTION_STORE_SCHEMA.names


def test_selected_view_and_done_keys(tmp_path):
    store = tmp_path / "store"
    rows = [row("t1", attempt=0, similarity=0.5, selected=False), row("t1", attempt=1, similarity=0.7),
            row("t2", similarity=None)]  # fmt: skip
    write_fragment(store, rows, META)
    view = selected_captions(store)
    assert view[["tile_id", "attempt"]].values.tolist() == [["t1", 1], ["t2", 0]]
    assert done_keys(store, done=POLICY.done) == {("t1", "e", "p1")}  # t2 only failed: a re-run retries it
    _, counts = attempt_counts(store, done=POLICY.done)
    assert counts == {("t1", "e", "p1"): 2, ("t2", "e", "p1"): 1}


def test_compaction_reselects_a_key_retried_by_a_later_run(tmp_path):
    store = tmp_path / "store"
    write_fragment(store, [row("t2", attempt=0, similarity=None)], META)
    write_fragment(store, [row("t2", attempt=1, similarity=0.61)], META)
    compact(store, select=POLICY.select)
    frame = read_store(store)
    assert frame.loc[frame["selected"], "attempt"].tolist() == [1]


def test_other_schema_version_is_refused(tmp_path):
    store = tmp_path / "store"
    path = write_fragment(store, [row("t1")], META)
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"schema_version": b"99"}), path)
    with pytest.raises(InputError, match=r"schema_version '99', this toolkit reads 4"):
        read_store(store)


def test_version_1_store_without_decoding_columns_is_refused(tmp_path):
    store = tmp_path / "store"
    path = write_fragment(store, [row("t1")], META)
    table = pq.read_table(path).drop_columns(["temperature", "seed", "split", "protocol"])
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"schema_version": b"1"}), path)
    with pytest.raises(InputError, match=r"schema_version '1', this toolkit reads 4; regenerate or convert") as info:
        read_store(store)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=r"schema_version '1'"):
        attempt_counts(store, done=POLICY.done)


def test_version_2_store_without_usable_is_refused(tmp_path):
    """A version 2 store has no ``usable`` column; deriving it on read would be a second definition of the rule."""
    store = tmp_path / "store"
    path = write_fragment(store, [row("t1")], META)
    table = pq.read_table(path).drop_columns(["usable"])
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"schema_version": b"2"}), path)
    for read in (read_store, selected_captions, lambda s: attempt_counts(s, done=POLICY.done)):
        with pytest.raises(InputError, match=r"schema_version '2', this toolkit reads 4; regenerate or convert"):
            read(store)


def test_version_3_store_without_gate_columns_is_refused(tmp_path):
    """A version 3 store has no gate mode per row: which gate judged its rows is unknown."""
    store = tmp_path / "store"
    path = write_fragment(store, [row("t1")], META)
    table = pq.read_table(path).drop_columns(["gate_mode", "gate_threshold", "gate_score"])
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"schema_version": b"3"}), path)
    with pytest.raises(InputError, match=r"schema_version '3', this toolkit reads 4; regenerate or convert"):
        read_store(store)


def test_compaction_keeps_the_gate_columns_and_selects_with_the_policy(tmp_path):
    """Selection across runs is the policy's: the most similar usable attempt, the earliest on ties, and one row for
    a key whose attempts all failed. The store itself holds no selection rule: it applies the one it is given."""
    store = tmp_path / "store"
    write_fragment(store, [row("a", attempt=0, similarity=0.7), row("b", attempt=0, similarity=None),
                           row("c", attempt=0, similarity=0.62)], META)  # fmt: skip
    write_fragment(store, [row("a", attempt=1, similarity=0.7), row("b", attempt=1, similarity=None),
                           row("c", attempt=1, similarity=0.9, caption="   ", usable=False)], META)  # fmt: skip
    compact(store, select=POLICY.select)
    frame = read_store(store)
    selected = frame[frame["selected"]].set_index("tile_id")["attempt"].to_dict()
    assert selected == {"a": 0, "b": 0, "c": 0}  # c's attempt 1 is more similar but not usable
    assert frame.set_index(["tile_id", "attempt"]).loc[("c", 1), "usable"] == False  # noqa: E712
    write_fragment(store, [row("d", attempt=1)], META)
    compact(store, select=lambda frame: frame["attempt"] == 1)  # another rule, applied as given
    frame = read_store(store)
    assert frame.loc[frame["selected"], "attempt"].tolist() == [1, 1, 1, 1]


def test_decoding_and_class_provenance_are_stored_per_row(tmp_path):
    store = tmp_path / "store"
    rows = [row("t1", attempt=0), row("t1", attempt=1, protocol="predicted", split="test",
                                       class_source="predictions", selected=False)]  # fmt: skip
    write_fragment(store, rows, META)
    frame = read_store(store).sort_values("attempt")
    assert frame["temperature"].tolist() == pytest.approx([0.0, 0.7]) and frame["seed"].tolist() == [0, 1]
    assert frame[["split", "protocol", "class_source"]].values.tolist() == [
        ["train", "custom", "labels"], ["test", "predicted", "predictions"]]  # fmt: skip
    no_seed = {key: value for key, value in row("t2").items() if key != "seed"}
    with pytest.raises(pa.ArrowInvalid, match="seed"):  # a row that does not say how it was decoded is not written
        write_fragment(store, [no_seed], META)


def test_missing_columns_and_missing_store(tmp_path):
    bad = tmp_path / "bad.parquet"
    version = str(CAPTION_STORE_SCHEMA_VERSION)
    pq.write_table(pa.table({"tile_id": ["a"]}).replace_schema_metadata({"schema_version": version}), bad)
    with pytest.raises(InputError, match="missing columns"):
        read_store(bad)
    with pytest.raises(InputError, match="no Parquet file or fragments"):
        read_store(tmp_path / "nowhere")
    assert read_store(tmp_path / "nowhere", missing_ok=True).empty


WRITER = textwrap.dedent(
    """
    import sys, itertools
    from tests.helpers import META, row
    from manifests.caption_store import write_fragment
    store = sys.argv[1]
    print("ready", flush=True)
    for shard in itertools.count():
        write_fragment(store, [row(f"s{shard}-t{i}") for i in range(2000)], META)
    """
)


def test_sigkill_mid_write_leaves_no_partial_rows(tmp_path):
    store = tmp_path / "store"
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(store)], cwd=root, stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 60
    while len(list(store.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.07)  # land the kill somewhere inside a write
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    frame = read_store(store)
    assert len(frame) % 2000 == 0 and len(frame) >= 4000
    assert not frame.duplicated(list(ATTEMPT_KEY)).any()
    assert frame.groupby(frame["tile_id"].str.split("-").str[0]).size().eq(2000).all()


def test_two_writers_in_one_directory(tmp_path):
    store = tmp_path / "store"
    root = Path(__file__).resolve().parents[1]
    script = WRITER.replace("itertools.count()", "range(3)").replace('f"s{shard}', 'f"{sys.argv[2]}{shard}')
    processes = [subprocess.Popen([sys.executable, "-c", script, str(store), name], cwd=root, stdout=subprocess.PIPE)
                 for name in ("a", "b")]  # fmt: skip
    for process in processes:
        assert process.wait(timeout=120) == 0
    frame = read_store(store)
    assert len(frame) == 2 * 3 * 2000 and not frame.duplicated(list(ATTEMPT_KEY)).any()


def test_attempt_counts_for_a_subset_of_tiles(tmp_path):
    store = tmp_path / "store"
    write_fragment(store, [row("t1"), row("t2", similarity=None), row("t3", attempt=1)], META)
    done, counts = attempt_counts(store, ["t2", "t3"], done=POLICY.done)
    assert done == {("t3", "e", "p1")}
    assert counts == {("t2", "e", "p1"): 1, ("t3", "e", "p1"): 2}
    assert attempt_counts(tmp_path / "empty", ["t1"], done=POLICY.done) == (set(), {})


def test_store_files_get_the_mode_of_any_new_file_not_a_private_one(tmp_path):
    """A store on a shared path must be readable by the group the umask allows (mkstemp alone makes 0600)."""
    import os

    path = write_fragment(tmp_path / "store", [row("t0")], META)
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
