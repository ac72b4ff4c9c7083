"""The caption store contract: Parquet fragments, one row per generation attempt.

A store is a directory of fragments (``part-*.parquet``) or a single Parquet file; readers accept both.
Every fragment is written atomically (temp file + rename), with a unique name, so a crashed writer leaves no
partial fragment and two runs writing into one directory never touch each other's files.

Scale (a store of a million rows in hundreds of fragments): every read goes through ``pyarrow.dataset`` with only the
columns it needs and its filter pushed down. Each fragment's footer is checked once per process (cached on the
file's inode, size and mtime, which an atomic write always changes) together with its ``tile_id`` range from the
Parquet statistics; the writer sorts rows by key, so a shard's lookup opens only the fragments whose range holds its
tiles. Fragments written by other tools are read: nullable fields (refused only where a row has a null the contract
forbids), other integer widths (cast), extra columns (ignored by readers, kept by :func:`compact`).

The gate's rules live in its policy (``caption_pipeline.policy``), which this package cannot import: rows carry the
policy's results (``usable``, ``passed``, ``selected``) and readers read those columns; the two rules the store
applies itself, selection across runs and done keys, are passed in by the caller (``compact(store, select=...)``,
``attempt_counts(store, done=...)``).
"""

from __future__ import annotations

import functools
import json
import operator
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from manifests.atomic import atomic_path
from manifests.errors import InputError
from manifests.locks import one_writer, remove_partial_files
from manifests.names import safe_join
from manifests.parquet_contract import checked_metadata

# 2: per-row decoding (temperature, seed) and class provenance (split, protocol) next to class_source.
# 3: ``usable``, the gate policy's verdict on the answer, which readers read instead of re-deriving it.
# 4: the gate mode per row (``gate_mode``, ``gate_threshold``, ``gate_score``).
CAPTION_STORE_SCHEMA_VERSION = 4
# The ``finish_reason`` of a caption the gate cut at ``captions.max_caption_chars`` (whatever the server's was).
CUT_FINISH_REASON = "cut"
# A percentile gate's derived thresholds, beside the fragments of a store directory.
THRESHOLDS_FILE = "gate_thresholds.json"
KEY_COLUMNS = ("tile_id", "expert", "prompt_id")
ATTEMPT_KEY = (*KEY_COLUMNS, "attempt")
Key = tuple[str, str, str]
# A rule of the gate policy over attempts of the store: one flag per row, on the frame's index.
RowRule = Callable[[pd.DataFrame], pd.Series]
# Rows per key range that compaction holds in memory at once (all columns), and per row group it writes.
COMPACT_RANGE_ROWS = 131_072
ROW_GROUP_ROWS = 65_536

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
        """The Parquet file metadata of a fragment (the schema version with these values)."""
        values = {
            "schema_version": str(CAPTION_STORE_SCHEMA_VERSION),
            "class_names": json.dumps(self.class_names),
            "clip_model": self.clip_model,
            "tau": repr(self.tau),
        }
        return {key.encode(): value.encode() for key, value in values.items()}


def _fragment_paths(store: Path) -> list[Path]:
    if store.is_file():
        return [store]
    if store.is_dir():
        names = sorted(name for name in os.listdir(store) if name.endswith(".parquet") and not name.startswith("."))
        return [store / name for name in names]
    return []


@dataclass(frozen=True)
class _Fragment:
    """A checked fragment: its file metadata, its ``tile_id`` range (None where its statistics do not say) and the
    columns it has beyond the contract."""

    path: Path
    parquet: ds.ParquetFileFragment  # its footer parsed once, reused by every scan
    meta: dict[str, str]
    low: str | None
    high: str | None
    extra: tuple[pa.Field, ...]

    def may_hold(self, low: str, high: str | None) -> bool:
        """Whether the fragment may hold a tile id in ``[low, high]`` (``high`` None: no upper bound)."""
        if self.low is None or self.high is None:
            return True
        return self.high >= low and (high is None or self.low <= high)


# Fragments are immutable once renamed into place, so a check holds as long as the file is the same one.
_CHECKED: dict[Path, tuple[tuple[int, int, int], _Fragment]] = {}
_CHECKED_LOCK = threading.Lock()
# Fragments are written with page checksums and read verifying them (pages without one, from older writers, are
# read as they are): a flipped byte fails instead of reading back
# as another caption.
_FORMAT = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
)
_CONTRACT_NAMES = frozenset(CAPTION_STORE_SCHEMA.names)
_LOCAL = pafs.LocalFileSystem()


def _check_fragment(path: Path) -> _Fragment:
    """The fragment at ``path``, checked once per file version.

    Raises:
        InputError: unreadable, another schema version, missing columns, or a null where the contract needs a value.
    """
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise InputError(f"caption store {path}: not a readable Parquet file ({exc})") from None
    version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _CHECKED_LOCK:
        cached = _CHECKED.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    try:
        parquet = _FORMAT.make_fragment(str(path), filesystem=_LOCAL)
        parquet.ensure_complete_metadata()
        schema = parquet.physical_schema
    except (pa.ArrowInvalid, OSError):
        schema = None
    found = (schema.metadata or {}) if schema is not None else {}
    # The serialized Arrow schema is the one long entry, and nothing reads it.
    meta = {key.decode(): value.decode() for key, value in found.items() if not key.startswith(b"ARROW:")}
    if (
        schema is None
        or meta.get("schema_version") != str(CAPTION_STORE_SCHEMA_VERSION)
        or not _CONTRACT_NAMES.issubset(schema.names)
    ):
        # The contract's own check says what is wrong, in its words.
        meta = checked_metadata(
            path, "caption store", CAPTION_STORE_SCHEMA, CAPTION_STORE_SCHEMA_VERSION, "regenerate or convert the store"
        )
        if schema is None:  # read by pyarrow's plain reader, not by its dataset reader
            raise InputError(f"caption store {path}: not a readable Parquet dataset fragment")
    # The toolkit's own fragments have exactly the contract's schema (one comparison); others are looked at closer.
    own = schema.equals(CAPTION_STORE_SCHEMA)
    if not own:
        _refuse_nulls(path, parquet.metadata, schema)
    low, high = _tile_range(parquet.metadata, schema.get_field_index("tile_id"))
    extra = () if own else tuple(field.with_nullable(True) for field in schema if field.name not in _CONTRACT_NAMES)
    fragment = _Fragment(path, parquet, meta, low, high, extra)
    with _CHECKED_LOCK:
        _CHECKED[path] = (version, fragment)
    return fragment


def _refuse_nulls(path: Path, metadata: pq.FileMetaData, schema: pa.Schema) -> None:
    """Refuse a null in a column the contract needs a value in; the toolkit's writer marks those columns required,
    another tool's may not (the row-group statistics count nulls, else the column is read)."""
    nullable = {field.name for field in schema if field.nullable}
    for field in CAPTION_STORE_SCHEMA:
        if field.nullable or field.name not in nullable:
            continue
        index = schema.get_field_index(field.name)
        nulls = 0
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(index).statistics
            if stats is None or not stats.has_null_count:
                nulls = pq.read_table(path, columns=[field.name]).column(0).null_count
                break
            nulls += stats.null_count
        if nulls:
            raise InputError(
                f"caption store {path}: column {field.name} has {nulls} null value(s), the contract needs a value in "
                "every row; fill them or drop those rows"
            )


def _tile_range(metadata: pq.FileMetaData, index: int) -> tuple[str | None, str | None]:
    """The smallest and largest ``tile_id`` from the row-group statistics, or (None, None) where any is missing."""
    lows, highs = [], []
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(index).statistics
        if stats is None or not stats.has_min_max:
            return None, None
        lows.append(stats.min)
        highs.append(stats.max)
    if not lows:
        return None, None
    low, high = min(lows), max(highs)
    if isinstance(low, bytes):  # a writer that did not mark the column as UTF-8
        return None, None
    return low, high


def _fragments(store: Path) -> list[_Fragment]:
    return [_check_fragment(path) for path in _fragment_paths(store)]


def _scan(
    fragments: list[_Fragment],
    columns: list[str],
    filter: pc.Expression | None = None,
    schema: pa.Schema = CAPTION_STORE_SCHEMA,
) -> pa.Table:
    """``columns`` of the rows of ``fragments`` that ``filter`` keeps, cast to ``schema``."""
    if not fragments:
        return schema.empty_table().select(columns)
    dataset = ds.FileSystemDataset([fragment.parquet for fragment in fragments], schema, _FORMAT, _LOCAL)
    try:
        return dataset.to_table(columns=columns, filter=filter)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        paths = ", ".join(str(fragment.path) for fragment in fragments[:3])
        raise InputError(
            f"caption store {paths}{' ...' if len(fragments) > 3 else ''}: a column does not convert to the "
            f"contract's type ({str(exc).splitlines()[0]})"
        ) from None
    except OSError as exc:  # a damaged page: a failed checksum, undecodable compressed data or page header
        raise InputError(
            f"caption store {_damaged(fragments, columns)}: a damaged data page ({str(exc).splitlines()[0][:200]}); "
            "restore the fragment from a copy, or move it aside and caption its tiles again"
        ) from None


def _damaged(fragments: list[_Fragment], columns: list[str]) -> str:
    """The first fragment whose pages fail to read (on the error path only: each is read again on its own)."""
    for fragment in fragments:
        try:
            fragment.parquet.to_table(columns=[c for c in columns if c in fragment.parquet.physical_schema.names])
        except OSError:
            return str(fragment.path)
    return ", ".join(str(fragment.path) for fragment in fragments[:3]) + (" ..." if len(fragments) > 3 else "")


def write_fragment(
    store: str | Path, rows: Iterable[dict] | pd.DataFrame, meta: StoreMeta, name: str | None = None
) -> Path | None:
    """Write ``rows`` as one new fragment in the store directory; returns its path (None for no rows).

    Rows are sorted by (tile, expert, prompt, attempt), so the fragment's ``tile_id`` statistics bound its tiles.
    """
    if isinstance(rows, pd.DataFrame):
        table = pa.Table.from_pandas(rows, schema=CAPTION_STORE_SCHEMA, preserve_index=False)
    else:
        table = pa.Table.from_pylist(list(rows), schema=CAPTION_STORE_SCHEMA)
    if table.num_rows == 0:
        return None
    table = table.sort_by([(column, "ascending") for column in ATTEMPT_KEY]).replace_schema_metadata(meta.encode())
    path = safe_join(store, f"part-{name or uuid.uuid4().hex}.parquet")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, write_page_checksum=True)
    return path


def read_store(store: str | Path, missing_ok: bool = False) -> pd.DataFrame:
    """All attempts in a store (a file or a directory of fragments), validated; the contract's columns only.

    Raises:
        InputError: no store there (unless ``missing_ok``), an unreadable fragment, another schema version, a null
            where the contract needs a value.
    """
    store = Path(store)
    fragments = _fragments(store)
    if not fragments:
        if missing_ok:
            return CAPTION_STORE_SCHEMA.empty_table().to_pandas()
        raise InputError(f"caption store {store}: no Parquet file or fragments found")
    return _scan(fragments, CAPTION_STORE_SCHEMA.names).to_pandas()


def latest_attempts(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with one row per attempt (tile, expert, prompt, attempt): the newest by ``created_at`` where an
    attempt is there twice (a compaction cut short, two that raced, a fragment copied in). The one rule for repeated
    attempts: compaction drops them by it, and readers that count attempts read through :func:`read_attempts`."""
    return frame.sort_values("created_at", kind="stable").drop_duplicates(list(ATTEMPT_KEY), keep="last")


def read_attempts(store: str | Path, missing_ok: bool = False) -> pd.DataFrame:
    """Every attempt of a store once (:func:`latest_attempts` of :func:`read_store`), in the store's row order: what a
    report or a summary counts.

    Raises:
        InputError: see :func:`read_store`.
    """
    return latest_attempts(read_store(store, missing_ok)).sort_index()


def scorers(store: str | Path) -> set[str]:
    """The CLIP model ids that scored the store's rows (one column read; empty for no store)."""
    column = _scan(_fragments(Path(store)), ["clip_model"]).column("clip_model")
    return set(pc.unique(column).to_pylist()) - {None}


def store_meta(store: str | Path) -> StoreMeta | None:
    """Metadata of the newest fragment, or None for an empty store."""
    paths = _fragment_paths(Path(store))
    if not paths:
        return None
    newest = max(paths, key=lambda path: path.stat().st_mtime_ns)
    meta = _check_fragment(newest).meta
    return StoreMeta(json.loads(meta["class_names"]), meta["clip_model"], float(meta["tau"]))


def _rule_frame(table: pa.Table) -> pd.DataFrame:
    """``table`` as the frame a rule of the gate policy reads (pandas 3 keeps strings in Arrow: no copy)."""
    return table.to_pandas()


def _done(table: pa.Table, done: RowRule) -> pa.Table:
    """The key columns of the rows of ``table`` that ``done`` flags."""
    if table.num_rows == 0:
        return table.select(list(KEY_COLUMNS))
    flags = np.asarray(done(_rule_frame(table)), dtype=bool)
    return table.select(list(KEY_COLUMNS)).filter(pa.array(flags))


def _key_set(keys: pa.Table) -> set[Key]:
    """The rows of a table of key columns as a set of tuples (the only Python objects per row an answer makes)."""
    return set(zip(*(keys.column(name).to_pylist() for name in KEY_COLUMNS), strict=True))


# The schema a gate rule's rows are read with: pandas 3 holds strings as Arrow large strings, so key columns read as
# such become a frame without a copy.
_RULE_SCHEMA = pa.schema(
    [field.with_type(pa.large_string()) if field.name in KEY_COLUMNS else field for field in CAPTION_STORE_SCHEMA]
)


def _shard_scan(store: str | Path, tile_ids: Iterable[str] | None, columns: list[str]) -> pa.Table:
    """``columns`` of the rows of ``tile_ids`` (every row for None), opening only the fragments that may hold them."""
    fragments = _fragments(Path(store))
    if tile_ids is None:
        return _scan(fragments, columns, schema=_RULE_SCHEMA)
    wanted = sorted(set(tile_ids))
    if not wanted:
        return _RULE_SCHEMA.empty_table().select(columns)
    # A shard's fragments are sorted by tile: their statistics' range rules out every other shard's fragment.
    fragments = [fragment for fragment in fragments if fragment.may_hold(wanted[0], wanted[-1])]
    return _scan(fragments, columns, pc.field("tile_id").isin(wanted), _RULE_SCHEMA)


def attempt_counts(
    store: str | Path, tile_ids: Iterable[str] | None = None, *, done: RowRule
) -> tuple[set[Key], dict[Key, int]]:
    """What a resumed run needs: keys already done, and how many attempts every key has so far.

    Args:
        store: the caption store.
        tile_ids: only these tiles' rows are read (and only the columns below), from only the fragments whose
            ``tile_id`` range may hold them, so a shard task's cost does not grow with the store; None reads every row.
        done: the gate policy's rule (``GatePolicy.done``): the rows that make their key done, given the key columns,
            ``attempt``, ``selected``, ``usable`` and ``passed``.
    """
    table = _shard_scan(store, tile_ids, [*ATTEMPT_KEY, "selected", "usable", "passed"])
    if table.num_rows == 0:
        return set(), {}
    grouped = table.group_by(list(KEY_COLUMNS), use_threads=False).aggregate([("attempt", "max")])
    keys = zip(*(grouped.column(name).to_pylist() for name in KEY_COLUMNS), strict=True)
    counts = dict(zip(keys, (attempt + 1 for attempt in grouped.column("attempt_max").to_pylist()), strict=True))
    return _key_set(_done(table, done)), counts


def done_keys(store: str | Path, *, done: RowRule, requires: tuple[str, ...] = ()) -> set[Key]:
    """(tile_id, expert, prompt_id) keys that the gate policy's ``done`` says a resumed run skips.

    ``requires``: boolean columns that every row ``done`` flags has true (``GatePolicy.DONE_REQUIRES``); the scan
    reads only those rows, and ``done`` still decides among them.
    """
    columns = [*ATTEMPT_KEY, "selected", "usable", "passed"]
    if requires:
        condition = functools.reduce(operator.and_, (pc.field(name) for name in requires))
        table = _scan(_fragments(Path(store)), columns, condition, _RULE_SCHEMA)
    else:
        table = _shard_scan(store, None, columns)
    picked = _done(table, done)
    # The store's rows go, back to the system too (Arrow's allocator keeps freed pages), before the answer's Python
    # tuples are made: the two never peak together.
    del table
    pa.default_memory_pool().release_unused()
    return _key_set(picked)


# The columns that show one caption: its key and attempt, what CLIP and the gate made of it, and its text (the
# report's caption tables show these).
CAPTION_COLUMNS = ["tile_id", "expert", "prompt_id", "attempt", "similarity", "passed", "caption"]
# The selected captions as the segmenter reads them (:func:`selected_captions`).
VIEW_COLUMNS = ["tile_id", "expert", "prompt_id", "caption", "similarity", "usable", "passed", "attempt",
                "image_sha256", "class_source"]  # fmt: skip


def selected_captions(store: str | Path, columns: Sequence[str] = VIEW_COLUMNS) -> pd.DataFrame:
    """The selected attempt of every (tile, expert, prompt), sorted by key: the view the segmenter reads, with the
    gate's verdicts on it (``usable``, ``passed``). Where two runs raced on one key and each selected a row, the
    newest wins: this is the one place that rule is applied (the report reads its selections here too).

    Args:
        store: the caption store.
        columns: the contract's columns to read (default: the segmenter's view, ``VIEW_COLUMNS``).

    Raises:
        InputError: no store there, or see :func:`read_store`.
    """
    store = Path(store)
    fragments = _fragments(store)
    if not fragments:
        raise InputError(f"caption store {store}: no Parquet file or fragments found")
    table = _scan(fragments, list(dict.fromkeys([*columns, *KEY_COLUMNS, "created_at"])), pc.field("selected"))
    order = pc.sort_indices(table, [*((name, "ascending") for name in KEY_COLUMNS), ("created_at", "ascending")])
    if table.num_rows > 1:
        # Two runs that raced on one key each selected a row: the newest (the last of its key, sorted) wins.
        keys = table.select(list(KEY_COLUMNS)).take(order)
        differs = [pc.not_equal(keys.column(name)[1:], keys.column(name)[:-1]) for name in KEY_COLUMNS]
        last = pc.or_(pc.or_(differs[0], differs[1]), differs[2])
        order = order.filter(pa.concat_arrays([*last.chunks, pa.array([True])]))
    return table.select(list(columns)).take(order).to_pandas()


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
    table = _scan(_fragments(Path(store)), columns).group_by(columns, use_threads=False).aggregate([])
    for expert, prompt, mode, threshold in zip(*(table.column(name).to_pylist() for name in columns), strict=True):
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


def _merged_schema(fragments: list[_Fragment]) -> pa.Schema:
    """The contract's columns and every extra column of any fragment (nullable: other fragments lack it).

    Raises:
        InputError: an extra column with different types in two fragments (merging would lose one).
    """
    extra: dict[str, tuple[pa.Field, Path]] = {}
    for fragment in fragments:
        for field in fragment.extra:
            seen = extra.setdefault(field.name, (field, fragment.path))
            if not seen[0].type.equals(field.type):
                raise InputError(
                    f"caption store {fragment.path}: extra column {field.name} is {field.type} here but "
                    f"{seen[0].type} in {seen[1]}; compact cannot merge them without losing data (convert one)"
                )
    return pa.schema([*CAPTION_STORE_SCHEMA, *(field for field, _ in extra.values())])


def _key_ranges(fragments: list[_Fragment], rows_per_range: int) -> list[tuple[str, str | None]]:
    """Tile-id ranges ``[low, next low)`` of about ``rows_per_range`` rows each (a tile is never split), from one
    scan of the ``tile_id`` column; the last range is open."""
    dataset = ds.FileSystemDataset([fragment.parquet for fragment in fragments], CAPTION_STORE_SCHEMA, _FORMAT, _LOCAL)
    counts = [pc.value_counts(batch.column(0)) for batch in dataset.to_batches(columns=["tile_id"])]
    counts = [part for part in counts if len(part)]
    if not counts:
        return []
    parts = pa.concat_arrays(counts)
    table = pa.table({"tile_id": parts.field("values"), "n": parts.field("counts")})
    table = table.group_by("tile_id", use_threads=False).aggregate([("n", "sum")]).sort_by("tile_id")
    ids = table.column("tile_id").to_pylist()
    total = np.cumsum(table.column("n_sum").to_numpy())
    starts = [0]
    # A new range starts at the first tile whose rows would take the current one past its share.
    for position in range(1, len(ids)):
        before = total[starts[-1] - 1] if starts[-1] else 0
        if total[position] - before > rows_per_range:
            starts.append(position)
    bounds = [ids[start] for start in starts]
    return list(zip(bounds, [*bounds[1:], None], strict=True))


def compact(store: str | Path, *, select: RowRule, rows_per_range: int = COMPACT_RANGE_ROWS) -> Path | None:
    """Merge the fragments of a store directory into one; returns the new fragment.

    Repeated attempts are dropped and ``selected`` is re-derived over all attempts of each key by ``select`` (the
    gate policy's ``GatePolicy.select``, given every column), so a key that was retried by a later run again has
    exactly one selected row. A store whose rows were judged by different gates is refused (:func:`check_gate`).
    Columns beyond the contract (written by other tools) are kept; fragments without one get nulls there.

    Memory is bounded: the store is merged one tile-id range (about ``rows_per_range`` rows, every attempt of a key
    in one range) at a time, streamed into the new fragment's row groups.

    Raises:
        InputError: the fragments mix gate modes, or thresholds of one mode for one (expert, prompt); an extra column
            with different types in two fragments.

    The merged fragment is written to a temporary file and renamed into place before the old ones are removed, so a
    crash at any point loses nothing and leaves the old store readable (it may leave rows twice, which the next
    compaction or any reader's key check resolves).

    One compaction at a time: it holds the store's lock (:func:`manifests.locks.one_writer`) from listing the
    fragments to removing them, and first removes (and names, on stderr) the temporary files of writers of this host
    that were killed. Caption runs keep adding fragments meanwhile; those are neither merged nor removed.

    Raises:
        FolderBusy: another compaction of this store is running (one line naming its process).
    """
    store = Path(store)
    if not store.is_dir():
        paths = _fragment_paths(store)
        return paths[0] if paths else None
    with one_writer(store, "caption store"):
        for path in remove_partial_files(store, every=False):
            print(f"note: removed {path}, a partial file of a writer that was killed", file=sys.stderr)
        return _compact_fragments(store, select, rows_per_range)


def _compact_fragments(store: Path, select: RowRule, rows_per_range: int) -> Path | None:
    """:func:`compact`'s work, under the store's lock."""
    paths = _fragment_paths(store)
    if len(paths) <= 1:
        return paths[0] if paths else None
    # The listed fragments only: a fragment a writer adds meanwhile is neither merged nor deleted.
    fragments = [_check_fragment(path) for path in paths]
    schema = _merged_schema(fragments)
    meta = store_meta(store)
    assert meta is not None
    merged = store / f"part-compacted-{uuid.uuid4().hex}.parquet"
    gates = []
    with atomic_path(merged) as tmp:
        with pq.ParquetWriter(tmp, schema.with_metadata(meta.encode()), write_page_checksum=True) as writer:
            for low, high in _key_ranges(fragments, rows_per_range):
                bound = pc.field("tile_id") >= low
                if high is not None:
                    bound = bound & (pc.field("tile_id") < high)
                part = [fragment for fragment in fragments if fragment.may_hold(low, high)]
                frame = _scan(part, schema.names, bound, schema).to_pandas()
                frame = latest_attempts(frame)
                frame = frame.sort_values(list(ATTEMPT_KEY), kind="stable").reset_index(drop=True)
                gates.append(frame[["expert", "prompt_id", "gate_mode", "gate_threshold", "run_id"]].drop_duplicates())
                frame = frame.assign(selected=select(frame))
                table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
                writer.write_table(table.replace_schema_metadata(None), row_group_size=ROW_GROUP_ROWS)
                del frame, table
        # Before the rename: a refused store keeps its fragments as they were.
        check_gate(pd.concat(gates, ignore_index=True), store)
    for path in paths:
        path.unlink(missing_ok=True)
        with _CHECKED_LOCK:
            _CHECKED.pop(path, None)
    return merged
