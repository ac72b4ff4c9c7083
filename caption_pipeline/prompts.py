"""The three MPerS prompt templates and their attempt-dependent re-prompts (class sources: PromptConfig.source_for)."""

from __future__ import annotations

from dataclasses import dataclass

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
# Re-prompts: attempt 1 states the proportions (where the class source allows) and asks for specifics; attempt 2 asks
# for counts and positions per class in other words; later attempts cycle through further wordings and name their
# attempt, so no two attempts of one key send the same text (the sampling seed differs too: seed = attempt).
PROPORTIONS_HINT = " The image contains {proportions}."
CLASSES_HINT = " The land cover types present are {classes}."
# No class names and no numbers in these: under protocol blind a prompt must carry no class information, and an
# example such as "buildings, cars" invites the model to report classes the tile may not have.
REFINEMENTS: tuple[str, ...] = (
    " Be specific: name the number of objects of each kind you see and where they are in the image (north, "
    "south-east, centre, ...).",
    " For every land cover type, count the separate objects or patches you see and give the position of each one "
    "(for example: two in the north-west, one near the centre).",
    " Go through the image region by region, from the north-west corner to the south-east corner, and say which "
    "objects lie in each region and how many there are.",
    " Describe the layout: which objects are next to, around or between which others, how many there are of each "
    "kind and roughly where in the frame.",
)
CYCLE_NOTE = " (Re-description {attempt}: choose different words from any earlier answer.)"


def readable(class_name: str) -> str:
    """A class name as words (``low_vegetation`` -> ``low vegetation``)."""
    return class_name.replace("_", " ")


@dataclass(frozen=True)
class TileClasses:
    """What a prompt may say about a tile's classes, and where that came from."""

    source: str  # labels | predictions | none
    fractions: dict[str, float]

    @property
    def present(self) -> list[str]:
        """The classes with a share above zero, the largest first."""
        ranked = sorted(self.fractions.items(), key=lambda item: -item[1])
        return [name for name, share in ranked if share > 0]

    def proportions(self) -> str:
        """``class (NN%), ...`` of the present classes, the largest first."""
        ranked = sorted(self.fractions.items(), key=lambda item: -item[1])
        return ", ".join(f"{readable(name)} ({share * 100:.0f}%)" for name, share in ranked if share > 0)


def refinement(classes: TileClasses, attempt: int) -> str:
    """What re-prompt ``attempt`` (>= 1) appends to the template: different text for every attempt."""
    known = classes.source != "none" and bool(classes.present)
    hint = ""
    if known:
        # Attempt 1 states the proportions; later ones alternate the class list and the proportions.
        if attempt % 2 == 0:
            hint = CLASSES_HINT.format(classes=", ".join(readable(name) for name in classes.present))
        else:
            hint = PROPORTIONS_HINT.format(proportions=classes.proportions())
    text = hint + REFINEMENTS[(attempt - 1) % len(REFINEMENTS)]
    if attempt > len(REFINEMENTS):  # a wording comes round again: the attempt number keeps the text unique
        text += CYCLE_NOTE.format(attempt=attempt)
    return text


def build_prompt(prompt_id: str, classes: TileClasses, attempt: int = 0, override: str | None = None) -> str:
    """The text of ``prompt_id`` for a tile; ``attempt`` > 0 gives that attempt's re-prompt.

    Args:
        prompt_id: ``p1``, ``p2`` or ``p3``.
        classes: what the prompt may say about the tile's classes (its source decides; ``none`` states nothing).
        attempt: the attempt number of the (tile, expert, prompt) key; every attempt gets its own wording.
        override: a per-expert template with ``{classes}`` and ``{proportions}`` placeholders.
    """
    known = classes.source != "none" and bool(classes.present)
    template = override or (TEMPLATES[prompt_id] if known or prompt_id == "p3" else AGNOSTIC_TEMPLATES[prompt_id])
    text = template.format(
        classes=", ".join(readable(name) for name in classes.present), proportions=classes.proportions()
    )
    return text + refinement(classes, attempt) if attempt > 0 else text
