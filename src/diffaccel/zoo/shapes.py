"""The "shapes" data set: procedurally drawn, class-conditional RGB images in [-1, 1].

Every image is fully determined by ``(class_id, seed)``, so data sets are defined by seed ranges and
need no files. The splits use disjoint seed ranges, so a model trained on ``train`` never sees an
``eval`` image. Shapes are drawn from signed distance functions with a one-pixel smooth edge, which
anti-aliases them without supersampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "plus", "diamond", "ring")
NUM_CLASSES = len(CLASSES)
RESOLUTION = 16

# Disjoint seed ranges per split; each range holds far more images than any run uses.
SPLITS: dict[str, int] = {"train": 0, "val": 1_000_000_000, "eval": 2_000_000_000, "calib": 3_000_000_000}
SPLIT_SIZE = 1_000_000_000

MIN_CONTRAST = 0.45  # minimum RGB distance between the shape and every background pixel


def _sdf(class_id: int, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (in pixels, negative inside) of one shape centred at the origin."""
    name = CLASSES[class_id]
    if name == "circle":
        return np.hypot(x, y) - r
    if name == "square":
        s = r * 0.85
        dx, dy = np.abs(x) - s, np.abs(y) - s
        outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
        return outside + np.minimum(np.maximum(dx, dy), 0)
    if name == "diamond":
        return (np.abs(x) + np.abs(y) - r * 1.15) / np.sqrt(2)
    if name == "ring":
        return np.abs(np.hypot(x, y) - r * 0.75) - r * 0.28
    if name == "plus":
        arm, half = r * 1.0, r * 0.34
        horiz = np.maximum(np.abs(x) - arm, np.abs(y) - half)
        vert = np.maximum(np.abs(x) - half, np.abs(y) - arm)
        return np.minimum(horiz, vert)
    if name == "triangle":
        # Upright equilateral triangle (apex up, y grows downwards): three half-planes whose
        # distance from the centre is the inradius, half the circumradius.
        inradius = r * 1.05 / 2
        d = y - inradius
        for nx in (np.sqrt(3) / 2, -np.sqrt(3) / 2):
            d = np.maximum(d, x * nx - y / 2 - inradius)
        return d
    raise ValueError(f"unknown class id {class_id}")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape colour and two background colours, each background colour far from the shape's."""
    while True:
        fg = rng.uniform(0, 1, 3)
        bg0 = rng.uniform(0, 1, 3)
        gradient = rng.random() < 0.5
        bg1 = np.clip(bg0 + rng.uniform(-0.3, 0.3, 3), 0, 1) if gradient else bg0
        if min(np.linalg.norm(fg - bg0), np.linalg.norm(fg - bg1)) >= MIN_CONTRAST:
            return fg, bg0, bg1


def render(class_id: int, seed: int, resolution: int = RESOLUTION) -> np.ndarray:
    """One image, shape (3, H, W), float32 in [-1, 1], fully determined by ``(class_id, seed)``."""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class_id must be in [0, {NUM_CLASSES}), got {class_id}")
    rng = np.random.default_rng(seed)
    scale = resolution / 16
    r = rng.uniform(3.6, 6.2) * scale
    margin = r * 1.05
    cx = rng.uniform(margin, resolution - margin)
    cy = rng.uniform(margin, resolution - margin)
    fg, bg0, bg1 = _colours(rng)
    angle = rng.uniform(0, 2 * np.pi)

    coords = np.arange(resolution, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    coverage = np.clip(0.5 - _sdf(class_id, xx - cx, yy - cy, r) / scale, 0.0, 1.0)

    t = ((xx / resolution - 0.5) * np.cos(angle) + (yy / resolution - 0.5) * np.sin(angle)) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    background = bg0 * (1 - t) + bg1 * t
    image = background * (1 - coverage[..., None]) + fg * coverage[..., None]
    return (image.transpose(2, 0, 1) * 2 - 1).astype(np.float32)


def split_items(split: str, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and seeds of items ``start .. start+count`` of a split, classes balanced in turn."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    if start < 0 or count < 0 or start + count > SPLIT_SIZE:
        raise ValueError(f"items {start}..{start + count} lie outside the split")
    index = np.arange(start, start + count, dtype=np.int64)
    return (index % NUM_CLASSES).astype(np.int64), SPLITS[split] + index


def make_batch(split: str, count: int, start: int = 0, resolution: int = RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, H, W) in [-1, 1] and their labels for a slice of a split."""
    labels, seeds = split_items(split, count, start)
    images = np.stack([render(int(c), int(s), resolution) for c, s in zip(labels, seeds)]) if count else (
        np.zeros((0, 3, resolution, resolution), np.float32))
    return images, labels


def make_batch_of(labels: Sequence[int], split: str = "eval", skip: int = 0,
                  resolution: int = RESOLUTION) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] of the given classes, in their order: the split's items of each
    class in turn, after its first ``skip`` (two calls with ``skip`` apart by the largest class count
    draw disjoint sets; with every class alike, the set ``make_batch`` draws, in another order)."""
    seen: dict[int, int] = {}
    items = []
    for label in (int(c) for c in labels):
        k = skip + seen.get(label, 0)
        seen[label] = seen.get(label, 0) + 1
        items.append((label, label + NUM_CLASSES * k))
    if not items:
        return np.zeros((0, 3, resolution, resolution), np.float32)
    return np.stack([render(c, SPLITS[split] + index, resolution) for c, index in items])


def class_ids(names: list[str] | None) -> list[int]:
    """Class ids for names (all classes when ``names`` is None); unknown names raise ValueError."""
    if names is None:
        return list(range(NUM_CLASSES))
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        raise ValueError(f"unknown class {', '.join(unknown)}; choose from {', '.join(CLASSES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # each would make the same images again
        raise ValueError(f"class {', '.join(repeated)} is named more than once; name each class once")
    return [CLASSES.index(n) for n in names]
