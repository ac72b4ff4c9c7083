"""The dataset options of ``segmenter prepare``: flags that name the fields of a manifest's ``dataset`` section.

Every dataset setting is a flag (``--modality`` is ``dataset.modality``, ``--train`` a list of
``dataset.custom_splits.train``, ...), so a first ``prepare`` needs no YAML; the settings are then checked by the same
models as a manifest, and a refusal names the flag, with every line of the reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from manifests.errors import InputError
from manifests.run_manifest import DATASET_SETTINGS, DatasetConfig, dataset_config

# The flag of each field whose name is not the flag's (``--`` + the field with dashes).
FIELD_FLAGS = {"name": "--dataset", "custom_splits": "--train/--val/--test/--split-file", "coarse": "--coarse/--fine"}
CUSTOM_SPLITS = ("train", "val", "test")
_HEX = re.compile(r"#?([0-9a-fA-F]{6})")


def flag(field: str) -> str:
    """The ``prepare`` flag that sets the dataset field ``field``."""
    return FIELD_FLAGS.get(field, "--" + field.replace("_", "-"))


def values(items: list[str] | None) -> list[str] | None:
    """A repeatable option's values, each also split at commas (``--towns 01,02 --towns 05``); None when not given."""
    if not items:
        return None
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def colour(text: str, option: str) -> list[int]:
    """``#0000ff`` (or ``0000ff``) as ``[0, 0, 255]``.

    Raises:
        InputError: not six hex digits, naming ``option``.
    """
    match = _HEX.fullmatch(text.strip())
    if match is None:
        raise InputError(f"{option}: '{text}' is not a colour (expected #RRGGBB, e.g. #0000ff)")
    digits = match.group(1)
    return [int(digits[i : i + 2], 16) for i in (0, 2, 4)]


def class_specs(items: list[str] | None, mask_format: str | None) -> list[dict[str, Any]] | None:
    """``--classes``: ``name`` (index masks: the id is its position), ``name=ID`` or ``name=ID+ID`` (its ids),
    ``name=#RRGGBB`` (its colour in rgb masks, a display colour in index ones).

    Raises:
        InputError: an id that is not a whole number or a colour that is not ``#RRGGBB``, naming ``--classes``.
    """
    specs = []
    for item in values(items) or []:
        name, _, code = item.partition("=")
        spec: dict[str, Any] = {"name": name.strip()}
        if code.startswith("#") or (code and mask_format == "rgb"):
            spec["color"] = colour(code, "--classes")
        elif code:
            ids = code.split("+")
            if not all(part.strip().lstrip("-").isdigit() for part in ids):
                raise InputError(f"--classes: '{item}': expected name=ID, name=ID+ID or name=#RRGGBB")
            spec["ids"] = [int(part) for part in ids]
        specs.append(spec)
    return specs or None


def ignore_values(items: list[str] | None) -> list[int | list[int]] | None:
    """``--ignore``: no-data ids (``0``) or colours (``#000000``).

    Raises:
        InputError: a value that is neither, naming ``--ignore``.
    """
    found: list[int | list[int]] = []
    for item in values(items) or []:
        if item.lstrip("-").isdigit():
            found.append(int(item))
        else:
            found.append(colour(item, "--ignore"))
    return found or None


def split_file(path: Path) -> dict[str, list[str]]:
    """A custom split written down: a YAML mapping of split -> ids (a list, or ids separated by spaces or commas).

    Every id is read as text (``2_10`` stays ``2_10``).

    Raises:
        InputError: a missing or unreadable file, or one that is not such a mapping, naming it.
    """
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"--split-file {path}: cannot be read ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(ids, str | list) for ids in data.values()):
        raise InputError(f"--split-file {path}: expected a mapping of split -> source ids, e.g. train: [2_10, 2_11]")
    return {
        str(split): [
            part for item in ([ids] if isinstance(ids, str) else ids) for part in re.split(r"[\s,]+", item) if part
        ]
        for split, ids in data.items()
    }


def custom_splits(lists: dict[str, list[str] | None], path: Path | None) -> dict[str, list[str]] | None:
    """The custom split of ``--train``/``--val``/``--test`` and ``--split-file`` (None when none is given).

    Raises:
        InputError: a split given both ways.
    """
    members = {split: ids for split, ids in lists.items() if ids}
    if path is not None:
        from_file = split_file(path)
        both = sorted(set(members) & set(from_file))
        if both:
            raise InputError(f"--split-file {path}: split {', '.join(both)} is also given by --{both[0]}")
        members |= from_file
    return members or None


def describe(error: dict[str, Any], dataset: str) -> str:
    """One problem of a validation error, naming its flag (a validator's sentence kept whole)."""
    loc = [str(part) for part in error["loc"] if str(part) != dataset]
    field = loc[0] if loc else ""
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(flag(name) for name in sorted(DATASET_SETTINGS[dataset].model_fields) if name != "name")
        return f"{flag(field)} is not an option of --dataset {dataset} (its options: {allowed})"
    if kind == "missing":
        return f"{flag(field)}: required by --dataset {dataset}"
    message = _in_flags(error["msg"].removeprefix("Value error, "), dataset)
    if kind == "value_error":
        named = re.match(r"(\w+): ", message)
        if named and named.group(1) in DATASET_SETTINGS[dataset].model_fields:
            return f"{flag(named.group(1))}: {message[named.end() :]}"
        return f"{flag(field)}: {message}" if field else message
    shown = error.get("input")
    return f"{flag(field)}: {message[:1].lower() + message[1:]} (got {shown!r})"


def _in_flags(message: str, dataset: str) -> str:
    """A validator's sentence with the settings it names written as flags (``mask_format`` as ``--mask-format``)."""
    fields = [name for name in DATASET_SETTINGS[dataset].model_fields if "_" in name]
    for name in fields:
        message = re.sub(rf"\b{name}\b(?!:)", flag(name), message)
    return message


def in_flags(exc: InputError, dataset: str) -> InputError:
    """A dataset's refusal as a flag user reads it: a leading ``dataset.<setting>:`` written as its flag."""
    message = str(exc)
    named = re.match(r"dataset\.(\w+): ", message)
    if named is None or named.group(1) not in DATASET_SETTINGS[dataset].model_fields:
        return exc
    return InputError(f"{flag(named.group(1))}: {_in_flags(message[named.end() :], dataset)}")


def dataset_from_flags(fields: dict[str, Any]) -> DatasetConfig:
    """The dataset settings the flags give (only the flags given: the settings' defaults fill the rest).

    Raises:
        InputError: every problem the settings find, each naming its flag, in one line.
    """
    given = {key: value for key, value in fields.items() if value is not None}
    try:
        return dataset_config(**given)
    except ValidationError as exc:
        problems = list(dict.fromkeys(describe(error, given["name"]) for error in exc.errors()))
        raise InputError("; ".join(problems)) from None
