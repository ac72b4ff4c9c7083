"""The caption flow against the oldest huggingface_hub the `vllm` extra allows (.ci/constraints-vllm-oldest.txt).

vLLM 0.12.0 to 0.19.0 ask transformers<5, which asks huggingface_hub<1.0, so `make vllm-env` can resolve to
huggingface_hub 0.34.0; ``is_offline_mode`` only came with 1.2.1. CI cannot install those versions beside its own, so
the project's imports of huggingface_hub are checked against the names 0.34.0 has (read from its ``__init__.py``,
``errors.py`` and ``utils/__init__.py`` at tag v0.34.0), statically and in a subprocess whose ``huggingface_hub``
offers only those names.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints-vllm-oldest.txt"
PACKAGES = ("manifests", "caption_pipeline", "segmenter", "flows")
# What huggingface_hub 0.34.0 has of the names this project imports (checked in its source at tag v0.34.0).
HUB_0_34 = {
    "huggingface_hub": {"constants", "errors", "utils", "hf_hub_download", "snapshot_download",
                        "try_to_load_from_cache"},
    "huggingface_hub.errors": {"EntryNotFoundError", "HFValidationError", "HfHubHTTPError", "LocalEntryNotFoundError",
                               "RepositoryNotFoundError", "RevisionNotFoundError"},
    "huggingface_hub.utils": {"validate_repo_id"},
    "huggingface_hub.constants": {"HF_HUB_CACHE", "HF_HUB_OFFLINE"},
}  # fmt: skip
# The modules the caption flow runs in the vLLM environment, and the segmenter's modules that read the hub.
VLLM_PATH = [
    "flows.cli",
    "flows.generate_captions",
    "caption_pipeline.experts.vllm_backend",
    "caption_pipeline.experts.transformers_backend",
    "segmenter.model.backbone",
    "segmenter.text.flan_t5",
]
STAND_IN = """
import importlib, json, os, sys, types
import huggingface_hub
for library in os.environ.get("PRELOAD", "").split():  # the libraries load with the real package first
    importlib.import_module(library)
allowed = set(json.loads(sys.argv[1]))
real = huggingface_hub

class Hub034(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") or name in allowed:
            return getattr(real, name)
        raise AttributeError(f"module 'huggingface_hub' 0.34.0 has no attribute {name!r}")

sys.modules["huggingface_hub"] = Hub034("huggingface_hub")
for module in sys.argv[2:]:
    importlib.import_module(module)
if "flows.cli" not in sys.argv:
    sys.exit(0)
from caption_pipeline.experts.base import ExpertUnavailable
from caption_pipeline.experts.transformers_backend import check_weights
from manifests.run_manifest import TransformersExpertConfig
try:
    check_weights(TransformersExpertConfig(name="local", backend="transformers", model="no-org/not-cached-vlm"))
except ExpertUnavailable as exc:
    print("refused:", exc)
"""


def hub_imports() -> dict[str, set[str]]:
    """Per huggingface_hub module, the names the project's packages import from it (functions included)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("huggingface_hub"):
                    found.setdefault(node.module, set()).update(alias.name for alias in node.names)
    return found


def test_the_constraints_file_pins_the_floors_the_test_checks_against():
    pins = dict(line.split("==") for line in CONSTRAINTS.read_text().splitlines() if "==" in line)
    assert pins["huggingface-hub"] == "0.34.0" and pins["vllm"] == "0.10.2" and pins["transformers"] == "4.56.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert (
        '"vllm>=0.10.2"' in pyproject and '"transformers>=4.56' in pyproject and '"huggingface_hub>=0.34' in pyproject
    )


def test_the_project_imports_only_what_huggingface_hub_0_34_has():
    found = hub_imports()
    newer = {module: sorted(names - HUB_0_34.get(module, set())) for module, names in found.items()}
    assert not any(newer.values()), f"not in huggingface_hub 0.34.0 (the vLLM environment's floor): {newer}"
    assert "is_offline_mode" not in found.get("huggingface_hub", set())


def test_the_caption_flow_imports_and_checks_offline_weights_without_is_offline_mode(tmp_path):
    allowed = sorted(HUB_0_34["huggingface_hub"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PRELOAD": "open_clip timm transformers"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", STAND_IN, json.dumps(allowed), *VLLM_PATH],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # the offline rule still holds: a hub id the cache lacks is refused in one line, naming the cache
    refused = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 1 and "no-org/not-cached-vlm" in refused[0] and str(tmp_path / "hub") in refused[0]


def test_the_stand_in_really_hides_newer_names(tmp_path):
    """The check above can fail: code that imports is_offline_mode does not import under the stand-in."""
    module = tmp_path / "uses_new_api.py"
    module.write_text("from huggingface_hub import is_offline_mode\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    done = subprocess.run(
        [sys.executable, "-c", STAND_IN, json.dumps(sorted(HUB_0_34["huggingface_hub"])), "uses_new_api"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0 and "cannot import name 'is_offline_mode'" in done.stderr
