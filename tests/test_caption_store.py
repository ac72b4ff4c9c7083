"""The caption store contract: atomic fragments, validation, compaction, resume keys, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.caption_store import (
    ATTEMPT_KEY,
    CAPTION_STORE_SCHEMA,
    CAPTION_STORE_SCHEMA_VERSION,
    StoreMeta,
    attempt_counts,
    compact,
    done_keys,
    read_store,
    selected_captions,
    write_fragment,
)
from manifests.errors import InputError

META = StoreMeta(class_names=["a", "b"], clip_model="tiny:random", tau=0.55)


def row(tile: str, prompt: str = "p1", attempt: int = 0, similarity: float | None = 0.6, **extra) -> dict:
    base = {
        "tile_id": tile, "expert": "e", "model": "m", "backend": "annotation", "prompt_id": prompt,
        "attempt": attempt, "prompt_text": "describe", "temperature": 0.0 if attempt == 0 else 0.7, "seed": attempt,
        "caption": None if similarity is None else f"caption {tile}",
        "n_tokens": 3, "n_chunks": 1, "clip_model": "tiny:random", "raw_cosine": 0.2, "similarity": similarity,
        "tau": 0.55, "passed": bool(similarity and similarity >= 0.55), "selected": True, "finish_reason": "stop",
        "latency_s": 0.1, "created_at": datetime.now(UTC), "run_id": "r", "manifest_sha256": None,
        "image_sha256": "x", "split": "train", "protocol": "custom", "class_source": "labels",
        "error": None if similarity is not None else "HTTP 500",
    }  # fmt: skip
    return {**base, **extra}


def test_fragments_and_single_file_read_the_same(tmp_path):
    store = tmp_path / "store"
    write_fragment(store, [row("t1"), row("t2")], META)
    write_fragment(store, [row("t3")], META)
    frame = read_store(store)
    assert sorted(frame["tile_id"]) == ["t1", "t2", "t3"]
    merged = compact(store)
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
    assert done_keys(store) == {("t1", "e", "p1")}  # t2 only failed: a re-run retries it
    _, counts = attempt_counts(store)
    assert counts == {("t1", "e", "p1"): 2, ("t2", "e", "p1"): 1}


def test_compaction_reselects_a_key_retried_by_a_later_run(tmp_path):
    store = tmp_path / "store"
    write_fragment(store, [row("t2", attempt=0, similarity=None)], META)
    write_fragment(store, [row("t2", attempt=1, similarity=0.61)], META)
    compact(store)
    frame = read_store(store)
    assert frame.loc[frame["selected"], "attempt"].tolist() == [1]


def test_other_schema_version_is_refused(tmp_path):
    store = tmp_path / "store"
    path = write_fragment(store, [row("t1")], META)
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"schema_version": b"99"}), path)
    with pytest.raises(InputError, match=r"schema_version '99', this toolkit reads 2"):
        read_store(store)


def test_version_1_store_without_decoding_columns_is_refused(tmp_path):
    store = tmp_path / "store"
    path = write_fragment(store, [row("t1")], META)
    table = pq.read_table(path).drop_columns(["temperature", "seed", "split", "protocol"])
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"schema_version": b"1"}), path)
    with pytest.raises(InputError, match=r"schema_version '1', this toolkit reads 2; regenerate or convert") as info:
        read_store(store)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=r"schema_version '1'"):
        attempt_counts(store)


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
    from tests.test_caption_store import META, row
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
    done, counts = attempt_counts(store, ["t2", "t3"])
    assert done == {("t3", "e", "p1")}
    assert counts == {("t2", "e", "p1"): 1, ("t3", "e", "p1"): 2}
    assert attempt_counts(tmp_path / "empty", ["t1"]) == (set(), {})
