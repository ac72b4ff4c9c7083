"""The gate policy: each rule (usable, passes, selected, done, re-prompt) defined once, recorded in the store and read
from there by resume, compaction and the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from caption_pipeline.gate import GateSettings, Resume, RunInfo, TileTask, caption_tiles
from caption_pipeline.policy import GatePolicy
from flows.report import build_report
from manifests.caption_store import StoreMeta, attempt_counts, compact, read_store, selected_captions, write_fragment
from manifests.run_manifest import CaptionsConfig
from tests.helpers import AnsweringExpert, CaptionScorer, flat_tiles

TAU = 0.6


@pytest.fixture
def tiles(tmp_path) -> list[TileTask]:
    return flat_tiles(tmp_path)


def gate(policy: GatePolicy, prompts: tuple[str, ...] = ("p1",)) -> GateSettings:
    return GateSettings(policy, prompt_ids=prompts)


def test_the_rules():
    policy = GatePolicy(tau=TAU, max_attempts=3)
    assert policy == GatePolicy.from_captions(CaptionsConfig(store="s", tau=TAU, max_attempts=3, experts=[]))
    # usable: no error and some text
    assert policy.usable("roofs", None)
    assert not any(policy.usable(caption, None) for caption in (None, "", "  \n "))
    assert not policy.usable("half a caption", "HTTP 500")
    # passes: a usable caption whose similarity reaches tau (inclusive); no score never passes
    assert policy.passes([0.59, 0.6, 0.9, None, 0.9], [True, True, True, True, False]).tolist() == [
        False, True, True, False, False]  # fmt: skip
    assert policy.with_tau(0.95).passes([0.9], [True]).tolist() == [False] and policy.with_tau(0.95).tau == 0.95
    # selected: the most similar usable attempt, the earliest on ties; a key that only failed still has one
    frame = pd.DataFrame({
        "tile_id": ["a", "a", "a", "b", "b", "c", "c"], "expert": "e", "prompt_id": "p1",
        "attempt": [0, 1, 2, 0, 1, 0, 1],
        "similarity": [0.5, 0.7, 0.7, None, None, 0.4, 0.99],
        "usable": [True, True, True, False, False, True, False],
    })  # fmt: skip
    frame["gate_score"] = frame["similarity"]  # what an absolute gate compares
    assert policy.select(frame).tolist() == [False, True, False, True, False, True, False]
    # done: a selected attempt with a usable caption; a caption that did not pass is done too
    frame = frame.assign(selected=policy.select(frame), passed=policy.passes(frame["similarity"], frame["usable"]))
    assert frame[policy.done(frame)]["tile_id"].tolist() == ["a", "c"]
    # re-prompt: a failed attempt of a readable tile, within the rounds of the expert
    assert policy.reprompt(False, readable=True) and not policy.reprompt(True, readable=True)
    assert not policy.reprompt(False, readable=False)
    assert (policy.rounds(reprompts=True), policy.rounds(reprompts=False)) == (3, 1)


def test_a_key_whose_attempts_all_errored_is_not_done_and_is_retried(tiles, tmp_path):
    policy = GatePolicy(tau=TAU, max_attempts=3)
    store = tmp_path / "store"
    down = AnsweringExpert(lambda tile, pid, attempt: None if tile == "t0" else "sim 0.8")
    rows = caption_tiles(tiles, down, CaptionScorer(), gate(policy), RunInfo("night"))
    write_fragment(store, rows, StoreMeta(["building"], CaptionScorer.model_id, TAU))
    errored = [row for row in rows if row["tile_id"] == "t0"]
    assert len(errored) == 3 and not any(row["usable"] or row["passed"] for row in errored)
    assert sum(row["selected"] for row in errored) == 1  # one selected row, as the contract asks
    done, counts = attempt_counts(store, done=policy.done)
    assert done == {("t1", "fake", "p1"), ("t2", "fake", "p1")}
    assert counts[("t0", "fake", "p1")] == 3
    # The next run skips the done keys and retries t0 with the next attempt numbers (so new wordings and seeds).
    up = AnsweringExpert(lambda tile, pid, attempt: "sim 0.7")
    rows = caption_tiles(tiles, up, CaptionScorer(), gate(policy), RunInfo("morning"), Resume(done, counts))
    assert up.asked == [("t0", "p1", 3)]
    write_fragment(store, rows, StoreMeta(["building"], CaptionScorer.model_id, TAU))
    compact(store, select=policy.select)
    frame = read_store(store)
    t0 = frame[frame["tile_id"] == "t0"]
    assert t0.loc[t0["selected"], "attempt"].tolist() == [3] and t0["selected"].sum() == 1
    assert attempt_counts(store, done=policy.done)[0] == {(f"t{i}", "fake", "p1") for i in range(3)}


def test_an_empty_caption_is_never_usable_passed_or_done(tiles, tmp_path):
    policy = GatePolicy(tau=0.0, max_attempts=3)  # any score would pass
    scorer = CaptionScorer()
    blank = AnsweringExpert(lambda tile, pid, attempt: "  \n")
    rows = caption_tiles(tiles[:1], blank, scorer, gate(policy), RunInfo("r"))
    assert len(rows) == 3 and scorer.scored == []  # re-prompted every round, never scored
    assert all(not row["usable"] and not row["passed"] and row["error"] == "empty caption" for row in rows)
    assert [row["selected"] for row in rows] == [True, False, False]
    store = tmp_path / "store"
    write_fragment(store, rows, StoreMeta(["building"], scorer.model_id, 0.0))
    assert attempt_counts(store, done=policy.done)[0] == set()
    view = selected_captions(store)
    assert view[["usable", "passed"]].values.tolist() == [[False, False]]


def test_the_report_sweep_at_the_store_tau_is_the_store_pass_rate(tiles, tmp_path):
    """The sweep asks the policy what would pass at each tau; at the tau the store was gated with, that is what the
    gate recorded: the share of keys with a passed attempt."""
    policy = GatePolicy(tau=TAU, max_attempts=2)
    scripts = {  # (tile, prompt) -> answer per attempt
        ("t0", "p1"): ["sim 0.6", "sim 0.9"],  # exactly tau: passes at once
        ("t0", "p2"): ["sim 0.3", "sim 0.65"],  # recovered by the re-prompt
        ("t1", "p1"): ["sim 0.5", "sim 0.55"],  # never passes
        ("t1", "p2"): [None, "   "],  # an error, then an empty caption
        ("t2", "p1"): ["sim 0.2", None],
        ("t2", "p2"): ["sim 0.75", "sim 0.1"],
    }
    expert = AnsweringExpert(lambda tile, pid, attempt: scripts[(tile, pid)][attempt])
    rows = caption_tiles(tiles, expert, CaptionScorer(), gate(policy, ("p1", "p2")), RunInfo("r"))
    store = tmp_path / "store"
    write_fragment(store, rows, StoreMeta(["building"], CaptionScorer.model_id, TAU))
    report = build_report(store)
    summary = report.summary
    pass_rate = (summary["pass_rate"] * summary["keys"]).sum() / summary["keys"].sum()
    assert report.tau == TAU and pass_rate == pytest.approx(3 / 6)
    assert report.tau_sweep.loc[TAU, "fake"] == pytest.approx(pass_rate)
    frame = read_store(store)
    per_key = frame.groupby(["tile_id", "prompt_id"])["passed"].any()
    assert per_key.mean() == pytest.approx(pass_rate)
    # Elsewhere the sweep is the policy at that tau; an unusable attempt never counts, whatever its score.
    assert report.tau_sweep.loc[0.5, "fake"] == pytest.approx(4 / 6)  # t2/p1 reached 0.2 only
    assert report.tau_sweep.loc[0.0, "fake"] == pytest.approx(5 / 6)  # t1/p2 has no usable caption
    assert report.tau_sweep.loc[0.91, "fake"] == 0
    assert np.all(np.diff(report.tau_sweep["fake"].to_numpy()) <= 0)
