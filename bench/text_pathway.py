"""Does a trained text-guided model read its captions? Gradients into DMTE and LQGA, the gates, and the effect of
shuffled captions.

For a text-guided run (default: the caption headroom study's oracle run of seed 0), on a batch of its train tiles
with their own captions: the gradient norm of the segmentation loss per part of the model (DMTE, the LQGA query that
the text enters through, the rest of LQGA, the decoder, the adapter), the DMTE gates (how far the text gate opens,
0..1), and how much the logits move when each tile reads another tile's captions instead (relative L2 change, and the
share of pixels whose predicted class changes). A model that ignores its captions has gradients into the text path
near zero, and predictions that shuffled captions leave unchanged.
Usage: ``python bench/text_pathway.py [--run RUN] [--store STORE] [--tiles 16]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "data" / "bench" / "caption_headroom"
PARTS = ("dmte", "lqga_query", "lqga_rest", "decoder", "adapter", "backbone")


def part_of(name: str) -> str | None:
    """The part of the model a parameter belongs to (None for the others)."""
    if name.startswith("lqga."):
        return "lqga_query" if ".query." in name else "lqga_rest"
    return next((part for part in PARTS if name.startswith(f"{part}.")), None)


def batch(trained, tiles: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The first ``tiles`` labelled train tiles: ids, images in [0, 1] and labels."""
    rows = trained.index.split("train")
    rows = rows[rows["label_path"].notna()].head(tiles)
    images, labels = [], []
    for row in rows.itertuples(index=False):
        with Image.open(trained.index.path(row.image_path)) as image:
            images.append(torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).float() / 255)
        with Image.open(trained.index.path(row.label_path)) as label:
            labels.append(torch.from_numpy(np.asarray(label).astype(np.int64)))
    return list(rows["tile_id"]), torch.stack(images), torch.stack(labels)


def text_of(features, tile_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [features.lookup(tile) for tile in tile_ids]
    return torch.stack([text for text, _ in pairs]), torch.stack([present for _, present in pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=WORK / "data/demo/bench_runs/headroom_oracle_seed0")
    parser.add_argument("--store", type=Path, default=WORK / "data/demo/captions_headroom_oracle")
    parser.add_argument("--tiles", type=int, default=16)
    args = parser.parse_args()

    from segmenter.engine.options import InferenceSettings, WindowSettings
    from segmenter.engine.runs import open_run

    trained = open_run(args.run, InferenceSettings(device="cpu"))
    model = trained.model.train()
    features = trained.text_features(args.store, WindowSettings(device="cpu"))
    tile_ids, images, labels = batch(trained, args.tiles)
    text, present = text_of(features, tile_ids)
    output = model(images, text, present)
    loss = F.cross_entropy(output.logits, labels, ignore_index=trained.index.ignore_index)
    model.zero_grad()
    loss.backward()
    norms = dict.fromkeys(PARTS, 0.0)
    for name, parameter in model.named_parameters():
        part = part_of(name)
        if part is not None and parameter.grad is not None:
            norms[part] += float(parameter.grad.norm() ** 2)
    print(f"run {args.run.name}, {len(tile_ids)} train tiles, loss {float(loss.detach()):.3f}")
    print("gradient norm per part: " + ", ".join(f"{part} {value**0.5:.2e}" for part, value in norms.items()))
    print(f"DMTE gates: mean {float(output.gates.detach().mean()):.3f}, range {float(output.gates.detach().min()):.3f}-"
          f"{float(output.gates.detach().max()):.3f}; DMTE weights {model.dmte.weights.detach().tolist()}")  # fmt: skip
    model.eval()
    with torch.no_grad():
        own = model(images, text, present).logits
        shuffled = model(images, text.roll(1, 0), present.roll(1, 0)).logits
        zero = model(images, torch.zeros_like(text), present).logits
    for label, other in (("shuffled captions", shuffled), ("zero text features", zero)):
        change = float((other - own).norm() / own.norm())
        flipped = float((other.argmax(1) != own.argmax(1)).float().mean())
        print(f"{label}: logits change {change:.2e} (relative L2), {flipped:.2%} of pixels change class")


if __name__ == "__main__":
    main()
