"""The run record: typed, versioned, written atomically; anything else is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from manifests.errors import InputError
from segmenter.engine.evaluate import evaluate
from segmenter.engine.options import Augmentation, TrainSettings
from segmenter.engine.run_record import RunRecord, prompt_class_sources, selected_captions_sha256
from segmenter.engine.runs import CHECKPOINT_FILES


def record(**changes) -> RunRecord:
    fields = {
        "manifest": "/data/run.yaml", "manifest_sha256": "a" * 64, "settings": TrainSettings(preset="test_tiny"),
        "class_names": ["a", "b"], "world_size": 1, "experts": ["annotation"], "augmentation": Augmentation.none,
        "captions": "/data/captions", "captions_sha256": "b" * 64,
        "class_sources": {"train": {"annotation": ["labels"]}}, "masked_experts": {"train": {"annotation": 0}},
    }  # fmt: skip
    return RunRecord(**{**fields, **changes})


def finished_run(folder: Path, data: dict) -> Path:
    """A run folder with a checkpoint whose files are placeholders (the record is read before any of them), its
    pointer, and the given run.json."""
    checkpoint = folder / "checkpoints" / "step_000001"
    checkpoint.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (checkpoint / name).write_bytes(b"")
    (folder / "checkpoints" / "latest").write_text("step_000001")
    (folder / "run.json").write_text(json.dumps(data))
    return folder


def test_write_then_read_gives_the_same_record(tmp_path):
    written = record()
    path = written.write(tmp_path)
    assert path == tmp_path / "run.json" and not list(tmp_path.glob(".*.tmp"))  # atomic: no temp file left
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["settings"]["augmentation"] == "auto" and data["augmentation"] == "none"
    read = RunRecord.read(tmp_path)
    assert read == written and read.preset == "test_tiny" and read.settings.passed_only is True
    with pytest.raises(ValidationError):
        read.world_size = 2  # frozen


@pytest.mark.parametrize(
    ("version", "found"), [(None, "an unversioned record"), (0, "schema_version 0"), (2, "schema_version 2")]
)
def test_another_version_is_refused_with_one_line(tmp_path, version, found):
    data = json.loads(record().model_dump_json())
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    (tmp_path / "run.json").write_text(json.dumps(data))
    with pytest.raises(InputError) as caught:
        RunRecord.read(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"run record {tmp_path / 'run.json'}: {found}, ")
    assert "this toolkit reads schema_version 1" in message and "train it again" in message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d.pop("captions_sha256"), "captions_sha256"),
        (lambda d: d.update(seed=3), "seed"),  # an unknown key: a typo is never ignored
        (lambda d: d["settings"].update(missing_captions="drop"), "settings.missing_captions"),
        (lambda d: d.update(world_size=0), "world_size"),
    ],
)
def test_a_missing_unknown_or_bad_field_is_refused_naming_it(tmp_path, change, key):
    data = json.loads(record().model_dump_json())
    change(data)
    finished_run(tmp_path / "run", data)
    with pytest.raises(InputError, match=rf"run record .*run.json: key '{key}': .*; .*train the run again$"):
        RunRecord.read(tmp_path / "run")
    with pytest.raises(InputError, match=rf"key '{key}'"):  # evaluate reads the typed record before anything else
        evaluate(tmp_path / "run", device="cpu")


def test_unreadable_or_absent_records(tmp_path):
    with pytest.raises(InputError, match=r"run\.json: not found"):
        RunRecord.read(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(InputError, match=r"run\.json: not valid JSON"):
        RunRecord.read(tmp_path)


def test_the_captions_hash_follows_the_captions_not_the_row_order():
    rows = pd.DataFrame({
        "tile_id": ["t1", "t1", "t2"], "expert": ["a", "b", "a"], "prompt_id": ["p1", "p1", "p1"],
        "attempt": [0, 0, 1], "passed": [True, False, True], "caption": ["x", "y", "z"],
        "class_source": ["labels", "labels", "predictions"],
    })  # fmt: skip
    digest = selected_captions_sha256(rows)
    assert selected_captions_sha256(rows.iloc[::-1]) == digest
    assert selected_captions_sha256(rows.assign(caption=["x", "y", "w"])) != digest
    assert selected_captions_sha256(rows.assign(passed=[True, True, True])) != digest
    assert prompt_class_sources(rows, ["t1", "t2"], ["a", "b", "c"]) == {
        "a": ["labels", "predictions"],
        "b": ["labels"],
        "c": [],
    }
    assert prompt_class_sources(rows, ["t1"], ["a"]) == {"a": ["labels"]}
