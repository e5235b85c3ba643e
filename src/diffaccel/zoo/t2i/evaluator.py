"""The text-to-image evaluator: reads shape, shape colour, background colour and size back from an image.

Built from the shapes evaluator's parts: its convolutional ``ShapesClassifier`` body (run on the image
average-pooled to 32x32) with one linear head per attribute, and its Fréchet distance
(:meth:`diffaccel.zoo.evaluator.Evaluator.frechet_distance`) in the 128 pooled features. *Prompt
adherence* is the fraction of images whose four attributes are all read back as the prompt says.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from diffaccel.zoo.evaluator import Evaluator, ShapesClassifier
from diffaccel.zoo.t2i import captions
from diffaccel.zoo.weights import WEIGHTS_DIR, _load

NAMES = tuple(captions.ATTRIBUTES)  # shape, colour, background, size


class CaptionClassifier(ModelMixin, ConfigMixin):
    """Images in [0, 1], (N, 3, 64, 64) -> logits per attribute; ``features`` gives the pooled features."""

    @register_to_config
    def __init__(self, width: int = 32, num_features: int = 128):
        super().__init__()
        self.backbone = ShapesClassifier(num_classes=len(captions.SHAPES), width=width, num_features=num_features)
        self.colour = torch.nn.Linear(num_features, len(captions.COLOURS))
        self.background = torch.nn.Linear(num_features, len(captions.COLOURS))
        self.size = torch.nn.Linear(num_features, len(captions.SIZES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(F.avg_pool2d(images, 2))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits of shape, colour, background and size, in that order."""
        f = self.features(images)
        return [self.backbone.head(f), self.colour(f), self.background(f), self.size(f)]


_BLUR = (torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16).expand(3, 1, 3, 3)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur and noise (as the shapes evaluator is trained), so imperfect generated images still read."""
    n = x.shape[0]
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _BLUR, groups=3)
    use_blur = (torch.rand(n, 1, 1, 1, generator=gen) < 0.3).float()
    x = x * (1 - use_blur) + blurred * use_blur
    return (x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.08).clamp(0, 1)


def classifier_loss(model: CaptionClassifier, step: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Summed cross-entropy of the four heads on training items of step ``step`` (all combinations)."""
    images, attrs = captions.make_batch("train", batch, start=step * batch, include_held_out=True)
    x = augment(torch.from_numpy(images).add(1).div(2), gen)
    targets = torch.from_numpy(captions.attribute_tensor(attrs))
    return sum(F.cross_entropy(logits, targets[:, i]) for i, logits in enumerate(model(x)))


def _attribute_targets(prompts_or_attributes: Sequence) -> torch.Tensor:
    if len(prompts_or_attributes) and isinstance(prompts_or_attributes[0], str):
        return torch.tensor([tuple(captions.parse_caption(p)) for p in prompts_or_attributes], dtype=torch.long)
    return torch.as_tensor(captions.attribute_tensor(list(prompts_or_attributes)))


class T2IEvaluator:
    """Scores text-to-image samples: prompt adherence, per-attribute accuracy, Fréchet distance and its floor."""

    def __init__(self, classifier: CaptionClassifier, batch_size: int = 256):
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self._fd = Evaluator(classifier, batch_size)  # the shapes evaluator's Fréchet distance, on our features

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 4) predicted attribute indices (shape, colour, background, size) of images in [0, 1]."""
        chunks = [torch.stack([lg.argmax(1) for lg in self.classifier(c)], 1) for c in images.split(self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, len(NAMES), dtype=torch.long)

    def correct(self, images: torch.Tensor, prompts_or_attributes: Sequence) -> torch.Tensor:
        """(N, 4) whether each attribute of each image is read back as its prompt says."""
        targets = _attribute_targets(prompts_or_attributes)
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} prompts")
        return self.predict(images) == targets

    def attribute_scores(self, images: torch.Tensor, prompts_or_attributes: Sequence) -> dict[str, float]:
        """``adherence`` (all four attributes right) and ``accuracy_<attribute>`` for each attribute.
        ``prompts_or_attributes``: captions, or Attributes / (N, 4) index rows."""
        right = self.correct(images, prompts_or_attributes)
        scores = {"adherence": float(right.all(1).float().mean())}
        scores.update({f"accuracy_{name}": float(right[:, i].float().mean()) for i, name in enumerate(NAMES)})
        return scores

    def adherence(self, images: torch.Tensor, prompts_or_attributes: Sequence) -> float:
        """Fraction of images whose every attribute named in the prompt is read back."""
        return self.attribute_scores(images, prompts_or_attributes)["adherence"]

    def frechet_distance(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        return self._fd.frechet_distance(images, reference)

    @staticmethod
    def real_images(count: int, start: int = 0, split: str = "eval") -> torch.Tensor:
        """Real images in [0, 1]: items ``start .. start+count`` of a split (``eval``: balanced combinations)."""
        images, _ = captions.make_batch(split, count, start=start)
        return torch.from_numpy(images).add(1).div(2)

    def score(self, images: torch.Tensor, prompts_or_attributes: Sequence) -> dict[str, float]:
        """Attribute scores, Fréchet distance to as many real ``eval`` images of the same captions and
        the floor: the distance between those and as many others of the same captions."""
        scores = self.attribute_scores(images, prompts_or_attributes)
        if len(images) < 2:  # a distribution of one has no covariance: no distance
            return scores
        n = len(images)
        attrs = [captions.Attributes(*row) for row in _attribute_targets(prompts_or_attributes).tolist()]
        most = max(attrs.count(a) for a in set(attrs))
        real_a, real_b = (torch.from_numpy(captions.make_batch_of(attrs, skip=skip)).add(1).div(2)
                          for skip in (0, most))
        return {**scores, "fd": self.frechet_distance(images, real_a),
                "fd_floor": self.frechet_distance(real_b, real_a), "fd_samples": n}


def export_classifier(model: CaptionClassifier, dest: Path, info: dict, count: int = 1440) -> dict:
    """Write the classifier (fp32 safetensors, 1 MB) to ``dest`` with its accuracy on real validation images."""
    model.eval().save_pretrained(dest, safe_serialization=True)
    evaluator = load_t2i_evaluator(dest)
    val_images, val_attrs = captions.make_batch("val", count)
    info = {**info, "val_images": count, **{f"val_{k}": v for k, v in
                                            evaluator.attribute_scores(
                                                torch.from_numpy(val_images).add(1).div(2), val_attrs).items()}}
    (dest / "training.json").write_text(json.dumps(info, indent=2))
    return info


def load_t2i_evaluator(weights_dir: Path | None = None) -> T2IEvaluator:
    """The shipped evaluator (``weights/t2i_evaluator``); WeightsError when missing or corrupt."""
    return T2IEvaluator(_load(CaptionClassifier, Path(weights_dir) if weights_dir else WEIGHTS_DIR / "t2i_evaluator"))
