"""Training of the embedded models and the evaluator: ``python -m diffaccel.zoo.train``.

Reproducible from a seed: the data of step ``s`` is items ``s*B .. (s+1)*B`` of the training split
and all randomness of that step comes from a generator seeded with ``(seed, s)``, so a run resumed
from a checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel
from diffusers.models.embeddings import LabelEmbedding
from tqdm import tqdm

from diffaccel.zoo import checkpoint, shapes
from diffaccel.zoo.evaluator import train_evaluator
from diffaccel.zoo.models import NULL_CLASS, SCHEDULER_CONFIG, build_dit, build_unet
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

log = logging.getLogger("diffaccel")
MODELS = ("dit", "unet", "evaluator")


@dataclass
class TrainConfig:
    model: str = "dit"
    steps: int = 6000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    seed: int = 0
    checkpoint_every: int = 200
    time_limit_min: float = 0.0  # 0 = no limit; otherwise stop (after a checkpoint) when exceeded
    stop_after: int = 0  # 0 = run to `steps`; else stop after this step, keeping the schedule of `steps`
    overrides: str = "{}"  # JSON of model-config overrides (tiny models in tests)
    device: str = "cpu"  # "cuda" trains on a GPU; the random draws stay on the CPU, seeded as above
    workers: int = 0  # processes that render training batches ahead (0 = render in the loop)


HELP = {
    **COMMON_HELP,
    "model": "dit or unet (the class-label denoisers), or evaluator (the classifier the quality metrics use)",
    "batch": "images per step",
    "label_dropout": "share of labels replaced by the null class, for classifier-free guidance (0 to 1)",
    "min_snr_gamma": "min-SNR loss weighting: the cap of the signal-to-noise ratio (> 0)",
    "stop_after": "stop after this step, keeping the schedule of --steps (0: run to --steps)",
    "overrides": "JSON object of model-config overrides (tiny models in tests)",
    "device": "cpu, or cuda to train on a GPU (the random draws stay on the CPU)",
    "workers": "processes that render training batches ahead (0: render in the loop)",
}
AT_LEAST = {"steps": 1, "batch": 1, "warmup": 0, "weight_decay": 0, "seed": 0, "checkpoint_every": 1,
            "time_limit_min": 0, "stop_after": 0, "workers": 0, "threads": 0}
TRAINED = {"dit": DiTTransformer2DModel, "unet": UNet2DConditionModel}  # the class --overrides configures
EXPORT_FILES = {"dit": ("training.json", "transformer"), "unet": ("training.json", "unet", "class_embedder")}
EVALUATOR_OPTIONS = ("model", "steps", "batch", "lr", "seed")


def check_config(cfg: TrainConfig, threads: int = 0) -> None:
    """Refuse settings that cannot train, before any folder is made or any work is done."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    check_numbers({**asdict(cfg), "threads": threads}, AT_LEAST, positive=("lr", "min_snr_gamma"),
                  fractions=("ema_decay", "label_dropout"))
    if cfg.model in TRAINED:
        check_overrides("--overrides", cfg.overrides, init_settings(TRAINED[cfg.model]), TRAINED[cfg.model].__name__)
    if not (cfg.device == "cpu" or cfg.device.split(":")[0] == "cuda"):
        raise ValueError(f"--device must be cpu or cuda (cuda:N), got {cfg.device!r}")
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA GPU is available; train with --device cpu")


def check_outputs(cfg: TrainConfig, out: Path, dest: Path | None) -> None:
    """Before any work: a run continues only with its own recipe, and no output overwrites other files. The
    evaluator's recipe is short and restarts when rerun, writing its weights into --out: the options it would
    ignore are refused, and so is an --out holding anything but an earlier evaluator."""
    if cfg.model != "evaluator":
        check_recipe(out, asdict(cfg))
        check_export("--export", dest, EXPORT_FILES[cfg.model], {"--out": out})
        return
    default = asdict(TrainConfig())
    ignored = [f"--{k.replace('_', '-')}" for k, v in asdict(cfg).items()
               if k not in EVALUATOR_OPTIONS and v != default[k]] + ["--export"] * (dest is not None)
    if ignored:
        raise ValueError("--model evaluator takes only --steps, --batch, --lr and --seed (it writes its weights into "
                         f"--out and starts over when rerun): drop {', '.join(ignored)}")
    check_export("--out", out, WEIGHTS_FILES)


class Denoiser(torch.nn.Module):
    """One trainable module per model, so training, EMA and checkpoints treat both alike."""

    def __init__(self, kind: str, overrides: dict):
        super().__init__()
        self.kind = kind
        if kind == "dit":
            self.transformer = build_dit(**overrides)
            # diffusers draws label dropout independently in every block; we drop labels ourselves,
            # once per sample, so that all blocks agree on the null class.
            for module in self.transformer.modules():
                if isinstance(module, LabelEmbedding):
                    module.dropout_prob = 0.0
            _init_dit(self.transformer)
        elif kind == "unet":
            self.unet, self.class_embedder = build_unet(**overrides)
        else:
            raise ValueError(f"unknown model {kind!r}; choose dit or unet")

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "dit":
            return self.transformer(x, timestep=t, class_labels=labels).sample
        return self.unet(x, t, encoder_hidden_states=self.class_embedder(labels)).sample


def _init_dit(model: torch.nn.Module) -> None:
    """The DiT paper's initialisation (diffusers keeps PyTorch defaults, meant for loading weights):
    Xavier linears, small embeddings, and zeroed adaLN modulations and output projection, so every
    block starts as the identity. It makes the small DiT learn markedly faster."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.02)
    for block in model.transformer_blocks:
        for name, module in block.norm1.emb.named_modules():
            if isinstance(module, torch.nn.Linear) and "timestep_embedder" in name:
                torch.nn.init.normal_(module.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for module in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _to_device(value: torch.Tensor, device: str) -> torch.Tensor:
    """Copy without waiting for the GPU (a copy from pageable memory would stall the queue)."""
    if device == "cpu" or value.device.type != "cpu":
        return value.to(device)
    return value.pin_memory().to(device, non_blocking=True)


def diffusion_loss(model: Denoiser, noise_scheduler: DDPMScheduler, images: torch.Tensor, labels: torch.Tensor,
                   gen: torch.Generator, cfg: TrainConfig) -> torch.Tensor:
    """v-prediction loss with min-SNR weighting, labels dropped to the null class at random."""
    n = images.shape[0]
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
    noise = torch.randn(images.shape, generator=gen)
    drop = torch.rand(n, generator=gen) < cfg.label_dropout
    labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
    alpha_bar = noise_scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)
    images, noise, t, labels, weight = (_to_device(v, cfg.device) for v in (images, noise, t, labels, weight))
    noisy = noise_scheduler.add_noise(images, noise, t)
    target = noise_scheduler.get_velocity(images, noise, t)
    per_sample = F.mse_loss(model(noisy, t, labels), target, reduction="none").mean(dim=(1, 2, 3))
    return (weight * per_sample).mean() / weight.mean().detach()


def _render(args: tuple[int, int]) -> tuple:
    step, batch = args
    return shapes.make_batch("train", batch, start=step * batch)


def batches(cfg: TrainConfig, first: int, last: int) -> Iterator[tuple]:
    """Training batches of steps ``first .. last-1`` in order, rendered ahead by worker processes."""
    jobs = ((step, cfg.batch) for step in range(first, last))
    if cfg.workers <= 0:
        yield from map(_render, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
        yield from pool.imap(_render, jobs, chunksize=4)


def train(cfg: TrainConfig, out: Path, show_progress: bool = True) -> dict:
    """Train (or resume) into ``out``; returns a summary with the final step and recent loss."""
    torch.manual_seed(cfg.seed)
    model = Denoiser(cfg.model, json.loads(cfg.overrides)).to(cfg.device)
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    floats = [k for k, v in ema.items() if v.dtype.is_floating_point]
    others = [k for k in ema if k not in floats]
    ckpt_path = out / "checkpoint.safetensors"
    step, losses = 0, []
    if ckpt_path.exists():
        step, meta = checkpoint.load(ckpt_path, model, ema, optimizer)
        losses = meta.get("losses", [])
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    start = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", disable=not show_progress)
    model.train()
    last = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    pending: list[torch.Tensor] = []  # losses not yet read back (reading one waits for the GPU)
    first, warm = step, None
    for images, labels in batches(cfg, step, last):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = diffusion_loss(model, noise_scheduler, torch.from_numpy(images), torch.from_numpy(labels), gen, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            state = model.state_dict()
            torch._foreach_lerp_([ema[k] for k in floats], [state[k] for k in floats], 1 - decay)
            for name in others:
                ema[name].copy_(state[name])
        pending.append(loss.detach())
        step += 1
        if step == first + 20:
            warm = time.monotonic()
        bar.update(1)
        timed_out = cfg.time_limit_min and time.monotonic() - start > cfg.time_limit_min * 60
        save = step % cfg.checkpoint_every == 0 or step == last or timed_out
        if len(pending) == 50 or save:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if save:
            checkpoint.save(ckpt_path, model, ema, optimizer, step, {"losses": losses[-2000:]})
        if timed_out:
            break
    bar.close()
    if cfg.device != "cpu":
        torch.cuda.synchronize()
    per_step = (time.monotonic() - warm) / (step - first - 20) if warm and step > first + 20 else None
    return {"step": step, "loss_first": losses[:20], "loss_last": losses[-20:], "seconds_per_step": per_step}


def export(out: Path, dest: Path) -> None:
    """Write the EMA weights of a finished run as a diffusers folder (fp16 safetensors + config)."""
    cfg = TrainConfig(**json.loads((out / "train_config.json").read_text()))
    model = Denoiser(cfg.model, json.loads(cfg.overrides))
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    step, _ = checkpoint.load(out / "checkpoint.safetensors", model, ema, optimizer)
    model.load_state_dict(ema)
    parts = {"transformer": model.transformer} if cfg.model == "dit" else {
        "unet": model.unet, "class_embedder": model.class_embedder}
    for name, module in parts.items():
        module.to(torch.float16).save_pretrained(dest / name, safe_serialization=True)
    (dest / "training.json").write_text(json.dumps({"steps": step, "config": asdict(cfg)}, indent=2))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffaccel train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="--model evaluator takes only --steps, --batch, --lr, --seed, --out and "
                                     "--threads (the shipped one: --steps 1500 --batch 128 --lr 2e-3); the defaults "
                                     "above are the denoisers'")
    for field, default in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default,
                            choices=MODELS if field == "model" else None, help=f"{HELP[field]} (default: {default})")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, config)")
    parser.add_argument("--export", type=Path, help="after training, write the EMA weights here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, torch's default)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out`` run folder, ``--export`` weights folder and the ``TrainConfig`` fields."""
    args = vars(_parser().parse_args(argv))
    out, dest, threads = args.pop("out"), args.pop("export"), args.pop("threads")
    cfg = TrainConfig(**args)
    check_config(cfg, threads)
    check_folder("--out", out)
    check_folder("--export", dest)
    check_outputs(cfg, out, dest)  # a checkpoint in --out is continued: with its own recipe only
    if threads:
        torch.set_num_threads(threads)
    if cfg.model == "evaluator":
        train_evaluator(out, seed=cfg.seed, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr)
        return
    log.info("last losses: %s", json.dumps(train(cfg, out)["loss_last"][-5:]))
    if dest:
        export(out, dest)


if __name__ == "__main__":
    main()
