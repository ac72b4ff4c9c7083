"""The name rule: ids that become parts of a path, checked where they enter and again where a path is built.

Dataset ids, split names, source ids, tile ids, expert names and run ids end up in file names (crops, masks, report
folders, store fragments) and in renderers (the caption report's plots and Markdown). Each is one **name**, or, where
the contract puts a separator (a tile id ``<dataset>/<source>/<y>_<x>``, a folder dataset's source id
``<split>/<stem>``, a path column of the tile index), names joined by ``/``. A name is:

- not empty, and neither ``.`` nor ``..``;
- free of ``/`` and ``\\`` (so a name is never a path of its own, and ``/`` only where the contract puts it);
- free of NUL and every other control character (``\\x00``-``\\x1f``, ``\\x7f``-``\\x9f``), so it cannot cut a path,
  a log line or a one-line message short, and of Unicode's invisible format characters (bidi overrides, zero-width
  characters) and the look-alikes of ``/`` and ``\\``, so what a report shows is what the name is.

A path joined from names therefore never starts with ``/`` and never climbs out of its folder. :func:`safe_join` is
the one way a write builds a path from such ids: it checks every part and then that the resolved target lies under
the resolved folder (a symbolic link inside the folder that points elsewhere is refused too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AfterValidator

from manifests.errors import InputError

NAME_RULE = (
    "a name is not empty, not '.' or '..', and has no '/', '\\', NUL or other control character, no invisible "
    "format character and no look-alike of '/'; ids with parts join names with '/'"
)
# The characters a name may not hold, and what a path of names may not be. Written for both Python's re and RE2
# (pyarrow's compute functions), so one pattern checks a single value and a whole column.
# Unicode's invisible format characters (bidi overrides such as U+202E reorder what a report or a terminal shows,
# zero-width ones hide text) and the look-alikes of '/' and '\' (a name that reads as a path) are refused too; they
# stand in the class as themselves, which both engines read.
_FORMAT = "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
_SLASH_LOOKALIKES = "\u2044\u2215\u29f8\u29f9\uff0f\uff3c"
_FORBIDDEN = rf"[\x00-\x1f\x7f-\x9f\\{_FORMAT}{_SLASH_LOOKALIKES}]"
_BAD_NAME = rf"{_FORBIDDEN}|/|^\.{{1,2}}$|^$"
_BAD_PATH = rf"{_FORBIDDEN}|^/|/$|//|(^|/)\.{{1,2}}(/|$)|^$"
_BAD = {False: re.compile(_BAD_NAME), True: re.compile(_BAD_PATH)}


def pattern(parts: bool) -> str:
    """The pattern a value breaking the rule matches: of one name, or (``parts``) of names joined by ``/``."""
    return _BAD_PATH if parts else _BAD_NAME


def name_problem(value: object, parts: bool = False) -> str | None:
    """Why ``value`` breaks the name rule (one phrase), or None when it is a name (``parts``: names joined by ``/``)."""
    if not isinstance(value, str):
        return f"expected a text name, got {type(value).__name__}"
    found = _BAD[parts].search(value)
    if found is None:
        return None
    if not value:
        return "is empty"
    piece = found.group(0)
    if re.fullmatch(_FORBIDDEN, piece[:1] or " "):
        if piece == "\\":
            return "holds a backslash"
        if piece in _SLASH_LOOKALIKES:
            return f"holds {piece!r}, which looks like a slash"
        return f"holds the control or format character {piece!r}"
    if "/" in piece and not parts:
        return "holds '/'"
    if piece.strip("/") in (".", ".."):
        return f"holds the part {piece.strip('/')!r}"
    return "is an absolute path or has an empty part"


def shown(value: object, limit: int = 80) -> str:
    """``value`` as a message shows it: escaped (a control character never reaches the terminal) and cut short."""
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_name(value: object, what: str, parts: bool = False) -> str:
    """``value`` when it follows the name rule.

    Args:
        value: the id.
        what: where it comes from, for the message (``dataset.id``, ``--split``, ``tile index x.parquet: tile_id``).
        parts: whether names joined by ``/`` are allowed (tile ids, a folder dataset's source ids, index paths).

    Raises:
        InputError: one line naming ``what``, the value (escaped) and the rule.
    """
    problem = name_problem(value, parts)
    if problem is not None:
        raise InputError(f"{what}: {shown(value)} {problem} ({NAME_RULE})")
    return value  # type: ignore[return-value]


def check_names(values: Iterable[object], what: str, parts: bool = False) -> None:
    """Check every value of ``values`` (:func:`check_name`); the first that breaks the rule is named."""
    for value in values:
        check_name(value, what, parts)


def safe_join(folder: str | os.PathLike[str], *parts: str) -> Path:
    """``folder`` joined with ``parts`` (each a name, or names joined by ``/``), checked to stay inside ``folder``.

    Every write whose file name comes from an id goes through here: the parts are checked against the name rule and
    the resolved target must lie under the resolved folder, so neither ``..``, an absolute id nor a symbolic link
    can put a file elsewhere.

    Raises:
        InputError: a part that breaks the name rule, or a target outside ``folder``, naming both.
    """
    for part in parts:
        check_name(part, f"path part under {folder}", parts=True)
    base = Path(folder)
    target = base.joinpath(*parts)
    root = base.resolve()
    if not target.resolve().is_relative_to(root):
        raise InputError(f"{target}: resolves outside its output folder {root}; refused")
    return target


def check_columns(table: pa.Table, columns: dict[str, bool], where: str) -> None:
    """Check the ids of a table written by someone else (a tile index, a predictions file): it is data, and its ids and
    paths become file names here. One vectorised pass per column; the first bad value is named.

    Args:
        table: the table read.
        columns: column -> whether its values may be names joined by ``/`` (tile ids, source ids, relative paths);
            nulls are not checked (a missing label path).
        where: the file, for the message.

    Raises:
        InputError: ``<where>: column <c>: <value> <problem>``.
    """
    for column, parts in columns.items():
        values = table.column(column)
        bad = pc.match_substring_regex(values, pattern(parts))
        if pc.any(bad).as_py():
            first = values.filter(bad)[0].as_py()
            check_name(first, f"{where}: column {column}", parts)


def valid_name(value: str) -> str:
    """``value`` when it is one name; a pydantic validator (the manifest says which key).

    Raises:
        ValueError: the value and why it is not a name.
    """
    problem = name_problem(value)
    if problem is not None:
        raise ValueError(f"{shown(value)} {problem} ({NAME_RULE})")
    return value


# A field that becomes one part of a path: a dataset id, a split name, a source id, an expert name.
Name = Annotated[str, AfterValidator(valid_name)]
