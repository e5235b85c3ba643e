"""Quality bar of the shipped text-to-image pipelines: prompt adherence, per-attribute accuracy, Fréchet distance.

    python benchmarks/quality_t2i.py --model pixart [--n 720] [--guidance 4.0] [--samplers ddim] [--threads 1]

Prompts and seeds are the first ``--n`` items of the held-out ``eval`` split, which walks through all
360 attribute combinations (6 shapes x 30 ordered colour pairs x 2 sizes) in a fixed shuffled order:
``--n 720`` draws every combination exactly twice. The 36 combinations the training split never
shows (``captions.HELD_OUT_COMBOS``) are scored separately as well. The Fréchet distance is taken in
the evaluator's features against as many real ``eval`` images, with the real-vs-real floor of two
disjoint real sets. ``--split calib`` draws prompts and seeds from the calibration split instead
(to choose the guidance scale without looking at the evaluation set). Writes
``benchmarks/results/quality_<model>.json`` for the ``eval`` split.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

from diffaccel.zoo.t2i import captions
from diffaccel.zoo.t2i.evaluator import load_t2i_evaluator
from diffaccel.zoo.t2i.pipelines import generate, load_t2i_pipeline
from diffaccel.zoo.weights import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parent.parent
STEPS = {"ddim": 50, "dpm": 20}


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Images (N, 3, H, W) in [0, 1] as one PNG, ``columns`` per row, 2x nearest-neighbour upscaled."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.ones(3, rows * (h + 2), columns * (w + 2))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = image
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).resize((array.shape[1] * 2, array.shape[0] * 2), Image.NEAREST).save(path)


def grid_prompts() -> list[str]:
    """For the sample grids: the first seen combination of each shape in the eval order, and the first two
    held-out ones."""
    seen = [next(c for c in captions.TRAIN_COMBOS if c.shape == s) for s in range(len(captions.SHAPES))]
    return [captions.caption(c) for c in seen + captions.HELD_OUT_COMBOS[:2]]


def sample_grid(model: str, guidance: float, path: Path, seeds: int = 4, weights_dir: Path | None = None) -> None:
    """One row per prompt of :func:`grid_prompts`, ``seeds`` images each (eval-range seeds past the benchmark's)."""
    prompts = grid_prompts()
    listed = [p for p in prompts for _ in range(seeds)]
    start = captions.SPLITS["eval"] + 100_000
    images = generate(load_t2i_pipeline(model, "ddim", weights_dir), listed, list(range(start, start + len(listed))),
                      STEPS["ddim"], guidance)
    save_grid(images, path, columns=seeds)
    print(f"wrote {path}: rows, top to bottom: " + "; ".join(prompts))


def run_one(model: str, sampler: str, guidance: float, split: str, n: int, batch: int, evaluator,
            weights_dir: Path | None = None) -> tuple[dict, torch.Tensor]:
    pipe = load_t2i_pipeline(model, sampler, weights_dir)
    listed = captions.items(split, n)
    prompts, seeds = [captions.caption(a) for a, _ in listed], [s for _, s in listed]
    start, images = time.monotonic(), []
    for i in range(0, n, batch):
        images.append(generate(pipe, prompts[i:i + batch], seeds[i:i + batch], STEPS[sampler], guidance))
        print(f"  {model} {sampler} g={guidance:g}: {min(i + batch, n)}/{n} images, {time.monotonic() - start:.0f} s",
              flush=True)
    images = torch.cat(images)
    seconds = time.monotonic() - start
    record = {"model": model, "sampler": sampler, "steps": STEPS[sampler], "guidance": guidance, "split": split,
              "n_images": n, "n_combinations": len({a for a, _ in listed}), **evaluator.score(images, prompts)}
    held = [i for i, (a, _) in enumerate(listed) if captions.is_held_out(a)]
    if held:
        record["adherence_held_out_prompts"] = evaluator.adherence(images[held], [prompts[i] for i in held])
        record["n_held_out_images"] = len(held)
    record["seconds"] = seconds
    return record, images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["pixart", "sd"], required=True)
    parser.add_argument("--n", type=int, default=720, help="images per setting (720 = every combination twice)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument("--samplers", nargs="+", choices=list(STEPS), default=["ddim"])
    parser.add_argument("--split", choices=["eval", "calib"], default="eval")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", type=Path, help="also save a sample grid (8 prompts x 4 seeds, DDIM) here")
    parser.add_argument("--weights-dir", type=Path, help="score this pipeline folder instead (results not written)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluator, runs = load_t2i_evaluator(), []
    for sampler in args.samplers:
        for guidance in args.guidance:
            record, images = run_one(args.model, sampler, guidance, args.split, args.n, args.batch, evaluator,
                                     args.weights_dir)
            record["threads"] = args.threads
            record["command"] = (f"python benchmarks/quality_t2i.py --model {args.model} --n {args.n} --guidance "
                                 f"{guidance:g} --samplers {sampler} --split {args.split} --threads {args.threads}")
            runs.append(record)
            print(json.dumps(record), flush=True)
            out = ROOT / "out" / "quality_t2i" / f"{args.model}-{args.split}-{sampler}-{guidance:g}.png"
            save_grid(images[:32], out)
    if args.grid:
        sample_grid(args.model, args.guidance[0], args.grid, weights_dir=args.weights_dir)
    if args.split != "eval" or args.weights_dir:
        return
    folder = WEIGHTS_DIR / args.model
    result = {"machine": platform.machine(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "threads": args.threads, "training": json.loads((folder / "training.json").read_text()),
              "vae": json.loads((folder / "vae" / "training.json").read_text()),
              "evaluator": json.loads((WEIGHTS_DIR / "t2i_evaluator" / "training.json").read_text()), "runs": runs}
    path = ROOT / "benchmarks" / "results" / f"quality_{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
