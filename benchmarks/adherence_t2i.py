"""Where a few-step plan loses prompt adherence on a shipped text-to-image pipeline: each setting against
the 50-step DDIM images of the same prompts and seeds, image by image.

    python benchmarks/adherence_t2i.py --model sd --per-prompt 20 \
        --sampler unipc:11 --solver unipc:999/975/920/840/720/560/380 --fit \
        --plan benchmarks/results/plans/sd-unipc7-dense-keys5.json

Prompts: the bench's 12 held-out captions, ``--per-prompt`` seeds each (from 9100000: not the bench's,
nor the calibration's). Settings: ``--sampler NAME:STEPS`` (the pipeline's own timestep spacing),
``--solver NAME:T1/T2/...`` (a plain solver on those timesteps; with ``--fit`` also with every step's
coefficients fitted, as the joint search fits them, on the plans' calibration workload: 12 captions x 2
seeds from 7000001), ``--plan FILE``. Per setting: adherence, images whose adherence the setting lost
and won against the reference (and per attribute), mean and 5th-percentile PSNR. Writes
``benchmarks/results/adherence_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import diffaccel
from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import identity_plan
from diffaccel.eval.io import write_json
from diffaccel.plan import Plan
from diffaccel.search.coefficients import fit_coefficients, record_reference
from diffaccel.solvers import SolverSpec
from diffaccel.zoo.t2i import captions
from diffaccel.zoo.t2i.evaluator import NAMES, load_t2i_evaluator
from diffaccel.zoo.t2i.pipelines import generate, load_t2i_pipeline

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "benchmarks" / "results" / "bench-sd-joint-600" / "prompts.jsonl"
SEED, CALIB_SEED, GUIDANCE, BATCH = 9_100_000, 7_000_001, 4.0, 12


def images(pipe, prompts: list[str], seeds: list[int], plan: Plan | None = None) -> torch.Tensor:
    """The pipeline's 50-step call (under ``plan`` if given), in batches of the bench's size."""
    def run() -> torch.Tensor:
        return torch.cat([generate(pipe, prompts[i:i + BATCH], seeds[i:i + BATCH], 50, GUIDANCE)
                          for i in range(0, len(prompts), BATCH)])
    if plan is None:
        return run()
    with diffaccel.accelerate(pipe, plan):
        return run()


def compare_to(reference_right: torch.Tensor, right: torch.Tensor, psnr: torch.Tensor) -> dict:
    """Adherence and the images it lost / won against the reference, overall and per attribute."""
    ref_all, all_ = reference_right.all(1), right.all(1)
    return {"adherence": float(all_.float().mean()), "lost": int((ref_all & ~all_).sum()),
            "won": int((~ref_all & all_).sum()),
            "lost_by_attribute": {n: int((reference_right[:, i] & ~right[:, i]).sum()) for i, n in enumerate(NAMES)},
            "psnr": float(psnr.mean()), "psnr_p5": float(psnr.quantile(0.05))}


def settings(args, pipe, calibrate) -> list[tuple[str, Plan]]:
    """(name, plan) of every setting asked for, fitting coefficients where ``--fit`` says so."""
    base = identity_plan(find_denoiser(pipe)[0])
    out = []
    for item in args.sampler:
        name, steps = item.split(":")
        out.append((f"{name} {steps} (pipeline spacing)",
                    base.model_copy(update={"solver": SolverSpec(name=name, steps=int(steps)), "method": "steps"})))
    reference = record_reference(pipe, calibrate) if args.fit and args.solver else None
    for item in args.solver:
        name, times = item.split(":")
        spec = SolverSpec(name=name, steps=len(times.split("/")), timesteps=tuple(int(t) for t in times.split("/")))
        out.append((f"{name} {times}", base.model_copy(update={"solver": spec, "method": "steps"})))
        if reference is not None:
            fitted = fit_coefficients(pipe, calibrate, spec, reference)
            out.append((f"{name} {times} + fitted coefficients",
                        base.model_copy(update={"solver": fitted, "method": "steps"})))
    out += [(f"plan {path.name}", Plan.load(path)) for path in args.plan]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd", "pixart"], default="sd")
    parser.add_argument("--per-prompt", type=int, default=20)
    parser.add_argument("--sampler", action="append", default=[], help="NAME:STEPS, the pipeline's spacing")
    parser.add_argument("--solver", action="append", default=[], help="NAME:T1/T2/..., explicit timesteps")
    parser.add_argument("--fit", action="store_true", help="also fit every --solver's coefficients")
    parser.add_argument("--plan", action="append", default=[], type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    captions_12 = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    prompts = [p for p in captions_12 for _ in range(args.per_prompt)]
    seeds = list(range(SEED, SEED + len(prompts)))
    calib_prompts = [p for p in captions_12 for _ in range(2)]
    pipe, evaluator = load_t2i_pipeline(args.model, "ddim"), load_t2i_evaluator()
    targets = torch.tensor([tuple(captions.parse_caption(p)) for p in prompts])
    started = time.time()
    reference = images(pipe, prompts, seeds)
    reference_right = evaluator.predict(reference) == targets
    rows = []
    for name, plan in settings(args, pipe, lambda p: generate(p, calib_prompts, list(range(
            CALIB_SEED, CALIB_SEED + len(calib_prompts))), 50, GUIDANCE)):
        out = images(pipe, prompts, seeds, plan)
        psnr = -10 * torch.log10(((out - reference) ** 2).mean((1, 2, 3)).clamp_min(1e-10))
        rows.append({"setting": name, **compare_to(reference_right, evaluator.predict(out) == targets, psnr)})
        print(json.dumps(rows[-1]), flush=True)
    command = " ".join(["python benchmarks/adherence_t2i.py", f"--model {args.model}",
                        f"--per-prompt {args.per_prompt}", *[f"--sampler {s}" for s in args.sampler],
                        *[f"--solver {s}" for s in args.solver], *(["--fit"] if args.fit else []),
                        *[f"--plan {p}" for p in args.plan], f"--threads {args.threads}"])
    write_json(ROOT / "benchmarks" / "results" / f"adherence_{args.model}.json", {
        "model": args.model, "images": len(prompts), "guidance": GUIDANCE, "reference": "DDIM 50 steps",
        "reference_adherence": float(reference_right.all(1).float().mean()), "rows": rows,
        "seconds": round(time.time() - started), "threads": args.threads, "machine": platform.machine(),
        "torch": torch.__version__, "command": command})


if __name__ == "__main__":
    main()
