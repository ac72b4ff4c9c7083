"""The tile index contract: ``tiles/index.parquet``, one row per crop.

Paths in the index are relative to the directory that holds ``index.parquet``, so a tile folder
can be moved or copied as a whole. The file metadata carries the class names, the ignore index,
the palette, the dataset's class vocabulary (how captions name each class, which classes the headline means
average over) and a fingerprint of the inputs that produced it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.atomic import atomic_path
from manifests.errors import InputError
from manifests.names import check_columns
from manifests.parquet_contract import checked_metadata

# 2: the class vocabulary in the metadata (an index without it would leave the report and the metrics guessing)
TILE_INDEX_SCHEMA_VERSION = 2
INDEX_FILENAME = "index.parquet"
# The columns whose values become parts of paths (crops, predicted masks, report folders), under the name rule
# (``manifests.names``): True where the contract joins names with ``/`` (tile ids, a folder dataset's source ids
# ``<split>/<stem>``, paths relative to the index folder).
NAME_COLUMNS = {
    "tile_id": True, "dataset": False, "split": False, "source_id": True,
    "image_path": True, "label_path": True, "eval_label_path": True,
}  # fmt: skip

TILE_INDEX_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("label_path", pa.string()),
        pa.field("eval_label_path", pa.string()),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("x", pa.int32(), nullable=False),
        pa.field("y", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("class_fractions", pa.list_(pa.float32())),
        pa.field("image_sha256", pa.string(), nullable=False),
    ]
)


def tile_name(y: int, x: int) -> str:
    """The name of the crop whose top-left corner is at row ``y``, column ``x`` (its files and its id end in it)."""
    return f"{y:04d}_{x:04d}"


def make_tile_id(dataset: str, source_id: str, y: int, x: int) -> str:
    """The stable id of the crop of ``source_id`` whose top-left corner is at row ``y``, column ``x``."""
    return f"{dataset}/{source_id}/{tile_name(y, x)}"


@dataclass(frozen=True)
class ClassVocabulary:
    """What a dataset says about its classes beyond their names and colours.

    Attributes:
        words: per class, the words a caption names it by (whole words, any case), its readable name first.
        plurals: the plural noun of each class that is counted as objects (buildings, cars); others are areas.
        main_classes: the classes the headline mIoU/mF1 average over (ISPRS leaves out clutter).
    """

    words: dict[str, tuple[str, ...]]
    plurals: dict[str, str]
    main_classes: tuple[str, ...]

    @classmethod
    def plain(cls, class_names: list[str] | tuple[str, ...]) -> ClassVocabulary:
        """Each class named by its own words, none counted, every class in the means."""
        return cls({name: (name.replace("_", " "),) for name in class_names}, {}, tuple(class_names))

    def to_json(self) -> str:
        """The vocabulary as the tile index's file metadata holds it."""
        return json.dumps({"words": self.words, "plurals": self.plurals, "main_classes": self.main_classes})

    @classmethod
    def from_json(cls, text: str) -> ClassVocabulary:
        """The vocabulary of a tile index's file metadata (:meth:`to_json`)."""
        data = json.loads(text)
        words = {name: tuple(words) for name, words in data["words"].items()}
        return cls(words, dict(data["plurals"]), tuple(data["main_classes"]))


@dataclass(frozen=True)
class TileIndex:
    """A loaded tile index: the rows as a DataFrame plus the file metadata."""

    frame: pd.DataFrame
    root: Path
    class_names: list[str]
    ignore_index: int
    palette: list[tuple[int, int, int]]
    vocabulary: ClassVocabulary
    extra: dict[str, str] = field(default_factory=dict)

    def path(self, relative: str | None) -> Path | None:
        """Absolute path of an index path column value."""
        return None if relative is None or pd.isna(relative) else self.root / relative

    def split(self, name: str) -> pd.DataFrame:
        """The rows of the tiles of one split."""
        return self.frame[self.frame["split"] == name]


@dataclass(frozen=True)
class IndexClasses:
    """What an index's file metadata says about its classes (see :class:`TileIndex`)."""

    class_names: list[str]
    ignore_index: int
    palette: list[tuple[int, int, int]]
    vocabulary: ClassVocabulary


def write_tile_index(
    out_dir: Path, rows: list[dict], classes: IndexClasses, extra: dict[str, str] | None = None
) -> Path:
    """Write ``index.parquet`` atomically; ``extra`` goes into the file metadata as strings."""
    table = pa.Table.from_pylist(rows, schema=TILE_INDEX_SCHEMA)
    if len(set(table.column("tile_id").to_pylist())) != table.num_rows:
        raise ValueError("tile ids in an index must be unique")
    check_columns(table, NAME_COLUMNS, f"tile index {Path(out_dir) / INDEX_FILENAME}")
    metadata = {
        "schema_version": str(TILE_INDEX_SCHEMA_VERSION),
        "class_names": json.dumps(classes.class_names),
        "ignore_index": str(classes.ignore_index),
        "palette": json.dumps([list(color) for color in classes.palette]),
        "class_vocabulary": classes.vocabulary.to_json(),
        **(extra or {}),
    }
    table = table.replace_schema_metadata({key.encode(): value.encode() for key, value in metadata.items()})
    path = Path(out_dir) / INDEX_FILENAME
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_tile_index(path: str | Path) -> TileIndex:
    """Read a tile index from ``index.parquet`` or the directory holding it.

    Raises:
        InputError: the file is missing, unreadable, of another schema version or lacks columns; an id or path that
            breaks the name rule (``manifests.names``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILENAME
    if not path.is_file():
        raise InputError(f"tile index {path}: file not found (run `segmenter prepare` first)")
    meta = checked_metadata(
        path, "tile index", TILE_INDEX_SCHEMA, TILE_INDEX_SCHEMA_VERSION, "re-run `segmenter prepare`"
    )
    table = pq.read_table(path)
    # An index written by someone else is data: its ids and paths are checked before any becomes a file name.
    check_columns(table, NAME_COLUMNS, f"tile index {path}")
    known = {"schema_version", "class_names", "ignore_index", "palette", "class_vocabulary", "pandas", "ARROW:schema"}
    return TileIndex(
        frame=table.to_pandas(),
        root=path.parent,
        class_names=json.loads(meta["class_names"]),
        ignore_index=int(meta["ignore_index"]),
        palette=[tuple(color) for color in json.loads(meta["palette"])],
        vocabulary=ClassVocabulary.from_json(meta["class_vocabulary"]),
        extra={key: value for key, value in meta.items() if key not in known},
    )
