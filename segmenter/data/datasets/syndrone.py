"""SynDrone: synthetic drone views rendered in CARLA (8 towns, heights 20/50/80 m, 28 classes).

Read as released (https://github.com/LTTM/Syndrone, its ``analyses`` and ``synth2real`` branches for the reader):
one ``Town{t}_Opt_120_color.zip`` per town holding ``Town{t}_Opt_120/ClearNoon/height{h}m/{rgb,semantic,camera}/``
(``{frame:05d}.jpg`` photos, ``.png`` single-band CARLA ids, ``.json`` poses) and ``ClearNoon/bboxes/``, read in
place or extracted; the split files ``train.txt`` and ``test.txt`` (one frame number a line) ship apart, as
``splits.zip``, and the official reader takes their folder as a path of its own. The depth and LiDAR zips are not read.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import ClassVar

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from segmenter.data.datasets.base import SegmentationDataset, Source, check_disjoint
from segmenter.data.datasets.files import SourceFile
from segmenter.data.datasets.labels import RGB, IdTable

# Raw CARLA ids in the semantic PNGs -> the 28 SynDrone classes, in this order.
FINE_CLASSES = (
    "building", "fence", "other", "pole", "road_line", "road", "sidewalk", "vegetation", "wall",
    "traffic_sign", "sky", "ground", "bridge", "rail_track", "guard_rail", "traffic_light", "static",
    "dynamic", "water", "terrain", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CARLA_IDS = (1, 2, 3, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 40, 41, 100, 101, 102, 103,
             104, 105)  # fmt: skip
FINE_PALETTE: tuple[RGB, ...] = (
    (70, 70, 70), (190, 153, 153), (180, 220, 135), (153, 153, 153), (255, 255, 255), (128, 64, 128),
    (244, 35, 232), (107, 142, 35), (102, 102, 156), (220, 220, 0), (70, 130, 180), (81, 0, 81),
    (150, 100, 100), (230, 150, 140), (180, 165, 180), (250, 170, 30), (110, 190, 160), (111, 74, 0),
    (45, 60, 150), (152, 251, 152), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

COARSE_CLASSES = ("road", "nature", "person", "vehicle", "construction", "obstacle", "water")
COARSE_PALETTE: tuple[RGB, ...] = (
    (128, 64, 128),
    (107, 142, 35),
    (220, 20, 60),
    (0, 0, 142),
    (70, 70, 70),
    (153, 153, 153),  # obstacle: the official coarse colour
    (45, 60, 150),
)
# Fine class -> coarse class; sky is seen only at the frame edges of oblique views and is ignored.
FINE_TO_COARSE = {
    "road": "road", "road_line": "road", "sidewalk": "road", "rail_track": "road", "ground": "road",
    "vegetation": "nature", "terrain": "nature",
    "person": "person", "rider": "person",
    "car": "vehicle", "truck": "vehicle", "bus": "vehicle", "train": "vehicle", "motorcycle": "vehicle",
    "bicycle": "vehicle",
    "building": "construction", "wall": "construction", "fence": "construction", "bridge": "construction",
    # the official coarse mapping puts guard rails with the obstacles, not with the constructions
    "pole": "obstacle", "traffic_sign": "obstacle", "traffic_light": "obstacle", "static": "obstacle",
    "dynamic": "obstacle", "other": "obstacle", "guard_rail": "obstacle",
    "water": "water",
}  # fmt: skip

TOWNS = ("01", "02", "03", "04", "05", "06", "07", "10HD")
HEIGHTS = ("20", "50", "80")
SPLIT_FILES = {"train": "train.txt", "test": "test.txt"}
SPLITS_ARCHIVE = "splits"


def town_folder(town: str) -> str:
    """The folder of one town in the release: ``Town01_Opt_120``."""
    return f"Town{town}_Opt_120"


def town_zip(town: str) -> str:
    """The release's archive of one town's photos, labels, poses and boxes: ``Town01_Opt_120_color.zip``."""
    return f"{town_folder(town)}_color.zip"


def _pairs(pairs: list[tuple[str, str]]) -> str:
    """``Town02 (20, 50, 80 m), Town04 (50 m)``: town/height pairs grouped by town, in words."""
    by_town: dict[str, list[str]] = {}
    for town, height in pairs:
        by_town.setdefault(town, []).append(height)
    return ", ".join(f"Town{town} ({', '.join(heights)} m)" for town, heights in by_town.items())


def _choice(values: list[str | int] | None, known: tuple[str, ...], key: str, width: int) -> tuple[str, ...] | None:
    """The manifest's towns or heights as the release names them (``1`` -> ``01``), or None when not given.

    Raises:
        InputError: a value the release does not have.
    """
    if values is None:
        return None
    chosen = []
    for value in values:
        text = str(value).strip()
        name = text.zfill(width) if text.isdigit() else text
        if name not in known:
            raise InputError(f"dataset.{key}: unknown value '{text}' (expected some of {', '.join(known)})")
        chosen.append(name)
    return tuple(dict.fromkeys(chosen))


class _Town:
    """The files of one town: its extracted folder ``<root>/Town{t}_Opt_120/`` or its archive ``..._color.zip``.

    A member of the archive is known by its path below ``ClearNoon/`` (``height20m/rgb/00000.jpg``), whatever
    folders lead to it, so an archive packed with or without the town folder reads the same.
    """

    def __init__(self, root: Path, town: str, scenario: str) -> None:
        self.folder = root / town_folder(town) / scenario
        self.zip = root / town_zip(town)
        self.scenario = scenario
        self.members: dict[str, str] = {}  # path below the scenario folder -> member
        self.notice = None
        if self.folder.is_dir():
            self.location = str(self.folder)
            if self.zip.is_file():
                self.notice = f"{self.folder}: read this folder; the archive {self.zip.name} beside it is not read"
        elif self.zip.is_file():
            self.location = str(self.zip)
            self._index_zip()
        else:
            self.location = ""

    def _index_zip(self) -> None:
        pattern = re.compile(rf"(?:^|/){re.escape(self.scenario)}/(height\d+m/.+)$")
        try:
            with zipfile.ZipFile(self.zip) as archive:
                names = [info.filename for info in archive.infolist() if not info.is_dir()]
        except zipfile.BadZipFile:
            raise InputError(f"{self.zip}: not a readable ZIP archive") from None
        except UnicodeDecodeError:
            raise InputError(f"{self.zip}: a member name is flagged UTF-8 but is not valid UTF-8") from None
        for name in names:
            match = pattern.search(name)
            if match is None or "__MACOSX" in name or PurePosixPath(name).name.startswith("._"):
                continue
            below = match.group(1)
            if below in self.members:
                raise InputError(
                    f"{self.zip}: {self.members[below]} and {name} are both the file {below} (expected one; re-pack "
                    "the archive)"
                )
            self.members[below] = name

    @property
    def exists(self) -> bool:
        return bool(self.location)

    def has_height(self, height: str) -> bool:
        """Whether the town has frames at ``height`` metres."""
        if self.folder.is_dir():
            return (self.folder / f"height{height}m").is_dir()
        prefix = f"height{height}m/"
        return any(below.startswith(prefix) for below in self.members)

    def file(self, below: str) -> SourceFile | None:
        """The file at ``below`` (a path under the scenario folder), or None when the town has none there."""
        if self.folder.is_dir():
            path = self.folder / below
            return SourceFile(path) if path.is_file() else None
        member = self.members.get(below)
        return SourceFile(self.zip, member) if member else None


class SynDrone(SegmentationDataset):
    """SynDrone frames of ``Town{t}_Opt_120/ClearNoon/height{h}m/{rgb,semantic}/{frame}.{jpg,png}``, read from the
    release's per-town ``Town{t}_Opt_120_color.zip`` or from their extracted folders.

    Splits list frame numbers (``train.txt`` / ``test.txt`` of the release's ``splits.zip`` for ``mpers`` and
    ``official``); every listed frame is taken from every selected town and height. All 8 towns x 3 heights must be
    there unless ``towns`` / ``heights`` in the manifest select a subset.
    """

    name = "syndrone"
    mask_format = "index"
    source_id_example = "5"
    class_names = COARSE_CLASSES
    palette = COARSE_PALETTE
    class_words: ClassVar[dict[str, tuple[str, ...]]] = {
        "road": ("roads", "street", "streets", "sidewalk", "sidewalks", "pavement"),
        "nature": ("vegetation", "grass", "tree", "trees", "terrain"),
        "person": ("people", "pedestrian", "pedestrians", "rider", "riders"),
        "vehicle": ("vehicles", "car", "cars", "truck", "trucks", "bus", "buses", "bicycle", "bicycles"),
        "construction": ("building", "buildings", "wall", "walls", "fence", "fences", "bridge"),
        "obstacle": ("obstacles", "pole", "poles", "traffic sign", "traffic light"),
        "building": ("buildings",), "car": ("cars",), "truck": ("trucks",),  # fine classes
    }  # fmt: skip
    plurals: ClassVar[dict[str, str]] = {
        "vehicle": "vehicles", "person": "people", "building": "buildings", "car": "cars", "truck": "trucks",
        "bus": "buses", "bicycle": "bicycles", "motorcycle": "motorcycles", "pole": "poles",
    }  # fmt: skip
    scenario: ClassVar[str] = "ClearNoon"
    split_files: ClassVar[dict[str, str]] = SPLIT_FILES

    def __init__(self, config: DatasetConfig) -> None:
        super().__init__(config)
        self.coarse = config.coarse
        self.id_table = self._id_table()
        self.towns = _choice(config.towns, TOWNS, "towns", 2)
        self.heights = _choice(config.heights, HEIGHTS, "heights", 2)

    @property
    def classes(self) -> tuple[str, ...]:
        """The 7 coarse classes (``coarse``, the default) or the 28 CARLA classes."""
        return COARSE_CLASSES if self.coarse else FINE_CLASSES

    @property
    def colors(self) -> tuple[RGB, ...]:
        """The palette of the classes: coarse, or CARLA's own colours."""
        return COARSE_PALETTE if self.coarse else FINE_PALETTE

    def _id_table(self) -> IdTable:
        """CARLA ids -> the coarse or the fine classes. In the coarse classes, sky (a known class the mapping leaves
        out) is ignored by design: counted apart from unknown ids."""
        pairs = [
            (carla_id, COARSE_CLASSES.index(FINE_TO_COARSE[name]) if self.coarse else fine_index)
            for fine_index, (name, carla_id) in enumerate(zip(FINE_CLASSES, CARLA_IDS, strict=True))
            if not self.coarse or name in FINE_TO_COARSE
        ]
        excluded = tuple(
            carla_id
            for name, carla_id in zip(FINE_CLASSES, CARLA_IDS, strict=True)
            if self.coarse and name not in FINE_TO_COARSE
        )
        return IdTable(tuple(raw for raw, _ in pairs), tuple(index for _, index in pairs), excluded=excluded)

    def split_members(self) -> dict[str, list[str]]:
        """Frame numbers (five digits, as the files are named) of each split.

        Raises:
            InputError: split files not found (the message says where they were looked for), a line or a custom id
                that is not a frame number, a frame listed twice.
        """
        if self.config.split not in ("mpers", "official"):
            members = super().split_members()
            return check_disjoint(
                {split: [_frame(item, "dataset.custom_splits") for item in ids] for split, ids in members.items()}
            )
        files = self._split_files()
        return check_disjoint(
            {split: [_frame(token, str(file)) for token in _text(file).split()] for split, file in files.items()}
        )

    def _split_locations(self) -> list[tuple[str, dict[str, SourceFile]]]:
        """Where the split files may be, in order: each place in words with the split files found there."""
        places = [self.config.splits] if self.config.splits is not None else [self.config.root, self.config.root.parent]
        found = []
        for place in places:
            candidates = [place] if place.suffix == ".zip" else [place, place / SPLITS_ARCHIVE, place / "splits.zip"]
            for candidate in candidates:
                found.append((str(candidate), _split_files_in(candidate, self.split_files)))
        return found

    def _split_files(self) -> dict[str, SourceFile]:
        locations = self._split_locations()
        for where, files in locations:
            if files:
                missing = [name for split, name in self.split_files.items() if split not in files]
                if missing:
                    raise InputError(f"dataset.splits: {where} has {', '.join(f.name for f in files.values())} but "
                                     f"not {', '.join(missing)} (one frame number a line)")  # fmt: skip
                return files
        names = " and ".join(self.split_files.values())
        raise InputError(
            f"dataset.splits: split files {names} not found; looked in {'; '.join(where for where, _ in locations)} "
            "(the release ships them as splits.zip: put it beside the town zips, or set dataset.splits to its path)"
        )

    def _towns(self) -> dict[str, _Town]:
        """The selected towns with their heights, all present.

        Raises:
            InputError: no town at all (with the expected layout), or selected town/height pairs missing.
        """
        towns = {town: _Town(self.config.root, town, self.scenario) for town in self.towns or TOWNS}
        self.notices = sorted(town.notice for town in towns.values() if town.notice)
        if not any(town.exists for town in towns.values()):
            raise InputError(
                f"dataset.root: no SynDrone town under {self.config.root} (expected the release's per-town "
                f"{town_zip('01')}, ... or their extracted folders {town_folder('01')}/{self.scenario}/height20m/"
                "{rgb,semantic}/)"
            )
        missing = [
            (town, height)
            for town, found in towns.items()
            for height in self.heights or HEIGHTS
            if not found.has_height(height)
        ]
        if missing:
            if self.towns or self.heights:
                raise InputError(
                    f"dataset.root: town/height pairs selected by dataset.towns/heights are missing under "
                    f"{self.config.root}: {_pairs(missing)}"
                )
            raise InputError(
                f"dataset.root: SynDrone town/height pairs missing under {self.config.root}: {_pairs(missing)} "
                f"(add their {town_zip('NN')}, or select what you have with dataset.towns and dataset.heights)"
            )
        return towns

    def sources(self) -> list[Source]:
        """Every listed frame of every selected town and height.

        Raises:
            InputError: missing towns or heights, split files not found, a frame's photo or label missing.
        """
        towns = self._towns()
        members = self.split_members()
        found = []
        for split, frames in members.items():
            for town_name, town in towns.items():
                for height in self.heights or HEIGHTS:
                    for frame in frames:
                        image = self._one(town, height, "rgb", frame, (".jpg", ".png"), split)
                        label = self._one(town, height, "semantic", frame, (".png",), split)
                        found.append(Source(f"town{town_name}_h{height}_{frame}", split, image, label, label))
        return found

    def _one(
        self, town: _Town, height: str, kind: str, frame: str, suffixes: tuple[str, ...], split: str
    ) -> SourceFile:
        """The one file of a frame in ``height{h}m/<kind>/``.

        Raises:
            InputError: none there, or two (``00005.jpg`` beside ``00005.png``).
        """
        below = [f"height{height}m/{kind}/{frame}{suffix}" for suffix in suffixes]
        files = [file for file in map(town.file, below) if file is not None]
        if len(files) > 1:
            raise InputError(f"{town.location}: {' and '.join(below)} both exist (expected one file per frame)")
        if not files:
            raise InputError(f"{town.location}: {below[0]} not found (frame {frame} of split {split})")
        return files[0]


def _frame(value: str | int, where: str) -> str:
    """A frame number as the files are named (``5`` -> ``00005``), as the official reader pads the split files.

    Raises:
        InputError: a value that is not a frame number, naming ``where`` it came from.
    """
    text = str(value).strip()
    if not text.isdigit():
        raise InputError(f"{where}: '{text[:40]}' is not a SynDrone frame number (expected an integer such as 5)")
    return f"{int(text):05d}"


def _text(file: SourceFile) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{file}: not UTF-8 text (expected one frame number a line)") from None


def _split_files_in(place: Path, names: dict[str, str]) -> dict[str, SourceFile]:
    """The split files found at ``place``: a folder holding them (or one folder down), or a zip holding them (at its
    top level or one folder down)."""
    found: dict[str, SourceFile] = {}
    if place.is_dir():
        for split, name in names.items():
            matches = [place / name] if (place / name).is_file() else sorted(place.glob(f"*/{name}"))
            if matches:
                found[split] = SourceFile(matches[0])
    elif place.is_file() and place.suffix == ".zip":
        try:
            with zipfile.ZipFile(place) as archive:
                members = [info.filename for info in archive.infolist() if not info.is_dir()]
        except zipfile.BadZipFile:
            raise InputError(f"{place}: not a readable ZIP archive") from None
        for split, name in names.items():
            matches = sorted(
                (len(PurePosixPath(m).parts), m)
                for m in members
                if PurePosixPath(m).name == name and len(PurePosixPath(m).parts) <= 2 and "__MACOSX" not in m
            )
            if matches:
                found[split] = SourceFile(place, matches[0][1])
    return found
