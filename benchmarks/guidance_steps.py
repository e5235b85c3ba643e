"""What predicting the unconditional guidance branch costs, step by step (``methods.fit_guidance``).

For each set of steps given with ``--steps``, the plan (e.g. a searched few-step sampler) gets its
unconditional branch predicted there, with weights fitted on the calibration images (and, with
``--refit``, its solver's coefficients fitted again under the prediction, as the joint search does),
or with ``--reuse`` fixed weights that reuse the step before's guidance difference (conditional
minus unconditional output: weights 1, 0, 1, -1, 0, no fit). Prints and writes the PSNR (mean, 5th
percentile) of the held-out images against the 50-step DDIM output, for the plan alone and each set:

    python benchmarks/guidance_steps.py --model dit \
        --plan benchmarks/results/plans/dit-joint-unipc7-fitted-coefficients-c8.json --steps 6 --steps 5 --refit
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffaccel.calibration.reference import checked_images, run_with_plan
from diffaccel.eval.fidelity import fidelity
from diffaccel.methods import fit_guidance
from diffaccel.plan import Plan
from diffaccel.search.coefficients import fit_coefficients, record_reference
from diffaccel.targets import load_target

ROOT = Path(__file__).resolve().parents[1]
REUSE = [1.0, 0.0, 1.0, -1.0, 0.0]  # unconditional = conditional - (the step before's conditional - unconditional)


def predicted(pipe, plan: Plan, steps: list[int], calib, reference, reuse: bool, refit: bool) -> Plan:
    if reuse:
        section = {"unconditional": "first", "steps": [{"step": s, "weights": REUSE} for s in steps]}
        return Plan.model_validate({**plan.model_dump(), "guidance": section})
    guided = fit_guidance(pipe, plan, steps, calib)
    if refit and plan.solver is not None and plan.solver.coefficients is not None:
        solver = fit_coefficients(pipe, calib, plan.solver, reference, plan=guided)
        guided = guided.model_copy(update={"solver": solver})
    return guided


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dit", choices=["unet", "dit"])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--steps", action="append", default=[], help="steps (0-based, comma-separated) to predict")
    parser.add_argument("--reuse", action="store_true", help="reuse the step before's guidance difference (no fit)")
    parser.add_argument("--refit", action="store_true", help="refit the solver's coefficients under the prediction")
    parser.add_argument("--calib-per-class", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=8, help="held-out images per class")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    pipe = target.pipe
    calib = target.workload(50, args.guidance, per_class=args.calib_per_class)
    heldout = target.workload(50, args.guidance, per_class=args.per_class, calibration=False)
    truth = checked_images(heldout(pipe), "reference")
    reference = record_reference(pipe, calib) if args.refit else None
    plan = Plan.load(args.plan)
    rows = []
    for steps in [[], *(sorted({int(s) for s in text.split(",")}) for text in args.steps)]:
        candidate = predicted(pipe, plan, steps, calib, reference, args.reuse, args.refit) if steps else plan
        images, executor = run_with_plan(pipe, heldout, candidate)
        scores = fidelity(checked_images(images, "held-out"), truth)
        rows.append({"steps": steps, "psnr": round(scores["psnr"], 3), "psnr_p5": round(scores["psnr_p5"], 3),
                     "mac_fraction": round(executor.stats.macs / executor.stats.full_macs, 4)})
        print(f"predicted at steps {steps}: {scores['psnr']:.2f} dB (p5 {scores['psnr_p5']:.2f}), "
              f"{rows[-1]['mac_fraction']:.3f} of the plan's MACs", flush=True)
    how = "reuse" if args.reuse else "refit" if args.refit else "fit"
    out = ROOT / "benchmarks" / "results" / f"guidance_steps_{args.model}_{how}.json"
    command = ("python benchmarks/guidance_steps.py " + f"--model {args.model} --plan {args.plan} "
               + " ".join(f"--steps {s}" for s in args.steps) + (" --reuse" if args.reuse else "")
               + (" --refit" if args.refit else "") + f" --calib-per-class {args.calib_per_class} "
               f"--per-class {args.per_class} --guidance {args.guidance:g} --threads {args.threads}")
    out.write_text(json.dumps({"model": args.model, "plan": args.plan, "images": len(truth), "rows": rows,
                               "command": command}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
