"""Tiny random-weight stand-ins for the real models, built offline and saved in the real formats.

They go through the same loading paths as real weights (``from_pretrained`` on a folder, open_clip with a
JSON config and a checkpoint), so tests and the demo exercise the real code without any download. Their
captions are gibberish and their CLIP scores are noise: they prove plumbing, not quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

from caption_pipeline.clip_models import register_tiny_config

CORPUS = (
    "An aerial image with buildings, trees, low vegetation, impervious surfaces, cars and clutter. "
    "Roads cross the scene from north to south; roofs in the north-west; trees in the east; 3 cars."
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{IMAGE}{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_clip(folder: Path, name: str = "demo-tiny-clip", seed: int = 0) -> tuple[Path, Path]:
    """Write ``<name>.json`` (an open_clip config) and ``<name>.pt`` (its state dict) into ``folder``."""
    import open_clip

    config_path = register_tiny_config(name, folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    checkpoint = folder / f"{name}.pt"
    torch.save(model.state_dict(), checkpoint)
    return config_path, checkpoint


def _tokenizer(special: list[str], image_token_text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([CORPUS] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{IMAGE}", image_token_text)
    return tokenizer


def _seeded_model(cls, config, ids: dict[str, int], seed: int):
    """A random model that stops at ``<|im_end|>`` and pads with ``<|endoftext|>``, as the chat template expects."""
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def _save(folder: Path, model, processor) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_qwen2_vl(folder: Path, seed: int = 0) -> Path:
    """A two-layer Qwen2-VL with a byte-level BPE trained offline, saved with ``save_pretrained``."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]  # fmt: skip
    tokenizer = _tokenizer(special, "<|vision_start|><|image_pad|><|vision_end|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
            "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    model = _seeded_model(Qwen2VLForConditionalGeneration, config, ids, seed)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    return _save(folder, model, processor)


def build_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A LLaVA-1.5-style model (CLIP vision tower + Llama) with a two-layer decoder, saved with ``save_pretrained``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tokenizer = _tokenizer(special, "<image>\n")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                       bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"])  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"],
                         vision_feature_layer=-2, image_seq_length=4)  # fmt: skip
    model = _seeded_model(LlavaForConditionalGeneration, config, ids, seed)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               chat_template=tokenizer.chat_template, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default")  # fmt: skip
    return _save(folder, model, processor)
