"""One writer per place: compaction and a run folder each take an OS file lock, the second writer gets one line naming
the holder, partial files a killed writer left are removed and named, and the report counts an attempt once however
often the store holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from caption_pipeline.policy import GatePolicy
from flows.report import build_report
from manifests.atomic import host_name
from manifests.caption_store import ATTEMPT_KEY, compact, read_store, write_fragment
from manifests.locks import FolderBusy
from segmenter.cli import app as segmenter_app
from segmenter.engine.run_record import RunRecord
from tests.helpers import META, demo_manifest, row

POLICY = GatePolicy()
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def three_fragments(store: Path) -> None:
    write_fragment(store, [row("t1", attempt=0, similarity=0.5), row("t2")], META)
    write_fragment(store, [row("t1", attempt=1, similarity=0.7)], META)
    write_fragment(store, [row("t3", prompt="p2")], META)


def test_a_second_compaction_is_refused_naming_the_first_and_no_row_doubles(tmp_path):
    store = tmp_path / "store"
    three_fragments(store)
    inside, go = threading.Event(), threading.Event()

    def slow_select(frame: pd.DataFrame) -> pd.Series:
        inside.set()
        assert go.wait(30)
        return POLICY.select(frame)

    first = threading.Thread(target=compact, args=(store,), kwargs={"select": slow_select})
    first.start()
    try:
        assert inside.wait(30)
        with pytest.raises(FolderBusy, match=rf"caption store {store}: being written by pid {os.getpid()} on "
                                             rf"{host_name()} \("):  # fmt: skip
            compact(store, select=POLICY.select)
    finally:
        go.set()
        first.join(30)
    frame = read_store(store)
    assert len(list(store.glob("part-*.parquet"))) == 1 and len(frame) == 4
    assert not frame.duplicated(list(ATTEMPT_KEY)).any()
    assert frame.groupby(["tile_id", "expert", "prompt_id"])["selected"].sum().eq(1).all()


def test_the_report_counts_an_attempt_once_however_often_the_store_holds_it(tmp_path):
    once, twice = tmp_path / "once", tmp_path / "twice"
    three_fragments(once)
    three_fragments(twice)
    three_fragments(twice)  # what two compactions that raced left: every row twice
    single, double = build_report(once), build_report(twice)
    for table in ("summary", "lengths", "gate", "class_information"):
        pd.testing.assert_frame_equal(getattr(single, table), getattr(double, table), obj=table)
    assert (double.gate["attempts"].sum(), double.lengths["captions"].sum()) == (4, 4)
    assert double.recovered_total == 1 and len(double.selected) == 3


def _holding(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s lock until it is killed (it says ``held`` once it does)."""
    code = ("import sys, time\nfrom manifests.locks import one_writer\nwith one_writer(sys.argv[1], 'run folder'):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_training_on_one_run_folder_is_refused_and_a_killed_ones_debris_named(small_index, tmp_path):
    manifest, out = demo_manifest(tmp_path, small_index), tmp_path / "run"
    args = ["train", "--manifest", str(manifest), "--out", str(out), "--preset", "test_tiny_notext", "--steps", "1",
            "--seed", "7"]  # fmt: skip
    holder = _holding(out)
    try:
        refused = runner.invoke(segmenter_app, args)
    finally:
        holder.kill()  # SIGKILL: the OS releases its lock
        holder.wait()
    assert refused.exit_code == 2, refused.output
    [line] = refused.output.strip().splitlines()
    assert line.startswith(f"error: run folder {out}: being written by pid {holder.pid} on {host_name()}"), line
    assert not (out / "run.json").exists()
    # what a run killed while checkpointing and recording leaves behind
    (out / "checkpoints" / ".step_000003.tmp").mkdir(parents=True)
    (out / f".run.json.{holder.pid}@{host_name()}.x1y2.tmp").write_text("{")
    result = runner.invoke(segmenter_app, args)
    assert result.exit_code == 0, result.output
    assert f"removed {out / 'checkpoints' / '.step_000003.tmp'}" in result.output
    assert f"removed {out}/.run.json.{holder.pid}@" in result.output
    assert not list(out.rglob(".*.tmp")) and RunRecord.read(out).settings.seed == 7


def test_compaction_removes_what_a_killed_writer_left_and_keeps_a_live_ones_file(tmp_path, capsys):
    store = tmp_path / "store"
    three_fragments(store)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = store / f".part-a.parquet.{int(gone.stdout)}@{host_name()}.abc123.tmp"
    live = store / f".part-b.parquet.{os.getpid()}@{host_name()}.def456.tmp"
    for path in (dead, live):
        path.write_bytes(b"PAR1 partial")
    compact(store, select=POLICY.select)
    assert not dead.exists() and live.exists()
    assert f"note: removed {dead}, a partial file of a writer that was killed" in capsys.readouterr().err
    assert len(read_store(store)) == 4
