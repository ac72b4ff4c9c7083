"""The segmenter model on random tensors: every preset (with tiny parts), SWDA, DMTE, LQGA, save/load."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch

from segmenter.model import MPerSSegmenter, build_model, list_presets, preset_config
from segmenter.model.dmte import DynamicTextExperts
from segmenter.model.lqga import mean_normalize
from segmenter.model.swda import swda, swda_reference

TINY = {"backbone": "vit_tiny_patch16_dinov3_qkvb", "backbone_pretrained": False, "dim": 32, "ldpe_width": 8,
        "adapter_heads": 4, "adapter_depth": 1, "dmte_heads": 4, "lqga_heads": 4}  # fmt: skip
EXPERTS = ["llava", "gpt4o", "qwen"]


def tiny(name: str):
    """A preset with tiny components; what makes it that preset (adapter, r, decoder, stages, text on/off) stays."""
    config = preset_config(name)
    text = {"text_encoder": "test-tiny-clip", "text_dim": 32, "experts": EXPERTS} if config.uses_text else {}
    return config.model_copy(update={**TINY, **text})


def run(model: MPerSSegmenter, batch: int = 2, size: int = 64):
    torch.manual_seed(1)
    images = torch.rand(batch, 3, size, size)
    if not model.config.uses_text:
        return model(images)
    text = torch.randn(batch, len(model.config.experts), model.config.text_dim)
    present = torch.ones(batch, len(model.config.experts), dtype=torch.bool)
    present[0, 1] = False
    return model(images, text, present)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_shapes_and_gradients(name):
    model = build_model(tiny(name))
    output = run(model, size=64 if name != "test_tiny" else 96)
    size = 64 if name != "test_tiny" else 96
    assert output.logits.shape == (2, model.config.num_classes, size, size)
    output.logits.logsumexp(1).mean().backward()
    assert all(p.grad is None for p in model.backbone.vit.parameters())
    trainable = {"pyramid": model.backbone.pyramid, "decoder": model.decoder}
    if model.ldpe is not None:
        trainable["ldpe"] = model.ldpe
    if model.config.adapter != "none":
        trainable["adapter"] = model.adapter
    if model.config.uses_text:
        trainable["dmte"] = model.dmte
        trainable["lqga"] = model.lqga
        assert output.gates.shape == (2, 3) and output.gates[0, 1] == 0
    for part, module in trainable.items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part


def test_paper_preset_is_the_paper_model():
    config = preset_config("mpers_vitl16")
    assert config.backbone == "vit_large_patch16_dinov3.lvd1689m" and config.adapter == "swda"
    assert (config.dilation, config.decoder, config.lqga_stages, config.text_encoder) == (
        1,
        "unet",
        [4],
        "clip-vit-b16",
    )
    assert config.experts == []  # a run takes its experts from the caption store
    assert preset_config("mpers_vitl16_dmte_s34").lqga_stages == [3, 4]


def test_a_text_guided_model_without_experts_is_refused():
    with pytest.raises(ValueError, match="names no experts: they come from the caption store"):
        build_model("test_tiny")


def test_saved_config_rebuilds_the_same_logits(tmp_path):
    model = build_model("test_tiny", experts=EXPERTS).eval()
    expected = run(model).logits
    MPerSSegmenter.load(model.save(tmp_path / "run")).eval()
    reloaded = MPerSSegmenter.load(tmp_path / "run").eval()
    torch.testing.assert_close(run(reloaded).logits, expected)


def test_backbone_weights_from_a_local_file_through_timm(tmp_path):
    """The real loading path: a DINOv3 checkpoint file given to timm via pretrained_cfg_overlay."""
    donor = timm.create_model("vit_tiny_patch16_dinov3_qkvb", pretrained=False, num_classes=0)
    from safetensors.torch import save_file

    save_file(donor.state_dict(), str(tmp_path / "dinov3_tiny.safetensors"))
    model = build_model("test_tiny", experts=EXPERTS, backbone_file=str(tmp_path / "dinov3_tiny.safetensors")).eval()
    for name, tensor in donor.state_dict().items():
        torch.testing.assert_close(model.backbone.vit.state_dict()[name], tensor)
    folder = model.save(tmp_path / "run")
    from safetensors.torch import load_file

    assert not any(key.startswith("backbone.vit.") for key in load_file(str(folder / "model.safetensors")))
    torch.testing.assert_close(run(MPerSSegmenter.load(folder).eval()).logits, run(model).logits)


@pytest.mark.parametrize(("dilation", "size"), list(itertools.product([1, 2, 3], [(7, 9), (8, 8), (5, 12)])))
def test_swda_equals_the_unfold_reference(dilation, size):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, *size, requires_grad=True) for _ in range(3))
    fast = swda(q, k, v, 3, dilation)
    reference = swda_reference(q, k, v, 3, dilation)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    # interior and border pixels both covered: the border is where zero padding enters the softmax
    torch.testing.assert_close(fast[..., 0, 0], reference[..., 0, 0], atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, (q, k, v), grad)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad)
    for a, b in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_swda_gradcheck_in_float64():
    q, k, v = (torch.randn(1, 2, 3, 5, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: swda(q, k, v, 3, 2), (q, k, v))


def test_dmte_with_a_masked_expert_equals_dmte_without_it():
    torch.manual_seed(0)
    full = DynamicTextExperts(dim=16, n_experts=3, heads=4).eval()
    reduced = DynamicTextExperts(dim=16, n_experts=2, heads=4).eval()
    keep = [0, 2]
    state = full.state_dict()
    state["gate.weight"], state["gate.bias"] = state["gate.weight"][keep], state["gate.bias"][keep]
    state["weights"] = state["weights"][keep]
    reduced.load_state_dict(state)
    tokens = torch.randn(4, 3, 16)
    mask = torch.tensor([[True, False, True]] * 4)
    fused, gates = full(tokens, mask)
    fused_reduced, gates_reduced = reduced(tokens[:, keep], torch.ones(4, 2, dtype=torch.bool))
    torch.testing.assert_close(fused, fused_reduced)
    torch.testing.assert_close(gates[:, keep], gates_reduced)
    assert (gates[:, 1] == 0).all()


def test_dmte_without_any_expert_gives_zero_text():
    dmte = DynamicTextExperts(dim=8, n_experts=3, heads=2)
    fused, gates = dmte(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(fused).all() and (fused == 0).all() and (gates == 0).all()


def test_mean_normalisation_bounds_the_channel_weights():
    weights = mean_normalize(torch.randn(3, 64) * 10)
    assert weights.abs().max() <= 1 and torch.allclose(weights.mean(-1), torch.zeros(3), atol=1e-6)


def test_a_checkpoint_is_loaded_only_as_it_was_saved(tmp_path):
    """Corrupted, replaced, unrecorded or non-finite weights are refused with one line, never evaluated."""
    import json

    from safetensors.torch import load_file, save_file

    from manifests.atomic import sha256_file
    from manifests.errors import InputError

    folder = build_model("test_tiny_notext").save(tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    MPerSSegmenter.load(folder)  # as saved: accepted

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model.safetensors: SHA-256 .* differs from the .* recorded"):
        MPerSSegmenter.load(folder)

    nan = build_model("test_tiny_notext").save(tmp_path / "nan") / "model.safetensors"
    state = load_file(str(nan))
    name = next(name for name, value in state.items() if value.is_floating_point())
    state[name][..., 0] = float("nan")
    save_file(state, str(nan))  # weights save() would never write, with a record that matches them
    (nan.parent / "checksums.json").write_text(json.dumps({"model.safetensors": sha256_file(nan)}))
    with pytest.raises(InputError, match=rf"non-finite weights \(NaN or inf\) in 1 tensor\(s\), e.g. {name}"):
        MPerSSegmenter.load(tmp_path / "nan")

    (tmp_path / "nan" / "checksums.json").unlink()
    with pytest.raises(InputError, match=r"no checksums.json beside it"):
        MPerSSegmenter.load(tmp_path / "nan")


def _gate_by_hand(gate, features: torch.Tensor, text: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One LQGA level written out: w = xi(softmax(q K^T / sqrt(d)) V), F' = w F + F, Z = Conv1x1([F', f])."""
    batch, dim, height, width = features.shape
    heads, head_dim = gate.heads, dim // gate.heads
    q = (text @ gate.query.weight.T + gate.query.bias).view(batch, heads, 1, head_dim)
    keys = torch.einsum("oc,bchw->bohw", gate.key.weight[:, :, 0, 0], features) + gate.key.bias.view(1, -1, 1, 1)
    values = torch.einsum("oc,bchw->bohw", gate.value.weight[:, :, 0, 0], features)
    values = values + gate.value.bias.view(1, -1, 1, 1)
    k = keys.reshape(batch, heads, head_dim, height * width)
    v = values.reshape(batch, heads, head_dim, height * width)
    attention = torch.softmax((q @ k) / head_dim**0.5, dim=-1)
    a = (attention @ v.transpose(-1, -2)).reshape(batch, dim)
    w = (a - a.mean(-1, keepdim=True)) / (a.max(-1, keepdim=True).values - a.min(-1, keepdim=True).values + 1e-6)
    gated = w[:, :, None, None] * features + features
    stacked = torch.cat([gated, context], dim=1)
    fuse = gate.fuse.weight[:, :, 0, 0]
    return torch.einsum("oc,bchw->bohw", fuse, stacked) + gate.fuse.bias.view(1, -1, 1, 1)


def test_lqga_stages_are_chained_deepest_first():
    """Stage 3 + Stage 4 (Table 4): stage 4 gates its own feature; stage 3 concatenates stage 4's Z, upsampled."""
    from segmenter.model.lqga import ChainedLanguageQueryGates

    torch.manual_seed(0)
    chain = ChainedLanguageQueryGates([3, 4], dim=8, text_dim=6, heads=2)
    pyramid = [torch.randn(2, 8, 16 // 2**i, 16 // 2**i) for i in range(4)]
    text = torch.randn(2, 6)
    out = chain(pyramid, text)
    z4 = _gate_by_hand(chain["4"], pyramid[3], text, pyramid[3])
    up = torch.nn.functional.interpolate(z4, size=pyramid[2].shape[-2:], mode="bilinear", align_corners=False)
    z3 = _gate_by_hand(chain["3"], pyramid[2], text, up)
    torch.testing.assert_close(out[3], z4)
    torch.testing.assert_close(out[2], z3)
    assert out[0] is pyramid[0] and out[1] is pyramid[1]
    # unchained (each level concatenating its own feature), stage 3 would differ
    assert not torch.allclose(out[2], _gate_by_hand(chain["3"], pyramid[2], text, pyramid[2]), atol=1e-4)


def test_single_stage_lqga_is_the_unchained_gate():
    """A single stage stays exactly what it was before chaining: Z = Conv1x1([F', F])."""
    from segmenter.model.lqga import ChainedLanguageQueryGates

    torch.manual_seed(0)
    chain = ChainedLanguageQueryGates([4], dim=8, text_dim=6, heads=2)
    pyramid = [torch.randn(1, 8, 8 // 2**i, 8 // 2**i) for i in range(4)]
    text = torch.randn(1, 6)
    torch.testing.assert_close(chain(pyramid, text)[3], chain["4"](pyramid[3], text), rtol=0, atol=1e-6)
    torch.testing.assert_close(chain(pyramid, text)[3], _gate_by_hand(chain["4"], pyramid[3], text, pyramid[3]))
    assert [key.split(".")[0] for key in chain.state_dict()] == ["4"] * len(chain.state_dict())


def test_the_paper_presets_query_with_one_lqga_head():
    """LQGA as the method writes it, w = xi(softmax(q K^T / sqrt(d)) V): one query-key product over all channels."""
    from segmenter.model.lqga import LanguageQueryGate

    paper = [name for name in list_presets() if name.startswith(("mpers_", "dinov3_"))]
    assert paper and all(preset_config(name).lqga_heads == 1 for name in paper)
    assert preset_config("mpers_vitl16", lqga_heads=8).lqga_heads == 8  # `segmenter train --lqga-heads 8`
    torch.manual_seed(0)
    gate = LanguageQueryGate(dim=8, text_dim=6, heads=1).eval()
    features, text = torch.randn(2, 8, 5, 4), torch.randn(2, 6)
    q = gate.query(text)  # (B, d)
    keys, values = gate.key(features).flatten(2), gate.value(features).flatten(2)  # (B, d, HW)
    attention = torch.softmax(torch.einsum("bd,bdn->bn", q, keys) / 8**0.5, dim=-1)
    weights = mean_normalize(torch.einsum("bn,bdn->bd", attention, values))[..., None, None]
    expected = gate.fuse(torch.cat([weights * features + features, features], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(gate(features, text), expected)
