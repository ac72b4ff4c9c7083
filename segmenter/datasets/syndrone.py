"""SynDrone: synthetic drone views rendered in CARLA (8 towns, heights 20/50/80 m, 28 classes)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from segmenter.datasets.base import SegmentationDataset, Source
from segmenter.datasets.files import SourceFile
from segmenter.datasets.labels import RGB, DecodeStats, decode_index_mask

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


class SynDrone(SegmentationDataset):
    """SynDrone frames under ``Town{t}_Opt_120/ClearNoon/height{h}m/{rgb,semantic}/{frame}.{jpg,png}``.

    Splits list frame numbers (``train.txt`` / ``test.txt`` of the release under the root for ``mpers``);
    every listed frame is taken from every town and height found.
    """

    name = "syndrone"
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
    split_files: ClassVar[dict[str, str]] = {"train": "train.txt", "test": "test.txt"}

    def __init__(self, config: DatasetConfig) -> None:
        super().__init__(config)
        self.coarse = config.coarse
        self._lookup = self._build_lookup()

    @property
    def classes(self) -> tuple[str, ...]:
        return COARSE_CLASSES if self.coarse else FINE_CLASSES

    @property
    def colors(self) -> tuple[RGB, ...]:
        return COARSE_PALETTE if self.coarse else FINE_PALETTE

    def _build_lookup(self) -> np.ndarray:
        lookup = np.full(256, self.ignore_index, dtype=np.uint8)
        for fine_index, (name, carla_id) in enumerate(zip(FINE_CLASSES, CARLA_IDS, strict=True)):
            if self.coarse:
                coarse = FINE_TO_COARSE.get(name)
                if coarse is not None:
                    lookup[carla_id] = COARSE_CLASSES.index(coarse)
            else:
                lookup[carla_id] = fine_index
        return lookup

    def split_members(self) -> dict[str, list[str]]:
        if self.config.split not in ("mpers", "official"):
            return super().split_members()
        members = {}
        for split, file_name in self.split_files.items():
            path = self.config.root / file_name
            if not path.is_file():
                raise InputError(f"dataset.root: split file {path} not found (one frame number a line)")
            members[split] = [f"{int(line):05d}" for line in path.read_text().split()]
        return members

    def sources(self) -> list[Source]:
        folders = [
            (town, height, self.config.root / f"Town{town}_Opt_120" / self.scenario / f"height{height}m")
            for town in TOWNS
            for height in HEIGHTS
        ]
        folders = [item for item in folders if item[2].is_dir()]
        if not folders:
            raise InputError(
                f"dataset.root: no Town*_Opt_120/{self.scenario}/height*m folders under {self.config.root}"
            )
        found = []
        for split, frames in self.split_members().items():
            for town, height, folder in folders:
                for frame in frames:
                    image = folder / "rgb" / f"{frame}.jpg"
                    label = folder / "semantic" / f"{frame}.png"
                    if not image.is_file():
                        image = image.with_suffix(".png")
                    for path in (image, label):
                        if not path.is_file():
                            raise InputError(f"{path}: file not found (frame {frame} of split {split})")
                    label_file = SourceFile(label)
                    found.append(
                        Source(f"town{town}_h{height}_{frame}", split, SourceFile(image), label_file, label_file)
                    )
        return found

    def read_label(self, file: SourceFile) -> tuple[np.ndarray, DecodeStats]:
        return decode_index_mask(file.read_array(), self._lookup, self.ignore_index)
