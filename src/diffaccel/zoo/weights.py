"""Loading the embedded models and evaluator shipped inside the package (safetensors only)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from safetensors import safe_open

from diffaccel.errors import WeightsError
from diffaccel.zoo.evaluator import Evaluator, ShapesClassifier
from diffaccel.zoo.models import MODEL_NAMES, ClassTokenEmbedder, make_scheduler
from diffaccel.zoo.pipeline import ShapesDiTPipeline, ShapesPipeline, ShapesUNetPipeline

WEIGHTS_DIR = Path(str(resources.files("diffaccel.zoo") / "weights"))


def check_complete(module: torch.nn.Module, folder: Path) -> None:
    """Refuse weights files that do not hold exactly the tensors of the model ``folder``'s config.json builds:
    diffusers and transformers leave missing layers at their random start and drop extra tensors, quietly."""
    stored: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            stored.update(handle.keys())
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        said = [f"{len(keys)} tensors {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise WeightsError(f"the weights in {folder} do not match its config.json: {' and '.join(said)} (re-export "
                           "them, or restore the config.json they were saved with)")


def _load(cls, folder: Path):
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise WeightsError(f"no weights in {folder}: expected config.json and a .safetensors file "
                           "(reinstall diffaccel, or train and export them with `diffaccel train`)")
    try:
        module = cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False).float().eval()
    except Exception as exc:  # diffusers raises many types for a damaged folder
        raise WeightsError(f"weights in {folder} are corrupt or do not match {cls.__name__}: "
                           f"{str(exc).splitlines()[0][:200]} (reinstall diffaccel or re-export them)") from exc
    check_complete(module, folder)
    return module


def load_pipeline(model: str = "dit", sampler: str = "ddim", weights_dir: Path | None = None) -> ShapesPipeline:
    """The embedded ``dit`` or ``unet`` model as a pipeline with a fresh ``ddim`` or ``dpm`` scheduler."""
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR / model
    if folder.exists() and not folder.is_dir():
        raise WeightsError(f"--weights {folder} is a file: give the folder an export wrote (holding "
                           f"{'transformer/' if model == 'dit' else 'unet/ and class_embedder/'})")
    if not folder.is_dir():
        raise WeightsError(f"weights directory {folder} does not exist")
    scheduler = make_scheduler(sampler)
    if model == "dit":
        pipe = ShapesDiTPipeline(_load(DiTTransformer2DModel, folder / "transformer"), scheduler)
    else:
        pipe = ShapesUNetPipeline(_load(UNet2DConditionModel, folder / "unet"),
                                  _load(ClassTokenEmbedder, folder / "class_embedder"), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_evaluator(weights_dir: Path | None = None) -> Evaluator:
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR / "evaluator"
    return Evaluator(_load(ShapesClassifier, folder))
