import numpy as np
import pytest

from diffaccel.zoo import shapes


def test_render_is_deterministic_per_seed():
    for c in range(shapes.NUM_CLASSES):
        a = shapes.render(c, 1234)
        assert np.array_equal(a, shapes.render(c, 1234))
        assert not np.array_equal(a, shapes.render(c, 1235))
        assert a.shape == (3, shapes.RESOLUTION, shapes.RESOLUTION)
        assert a.min() >= -1 and a.max() <= 1


def test_splits_use_disjoint_seed_ranges():
    seeds = {split: set(shapes.split_items(split, 500)[1].tolist()) for split in shapes.SPLITS}
    names = list(seeds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not seeds[a] & seeds[b]
    starts = sorted(shapes.SPLITS.values())
    assert all(b - a >= shapes.SPLIT_SIZE for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError):
        shapes.split_items("train", 10, start=shapes.SPLIT_SIZE - 5)


def test_classes_are_balanced_and_shapes_contrast_with_background():
    images, labels = shapes.make_batch("val", 120)
    assert np.bincount(labels).tolist() == [20] * shapes.NUM_CLASSES
    for image in images:
        pixels = (image.reshape(3, -1).T + 1) / 2
        # the two most distant pixel colours belong to shape and background
        spread = np.linalg.norm(pixels[:, None] - pixels[None], axis=-1).max()
        assert spread >= shapes.MIN_CONTRAST - 1e-6


def test_class_names():
    assert shapes.class_ids(["ring", "circle"]) == [5, 0]
    with pytest.raises(ValueError, match="unknown class hexagon"):
        shapes.class_ids(["hexagon"])
