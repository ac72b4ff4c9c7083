"""The data contracts between the two stages: run manifests, the tile index and the caption store.

This package imports nothing else of the project, so that ``caption_pipeline`` and ``segmenter``
can both depend on it without depending on each other.
"""

from manifests.errors import InputError
from manifests.run_manifest import RunManifest, load_manifest, packaged_manifests
from manifests.tile_index import TILE_INDEX_SCHEMA_VERSION, TileIndex, read_tile_index, write_tile_index

__all__ = [
    "TILE_INDEX_SCHEMA_VERSION",
    "InputError",
    "RunManifest",
    "TileIndex",
    "load_manifest",
    "packaged_manifests",
    "read_tile_index",
    "write_tile_index",
]
