"""Captioned shapes: 64x64 RGB images of one shape, described by a caption of four attributes.

"a small red circle on a blue background": shape (the six classes of :mod:`diffaccel.zoo.shapes`),
shape colour and background colour (from a fixed palette, never equal) and size ("small" or
"large"). Every image is determined by ``(split, index)``: the split's seed range (the same
disjoint ranges as ``shapes.SPLITS``) gives the seed, the seed gives position, exact radius and a
slight colour jitter and shading. A fixed set of (shape, colour, background) triples never appears
in the training split: prompts built from them test compositional generalisation. The ``eval``
split walks through every attribute combination in a fixed shuffled order, so any multiple of
``len(ALL_COMBOS)`` consecutive items holds each combination equally often.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from diffaccel.zoo import shapes
from diffaccel.zoo.shapes import _sdf

RESOLUTION = 64
SHAPES: tuple[str, ...] = shapes.CLASSES
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black")
SIZES: tuple[str, ...] = ("small", "large")
PALETTE = np.array([
    (0.86, 0.16, 0.16), (0.18, 0.70, 0.25), (0.16, 0.32, 0.88),
    (0.96, 0.86, 0.18), (0.95, 0.95, 0.95), (0.08, 0.08, 0.10),
])
RADII = {"small": (9.0, 12.0), "large": (16.0, 21.0)}  # circumradius range in pixels
EDGE = 1.25  # width in pixels of the anti-aliased edge
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "background": COLOURS, "size": SIZES}
SPLITS = shapes.SPLITS


class Attributes(NamedTuple):
    """Indices into SHAPES, COLOURS, COLOURS and SIZES."""

    shape: int
    colour: int
    background: int
    size: int


def caption(attrs: Attributes) -> str:
    """The caption of one attribute combination, e.g. ``a small red circle on a blue background``."""
    return (f"a {SIZES[attrs.size]} {COLOURS[attrs.colour]} {SHAPES[attrs.shape]} "
            f"on a {COLOURS[attrs.background]} background")


def parse_caption(text: str) -> Attributes:
    """Inverse of :func:`caption`; raises ValueError for a caption outside the language."""
    words = text.lower().split()
    if len(words) != 8 or words[0] != "a" or words[4:6] != ["on", "a"] or words[7] != "background":
        raise ValueError(f"not a caption of the form 'a <size> <colour> <shape> on a <colour> background': {text!r}")
    try:
        attrs = Attributes(SHAPES.index(words[3]), COLOURS.index(words[2]), COLOURS.index(words[6]),
                           SIZES.index(words[1]))
    except ValueError as exc:
        raise ValueError(f"unknown word in caption {text!r}: {exc}") from None
    if attrs.colour == attrs.background:
        raise ValueError(f"shape and background colour must differ: {text!r}")
    return attrs


def vocabulary() -> list[str]:
    """Every word the caption language uses, in a fixed order."""
    words = ["a", "on", "background", *SIZES, *COLOURS, *SHAPES]
    return list(dict.fromkeys(words))


def is_held_out(attrs: Attributes) -> bool:
    """True for the 18 (shape, colour, background) triples the training split never shows (both sizes):
    three colour pairs per shape, each colour three times as shape colour and three times as background."""
    s, f, b = attrs.shape, attrs.colour, attrs.background
    return f % 2 == s % 2 and b == (f + 1 + s // 2) % len(COLOURS)


def _all_combos() -> list[Attributes]:
    combos = [Attributes(s, f, b, z) for s in range(len(SHAPES)) for f in range(len(COLOURS))
              for b in range(len(COLOURS)) for z in range(len(SIZES)) if f != b]
    order = np.random.default_rng(20240613).permutation(len(combos))
    return [combos[i] for i in order]


ALL_COMBOS: list[Attributes] = _all_combos()  # 360, in a fixed shuffled order
TRAIN_COMBOS: list[Attributes] = [c for c in ALL_COMBOS if not is_held_out(c)]
HELD_OUT_COMBOS: list[Attributes] = [c for c in ALL_COMBOS if is_held_out(c)]


def held_out_prompts() -> list[str]:
    """Captions whose attribute combination never occurs in the training split."""
    return [caption(c) for c in HELD_OUT_COMBOS]


def items(split: str, count: int, start: int = 0, include_held_out: bool | None = None) -> list[tuple[Attributes, int]]:
    """Attributes and seeds of items ``start .. start+count`` of a split.

    ``eval`` cycles through ALL_COMBOS (balanced); other splits draw a combination from the item's
    seed, among all combinations, except held-out ones for ``train`` (unless ``include_held_out``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    if start < 0 or count < 0 or start + count > shapes.SPLIT_SIZE:
        raise ValueError(f"items {start}..{start + count} lie outside the split")
    if include_held_out is None:
        include_held_out = split != "train"
    pool = ALL_COMBOS if include_held_out else TRAIN_COMBOS
    out = []
    for index in range(start, start + count):
        seed = SPLITS[split] + index
        if split == "eval":
            attrs = ALL_COMBOS[index % len(ALL_COMBOS)]
        else:
            attrs = pool[int(np.random.default_rng([seed, 7]).integers(len(pool)))]
        out.append((attrs, seed))
    return out


def render(attrs: Attributes, seed: int, resolution: int = RESOLUTION) -> np.ndarray:
    """One image, shape (3, H, W), float32 in [-1, 1], fully determined by ``(attrs, seed)``."""
    rng = np.random.default_rng(seed)
    scale = resolution / RESOLUTION
    r = rng.uniform(*RADII[SIZES[attrs.size]]) * scale
    margin = r * 1.2 + scale
    cx, cy = rng.uniform(margin, resolution - margin, 2)
    fg = np.clip(PALETTE[attrs.colour] + rng.normal(0, 0.025, 3), 0, 1)
    bg = np.clip(PALETTE[attrs.background] + rng.normal(0, 0.025, 3), 0, 1)
    angle, shade = rng.uniform(0, 2 * np.pi), rng.uniform(-0.08, 0.08)

    coords = np.arange(resolution, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    coverage = np.clip(0.5 - _sdf(attrs.shape, xx - cx, yy - cy, r) / (EDGE * scale), 0.0, 1.0)[..., None]
    t = (xx / resolution - 0.5) * np.cos(angle) + (yy / resolution - 0.5) * np.sin(angle)
    background = np.clip(bg * (1 + shade * t[..., None] * 2), 0, 1)
    image = background * (1 - coverage) + fg * coverage
    return (image.transpose(2, 0, 1) * 2 - 1).astype(np.float32)


def make_batch(split: str, count: int, start: int = 0, include_held_out: bool | None = None,
               resolution: int = RESOLUTION) -> tuple[np.ndarray, list[Attributes]]:
    """Images (N, 3, H, W) in [-1, 1] and their attributes for a slice of a split."""
    listed = items(split, count, start, include_held_out)
    if not listed:
        return np.zeros((0, 3, resolution, resolution), np.float32), []
    return np.stack([render(a, s, resolution) for a, s in listed]), [a for a, _ in listed]


def make_batch_of(attrs: Sequence[Attributes], split: str = "eval", skip: int = 0,
                  resolution: int = RESOLUTION) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] of the given attribute combinations, in their order: the ``eval``
    items of each combination in turn, after its first ``skip`` (as ``shapes.make_batch_of``)."""
    seen: dict[Attributes, int] = {}
    images = []
    for combo in (Attributes(*a) for a in attrs):
        k = skip + seen.get(combo, 0)
        seen[combo] = seen.get(combo, 0) + 1
        index = ALL_COMBOS.index(combo) + len(ALL_COMBOS) * k
        images.append(render(combo, SPLITS[split] + index, resolution))
    return np.stack(images) if images else np.zeros((0, 3, resolution, resolution), np.float32)


def attribute_tensor(attrs: list[Attributes]) -> np.ndarray:
    """(N, 4) int64 array of attribute indices in ATTRIBUTES order."""
    return np.array([tuple(a) for a in attrs], dtype=np.int64).reshape(len(attrs), len(ATTRIBUTES))
