"""The three MPerS prompt templates, their refined re-prompts, and where their class lists come from."""

from __future__ import annotations

from dataclasses import dataclass

from manifests.errors import InputError
from manifests.run_manifest import PromptConfig

TEMPLATES: dict[str, str] = {
    "p1": "This image contains the following land cover types: {classes}. Describe the image in one sentence.",
    "p2": "This image contains: {proportions}. Describe the image in one sentence, following these proportions.",
    "p3": (
        "Please describe the RS image in natural language in one concise paragraph, including its approximate "
        "location and spatial relationships."
    ),
}
# Without a class source, P1 and P2 ask for the classes instead of stating them.
AGNOSTIC_TEMPLATES: dict[str, str] = {
    "p1": "Which land cover types does this aerial image contain? Answer with one sentence that lists them.",
    "p2": "Which land cover types does this aerial image contain, and roughly what share of the image does each "
    "cover? Answer with one sentence.",
}
REFINEMENT = (
    " Be specific: name the number of objects of each category (buildings, trees, cars, roads) and where they are "
    "in the image (north, south-east, centre, ...)."
)
REFINEMENT_WITH_CLASSES = " The image contains {proportions}."


def readable(class_name: str) -> str:
    return class_name.replace("_", " ")


@dataclass(frozen=True)
class TileClasses:
    """What a prompt may say about a tile's classes, and where that came from."""

    source: str  # labels | predictions | none
    fractions: dict[str, float]

    @property
    def present(self) -> list[str]:
        ranked = sorted(self.fractions.items(), key=lambda item: -item[1])
        return [name for name, share in ranked if share > 0]

    def proportions(self) -> str:
        ranked = sorted(self.fractions.items(), key=lambda item: -item[1])
        return ", ".join(f"{readable(name)} ({share * 100:.0f}%)" for name, share in ranked if share > 0)


def build_prompt(prompt_id: str, classes: TileClasses, attempt: int = 0, override: str | None = None) -> str:
    """The text of ``prompt_id`` for a tile; ``attempt`` > 0 gives the refined re-prompt."""
    known = classes.source != "none" and bool(classes.present)
    template = override or (TEMPLATES[prompt_id] if known or prompt_id == "p3" else AGNOSTIC_TEMPLATES[prompt_id])
    text = template.format(
        classes=", ".join(readable(name) for name in classes.present), proportions=classes.proportions()
    )
    if attempt > 0:
        text += REFINEMENT_WITH_CLASSES.format(proportions=classes.proportions()) if known else ""
        text += REFINEMENT
    return text


def class_source_for(split: str, config: PromptConfig) -> str:
    """The class source of a split, refusing ground truth on evaluation splits unless opted in.

    Raises:
        InputError: labels are asked for on an evaluation split without ``allow_labels_on_eval``, or
            predictions are asked for (not available until the segmenter writes them).
    """
    source = config.class_source.get(split, "none")
    if source == "predictions":
        raise InputError(
            f"captions.prompts.class_source: '{split}: predictions' needs class fractions predicted by the segmenter, "
            "which `segmenter predict` does not write yet; use labels or none"
        )
    if source == "labels" and split in config.eval_splits and not config.allow_labels_on_eval:
        raise InputError(
            f"captions.prompts.class_source: '{split}' is an evaluation split; prompts built from its labels leak "
            "the ground truth (set allow_labels_on_eval: true to opt in)"
        )
    return source
