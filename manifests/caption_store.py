"""The caption store contract: Parquet fragments, one row per generation attempt.

A store is a directory of fragments (``part-*.parquet``) or a single Parquet file; readers accept both.
Every fragment is written atomically (temp file + rename), with a unique name, so a crashed writer leaves no
partial fragment and two runs writing into one directory never touch each other's files.

The gate's rules live in its policy (``caption_pipeline.policy``), which this package cannot import: rows carry the
policy's results (``usable``, ``passed``, ``selected``) and readers read those columns; the two rules the store
applies itself, selection across runs and done keys, are passed in by the caller (``compact(store, select=...)``,
``attempt_counts(store, done=...)``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.atomic import atomic_path
from manifests.errors import InputError
from manifests.parquet_contract import checked_metadata

# 2: per-row decoding (temperature, seed) and class provenance (split, protocol) next to class_source.
# 3: ``usable``, the gate policy's verdict on the answer, which readers read instead of re-deriving it.
# 4: the gate mode per row (``gate_mode``, ``gate_threshold``, ``gate_score``).
CAPTION_STORE_SCHEMA_VERSION = 4
# A percentile gate's derived thresholds, beside the fragments of a store directory.
THRESHOLDS_FILE = "gate_thresholds.json"
KEY_COLUMNS = ("tile_id", "expert", "prompt_id")
ATTEMPT_KEY = (*KEY_COLUMNS, "attempt")
Key = tuple[str, str, str]
# A rule of the gate policy over attempts of the store: one flag per row, on the frame's index.
RowRule = Callable[[pd.DataFrame], pd.Series]

CAPTION_STORE_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("expert", pa.string(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("attempt", pa.int16(), nullable=False),
        pa.field("prompt_text", pa.string(), nullable=False),
        # The decoding the request asked for: the expert's temperature on attempt 0, the re-prompt temperature
        # with seed = attempt later (deterministic backends ignore both).
        pa.field("temperature", pa.float32(), nullable=False),
        pa.field("seed", pa.int32(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("n_tokens", pa.int32()),
        pa.field("n_chunks", pa.int16()),
        pa.field("clip_model", pa.string()),
        pa.field("raw_cosine", pa.float32()),
        pa.field("similarity", pa.float32()),
        pa.field("tau", pa.float32(), nullable=False),
        # The gate that judged the attempt: its mode (absolute | percentile | contrastive), the threshold of the
        # attempt's (expert, prompt) (tau, the derived percentile threshold, or the contrastive margin) and the number
        # compared with it (the similarity, or the contrastive score; null where unscored).
        pa.field("gate_mode", pa.string(), nullable=False),
        pa.field("gate_threshold", pa.float32(), nullable=False),
        pa.field("gate_score", pa.float32()),
        # The gate policy's results: an answer with a caption (no error, not empty: only these are scored), one that
        # passed the gate, and the attempt selected for its (tile, expert, prompt).
        pa.field("usable", pa.bool_(), nullable=False),
        pa.field("passed", pa.bool_(), nullable=False),
        pa.field("selected", pa.bool_(), nullable=False),
        pa.field("finish_reason", pa.string()),
        pa.field("latency_s", pa.float32()),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("manifest_sha256", pa.string()),
        pa.field("image_sha256", pa.string()),
        # Where the prompt's classes came from: the tile's split when it was captioned, the run's protocol
        # (oracle | predicted | blind | custom) and the class source used (labels | predictions | none).
        pa.field("split", pa.string(), nullable=False),
        pa.field("protocol", pa.string(), nullable=False),
        pa.field("class_source", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class StoreMeta:
    """File metadata written with every fragment."""

    class_names: list[str]
    clip_model: str
    tau: float

    def encode(self) -> dict[bytes, bytes]:
        values = {
            "schema_version": str(CAPTION_STORE_SCHEMA_VERSION),
            "class_names": json.dumps(self.class_names),
            "clip_model": self.clip_model,
            "tau": repr(self.tau),
        }
        return {key.encode(): value.encode() for key, value in values.items()}


def _fragments(store: Path) -> list[Path]:
    if store.is_file():
        return [store]
    if store.is_dir():
        return sorted(path for path in store.glob("*.parquet") if not path.name.startswith("."))
    return []


def write_fragment(
    store: str | Path, rows: Iterable[dict] | pd.DataFrame, meta: StoreMeta, name: str | None = None
) -> Path | None:
    """Write ``rows`` as one new fragment in the store directory; returns its path (None for no rows)."""
    if isinstance(rows, pd.DataFrame):
        table = pa.Table.from_pandas(rows, schema=CAPTION_STORE_SCHEMA, preserve_index=False)
    else:
        table = pa.Table.from_pylist(list(rows), schema=CAPTION_STORE_SCHEMA)
    if table.num_rows == 0:
        return None
    table = table.replace_schema_metadata(meta.encode())
    path = Path(store) / f"part-{name or uuid.uuid4().hex}.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _check_fragment(path: Path) -> dict[str, str]:
    return checked_metadata(
        path, "caption store", CAPTION_STORE_SCHEMA, CAPTION_STORE_SCHEMA_VERSION, "regenerate or convert the store"
    )


def read_store(store: str | Path, missing_ok: bool = False) -> pd.DataFrame:
    """All attempts in a store (a file or a directory of fragments), validated.

    Raises:
        InputError: no store there (unless ``missing_ok``), an unreadable fragment, another schema version.
    """
    store = Path(store)
    fragments = _fragments(store)
    if not fragments:
        if missing_ok:
            return CAPTION_STORE_SCHEMA.empty_table().to_pandas()
        raise InputError(f"caption store {store}: no Parquet file or fragments found")
    tables = []
    for path in fragments:
        _check_fragment(path)
        tables.append(pq.read_table(path, schema=CAPTION_STORE_SCHEMA))
    return pa.concat_tables(tables).to_pandas()


def scorers(store: str | Path) -> set[str]:
    """The CLIP model ids that scored the store's rows (one column read; empty for no store)."""
    models: set[str] = set()
    for path in _fragments(Path(store)):
        _check_fragment(path)
        models.update(pq.read_table(path, columns=["clip_model"]).column("clip_model").unique().to_pylist())
    return models - {None}


def store_meta(store: str | Path) -> StoreMeta | None:
    """Metadata of the newest fragment, or None for an empty store."""
    fragments = _fragments(Path(store))
    if not fragments:
        return None
    newest = max(fragments, key=lambda path: path.stat().st_mtime_ns)
    meta = _check_fragment(newest)
    return StoreMeta(json.loads(meta["class_names"]), meta["clip_model"], float(meta["tau"]))


def attempt_counts(
    store: str | Path, tile_ids: Iterable[str] | None = None, *, done: RowRule
) -> tuple[set[Key], dict[Key, int]]:
    """What a resumed run needs: keys already done, and how many attempts every key has so far.

    Args:
        store: the caption store.
        tile_ids: only these tiles' rows are read (and only the columns below), so a shard task's cost does not grow
            with the store; None reads every row.
        done: the gate policy's rule (``GatePolicy.done``): the rows that make their key done, given the key columns,
            ``attempt``, ``selected``, ``usable`` and ``passed``.
    """
    columns = [*ATTEMPT_KEY, "selected", "usable", "passed"]
    wanted = None if tile_ids is None else list(tile_ids)
    tables = []
    for path in _fragments(Path(store)):
        _check_fragment(path)
        filters = [("tile_id", "in", wanted)] if wanted is not None else None
        tables.append(pq.read_table(path, columns=columns, filters=filters))
    if not tables:
        return set(), {}
    frame = pa.concat_tables(tables).to_pandas()
    keys = list(zip(frame["tile_id"], frame["expert"], frame["prompt_id"], strict=True))
    counts: dict[Key, int] = {}
    for key, attempt in zip(keys, frame["attempt"], strict=True):
        counts[key] = max(counts.get(key, 0), int(attempt) + 1)
    finished = {key for key, flag in zip(keys, done(frame), strict=True) if flag}
    return finished, counts


def done_keys(store: str | Path, *, done: RowRule) -> set[Key]:
    """(tile_id, expert, prompt_id) keys that the gate policy's ``done`` says a resumed run skips."""
    return attempt_counts(store, done=done)[0]


def selected_captions(store: str | Path) -> pd.DataFrame:
    """The selected attempt of every (tile, expert, prompt): the view the segmenter reads, with the gate's verdicts
    on it (``usable``, ``passed``)."""
    frame = read_store(store)
    columns = ["tile_id", "expert", "prompt_id", "caption", "similarity", "usable", "passed", "attempt",
               "image_sha256", "class_source"]  # fmt: skip
    # Two runs that raced on one key each selected a row: the newest wins.
    selected = frame[frame["selected"]].sort_values("created_at").drop_duplicates(list(KEY_COLUMNS), keep="last")
    return selected[columns].sort_values(list(KEY_COLUMNS)).reset_index(drop=True)


def _runs_by(frame: pd.DataFrame, column: str) -> str:
    """Which runs wrote each value of ``column`` in ``frame``: ``value (run a, b)``, comma-separated."""
    parts = []
    for value, group in frame.groupby(column):
        shown = f"{value:.6g}" if isinstance(value, Real) else str(value)
        parts.append(f"{shown} (run {', '.join(sorted(group['run_id'].unique()))})")
    return ", ".join(parts)


def check_gate(frame: pd.DataFrame, store: str | Path) -> None:
    """Refuse rows judged by different gates: more than one ``gate_mode``, or more than one ``gate_threshold`` for
    one (expert, prompt) (their ``passed`` and ``selected`` would not compare). The message names the runs
    (``run_id``) that wrote each mode or threshold, so a user can remove the rows of the runs that do not belong.

    Raises:
        InputError: one line naming the modes, or the (expert, prompt) pairs with several thresholds, and their runs.
    """
    if frame.empty:
        return
    modes = sorted(frame["gate_mode"].unique())
    if len(modes) > 1:
        raise InputError(
            f"caption store {store}: mixes gate modes {_runs_by(frame, 'gate_mode')}; caption into a new store per "
            "gate mode (or remove the rows of the runs that do not belong)"
        )
    mixed = []
    for (expert, prompt), group in frame.groupby(["expert", "prompt_id"]):
        if group["gate_threshold"].nunique() > 1:
            mixed.append(f"{expert}/{prompt}: {_runs_by(group, 'gate_threshold')}")
    if mixed:
        raise InputError(
            f"caption store {store}: gate mode {modes[0]} with several thresholds, {'; '.join(mixed)}; "
            "caption into a new store per threshold (or remove the rows of the runs that do not belong)"
        )


def gate_thresholds(store: str | Path) -> dict[tuple[str, str], set[tuple[str, float]]]:
    """The (gate mode, gate threshold) pairs that judged the store's rows, per (expert, prompt id) (four columns
    read; empty for no store)."""
    found: dict[tuple[str, str], set[tuple[str, float]]] = {}
    columns = ["expert", "prompt_id", "gate_mode", "gate_threshold"]
    for path in _fragments(Path(store)):
        _check_fragment(path)
        table = pq.read_table(path, columns=columns).to_pandas().drop_duplicates()
        for expert, prompt, mode, threshold in table.itertuples(index=False):
            found.setdefault((expert, prompt), set()).add((mode, float(threshold)))
    return found


def read_gate_thresholds(store: str | Path) -> dict | None:
    """A percentile gate's sidecar (``<store>/gate_thresholds.json``) as written, or None where there is none.

    Raises:
        InputError: an unreadable sidecar.
    """
    path = Path(store) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"gate thresholds {path}: unreadable ({exc})") from None


def write_gate_thresholds(store: str | Path, content: dict) -> Path:
    """Write a percentile gate's sidecar atomically into the store directory; returns its path."""
    path = Path(store) / THRESHOLDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(content, indent=2, sort_keys=True))
    return path


def compact(store: str | Path, *, select: RowRule) -> Path | None:
    """Merge the fragments of a store directory into one; returns the new fragment.

    Repeated attempts are dropped and ``selected`` is re-derived over all attempts of each key by ``select`` (the
    gate policy's ``GatePolicy.select``, given every column), so a key that was retried by a later run again has
    exactly one selected row. A store whose rows were judged by different gates is refused (:func:`check_gate`).

    Raises:
        InputError: the fragments mix gate modes, or thresholds of one mode for one (expert, prompt).

    The merged fragment is written before the old ones are removed, so a crash at any point loses nothing
    (it may leave rows twice, which the next compaction or any reader's key check resolves).
    """
    store = Path(store)
    fragments = _fragments(store)
    if len(fragments) <= 1 or not store.is_dir():
        return fragments[0] if fragments else None
    # The listed fragments, each read on its own: a fragment a writer adds meanwhile is neither merged nor deleted.
    frame = pd.concat([read_store(path) for path in fragments], ignore_index=True)
    frame = frame.sort_values("created_at").drop_duplicates(list(ATTEMPT_KEY), keep="last").reset_index(drop=True)
    check_gate(frame, store)
    frame = frame.assign(selected=select(frame))
    meta = store_meta(store)
    assert meta is not None
    merged = write_fragment(store, frame, meta, name=f"compacted-{uuid.uuid4().hex}")
    for path in fragments:
        path.unlink(missing_ok=True)
    return merged
