"""The shipped models and evaluator: they load, sample deterministically and score correctly."""

import json
import shutil

import pytest
import torch

from conftest import requires_weights
from diffaccel.errors import WeightsError
from diffaccel.seeds import image_seed
from diffaccel.zoo import shapes
from diffaccel.zoo.pipeline import sample
from diffaccel.zoo.weights import WEIGHTS_DIR, load_evaluator, load_pipeline

pytestmark = requires_weights


def test_shipped_models_load_and_give_finite_images():
    for model in ("dit", "unet"):
        for sampler in ("ddim", "dpm"):
            pipe = load_pipeline(model, sampler)
            images = pipe([0, 5], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
            assert images.shape == (2, 3, shapes.RESOLUTION, shapes.RESOLUTION)
            assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_same_seed_gives_bitwise_identical_images_whatever_the_batch():
    pipe = load_pipeline("dit")
    labels = torch.tensor([1, 2, 3])
    seeds = [image_seed(0, int(c), 0) for c in labels]
    together = sample(pipe, labels, seeds, steps=4, guidance=3.0)
    again = sample(pipe, labels, seeds, steps=4, guidance=3.0)
    alone = sample(pipe, labels[1:2], seeds[1:2], steps=4, guidance=3.0)
    assert torch.equal(together, again)
    assert torch.allclose(together[1], alone[0], atol=1e-4)  # BLAS blocking differs with the batch size
    other = sample(pipe, labels, [s + 1 for s in seeds], steps=4, guidance=3.0)
    assert not torch.equal(together, other)


def test_evaluator_reads_real_images_and_separates_real_from_noise():
    evaluator = load_evaluator()
    images, labels = shapes.make_batch("eval", 300)
    real = torch.from_numpy(images).add(1).div(2)
    assert evaluator.accuracy(real, torch.from_numpy(labels)) >= 0.99
    noise = torch.rand(300, 3, shapes.RESOLUTION, shapes.RESOLUTION, generator=torch.Generator().manual_seed(0))
    floor = evaluator.frechet_distance(evaluator.real_images(300, start=300), real)
    assert evaluator.frechet_distance(noise, real) > 20 * floor


@requires_weights
def test_fd_is_measured_against_real_images_of_the_classes_drawn():
    """With --classes ring, FD had compared rings with all six classes (90 against a floor of 2)."""
    evaluator = load_evaluator()
    ring = [shapes.CLASSES.index("ring")] * 12
    images = torch.from_numpy(shapes.make_batch_of(ring, split="val")).add(1).div(2)  # real rings: a perfect model
    scores = evaluator.score(images, torch.tensor(ring))
    assert scores["fd"] < 3 * scores["fd_floor"], scores
    _, labels = shapes.make_batch("val", 24)  # every class in turn: the same real images as before, reordered
    new = torch.from_numpy(shapes.make_batch_of(labels.tolist())).add(1).div(2)
    assert sorted(x.numpy().tobytes() for x in new) == sorted(x.numpy().tobytes() for x in evaluator.real_images(24))


def test_a_config_that_does_not_match_its_weights_is_refused(tmp_path):
    """A config.json asking for more blocks than the file holds had loaded with random blocks, fewer with the
    extra tensors dropped, both silently; --weights naming a file had said the folder does not exist."""
    for layers, said in ((12, "76 tensors missing"), (4, "76 tensors unexpected")):
        folder = tmp_path / f"dit{layers}"
        shutil.copytree(WEIGHTS_DIR / "dit", folder)
        config = folder / "transformer" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": layers}))
        with pytest.raises(WeightsError, match=f"do not match its config.json: {said} \\(transformer_blocks"):
            load_pipeline("dit", weights_dir=folder)
    with pytest.raises(WeightsError, match="is a file: give the folder an export wrote"):
        load_pipeline("dit", weights_dir=WEIGHTS_DIR / "dit" / "training.json")
