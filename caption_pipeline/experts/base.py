"""The one protocol every expert backend follows: a batch of (tile image, prompt) requests in, captions out."""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import tifffile
from PIL import Image


@dataclass(frozen=True)
class CaptionRequest:
    """One caption to generate.

    ``label_path`` is the class-index mask the class source allows: the label (source ``labels``), the predicted
    mask (source ``predictions``) or None. ``temperature`` and ``seed`` are the decoding of this attempt (the gate
    sets them: the expert's temperature on attempt 0, the re-prompt temperature with ``seed = attempt`` later);
    None means the backend's configured temperature and no seed. Backends that cannot honour them (``annotation``,
    deterministic) ignore them.
    """

    tile_id: str
    image_path: Path
    prompt: str
    prompt_id: str = "p3"
    label_path: Path | None = None
    class_names: tuple[str, ...] = ()
    ignore_index: int = 255
    temperature: float | None = None
    seed: int | None = None

    def decoding(self, default_temperature: float) -> tuple[float, int | None]:
        """(temperature, seed) of this request, the backend's configured temperature where none was asked."""
        return (default_temperature if self.temperature is None else self.temperature), self.seed


@dataclass(frozen=True)
class CaptionResult:
    """What an expert made of one request. A failed request has ``caption=None`` and an ``error``."""

    caption: str | None
    finish_reason: str | None
    n_generated: int | None
    latency_s: float
    error: str | None = None


class Expert(Protocol):
    """A multimodal LLM behind some backend."""

    name: str
    model: str | None
    backend: str
    # Whether a re-prompt can change the answer: False for an expert that writes the same caption from the same
    # input whatever the wording and seed (the annotation expert), which the gate then never re-prompts.
    reprompts: bool

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """Captions for ``requests``, in order; a failed request gives a result with an error, never an exception."""
        ...


def load_image(path: Path, max_side: int | None = None) -> Image.Image:
    """An RGB image (the first three bands of a multi-band crop), shrunk so its longest side is ``max_side``."""
    if path.suffix.lower() in (".tif", ".tiff"):
        image = Image.fromarray(np.asarray(tifffile.imread(path))[..., :3])
    else:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def image_data_url(path: Path, max_side: int) -> str:
    """The image as a base64 PNG data URL, resized first: what OpenAI-compatible servers accept.

    A tile is sent once per prompt and attempt, so the encoding is cached (keyed by path, mtime and size).
    """
    return _encoded(str(path), path.stat().st_mtime_ns, max_side)


@functools.lru_cache(maxsize=2048)
def _encoded(path: str, mtime_ns: int, max_side: int) -> str:
    buffer = io.BytesIO()
    load_image(Path(path), max_side).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(request: CaptionRequest, image_url: str) -> list[dict]:
    """One user turn with the image and the prompt, in the OpenAI chat format (also what ``vllm.LLM.chat`` takes)."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": request.prompt},
            ],
        }
    ]
