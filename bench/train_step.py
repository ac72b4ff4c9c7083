"""Training step time of the text-guided preset against the no-text preset and against a variant that runs the
frozen text encoder inside every step (the cost the text-feature cache removes). Printed as ratios from one run.
Target: text-guided / no-text <= 1.15 with cached text features.

On a GPU the paper's preset (``mpers_vitl16``: DINOv3 ViT-L/16, CLIP ViT-B/16 text) runs at 512 px, batch 8,
bf16 autocast, random weights (timing only); on a CPU ``test_tiny`` runs at 256 px.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

CAPTION = ("An aerial image with 12 buildings mostly in the north-west; impervious surfaces (31%) across the image; "
           "trees (14%) in the east; 4 cars on the roads in the south.")  # fmt: skip


def timed_steps(model, batch: dict, encoder, steps: int, device: str) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    use_amp = device == "cuda"
    times = []
    for index in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        text = batch.get("text")
        if encoder is not None:  # encode 3 experts x 3 prompts per tile, as an uncached run would
            captions = [CAPTION] * (batch["image"].shape[0] * 9)
            text = encoder.encode(captions).view(batch["image"].shape[0], 3, 3, -1).mean(2).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_amp):
            output = model(batch["image"], text, batch["present"]) if model.config.uses_text else model(batch["image"])
            loss = F.cross_entropy(output.logits.float(), batch["label"], ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= 2:  # two warm-up steps
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    from segmenter.model import build_model
    from segmenter.text import TextEncoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    preset, size, batch_size = ("mpers_vitl16", 512, 8) if gpu else ("test_tiny", 256, 8)
    overrides = {"backbone_pretrained": False} if gpu else {}
    encoder_id = "clip-vit-b16" if gpu else "test-tiny-clip"
    torch.manual_seed(0)
    guided = build_model(preset, experts=["llava", "gpt4o", "qwen"], **overrides).to(args.device)  # the paper's M = 3
    plain = build_model(f"{preset}_notext", **overrides).to(args.device)
    if gpu:
        guided, plain = (m.to(memory_format=torch.channels_last) for m in (guided, plain))
    experts, dim = len(guided.config.experts), guided.config.text_dim
    batch = {
        "image": torch.rand(batch_size, 3, size, size, device=args.device),
        "label": torch.randint(0, 6, (batch_size, size, size), device=args.device),
        "text": torch.randn(batch_size, experts, dim, device=args.device),
        "present": torch.ones(batch_size, experts, dtype=torch.bool, device=args.device),
    }
    encoder = TextEncoder(encoder_id, device=args.device, random_weights=gpu)
    t_plain = timed_steps(plain, batch, None, args.steps, args.device)
    t_guided = timed_steps(guided, batch, None, args.steps, args.device)
    t_uncached = timed_steps(guided, batch, encoder, args.steps, args.device)
    print(f"{preset} at {size} px, batch {batch_size}, {args.device}; median of {args.steps} steps")
    print(f"no text            : {t_plain * 1e3:8.1f} ms/step")
    print(f"text, cached       : {t_guided * 1e3:8.1f} ms/step  ({t_guided / t_plain:.3f} of no text)")
    print(f"text, encoder/step : {t_uncached * 1e3:8.1f} ms/step  ({t_uncached / t_plain:.3f} of no text, "
          f"{t_uncached / t_guided:.3f} of cached)")  # fmt: skip


if __name__ == "__main__":
    main()
