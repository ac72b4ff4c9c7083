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

from manifests.run_manifest import TilingConfig, dataset_config
from tests.data.isprs.generate import make_vaihingen


@pytest.fixture
def vaihingen_root(tmp_path: Path) -> Path:
    """A fake Vaihingen release (zips) with the 16 areas of the ``mpers`` split, 40 x 72 px each."""
    return make_vaihingen(tmp_path / "vaihingen")


@pytest.fixture(scope="session")
def _prefect_harness():
    """A temporary Prefect API (with its own database) for the session's flow runs, started with the toolkit's start
    window (a busy machine needs more than the harness's 30 s); yields its URL, or the one-line reason it did not
    start (never raises, so that a failed start is reported once, by ``prefect_api``, not by every test)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.prefect_api import startup_window

    window = startup_window()
    try:
        harness = prefect_test_harness(server_startup_timeout=window)
        harness.__enter__()
    except Exception as exc:  # the reason, once; the tests that need the API are skipped after the first
        yield HarnessFailure(f"Prefect's test API server did not start within {window} s: {exc}"[:2000])
        return
    try:
        yield PREFECT_API_URL.value()
    finally:
        harness.__exit__(None, None, None)


class HarnessFailure(str):
    """Why the session's Prefect API did not start."""


_reported: list[str] = []


@pytest.fixture
def prefect_api(_prefect_harness, request) -> str:
    """The session's Prefect API URL. If it could not start, the first test that needs it fails with the reason and
    the others are skipped, pointing at that test."""
    if isinstance(_prefect_harness, HarnessFailure):
        if _reported:
            pytest.skip(f"no Prefect API (see the failure of {_reported[0]})")
        _reported.append(request.node.nodeid)
        pytest.fail(str(_prefect_harness), pytrace=False)
    return _prefect_harness


@pytest.fixture(scope="session")
def prefect_api_session(_prefect_harness) -> str:
    """The session's Prefect API URL for session-scoped fixtures; skips their tests if it could not start (the reason
    is reported once, by the tests that use ``prefect_api``: tests/test_prefect_api.py always does)."""
    if isinstance(_prefect_harness, HarnessFailure):
        pytest.skip("no Prefect API (see the failure of tests/test_prefect_api.py)")
    return _prefect_harness


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny CLIP, Qwen2-VL and LLaVA saved in their real formats, built once per session."""
    from caption_pipeline.tiny_models import build_tiny_clip, build_tiny_llava, build_tiny_qwen2_vl

    folder = tmp_path_factory.mktemp("models")
    _, clip_checkpoint = build_tiny_clip(folder / "clip")
    return {
        "clip_dir": folder / "clip",
        "clip_checkpoint": clip_checkpoint,
        "qwen": build_tiny_qwen2_vl(folder / "qwen2-vl-tiny"),
        "llava": build_tiny_llava(folder / "llava-tiny"),
    }


@pytest.fixture(scope="session")
def clip_config(tiny_models):
    from manifests.run_manifest import ClipConfig

    return ClipConfig(
        model="demo-tiny-clip", pretrained=None, config=tiny_models["clip_dir"],
        checkpoint=tiny_models["clip_checkpoint"], device="cpu",
    )  # fmt: skip


@pytest.fixture(scope="session")
def small_index(tmp_path_factory):
    """Demo scenes of 128 px, areas 1 and 3 for training and 7 for testing, cut into 64 px tiles (12 tiles)."""
    from manifests.tile_index import read_tile_index
    from segmenter.data.demo_scenes import write_demo_dataset
    from segmenter.data.prepare import prepare_tiles

    folder = tmp_path_factory.mktemp("small")
    write_demo_dataset(folder / "raw", n_areas=3, size=128)
    dataset = dataset_config(name="vaihingen", id="demo", root=folder / "raw", split="custom",
                            custom_splits={"train": ["1", "3"], "test": ["7"]})  # fmt: skip
    return read_tile_index(prepare_tiles(dataset, TilingConfig(size=64, out=folder / "tiles")).index_path)
