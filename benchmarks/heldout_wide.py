"""A saved plan and a plain sampler re-measured on a larger held-out set than the search's, in one process.

    python benchmarks/heldout_wide.py --model sd \
        --plan benchmarks/results/plans/sd-joint-unipc6-fitted-coefficients-keys4.json \
        --sampler unipc --steps 12 --heldout-per-class 4 --pairs 2 --guidance 4

The joint search's held-out check on the SD pipeline uses 24 images (2 per caption), where one
image moves prompt adherence by 4.2 points; this measures the same rows (``joint_search.measure``:
interleaved with the unaccelerated 50-step DDIM pipeline, MAC and wall speedup, PSNR with its 5th
percentile, adherence or accuracy, Fréchet distance) on ``--heldout-per-class`` images per caption
or class. Results go to ``benchmarks/results/heldout_wide_<model>_<plan file stem>.json``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from joint_search import ROOT, measure

from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import checked_images, identity_plan
from diffaccel.eval.io import write_json
from diffaccel.plan import Plan
from diffaccel.solvers import SolverSpec
from diffaccel.targets import load_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd")
    parser.add_argument("--plan", type=Path, required=True, help="the plan to measure (plan.json of a search)")
    parser.add_argument("--sampler", default="unipc", help="the plain sampler measured beside it")
    parser.add_argument("--steps", type=int, default=12, help="... at this many steps")
    parser.add_argument("--heldout-per-class", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    heldout = target.workload(50, args.guidance, args.heldout_per_class, 0, calibration=False)
    reference = checked_images(heldout(target.pipe), "held-out")
    plain = identity_plan(find_denoiser(target.pipe)[0]).model_copy(
        update={"solver": SolverSpec(name=args.sampler, steps=args.steps), "method": "steps"})
    rows = [measure(target, f"plan {args.plan.name}", Plan.load(args.plan), heldout, reference, args.pairs),
            measure(target, f"plain sampler {args.sampler} {args.steps}", plain, heldout, reference, args.pairs)]
    write_json(ROOT / "benchmarks" / "results" / f"heldout_wide_{args.model}_{args.plan.stem}.json", {
        "model": args.model, "plan": str(args.plan), "heldout_images": len(reference), "guidance": args.guidance,
        "rows": rows, "threads": args.threads, "machine": platform.machine(), "processor": platform.processor(),
        "torch": torch.__version__,
        "command": f"python benchmarks/heldout_wide.py --model {args.model} --plan {args.plan} --sampler "
                   f"{args.sampler} --steps {args.steps} --heldout-per-class {args.heldout_per_class} --pairs "
                   f"{args.pairs} --guidance {args.guidance:g} --threads {args.threads}"})


if __name__ == "__main__":
    main()
