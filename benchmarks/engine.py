"""Engine acceptance benchmark: every method at a sweep of settings on one embedded model.

    python benchmarks/engine.py --model dit [--per-class 20] [--threads 2]

Each row runs the method and the unaccelerated model on the same held-out seeds, batch by batch
interleaved in this one process (see ``diffaccel generate --compare``), and records MAC and
wall-clock speedups, PSNR/SSIM against the unaccelerated images and evaluator accuracy. Rows are
written to ``benchmarks/results/engine_<model>.json`` as they complete, each with the exact
``diffaccel generate`` command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from pathlib import Path

import torch

from diffaccel.eval.io import write_json
from diffaccel.generate import GenerateConfig, run_generate
from diffaccel.methods.registry import build
from diffaccel.targets import load_target

SWEEPS = {
    "dit": [
        ("fora", {"interval": 2}), ("fora", {"interval": 3}), ("fora", {"interval": 4}), ("fora", {"interval": 5}),
        ("fora", {"interval": 3, "granularity": "component", "components": ["attn1"]}),
        ("fora", {"interval": 3, "granularity": "component", "components": ["ff"]}),
        ("taylorseer", {"interval": 3, "order": 1}), ("taylorseer", {"interval": 4, "order": 1}),
        ("taylorseer", {"interval": 5, "order": 2}),
        ("first_block_cache", {"threshold": 0.05}), ("first_block_cache", {"threshold": 0.1}),
        ("first_block_cache", {"threshold": 0.2}),
        ("dbcache", {"threshold": 0.1}), ("dbcache", {"threshold": 0.2, "forecast_order": 1}),
        ("erta", {"threshold": 0.1}), ("erta", {"threshold": 0.2}), ("erta", {"threshold": 0.3}),
        ("erta", {"threshold": 0.2, "correct": False}), ("erta", {"threshold": 0.2, "adjust_steps": True}),
    ],
    "unet": [
        ("deepcache", {"interval": 2}), ("deepcache", {"interval": 3}), ("deepcache", {"interval": 4}),
        ("deepcache", {"interval": 5}), ("deepcache", {"interval": 3, "branch": 1}),
        ("deepcache", {"interval": 4, "uniform": False}),
        ("deepcache", {"interval": 5, "uniform": False, "power": 1.2, "key_steps": 11}),
        ("deepcache", {"interval": 5, "uniform": False, "power": 1.2, "key_steps": 10}),
        ("deepcache", {"interval": 6, "uniform": False}),
        ("faster_diffusion", {"interval": 2, "parallel": False}), ("faster_diffusion", {"interval": 2}),
        ("faster_diffusion", {"interval": 3, "parallel": False}), ("faster_diffusion", {"interval": 3}),
        ("faster_diffusion", {"interval": 3, "noise_strength": 0.003}),
        ("fora", {"interval": 3}), ("taylorseer", {"interval": 4, "order": 2}),
        ("taylorseer", {"interval": 5, "order": 1}), ("taylorseer", {"interval": 6, "order": 1}),
        ("taylorseer", {"interval": 8, "order": 1}),
        ("erta", {"threshold": 0.2}), ("erta", {"threshold": 0.3, "max_consecutive": 4}),
        ("erta", {"threshold": 0.4, "max_consecutive": 5}),
    ],
}
NAMED = {"interval", "branch", "order", "threshold"}


def command(model: str, method: str, settings: dict, args) -> str:
    parts = ["diffaccel", "generate", "--model", model, "--method", method]
    for key, value in settings.items():
        if key in NAMED:
            parts += [f"--{key}", str(value)]
        else:
            parts += ["--param", f"{key}={json.dumps(value)}"]
    parts += ["--per-class", str(args.per_class), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
              "--guidance", str(args.guidance), "--threads", str(args.threads), "--compare",
              "--out", f"out/engine/{model}-{method}"]  # repository-relative
    return shlex.join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SWEEPS), required=True)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=100, help="held-out noise seeds (ERTA calibrates elsewhere)")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--only", help="comma-separated methods to run")
    parser.add_argument("--settings", help="with --only: a JSON list of settings objects to run instead")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    path = args.out / f"engine_{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep = [row for row in SWEEPS[args.model] if not args.only or row[0] in args.only.split(",")]
    if args.settings:
        sweep = [(args.only, settings) for settings in json.loads(args.settings)]
    for index, (method, settings) in enumerate(sweep):
        started = time.time()
        cfg = GenerateConfig(per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
                             guidance=args.guidance)
        plan = build(method, target.pipe, cfg.steps, guidance=args.guidance, **settings)
        record = run_generate(target, cfg, Path("out/engine") / f"{args.model}-{method}-{index}", plan=plan,
                              compare=True, progress=False)
        row = {
            "method": method,
            "setting": ",".join(f"{k}={v}" for k, v in settings.items()),
            "speedup_macs": round(record["speedup_macs"], 3),
            "speedup_wall": round(record["speedup_wall"], 3),
            "psnr": round(record["psnr"], 2),
            "psnr_p5": round(record["psnr_p5"], 2),
            "psnr_min": round(record["psnr_min"], 2),
            "ssim": round(record["ssim"], 4),
            "accuracy": record["accuracy"],
            "baseline_accuracy": record["baseline"]["accuracy"],
            "fd": round(record["fd"], 3),
            "baseline_fd": round(record["baseline"]["fd"], 3),
            "n_images": record["n_images"],
            "wall_pairs": record["wall_pairs"],
            "command": command(args.model, method, settings, args),
            "threads": args.threads,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__,
        }
        # rows of earlier (or concurrent) runs stay unless this run measured the same method and setting
        rows = json.loads(path.read_text()) if path.exists() else []
        rows = [r for r in rows if (r["method"], r["setting"]) != (row["method"], row["setting"])] + [row]
        write_json(path, rows)
        print(f"[{index + 1}/{len(sweep)}] {method} {row['setting']}: {row['speedup_wall']:.2f}x wall, "
              f"{row['speedup_macs']:.2f}x MACs, PSNR {row['psnr']:.1f}, acc {row['accuracy']:.1%} "
              f"({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
