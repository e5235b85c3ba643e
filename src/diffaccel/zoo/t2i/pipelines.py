"""The shipped text-to-image pipelines as standard diffusers folders, and how to load and call them.

``weights/pixart`` loads with ``PixArtAlphaPipeline.from_pretrained`` and ``weights/sd`` with
``StableDiffusionPipeline.from_pretrained`` (no safety checker), offline, each folder on its own
(model_index.json, scheduler/, text_encoder/, tokenizer/, vae/, transformer/ or unet/, fp16
safetensors). PixArt's pipeline needs three call arguments for these small models (see
:func:`call_kwargs`): ``use_resolution_binning=False`` (its bins exist only for 256-1024 px),
``clean_caption=False`` (cleaning needs bs4 and ftfy, and captions are plain words) and a short
``max_sequence_length`` (the default 120 also works, only slower).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils import logging as diffusers_logging

from diffaccel.errors import WeightsError
from diffaccel.zoo.models import make_scheduler
from diffaccel.zoo.t2i import text
from diffaccel.zoo.t2i.vae import load_vae
from diffaccel.zoo.train_options import check_export
from diffaccel.zoo.weights import WEIGHTS_DIR, check_complete

# class names, looked up when used: importing StableDiffusionPipeline loads transformers' image processors,
# which warn about torchvision; a command that never runs these pipelines should not pay for that
PIPELINES = {"pixart": "PixArtAlphaPipeline", "sd": "StableDiffusionPipeline"}


def pipeline_class(name: str) -> type[DiffusionPipeline]:
    """The stock diffusers class of the ``pixart`` or ``sd`` pipeline (imported quietly on first use)."""
    with quiet_loading():
        return getattr(diffusers, PIPELINES[name])
DENOISER_FOLDER = {"pixart": "transformer", "sd": "unet"}
DEFAULT_GUIDANCE = {"pixart": 4.0, "sd": 4.0}


def _components(name: str) -> list[str]:
    return ["scheduler", "text_encoder", "tokenizer", "vae", DENOISER_FOLDER[name]]


def pipeline_files(name: str) -> list[str]:
    """What an export of the ``name`` pipeline writes at the top of its folder."""
    return ["model_index.json", "training.json", *_components(name)]


def _check_folder(name: str, folder: Path) -> None:
    fix = f"reinstall diffaccel, or retrain and export it with `python -m diffaccel.zoo.t2i.train --model {name}`"
    if not (folder / "model_index.json").is_file():
        raise WeightsError(f"no {name} pipeline in {folder}: model_index.json is missing ({fix})")
    for part in _components(name):
        files = {p.name for p in (folder / part).glob("*")} if (folder / part).is_dir() else set()
        needs_weights = part not in ("scheduler", "tokenizer")
        if needs_weights and files and not any(f.endswith(".safetensors") for f in files) \
                and any(f.endswith(".bin") for f in files):
            raise WeightsError(f"the {name} pipeline in {folder} holds pickled weights (.bin) only for {part}, which "
                               "diffaccel never loads (unpickling runs code): save it with safetensors "
                               "(save_pretrained's default)")
        if not files or (needs_weights and not any(f.endswith(".safetensors") for f in files)):
            raise WeightsError(f"the {name} pipeline in {folder} lacks its {part}/ files ({fix})")


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers' and transformers' loading bars and notes (e.g. PixArt's "expected T5EncoderModel")."""
    levels = diffusers_logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its load errors are raised, not only logged
    transformers.logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        diffusers_logging.enable_progress_bar()
        transformers.logging.enable_progress_bar()


def load_t2i_pipeline(name: str, sampler: str = "ddim", weights_dir: Path | None = None,
                      dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """The shipped ``pixart`` or ``sd`` pipeline (stock diffusers class) with a ``ddim`` (the folder's own
    scheduler) or ``dpm`` (DPM-Solver++ 2M, same noise schedule) sampler, progress bar off.

    Raises :class:`diffaccel.errors.WeightsError` when the folder is missing or corrupt."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    if sampler not in ("ddim", "dpm"):
        raise ValueError(f"unknown sampler {sampler!r}; choose ddim or dpm")
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR / name
    _check_folder(name, folder)
    cls = pipeline_class(name)  # before quiet_loading: it does not nest
    try:  # the fp16 files load as stored, then convert exactly (no dtype argument: its name changed in diffusers)
        with quiet_loading():
            pipe = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                      low_cpu_mem_usage=False).to(dtype)
    except Exception as exc:  # diffusers and transformers raise many types for a damaged folder
        raise WeightsError(f"the {name} pipeline in {folder} is corrupt: {str(exc).splitlines()[0][:200]} "
                           "(reinstall diffaccel or re-export it)") from exc
    for part in ("text_encoder", "vae", DENOISER_FOLDER[name]):
        check_complete(getattr(pipe, part), folder / part)
    if sampler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                                 solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIXART_CALL = {"use_resolution_binning": False, "clean_caption": False, "max_sequence_length": text.MAX_LENGTH}


def call_kwargs(pipe: DiffusionPipeline) -> dict:
    """Extra keyword arguments a call of this pipeline needs (PixArt's; none for SD)."""
    return dict(PIXART_CALL) if isinstance(pipe, pipeline_class("pixart")) else {}


@torch.no_grad()
def generate(pipe: DiffusionPipeline, prompts: list[str], seeds: list[int], steps: int = 50,
             guidance: float = 4.0) -> torch.Tensor:
    """Images (N, 3, 64, 64) in [0, 1], image ``i`` from ``prompts[i]`` and its own generator seeded ``seeds[i]``
    (so an image does not depend on the batch it is drawn in)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                output_type="pt", **call_kwargs(pipe)).images


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def write_pipeline(model: torch.nn.Module, vae_folder: Path, dest: Path, info: dict) -> dict:
    """Write a trained :class:`~diffaccel.zoo.t2i.models.TextToImage` with the VAE of ``vae_folder`` as a
    standard fp16 pipeline folder at ``dest`` (replacing an earlier export there, never other files); returns
    ``info`` with the folder's size."""
    kind = model.kind
    check_export("--export", dest, pipeline_files(kind), {"--vae": vae_folder})
    vae, scheduler = load_vae(vae_folder), make_scheduler("ddim")
    scheduler.register_to_config(steps_offset=1)  # unused with trailing spacing; SD's pipeline warns unless 1
    if kind == "pixart":
        pipe = pipeline_class("pixart")(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=vae,
                                   transformer=model.transformer, scheduler=scheduler)
    else:
        pipe = pipeline_class("sd")(vae=vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                       unet=model.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if dest.exists():
        shutil.rmtree(dest)
    pipe.to(torch.float16).save_pretrained(dest, safe_serialization=True)
    shutil.rmtree(dest / "tokenizer")
    text.save_tokenizer(model.tokenizer, dest / "tokenizer")
    index = json.loads((dest / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]  # the class name in transformers 4 and 5
    (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if (vae_folder / "training.json").exists():
        shutil.copy(vae_folder / "training.json", dest / "vae" / "training.json")
    info = {**info, "size_mb": round(_folder_mb(dest), 2)}
    (dest / "training.json").write_text(json.dumps(info, indent=2))
    return info
