"""Expert backends and gate modes are each declared once: a backend by its settings class in the manifest schema (with
the path of its expert class), a gate mode by its object in the gate policy. Everything else (the manifest's union and
its messages, the builder, the pre-flight, what the flows, the report and the calibration ask) is derived from those
declarations, and no other module spells a backend's or a mode's name."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, get_args

import numpy as np
import pytest
from pydantic import BaseModel

from caption_pipeline.experts import Expert, build_expert, expert_class
from caption_pipeline.experts.annotation import AnnotationExpert
from caption_pipeline.policy import GATE_MODES, GatePolicy
from flows import generate_captions as flow_module
from flows.generate_captions import CaptionRunSettings, generate_captions
from manifests.errors import InputError
from manifests.run_manifest import (
    EXPERT_BACKENDS,
    EXPERT_SETTINGS,
    AnnotationExpertConfig,
    CaptionsConfig,
    ExpertConfig,
    GateConfig,
    GateMode,
    expert_backend,
    load_manifest,
)
from tests.helpers import demo_data_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_backend_has_its_settings_an_expert_class_that_imports_and_a_preflight():
    assert EXPERT_BACKENDS, "no expert backend is declared"
    for name, backend in EXPERT_BACKENDS.items():
        assert get_args(backend.settings.model_fields["backend"].annotation) == (name,)
        cls = expert_class(name)  # imports the backend's module: vLLM itself only on first use
        assert Expert in cls.__mro__ and cls.backend == name, name  # it inherits the protocol's defaults
        assert callable(cls.preflight) and isinstance(cls.runs_alone, bool), name
    with pytest.raises(InputError, match=r"unknown expert backend 'ollama' \(expected one of \['annotation'"):
        expert_class("ollama")
    with pytest.raises(ValueError, match="declared twice"):
        expert_backend("caption_pipeline.experts.annotation:AnnotationExpert")(AnnotationExpertConfig)

    class Late(AnnotationExpertConfig):
        backend: Literal["late"]

    class Bare(BaseModel):
        name: str
        backend: Literal["bare"]

    with pytest.raises(ValueError, match="'late' is declared after ExpertConfig"):  # it would be in no manifest
        expert_backend("tests.late:Late")(Late)
    with pytest.raises(ValueError, match=r"the flow reads \['model', 'temperature', 'reprompt_temperature', 'gpu'"):
        expert_backend("tests.bare:Bare")(Bare)
    assert "late" not in EXPERT_BACKENDS and "bare" not in EXPERT_BACKENDS
    expert = build_expert(AnnotationExpertConfig(name="labels", backend="annotation"))
    assert isinstance(expert, AnnotationExpert) and expert.name == "labels"


def test_the_manifest_union_and_its_messages_are_the_registry(tmp_path, small_index):
    union = get_args(get_args(ExpertConfig)[0])
    assert union == tuple(backend.settings for backend in EXPERT_BACKENDS.values())
    assert {name: backend.settings for name, backend in EXPERT_BACKENDS.items()} == EXPERT_SETTINGS
    path = tmp_path / "run.yaml"
    path.write_text(
        f"name: r\n{demo_data_yaml(small_index)}\ncaptions:\n  store: {tmp_path / 'store'}\n"
        "  experts:\n    - {name: x, backend: ollama}\n"
    )
    with pytest.raises(InputError) as info:
        load_manifest(path)
    assert f"unknown backend 'ollama' (expected one of {', '.join(EXPERT_BACKENDS)})" in str(info.value)


def test_the_run_asks_every_chosen_experts_preflight_before_it_starts(tmp_path, small_index, clip_config, monkeypatch):
    asked: list[str] = []

    def refuse(cls, config) -> None:
        asked.append(config.name)
        raise InputError(f"expert {config.name}: a key this backend needs is not set")

    def no_flow(**options):
        raise AssertionError("the flow started")

    monkeypatch.setattr(AnnotationExpert, "preflight", classmethod(refuse))
    monkeypatch.setattr(flow_module.generate_captions_flow, "with_options", no_flow)
    path = tmp_path / "run.yaml"
    path.write_text(
        f"name: r\n{demo_data_yaml(small_index)}\ncaptions:\n  store: {tmp_path / 'store'}\n"
        f"  clip: {{model: demo-tiny-clip, pretrained: null, config: {clip_config.config}, "
        f"checkpoint: {clip_config.checkpoint}, device: cpu}}\n"
        "  prompts: {class_source: {train: labels, test: labels}, allow_labels_on_eval: true}\n"
        "  experts:\n    - {name: first, backend: annotation}\n    - {name: second, backend: annotation}\n"
    )
    with pytest.raises(InputError, match="expert second: a key this backend needs is not set"):
        generate_captions(CaptionRunSettings(path, experts=["second"]))
    assert asked == ["second"] and not (tmp_path / "store").exists()


def _calibration_group() -> SimpleNamespace:
    return SimpleNamespace(tau_at_false_pass=0.62, false_pass_at_suggested=0.04, own_pass_at_suggested=0.7,
                           margin_at_false_pass=0.03, own_pass_at_margin=0.6)  # fmt: skip


@pytest.mark.parametrize("name", list(GATE_MODES))
def test_a_gate_mode_object_answers_what_flows_report_and_calibration_ask(name):
    rule = GATE_MODES[name]
    captions = CaptionsConfig(store="s", tau=0.6, experts=[], gate=GateConfig(mode=name))
    policy = GatePolicy.from_captions(captions, {("e", "p1"): 0.61})
    assert rule.name == name and policy.gate_mode is rule and policy.mode == name
    # Its threshold: the manifest setting it names, or a derived one per (expert, prompt).
    assert rule.derives_thresholds == (rule.setting is None)
    if rule.setting is None:
        assert rule.fixed_threshold(policy) is None and policy.threshold("e", "p1") == 0.61
    else:
        value = functools.reduce(getattr, rule.setting.split(".")[1:], captions)
        assert rule.fixed_threshold(policy) == value == policy.threshold("e", "p1")
    assert rule.score(0.7, 0.6) is not None and policy.gate_score(None, 0.5) is None
    assert policy.describe().startswith(f"gate: {name}")
    summary = rule.store_summary("0.615")
    assert summary.startswith(f"gate mode {name}: ") and "0.615" in summary
    rate = rule.calibration_pass_rate(np.array([0.5, 0.7]), np.array([0.0, 0.1]), policy)
    assert 0.0 <= rate <= 1.0
    assert rule.suggestion(_calibration_group(), 0.05).startswith("captions.")
    assert rule.min_shard_tiles >= 1 and isinstance(rule.contrasts_shard, bool)
    rule.check_run(tiles=8, shard_size=4)  # shards of several tiles suit every mode
    rule.check_shard(tiles=4, distinct=4)
    assert rule.calibration_note is None or isinstance(rule.calibration_note, str)


def test_the_manifest_names_the_modes_the_policy_has():
    assert set(GATE_MODES) == set(get_args(GateMode))
    assert set(GateConfig._SETTING_MODES.values()) <= set(GATE_MODES)


def _spelled(paths: list[Path], names: set[str]) -> list[str]:
    """Where a module spells one of ``names`` as a whole string literal (docstrings aside)."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
                found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{node.lineno} "
                             f"{node.value!r}")  # fmt: skip
    return found


def _sources(*folders: str, leave_out: tuple[str, ...] = ()) -> list[Path]:
    paths = [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]
    return [path for path in paths if str(path.relative_to(ROOT)) not in leave_out]


def test_no_mode_name_outside_the_policy_and_the_manifest_schema_and_no_backend_name_in_flows(tmp_path):
    modes = _spelled(
        _sources("manifests", "caption_pipeline", "flows", "bench",
                 leave_out=("caption_pipeline/policy.py", "manifests/run_manifest.py")),
        set(GATE_MODES),
    )  # fmt: skip
    assert not modes, "gate mode names spelled outside the policy and the manifest schema:\n" + "\n".join(modes)
    backends = _spelled(_sources("flows"), set(EXPERT_BACKENDS))
    assert not backends, "backend names spelled in flows:\n" + "\n".join(backends)
    # The checks see a name where it is compared.
    probe = tmp_path / "probe.py"
    probe.write_text('"""Says contrastive in its docstring only."""\nif mode == "contrastive":\n    pass\n')
    assert _spelled([probe], set(GATE_MODES)) == ["probe.py:2 'contrastive'"]
