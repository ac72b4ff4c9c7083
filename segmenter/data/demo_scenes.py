"""Deterministic synthetic aerial scenes written in the ISPRS Vaihingen archive layout.

Each scene has a road network with parking lots (impervious, asphalt to concrete), buildings with ridge-lit
roofs and cast shadows (half the roof colours are greys within reach of the roads), low vegetation with dry
patches that look like bare soil, tree canopies that occlude roads, roofs and cars, cars on the roads, clutter
patches, an IRRG-like rendering (vegetation bright in the red band), per-scene illumination and colour cast,
blur and sensor noise. ``prepare`` then reads them through the real Vaihingen code path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from manifests.atomic import atomic_path
from segmenter.data.datasets.files import FileRole
from segmenter.data.datasets.isprs import ISPRS_PALETTE, Vaihingen
from segmenter.data.datasets.labels import encode_rgb_mask

IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR, CLUTTER = range(6)
IGNORE = 255
ERODE_RADIUS = 3

# IRRG colours (NIR, R, G) and the amplitude of their low-frequency texture.
BASE_COLOR = np.array(
    [[128, 124, 128], [150, 120, 110], [190, 112, 118], [156, 76, 88], [90, 90, 90], [150, 128, 100]], dtype=np.float32
)
TEXTURE = np.array([22, 8, 30, 30, 0, 20], dtype=np.float32)
# Half the roof colours are greys within reach of the road colours.
ROOF_COLORS = np.array(
    [[176, 96, 86], [134, 128, 134], [96, 92, 104], [160, 150, 140], [190, 130, 96], [122, 118, 124],
     [112, 110, 116], [146, 140, 146]],
    dtype=np.float32,
)  # fmt: skip
DRY_GROUND = np.array([158, 132, 112], dtype=np.float32)  # parched lawn, close to bare-soil clutter
CAR_COLORS = np.array(
    [[220, 220, 225], [30, 30, 36], [150, 40, 40], [60, 70, 150], [170, 170, 175], [200, 190, 60]], dtype=np.float32
)


def demo_area_ids(n_areas: int) -> list[str]:
    """Area numbers of the demo: the ``mpers`` train and test areas first, then the other ISPRS ones."""
    splits = Vaihingen.splits
    ordered = [*splits["mpers"]["train"], *splits["mpers"]["test"]]
    ordered += [area for area in (*splits["isprs"]["train"], *splits["isprs"]["test"]) if area not in ordered]
    if not 1 <= n_areas <= len(ordered):
        raise ValueError(f"n_areas must be within 1..{len(ordered)}, got {n_areas}")
    return ordered[:n_areas]


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    coarse = rng.normal(size=(size // cell + 2, size // cell + 2)).astype(np.float32)
    return ndimage.zoom(coarse, cell, order=1)[:size, :size]


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _draw_roads(rng: np.random.Generator, labels: np.ndarray) -> list[tuple[str, int, int]]:
    size = labels.shape[0]
    scale = size / 1024
    roads = []
    for axis in ("h", "v"):
        margin = size // 16
        positions = np.sort(rng.choice(np.arange(margin, size - margin), size=rng.integers(2, 4), replace=False))
        for position in positions:
            width = max(6, int(rng.integers(16, 34) * scale))
            lo, hi = position - width // 2, position + width // 2
            if axis == "h":
                labels[lo:hi, :] = IMPERVIOUS
            else:
                labels[:, lo:hi] = IMPERVIOUS
            roads.append((axis, lo, hi))
    for _ in range(rng.integers(1, 4)):  # parking lots and plazas
        h, w = (rng.integers(40, 120, size=2) * scale).astype(int) + 4
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        labels[y : y + h, x : x + w] = IMPERVIOUS
    return roads


def _draw_buildings(rng: np.random.Generator, labels: np.ndarray, roof: np.ndarray, shade: np.ndarray) -> np.ndarray:
    size = labels.shape[0]
    scale = size / 1024
    shadow = np.zeros_like(labels, dtype=bool)
    placed = 0
    target = max(3, int(rng.integers(30, 50) * scale * scale))
    for _ in range(600):
        if placed >= target:
            break
        h, w = (rng.integers(24, 140, size=2) * scale).astype(int) + 6
        y, x = rng.integers(4, size - h - 4), rng.integers(4, size - w - 4)
        if np.any(labels[y - 4 : y + h + 4, x - 4 : x + w + 4] != LOW_VEGETATION):
            continue
        labels[y : y + h, x : x + w] = BUILDING
        roof[y : y + h, x : x + w] = ROOF_COLORS[rng.integers(len(ROOF_COLORS))] + rng.normal(0, 8, size=3)
        # A ridge: one half of the roof faces the sun.
        if h > w:
            shade[y : y + h, x : x + w // 2] = 1.15
        else:
            shade[y : y + h // 2, x : x + w] = 1.15
        offset = max(2, int(rng.integers(4, 12) * scale))
        shadow[y + offset : y + h + offset, x + offset : x + w + offset] = True
        placed += 1
    return shadow & (labels != BUILDING)


def _draw_cars(rng: np.random.Generator, labels: np.ndarray, car_color: np.ndarray, roads) -> None:
    size = labels.shape[0]
    for axis, lo, hi in roads:
        for _ in range(rng.integers(3, 10)):
            along = int(rng.integers(0, size - 16))
            lane = int(rng.integers(lo + 2, max(lo + 3, hi - 8)))
            y, x, h, w = (lane, along, 7, 15) if axis == "h" else (along, lane, 15, 7)
            if np.all(labels[y : y + h, x : x + w] == IMPERVIOUS):
                labels[y : y + h, x : x + w] = CAR
                car_color[y : y + h, x : x + w] = CAR_COLORS[rng.integers(len(CAR_COLORS))]


def _draw_blobs(
    rng: np.random.Generator, labels: np.ndarray, value: int, count: int, radii: tuple[int, int], spread: int = 0
) -> None:
    """Disks of ``value``; with ``spread`` > 0 they gather in clusters (tree rows, copses)."""
    size = labels.shape[0]
    centre = rng.integers(0, size, size=2)
    for index in range(count):
        radius = int(rng.integers(*radii))
        if spread and index % 6:
            cy, cx = np.clip(centre + rng.integers(-spread, spread + 1, size=2), 0, size - 1)
        else:
            centre = rng.integers(0, size, size=2)
            cy, cx = centre
        y0, y1 = max(cy - radius, 0), min(cy + radius + 1, size)
        x0, x1 = max(cx - radius, 0), min(cx + radius + 1, size)
        disk = _disk(radius)[y0 - cy + radius : y1 - cy + radius, x0 - cx + radius : x1 - cx + radius]
        region = labels[y0:y1, x0:x1]
        region[disk] = value


def generate_scene(seed: int | list[int], size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: an IRRG ``size x size x 3`` uint8 image and its class-index label."""
    rng = np.random.default_rng(seed)
    labels = np.full((size, size), LOW_VEGETATION, dtype=np.uint8)
    roof = np.zeros((size, size, 3), dtype=np.float32)
    shade = np.ones((size, size), dtype=np.float32)
    car_color = np.zeros((size, size, 3), dtype=np.float32)
    roads = _draw_roads(rng, labels)
    shadow = _draw_buildings(rng, labels, roof, shade)
    _draw_cars(rng, labels, car_color, roads)
    # Clutter only on open ground; trees occlude everything.
    clutter = labels.copy()
    scale = size / 1024
    _draw_blobs(rng, clutter, CLUTTER, int(rng.integers(6, 14)), (max(2, int(8 * scale)), max(3, int(30 * scale))))
    labels = np.where((labels == LOW_VEGETATION) & (clutter == CLUTTER), CLUTTER, labels).astype(np.uint8)
    tree_radii = (max(2, int(6 * scale)), max(3, int(24 * scale)))
    _draw_blobs(rng, labels, TREE, int(rng.integers(80, 160) * scale), tree_radii, spread=max(4, int(40 * scale)))

    image = BASE_COLOR[labels].copy()
    broad = _smooth_noise(rng, size, 32)
    fine = ndimage.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), 1.5) * 3.0
    image += ((broad + fine) * TEXTURE[labels])[..., None]
    dry = (_smooth_noise(rng, size, 64) > 0.8) & (labels == LOW_VEGETATION)  # dry patches look like bare soil
    image[dry] = 0.35 * image[dry] + 0.65 * DRY_GROUND
    is_building = labels == BUILDING
    image[is_building] = roof[is_building] * shade[is_building, None] + broad[is_building, None] * 6
    is_car = labels == CAR
    image[is_car] = car_color[is_car]
    image[shadow & (labels != TREE)] *= 0.55
    image = ndimage.gaussian_filter(image, sigma=(1.0, 1.0, 0))
    # Per-scene illumination and colour cast, then sensor noise.
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12, size=3).astype(np.float32)
    image += rng.normal(scale=7.0, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def erode_boundaries(labels: np.ndarray, radius: int = ERODE_RADIUS) -> np.ndarray:
    """The ISPRS ``noBoundary`` label: pixels within ``radius`` of another class become ``IGNORE``."""
    footprint = _disk(radius)
    high = ndimage.maximum_filter(labels, footprint=footprint, mode="nearest")
    low = ndimage.minimum_filter(labels, footprint=footprint, mode="nearest")
    return np.where(high == low, labels, IGNORE).astype(np.uint8)


def _write_tiff(path: Path, array: np.ndarray, compression: str | None = None) -> None:
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, photometric="rgb" if array.ndim == 3 else "minisblack", compression=compression)


def scene_heights(labels: np.ndarray) -> np.ndarray:
    """A float32 surface model of a scene in metres, from its classes alone (no random draws).

    Buildings and trees stand above the ground, cars a little; it fills ``dsm/`` of the archive layout and is
    not read by ``prepare``.
    """
    above_ground = np.array([0.0, 9.0, 0.2, 12.0, 1.5, 0.8], dtype=np.float32)
    return (265.0 + above_ground[labels]).astype(np.float32)  # Vaihingen lies at about 265 m


def write_demo_dataset(out: Path, n_areas: int = 16, size: int = 1024, seed: int = 0) -> list[str]:
    """Write ``n_areas`` scenes as the extracted Vaihingen archives under ``out``; returns the area ids.

    The layout is that of the official release, extracted: ``ISPRS_semantic_labeling_Vaihingen/`` with
    ``top/`` (the images), ``dsm/`` (a surface model) and ``gts_for_participants/`` (the full ground truth of the
    areas the ISPRS labelled, named like the images), and the COMPLETE and eroded COMPLETE ground truth folders.
    """
    roles, companions = Vaihingen.roles, Vaihingen.companions
    labelled = set(Vaihingen.splits["isprs"]["train"])
    area_ids = demo_area_ids(n_areas)
    for area in area_ids:
        image, labels = generate_scene([seed, int(area)], size)
        full = encode_rgb_mask(labels, ISPRS_PALETTE, IGNORE)
        eroded = encode_rgb_mask(erode_boundaries(labels), ISPRS_PALETTE, IGNORE)
        _write_tiff(_demo_path(out, roles["image"], area), image)
        _write_tiff(_demo_path(out, roles["label"], area), full)
        _write_tiff(_demo_path(out, roles["eval_label"], area), eroded)
        # The rest of the image archive, compressed: the demo's folder stays small, and prepare must skip it.
        _write_tiff(_demo_path(out, companions["dsm"], area), scene_heights(labels), compression="zlib")
        if area in labelled:
            _write_tiff(_demo_path(out, companions["participant_label"], area), full, compression="zlib")
    return area_ids


def _demo_path(out: Path, role: FileRole, area: str) -> Path:
    """``<out>/<archive>/[<folder>/]<file>``: the archive as extracted, its folders inside it."""
    folder = out / role.archive
    return (folder / role.folder if role.folder else folder) / role.file_name(area)
