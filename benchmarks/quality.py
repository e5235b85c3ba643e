"""Quality bar of the embedded models (foundation issue): evaluator accuracy and Fréchet distance.

    python benchmarks/quality.py --model dit [--per-class 100] [--guidance 3.0] [--threads 2]

Runs 50-step DDIM (and 20-step DPM-Solver++) on held-out seeds, balanced classes, and writes
``benchmarks/results/quality_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from diffaccel.eval.io import write_json
from diffaccel.generate import GenerateConfig, run_generate
from diffaccel.targets import load_target
from diffaccel.zoo.weights import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "unet"], required=True)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for sampler, steps in (("ddim", 50), ("dpm", 20)):
        target = load_target(args.model, sampler=sampler)
        for guidance in args.guidance:
            cfg = GenerateConfig(per_class=args.per_class, steps=steps, sampler=sampler, guidance=guidance,
                                 seed=args.seed)
            out = ROOT / "out" / "quality" / f"{args.model}-{sampler}-{guidance:g}"
            record = run_generate(target, cfg, out, progress=True)
            record["command"] = (f"diffaccel generate --model {args.model} --sampler {sampler} --steps {steps} "
                                 f"--guidance {guidance:g} --per-class {args.per_class} --seed {args.seed} "
                                 f"--threads {args.threads}")
            results.append(record)
            print(f"{args.model} {sampler} {steps} steps, guidance {guidance:g}: accuracy {record['accuracy']:.1%}, "
                  f"FD {record['fd']:.3f} (floor {record['fd_floor']:.3f}), {record['seconds']:.0f} s", flush=True)
    training = (WEIGHTS_DIR / args.model / "training.json").read_text()
    write_json(ROOT / "benchmarks" / "results" / f"quality_{args.model}.json",
               {"machine": platform.machine(), "torch": torch.__version__, "threads": args.threads,
                "training": json.loads(training), "runs": results})


if __name__ == "__main__":
    main()
