"""Does W8A8 int8 pay on top of a saved plan? The plan in float32 and with each int8 backend, each
against the unaccelerated 50-step DDIM pipeline on the same held-out seeds, interleaved in one
process (the joint search's held-out rows: ``joint_search.measure``).

    python benchmarks/plan_int8.py --model pixart --guidance 4 --plan PLAN.json [--backends int8-dynamic,int8]

The static backend's activation ranges are calibrated on 2 calibration images per class or prompt
(``methods.ptq.quant_spec``). Results: ``benchmarks/results/plan_int8_<model>_t<threads>.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from joint_search import measure

from diffaccel.calibration.reference import checked_images
from diffaccel.eval.io import write_json
from diffaccel.methods.ptq import quant_spec
from diffaccel.plan import Plan
from diffaccel.targets import load_target

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pixart")
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--per-class", type=int, default=1, help="held-out images per class or prompt")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--backends", default="int8-dynamic,int8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    heldout = target.workload(50, args.guidance, args.per_class, 0, calibration=False)
    reference = checked_images(heldout(target.pipe), "held-out")
    plan = Plan.load(args.plan)
    rows = [measure(target, "plan in float32", plan, heldout, reference, args.pairs)]
    for backend in args.backends.split(","):
        spec = quant_spec(target.pipe, target.workload(50, args.guidance, 2, 0), "w8a8", backend)
        rows.append(measure(target, f"plan in w8a8 {backend}", plan.with_quant(spec), heldout, reference, args.pairs))
    command = (f"python benchmarks/plan_int8.py --model {args.model} --plan {args.plan} --guidance {args.guidance:g} "
               f"--per-class {args.per_class} --pairs {args.pairs} --backends {args.backends} --threads {args.threads}")
    write_json(ROOT / "benchmarks" / "results" / f"plan_int8_{args.model}_t{args.threads}.json",
               {"rows": rows, "heldout_images": len(reference), "command": command})


if __name__ == "__main__":
    main()
