"""The main job: sample every requested class from an embedded model, then score the samples."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from diffaccel.eval.cost import count_macs
from diffaccel.eval.fidelity import fidelity
from diffaccel.eval.io import write_json
from diffaccel.eval.timing import wall_ratio
from diffaccel.plan import Plan
from diffaccel.runtime.executor import Executor
from diffaccel.seeds import image_seed
from diffaccel.zoo import shapes
from diffaccel.zoo.pipeline import ShapesPipeline


@dataclass
class GenerateConfig:
    model: str = "dit"
    classes: list[str] | None = None
    per_class: int = 8
    steps: int = 50
    sampler: str = "ddim"
    guidance: float = 3.0
    seed: int = 0
    batch_size: int = 64


def job_items(cfg: GenerateConfig) -> tuple[torch.Tensor, list[int]]:
    """Labels and noise seeds of every image of a job, class by class."""
    ids = shapes.class_ids(cfg.classes)
    labels = [c for c in ids for _ in range(cfg.per_class)]
    seeds = [image_seed(cfg.seed, c, j) for c in ids for j in range(cfg.per_class)]
    return torch.tensor(labels), seeds


def sample(pipe: ShapesPipeline, labels: torch.Tensor, seeds: list[int], steps: int, guidance: float,
           batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Images in [0, 1] for the given labels and per-image seeds, in batches."""
    out = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress or len(starts) < 2):
        gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        out.append(pipe(labels[start:start + batch_size], num_inference_steps=steps,
                        guidance_scale=guidance, generator=gens).images)
    return torch.cat(out)


def macs_per_image(pipe: ShapesPipeline, steps: int, guidance: float) -> int:
    """Denoiser MACs of one unaccelerated image: one forward per step, two under guidance."""
    x = torch.zeros(1, pipe.denoiser.config.in_channels, pipe.denoiser.config.sample_size,
                    pipe.denoiser.config.sample_size)
    per_forward = count_macs(lambda: pipe.denoise(x, torch.tensor([500]), torch.tensor([0])))
    return per_forward * steps * (2 if guidance > 1.0 else 1)


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 4) -> None:
    """Images (N, 3, H, W) in [0, 1] as one PNG, ``rows`` rows (one per class), upscaled."""
    n, _, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.ones(3, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = image
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(array)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def _timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_generate(cfg: GenerateConfig, out: Path, pipe: ShapesPipeline, evaluator, plan: Plan | None = None,
                 compare: bool = False, progress: bool = True) -> dict:
    """Generate and score; with a plan, run it (and with ``compare`` the unaccelerated model too,
    batch by batch interleaved, after one discarded warm-up of each) and add fidelity and speed."""
    labels, seeds = job_items(cfg)
    executor = Executor(pipe.denoiser, plan) if plan is not None else None

    def run(batch: slice, accelerated: bool) -> torch.Tensor:
        def call():
            return sample(pipe, labels[batch], seeds[batch], cfg.steps, cfg.guidance, cfg.batch_size)
        if not accelerated:
            return call()
        executor.install(pipe.scheduler)
        try:
            result = call()
        finally:
            executor.remove()
        spent["macs"] += executor.stats.macs
        spent["full_macs"] += executor.stats.full_macs
        return result

    spent = {"macs": 0, "full_macs": 0}
    batches = [slice(i, i + cfg.batch_size) for i in range(0, len(labels), cfg.batch_size)]
    if executor is not None:
        run(slice(0, 1), accelerated=True)  # warm-up: measures unit costs, fills caches of torch
        if compare:
            run(slice(0, 1), accelerated=False)
        spent.update(macs=0, full_macs=0)
    fast, base, base_times, fast_times = [], [], [], []
    for batch in tqdm(batches, desc="sampling", disable=not progress or len(batches) < 2):
        if compare or executor is None:
            images, seconds = _timed(lambda b=batch: run(b, accelerated=False))
            base.append(images)
            base_times.append(seconds)
        if executor is not None:
            images, seconds = _timed(lambda b=batch: run(b, accelerated=True))
            fast.append(images)
            fast_times.append(seconds)
    base_s, fast_s = sum(base_times), sum(fast_times)
    main = torch.cat(fast) if executor is not None else torch.cat(base)
    full_macs = macs_per_image(pipe, cfg.steps, cfg.guidance)
    record = {
        "model": cfg.model,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "seed": cfg.seed,
        "classes": [shapes.CLASSES[c] for c in shapes.class_ids(cfg.classes)],
        "per_class": cfg.per_class,
        "n_images": len(main),
        **evaluator.score(main, labels),
        "fd_samples": len(main),
        "macs_per_image": full_macs,
        "seconds": fast_s if executor is not None else base_s,
        "threads": torch.get_num_threads(),
    }
    if executor is not None:
        record["plan"] = plan.model_dump(exclude_none=True)
        record["macs_per_image"] = round(full_macs * spent["macs"] / spent["full_macs"])
        record["speedup_macs"] = spent["full_macs"] / spent["macs"]
        record["work"] = executor.stats.as_dict()
    if compare and executor is not None:
        reference = torch.cat(base)
        base_scores = evaluator.score(reference, labels)
        record.update(fidelity(main, reference))
        record["speedup_wall"] = wall_ratio(base_times, fast_times)
        record["wall_pairs"] = len(base_times)
        record["baseline"] = {"accuracy": base_scores["accuracy"], "fd": base_scores["fd"],
                              "macs_per_image": full_macs, "seconds": base_s}
    out.mkdir(parents=True, exist_ok=True)
    save_grid(main, rows=len(shapes.class_ids(cfg.classes)), path=out / "grid.png")
    if compare and executor is not None:
        save_grid(reference, rows=len(shapes.class_ids(cfg.classes)), path=out / "grid_baseline.png")
    write_json(out / "record.json", record)
    return record
