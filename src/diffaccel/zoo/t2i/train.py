"""Training of the text-to-image zoo: ``python -m diffaccel.zoo.t2i.train --model vae|pixart|sd|t2i_evaluator``.

Order: the VAE first (the denoisers train on its latents), then either denoiser and the evaluator
in any order. Every run is reproducible from its seed and resumable (see :mod:`.loop`)::

    python -m diffaccel.zoo.t2i.train --model vae --out runs/t2i/vae --export runs/t2i/vae_export
    python -m diffaccel.zoo.t2i.train --model pixart --out runs/t2i/pixart --vae runs/t2i/vae_export \\
        --latents runs/t2i/latents.safetensors --export src/diffaccel/zoo/weights/pixart
    python -m diffaccel.zoo.t2i.train --model pixart --out runs/t2i/pixart --resume   # continue a stopped run

Without ``--resume`` an existing checkpoint in ``--out`` is an error, so that no run is silently
continued with other settings; with it, the saved settings apply. Only the settings that say when to
stop (``--steps``, never below the step reached, ``--stop-after``, ``--time-limit-min``,
``--checkpoint-every``) and where the latent cache lives may be given again; another recipe is refused
(``--stop-after`` and ``--time-limit-min`` apply to one invocation only and are not carried over).
``--export`` writes into a new or empty folder or replaces an earlier export of the same model.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel

from diffaccel.errors import DiffaccelError
from diffaccel.zoo.t2i import loop, text
from diffaccel.zoo.t2i.evaluator import CaptionClassifier, classifier_loss, export_classifier
from diffaccel.zoo.t2i.models import DENOISERS, TextToImage, diffusion_loss
from diffaccel.zoo.t2i.pipelines import pipeline_files, write_pipeline
from diffaccel.zoo.t2i.vae import build_vae, export_vae, load_latents, train_images, vae_loss
from diffaccel.zoo.train_options import (
    COMMON_HELP,
    WEIGHTS_FILES,
    check_export,
    check_folder,
    check_numbers,
    check_overrides,
    check_recipe,
    init_settings,
)
from diffaccel.zoo.weights import WEIGHTS_DIR

MODELS = ("vae", "pixart", "sd", "t2i_evaluator")
DEFAULTS: dict[str, dict] = {
    "vae": dict(steps=3000, batch=16, lr=1e-3, warmup=100, ema_decay=0.995),
    "pixart": dict(steps=14000, batch=64, lr=1e-3, warmup=200),  # the shipped run: 4000 left shapes unlearned
    "sd": dict(steps=4000, batch=64, lr=1e-3, warmup=200),
    "t2i_evaluator": dict(steps=1500, batch=64, lr=2e-3, warmup=100, weight_decay=1e-4, ema_decay=0.99),
}


@dataclass
class TrainConfig:
    model: str = "pixart"
    steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200
    time_limit_min: float = 0.0  # 0 = no limit; otherwise stop (after a checkpoint) when exceeded
    stop_after: int = 0  # 0 = run to `steps`; else stop after this step, keeping the schedule of `steps`
    overrides: str = "{}"  # JSON of config overrides of the trained model (tiny models in tests)
    text_overrides: str = "{}"  # JSON of text-encoder config overrides (denoisers)
    kl_weight: float = 1e-6  # VAE
    caption_dropout: float = 0.1  # denoisers: captions replaced by "" (the null condition)
    min_snr_gamma: float = 5.0  # denoisers
    vae: str = "runs/t2i/vae_export"  # denoisers: the VAE folder whose latents they learn
    latents: str = "runs/t2i/latents.safetensors"  # denoisers: cache of training-split latents
    cache_items: int = 50_000  # denoisers: training items in the latent cache (steps cycle through them)

    @classmethod
    def for_model(cls, model: str, **changes) -> TrainConfig:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
        return cls(**{"model": model, **DEFAULTS[model], **changes})


HELP = {
    **COMMON_HELP,
    "model": "the part to train: vae (first), pixart or sd (denoisers), t2i_evaluator",
    "batch": "images (or captions) per step",
    "stop_after": "stop after this step, keeping the schedule of --steps (0: run to --steps)",
    "overrides": "JSON object of config overrides of the trained model (tiny models in tests)",
    "text_overrides": "denoisers: JSON object of text-encoder config overrides",
    "kl_weight": "vae: weight of the KL term",
    "caption_dropout": "denoisers: share of captions replaced by \"\" (the null condition; 0 to 1)",
    "min_snr_gamma": "denoisers: min-SNR loss weighting, the cap of the signal-to-noise ratio (> 0)",
    "vae": "denoisers: the exported VAE folder whose latents they learn",
    "latents": "denoisers: cache file of the training split's latents",
    "cache_items": "denoisers: training items in the latent cache (steps cycle through them)",
}
AT_LEAST = {"steps": 1, "batch": 1, "warmup": 0, "weight_decay": 0, "seed": 0, "checkpoint_every": 1,
            "time_limit_min": 0, "stop_after": 0, "kl_weight": 0, "cache_items": 1, "threads": 0}
TRAINED = {"vae": AutoencoderKL, "pixart": PixArtTransformer2DModel, "sd": UNet2DConditionModel,
           "t2i_evaluator": CaptionClassifier}  # the class --overrides configures
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def check_config(cfg: TrainConfig, threads: int = 0) -> None:
    """Refuse settings that cannot train, before any folder is made or any work is done."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    check_numbers({**asdict(cfg), "threads": threads}, AT_LEAST, positive=("lr", "min_snr_gamma"),
                  fractions=("ema_decay", "caption_dropout"))
    check_overrides("--overrides", cfg.overrides, init_settings(TRAINED[cfg.model]), TRAINED[cfg.model].__name__)
    check_overrides("--text-overrides", cfg.text_overrides, text.text_encoder_config().to_dict(), "CLIPTextConfig")
    if cfg.model in DENOISERS and not all((Path(cfg.vae) / name).is_file() for name in VAE_FILES):
        raise ValueError(f"--vae {cfg.vae} is not an exported VAE (no {' and '.join(VAE_FILES)} there), whose latents "
                         f"the denoisers learn: make one with `diffaccel train --model vae --out runs/t2i/vae --export "
                         f"{cfg.vae}`, or pass the shipped one, --vae {WEIGHTS_DIR / 'sd' / 'vae'}")


def check_outputs(cfg: TrainConfig, out: Path, dest: Path | None) -> None:
    """Before any work: the run continues only with its own recipe, and the export overwrites no other files."""
    check_recipe(out, asdict(cfg))
    writes = pipeline_files(cfg.model) if cfg.model in DENOISERS else WEIGHTS_FILES
    check_export("--export", dest, writes, {"--out": out, "--vae": Path(cfg.vae) if cfg.model in DENOISERS else None})


def _help(field: str, default: object) -> str:
    """An option's help and its default (per model where the models' defaults differ)."""
    if any(field in d for d in DEFAULTS.values()):
        default = ", ".join(f"{m} {DEFAULTS[m].get(field, default)}" for m in MODELS)
    return f"{HELP[field]} (default: {default})"


def build_task(cfg: TrainConfig) -> tuple[torch.nn.Module, Callable[[int, torch.Generator], torch.Tensor]]:
    """The trainable module and ``loss_at(step, generator)`` of a configuration."""
    torch.manual_seed(cfg.seed)
    overrides = json.loads(cfg.overrides)
    if cfg.model == "vae":
        vae = build_vae(**overrides)
        return vae, lambda step, gen: vae_loss(vae, train_images(step, cfg.batch), gen, cfg.kl_weight)
    if cfg.model == "t2i_evaluator":
        model = CaptionClassifier(**overrides)
        return model, lambda step, gen: classifier_loss(model, step, cfg.batch, gen)
    model = TextToImage(cfg.model, overrides, json.loads(cfg.text_overrides))
    latents, attributes = load_latents(Path(cfg.vae), Path(cfg.latents), cfg.cache_items)

    def loss_at(step: int, gen: torch.Generator) -> torch.Tensor:
        index = (torch.arange(cfg.batch) + step * cfg.batch) % len(latents)
        return diffusion_loss(model, latents[index], attributes[index.numpy()], gen, cfg)

    return model, loss_at


def train(cfg: TrainConfig, out: Path, show_progress: bool = True) -> dict:
    """Train (or continue) the run in ``out``; returns the final step, recent losses and seconds per step."""
    module, loss_at = build_task(cfg)
    return loop.run(module, loss_at, cfg, out, asdict(cfg), desc=f"train {cfg.model}", show_progress=show_progress)


def saved_config(out: Path) -> TrainConfig:
    path = out / "train_config.json"
    try:
        return TrainConfig(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DiffaccelError(f"cannot read the run's recipe {path}: {exc}") from None


def export(out: Path, dest: Path) -> dict:
    """Write the EMA weights of the run in ``out`` to ``dest`` in its shipped form; returns what was measured."""
    cfg = saved_config(out)
    if cfg.model == "vae":
        module = build_vae(**json.loads(cfg.overrides))
        step = loop.load_ema(module, cfg, out)
        return export_vae(module, dest, {"steps": step, "config": asdict(cfg)})
    if cfg.model == "t2i_evaluator":
        module = CaptionClassifier(**json.loads(cfg.overrides))
        step = loop.load_ema(module, cfg, out)
        return export_classifier(module, dest, {"steps": step, "config": asdict(cfg)})
    module = TextToImage(cfg.model, json.loads(cfg.overrides), json.loads(cfg.text_overrides))
    step = loop.load_ema(module, cfg, out)
    return write_pipeline(module, Path(cfg.vae), dest, {"steps": step, "config": asdict(cfg)})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffaccel train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in fields(TrainConfig):
        kind = {"int": int, "float": float, "str": str}[str(field.type)]
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                            choices=MODELS if field.name == "model" else None, help=_help(field.name, field.default))
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, settings)")
    parser.add_argument("--export", type=Path, help="after training, write the EMA weights here")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    parser.add_argument("--export-only", action="store_true", help="export the run in --out without training")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, torch's default)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the training summary (and what the export measured)."""
    args = vars(_parser().parse_args(argv))
    out, dest, resume, only, threads = (args.pop(k) for k in ("out", "export", "resume", "export_only", "threads"))
    check_folder("--out", out)
    check_folder("--export", dest)
    given = {k: v for k, v in args.items() if v is not None}
    has_run = (out / loop.CHECKPOINT).exists()
    if has_run and not (resume or only):
        raise DiffaccelError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    if (resume or only) and not has_run:
        raise DiffaccelError(f"nothing to resume in {out}: no {loop.CHECKPOINT} there")
    if resume or only:  # the saved recipe; when to stop is a setting of each invocation
        cfg = TrainConfig(**{**asdict(saved_config(out)), "stop_after": 0, "time_limit_min": 0.0, **given})
    else:
        cfg = TrainConfig.for_model(given.pop("model", "pixart"), **given)
    check_config(cfg, threads)
    check_outputs(cfg, out, dest)
    if threads:
        torch.set_num_threads(threads)
    summary = {} if only else train(cfg, out)
    if summary:
        print(json.dumps(summary), flush=True)
    if dest:
        summary["export"] = export(out, dest)
        print(json.dumps(summary["export"]), flush=True)
    return summary


if __name__ == "__main__":
    main()
