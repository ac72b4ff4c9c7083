"""Validation shared by the Parquet contracts: readable file, matching ``schema_version``, required columns."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.errors import InputError


def checked_metadata(path: Path, label: str, schema: pa.Schema, version: int, hint: str) -> dict[str, str]:
    """The file metadata of a contract file, after checking it can be read, its version and its columns.

    Raises:
        InputError: one line naming ``label`` and ``path``; ``hint`` says what to do about a version mismatch.
    """
    try:
        found = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{label} {path}: not a readable Parquet file ({exc})") from None
    meta = {key.decode(): value.decode() for key, value in (found.metadata or {}).items()}
    if meta.get("schema_version") != str(version):
        raise InputError(
            f"{label} {path}: schema_version {meta.get('schema_version')!r}, this toolkit reads {version}; {hint}"
        )
    missing = [name for name in schema.names if name not in found.names]
    if missing:
        raise InputError(f"{label} {path}: missing columns {missing}")
    return meta
