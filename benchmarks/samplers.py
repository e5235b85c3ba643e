"""Plain samplers at equal steps: EVODiff against DPM-Solver++ and UniPC (and DDIM), each as a plan's
solver section, against the model's own 50-step DDIM output on held-out seeds.

    python benchmarks/samplers.py --model dit [--per-class 20] [--threads 1]
    python benchmarks/samplers.py --model sd --per-class 4 --guidance 4   # 12 held-out captions x 4 seeds
    python benchmarks/samplers.py --model dit --per-class 1 --reference unipc:200 --steps 10,20,40

``--reference SOLVER:STEPS`` measures against that sampler's run instead of the pipeline's 50-step
DDIM (a near-exact trajectory, to tell a solver's error from the reference's own); the results then
go to ``samplers_<model>_ref-<solver><steps>.json``.

Per sampler and step count: PSNR (mean, 5th percentile), SSIM, evaluator accuracy (on the t2i
models also prompt adherence) and Fréchet distance; per sampler, the fewest steps that reach a mean
PSNR of 30 dB. Rows and the command
that reproduces them go to ``benchmarks/results/samplers_<model>.json``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import diffaccel
from diffaccel.calibration.reference import identity_plan
from diffaccel.eval.fidelity import fidelity
from diffaccel.eval.io import write_json
from diffaccel.generate import run_call
from diffaccel.solvers import SolverSpec
from diffaccel.targets import load_target

ROOT = Path(__file__).resolve().parent.parent
SOLVERS = ("ddim", "dpm++2", "dpm++3", "unipc", "evodiff")
STEPS = (5, 6, 7, 8, 10, 15, 20)


def sample(target, calls, plan=None) -> torch.Tensor:
    if plan is None:
        return torch.cat([run_call(target.pipe, c) for c in calls])
    with diffaccel.accelerate(target.pipe, plan):
        return torch.cat([run_call(target.pipe, c) for c in calls])


def labels_of(calls) -> torch.Tensor | None:
    if "class_labels" not in calls[0].kwargs:
        return None
    return torch.tensor([int(c) for call in calls for c in call.kwargs["class_labels"]])


def scores_of(target, images: torch.Tensor, labels, calls) -> dict:
    """The evaluator's scores: class accuracy on the embedded models, adherence on the t2i models."""
    if target.evaluator is None:
        return {}
    return target.evaluator.score(images, labels) if target.embedded else target.prompt_scores(images, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--reference", default=None, help="SOLVER:STEPS (default: the pipeline's 50-step DDIM)")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated step counts")
    args = parser.parse_args()
    step_counts = [int(n) for n in args.steps.split(",")]
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    calls = list(target.workload(50, args.guidance, args.per_class, seed=100, calibration=False).calls)
    ref_plan, suffix = None, ""
    if args.reference:
        name, steps = args.reference.split(":")
        ref_plan = identity_plan(target.denoiser()[0]).model_copy(
            update={"solver": SolverSpec(name=name, steps=int(steps))})
        suffix = f"_ref-{name}{steps}"
    reference = sample(target, calls, ref_plan)
    labels = labels_of(calls)
    base_scores = scores_of(target, reference, labels, calls)
    rows, base = [], identity_plan(target.denoiser()[0])
    for name in SOLVERS:
        for steps in step_counts:
            started = time.time()
            plan = base.model_copy(update={"solver": SolverSpec(name=name, steps=steps)})
            images = sample(target, calls, plan)
            row = {"solver": name, "steps": steps, **{k: round(v, 3) for k, v in fidelity(images, reference).items()}}
            if target.evaluator is not None:
                scores = scores_of(target, images, labels, calls)
                row.update(accuracy=scores["accuracy"], fd=round(scores["fd"], 4))
                if "adherence" in scores:
                    row["adherence"] = scores["adherence"]
            rows.append(row)
            print(f"{name} {steps}: {row['psnr']:.2f} dB (p5 {row['psnr_p5']:.2f}) {time.time() - started:.0f} s",
                  flush=True)
    reach = {name: min((r["steps"] for r in rows if r["solver"] == name and r["psnr"] >= 30), default=None)
             for name in SOLVERS}
    extra = f" --reference {args.reference} --steps {args.steps}" if args.reference else ""
    write_json(ROOT / "benchmarks" / "results" / f"samplers_{args.model}{suffix}.json", {
        "model": args.model, "reference": args.reference or "DDIM 50 steps", "images": len(reference),
        "guidance": args.guidance,
        "baseline_accuracy": base_scores.get("accuracy"), "baseline_fd": base_scores.get("fd"),
        "baseline_adherence": base_scores.get("adherence"),
        "steps_to_30db": reach, "rows": rows, "threads": args.threads, "machine": platform.machine(),
        "torch": torch.__version__,
        "command": f"python benchmarks/samplers.py --model {args.model} --per-class {args.per_class} "
                   f"--guidance {args.guidance:g} --threads {args.threads}{extra}"})


if __name__ == "__main__":
    main()
