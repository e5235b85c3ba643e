"""The embedded evaluator: a small classifier of the shapes data set, shipped with its weights.

It plays the role Inception plays for FID: its class predictions give the *adherence* of generated
images (accuracy against the requested class) and its penultimate features give a Fréchet distance
to real images (computed by torchmetrics), next to the real-vs-real distance as the floor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from diffaccel.zoo import shapes

log = logging.getLogger("diffaccel")

class ShapesClassifier(ModelMixin, ConfigMixin):
    """Images in [0, 1], shape (N, 3, H, W) -> class logits; ``features`` gives the penultimate layer."""

    @register_to_config
    def __init__(self, num_classes: int = shapes.NUM_CLASSES, width: int = 32, num_features: int = 128):
        super().__init__()

        def stage(cin: int, cout: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU()]

        self.body = torch.nn.Sequential(
            *stage(3, width), *stage(width, width), torch.nn.AvgPool2d(2),
            *stage(width, 2 * width), *stage(2 * width, 2 * width), torch.nn.AvgPool2d(2),
            *stage(2 * width, num_features), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class _FeatureExtractor(torch.nn.Module):
    """Adapter for torchmetrics' Fréchet distance, which asks for ``num_features``."""

    def __init__(self, classifier: ShapesClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


class Evaluator:
    """Scores generated images: class accuracy and Fréchet distance to real ``eval`` images."""

    def __init__(self, classifier: ShapesClassifier, batch_size: int = 256):
        self.classifier = classifier.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted classes of images in [0, 1]."""
        return torch.cat([self.classifier(chunk).argmax(1) for chunk in images.split(self.batch_size)])

    def correct(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image, whether its class is read back as ``labels`` says (the paired comparisons' input)."""
        return self.predict(images) == labels

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float(self.correct(images, labels).float().mean())

    @torch.no_grad()
    def frechet_distance(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        metric = FrechetInceptionDistance(feature=_FeatureExtractor(self.classifier), normalize=True)
        for chunk in reference.split(self.batch_size):
            metric.update(chunk, real=True)
        for chunk in images.split(self.batch_size):
            metric.update(chunk, real=False)
        return float(metric.compute())

    def real_images(self, count: int, split: str = "eval", start: int = 0) -> torch.Tensor:
        images, _ = shapes.make_batch(split, count, start=start)
        return torch.from_numpy(images).add(1).div(2)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Accuracy, Fréchet distance to as many real images of the same classes, and the real-vs-real
        floor (no distance for a single image: a distribution of one has no covariance)."""
        accuracy = {"accuracy": self.accuracy(images, labels)}
        if len(images) < 2:
            return accuracy
        # real images of the same classes (with --classes ring, all six classes had made FD 90 of a floor of 2)
        labels = [int(c) for c in labels.reshape(-1)]
        most = max(labels.count(c) for c in set(labels))
        real_a, real_b = (torch.from_numpy(shapes.make_batch_of(labels, skip=skip)).add(1).div(2) for skip in (0, most))
        return {**accuracy, "fd": self.frechet_distance(images, real_a),
                "fd_floor": self.frechet_distance(real_b, real_a)}


def train_evaluator(out: Path, seed: int = 0, steps: int = 2000, batch: int = 128, lr: float = 2e-3) -> float:
    """Train the classifier on the training split with mild noise and blur augmentation (so that
    slightly imperfect generated images are still read by shape); returns validation accuracy."""
    torch.manual_seed(seed)
    model = ShapesClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blur = blur.expand(3, 1, 3, 3)
    model.train()
    for step in tqdm(range(steps), desc="train evaluator"):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        images, labels = shapes.make_batch("train", batch, start=step * batch)
        x = torch.from_numpy(images).add(1).div(2)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur, groups=3)
        use_blur = (torch.rand(batch, 1, 1, 1, generator=gen) < 0.3).float()
        x = x * (1 - use_blur) + blurred * use_blur
        x = x + torch.randn(x.shape, generator=gen) * torch.rand(batch, 1, 1, 1, generator=gen) * 0.08
        loss = F.cross_entropy(model(x), torch.from_numpy(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    val_images, val_labels = shapes.make_batch("val", 3000)
    accuracy = Evaluator(model).accuracy(torch.from_numpy(val_images).add(1).div(2), torch.from_numpy(val_labels))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(
        {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "val_accuracy": accuracy, "val_images": 3000}))
    log.info("evaluator validation accuracy %.4f on 3000 images", accuracy)
    return accuracy


__all__ = ["Evaluator", "ShapesClassifier", "train_evaluator"]
