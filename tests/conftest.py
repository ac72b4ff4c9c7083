"""Shared fixtures. The Makefile sets the offline and Prefect variables before Python starts;
they are repeated here so that a bare ``pytest`` behaves the same."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest

from manifests.run_manifest import DatasetConfig, TilingConfig
from tests.data.isprs.generate import make_vaihingen


@pytest.fixture
def vaihingen_root(tmp_path: Path) -> Path:
    """A fake Vaihingen release (zips) with the 16 areas of the ``mpers`` split, 40 x 72 px each."""
    return make_vaihingen(tmp_path / "vaihingen")


def vaihingen_configs(root: Path, out: Path, size: int = 32, stride: int | None = None, **dataset):
    return (
        DatasetConfig(name="vaihingen", root=root, **dataset),
        TilingConfig(size=size, stride=stride, out=out),
    )
