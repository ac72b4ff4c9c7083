"""The predicted-tile-classes contract (2b): what a text-free segmenter predicted for each tile of an index.

Written by ``segmenter predict --index``; read by the caption stage where a split's class source is
``predictions``, so prompts of evaluation splits and of new imagery never carry ground truth. One row per tile:
``tile_id``, ``class_fractions`` (share of each class among the tile's pixels, in the metadata's class order),
``mask_path`` (the predicted class-index PNG, relative to the file's folder; the ``annotation`` expert describes
it), ``run_id`` and ``model`` (the run folder and preset that predicted it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.atomic import atomic_path
from manifests.errors import InputError
from manifests.names import check_columns
from manifests.parquet_contract import checked_metadata

CLASS_PREDICTIONS_SCHEMA_VERSION = 1

CLASS_PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("class_fractions", pa.list_(pa.float32()), nullable=False),
        pa.field("mask_path", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class ClassPredictions:
    """A loaded predictions file: rows indexed by ``tile_id`` plus the class names they refer to."""

    frame: pd.DataFrame
    path: Path
    class_names: list[str]
    ignore_index: int

    def mask_path(self, tile_id: str) -> Path | None:
        """Absolute path of a tile's predicted class mask, or None where none was written."""
        relative = self.frame.at[tile_id, "mask_path"]
        return None if relative is None or pd.isna(relative) else self.path.parent / relative

    def fractions(self, tile_id: str) -> list[float]:
        """The predicted class fractions of a tile, in the index's class order."""
        return [float(value) for value in self.frame.at[tile_id, "class_fractions"]]


def write_class_predictions(path: str | Path, rows: list[dict], class_names: list[str], ignore_index: int) -> Path:
    """Write the predictions of an index atomically to ``path`` (a ``.parquet`` file)."""
    table = pa.Table.from_pylist(rows, schema=CLASS_PREDICTIONS_SCHEMA)
    if len(set(table.column("tile_id").to_pylist())) != table.num_rows:
        raise ValueError("tile ids in a predictions file must be unique")
    metadata = {
        "schema_version": str(CLASS_PREDICTIONS_SCHEMA_VERSION),
        "class_names": json.dumps(list(class_names)),
        "ignore_index": str(ignore_index),
    }
    table = table.replace_schema_metadata({key.encode(): value.encode() for key, value in metadata.items()})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_class_predictions(path: str | Path, class_names: list[str] | None = None) -> ClassPredictions:
    """Read a predictions file; with ``class_names``, refuse one made for other classes.

    Raises:
        InputError: missing or unreadable file, another schema version, other class names, a tile id or mask path
            that breaks the name rule.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"class predictions {path}: file not found (write it with `segmenter predict --run RUN --index TILES "
            f"--predictions {path}` using a text-free model)"
        )
    meta = checked_metadata(
        path, "class predictions", CLASS_PREDICTIONS_SCHEMA, CLASS_PREDICTIONS_SCHEMA_VERSION,
        "write it again with `segmenter predict --index`",
    )  # fmt: skip
    names = json.loads(meta["class_names"])
    if class_names is not None and list(class_names) != names:
        raise InputError(f"class predictions {path}: made for classes {names}, the tile index has {list(class_names)}")
    table = pq.read_table(path)
    # Written by someone else, maybe: its mask paths are read, relative to this file's folder, only if they stay there.
    check_columns(table, {"tile_id": True, "mask_path": True}, f"class predictions {path}")
    frame = table.to_pandas().set_index("tile_id", drop=False)
    return ClassPredictions(frame, path, names, int(meta["ignore_index"]))
