"""The one protocol every expert backend follows: a batch of (tile image, prompt) requests in, captions out."""

from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import tifffile
from PIL import Image

from manifests.errors import InputError
from manifests.run_manifest import ExpertConfig

# Total characters of encoded data URLs kept in memory. A 512-px PNG tile is about 0.5 MiB of base64, so this holds
# several hundred tiles: enough for every prompt and attempt of the chunks in flight to reuse one encoding.
DATA_URL_CACHE_BYTES = 256 * 2**20


class ExpertUnavailable(InputError):
    """An expert that cannot answer any request of this run.

    A rejected key, an unknown model or URL, a request field the server refuses: ``generate`` raises it instead of
    recording one failed result per request, and the run stops. Retrying cannot help, so callers must not retry it.
    """


class SamplingSettings(Protocol):
    """What an expert's settings say about decoding (``manifests.run_manifest``'s model experts have it all)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float


@dataclass(frozen=True)
class Sampling:
    """The whole decoding of one request, every field explicit, so no backend or server fills one in from the
    model's ``generation_config.json`` (vLLM's OpenAI server does for every field a request leaves unset:
    ``ChatCompletionRequest.to_sampling_params``, "user -> server default -> OpenAI default"; Qwen2.5-VL's would
    make sampled re-prompts greedy with ``top_k`` 1 and add a repetition penalty).

    Attributes:
        temperature: 0 is greedy.
        seed: the request's seed (None: none asked).
        top_p: nucleus share, 1 is off.
        top_k: top-k cut, 0 is off.
        min_p: min-p cut, 0 is off.
        repetition_penalty: 1 is off; it applies to greedy decoding too.
    """

    temperature: float
    seed: int | None
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float

    def vllm_fields(self) -> dict[str, float | int]:
        """The fields as vLLM's ``SamplingParams`` and its OpenAI server (and SGLang's) name them, seed left out
        where none was asked. An off top-k is sent as -1: older vLLM releases refuse 0 (vllm-project/vllm#17553, on
        0.8.5), current ones take -1 as off ("quietly accept -1 as disabled" in ``SamplingParams._verify_args``)."""
        fields: dict[str, float | int] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or -1,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.seed is not None:
            fields["seed"] = self.seed
        return fields


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
    plurals: Mapping[str, str] = field(default_factory=dict)  # classes counted as objects (the class vocabulary)
    ignore_index: int = 255
    temperature: float | None = None
    seed: int | None = None

    def decoding(self, default_temperature: float) -> tuple[float, int | None]:
        """(temperature, seed) of this request, the backend's configured temperature where none was asked."""
        return (default_temperature if self.temperature is None else self.temperature), self.seed

    def sampling(self, settings: SamplingSettings) -> Sampling:
        """The whole decoding of this request: its temperature and seed, the expert's other sampling settings."""
        temperature, seed = self.decoding(settings.temperature)
        return Sampling(temperature, seed, settings.top_p, settings.top_k, settings.min_p, settings.repetition_penalty)


@dataclass(frozen=True)
class CaptionResult:
    """What an expert made of one request. A failed request has ``caption=None`` and an ``error``."""

    caption: str | None
    finish_reason: str | None
    n_generated: int | None
    latency_s: float
    error: str | None = None


class Expert(Protocol):
    """A multimodal LLM behind some backend.

    A backend's expert class subclasses this protocol explicitly, inheriting the defaults below, and is declared with
    its settings class in ``manifests.run_manifest.EXPERT_BACKENDS``; what the flows need to know of a backend they
    ask the class (:attr:`runs_alone`, :meth:`preflight`), never its name.
    """

    name: str
    model: str | None
    backend: str
    # Whether a re-prompt can change the answer: False for an expert that writes the same caption from the same
    # input whatever the wording and seed (the annotation expert), which the gate then never re-prompts.
    reprompts: bool = True
    # Whether the expert describes a tile's class mask rather than its image (the annotation expert): the gate then
    # skips splits whose class source is none, fails a tile without a mask, and records the mask's class source.
    needs_class_mask: bool = False
    # Requests per chunk for an expert that serves a batch concurrently (the HTTP backend): the gate keeps two chunks
    # in flight so CLIP scores one while the next is generated. None: the gate sends the whole batch at once.
    pipeline_chunk: int | None = None
    # Whether the expert is an in-process engine that takes most of the GPU (vLLM): the flow runs such experts one
    # after another and releases each before the next starts; the others run alongside from the start.
    runs_alone: ClassVar[bool] = False

    @classmethod
    def holds_gpu(cls, config: ExpertConfig) -> bool:
        """Whether the expert keeps a model on a GPU of the process that runs it (an in-process engine, a model on
        CUDA): a local Dask cluster then starts one worker per GPU, not one per CPU. The default: no.

        Raises:
            InputError: a device setting that names no device of this machine.
        """
        return False

    @classmethod
    def preflight(cls, config: ExpertConfig) -> None:
        """Refuse, before a run starts and any model loads, what cannot work for this expert (an API key not set,
        weights not found); the default checks nothing.

        Raises:
            InputError: one line naming the expert and what to do.
        """

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """Captions for ``requests``, in order; a failed request gives a result with an error.

        Raises:
            ExpertUnavailable: the expert cannot serve any request (backends that talk to a server only).
        """
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


class DataUrlCache:
    """A thread-safe least-recently-used cache of encoded data URLs, bounded by their total length.

    A tile is sent once per prompt and attempt, so its encoding is reused; an entry is valid while the file's
    mtime and size are those it was encoded from, and a changed file replaces its old entry rather than leaving it
    to age out. An encoding longer than the whole bound is returned but never stored.

    Args:
        max_bytes: the most characters (bytes: the URLs are ASCII) of data URL kept at once.
    """

    def __init__(self, max_bytes: int = DATA_URL_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[str, int], tuple[tuple[int, int], str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: Path, max_side: int) -> str:
        """The data URL of ``path`` shrunk to ``max_side``, encoded now unless an up-to-date copy is cached."""
        stat = path.stat()
        key, stamp = (str(path), max_side), (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == stamp:
                self._entries.move_to_end(key)
                return entry[1]
        # Encoding runs outside the lock so caller threads encode different tiles in parallel; two threads that
        # miss on the same tile both encode it and the second store wins, which costs time, never correctness.
        url = _encode(path, max_side)
        with self._lock:
            stale = self._entries.pop(key, None)
            if stale is not None:
                self.nbytes -= len(stale[1])
            if len(url) <= self.max_bytes:
                self._entries[key] = (stamp, url)
                self.nbytes += len(url)
                while self.nbytes > self.max_bytes:
                    _, (_, evicted) = self._entries.popitem(last=False)
                    self.nbytes -= len(evicted)
        return url


_DATA_URLS = DataUrlCache()


def image_data_url(path: Path, max_side: int) -> str:
    """The image as a base64 PNG data URL, resized first: what OpenAI-compatible servers accept.

    Encodings are cached (see :class:`DataUrlCache`), up to ``DATA_URL_CACHE_BYTES`` in all.
    """
    return _DATA_URLS.get(path, max_side)


def _encode(path: Path, max_side: int) -> str:
    buffer = io.BytesIO()
    load_image(path, max_side).save(buffer, format="PNG")
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
