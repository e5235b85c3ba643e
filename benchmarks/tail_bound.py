"""What the search's validation makes of saved plans under a tail bound: each plan run on the
validation seeds a joint search of the same settings uses (calibration calls, seeds shifted by 2000),
with its mean PSNR, its 5th percentile, the 95% lower confidence bound on the 5th percentile that
validation checks a ``psnr_p5>=X`` budget by (``search.config.tail_lower_bound``) and the worst
images. The validation seeds are those of a tail-bounded search: copies of the calibration calls up
to 93 images (``search.validation.tail_copies``).

    python benchmarks/tail_bound.py --model sd --guidance 4 --calib-per-class 4 PLAN.json [PLAN.json ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffaccel.calibration.reference import checked_images, run_with_plan
from diffaccel.eval.fidelity import psnr_per_image
from diffaccel.eval.io import write_json
from diffaccel.plan import Plan
from diffaccel.search.config import tail_lower_bound
from diffaccel.search.validation import VALIDATION_SEED_OFFSET, tail_copies
from diffaccel.targets import load_target

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plans", nargs="+", type=Path)
    parser.add_argument("--model", default="sd")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--calib-per-class", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    calls = target.workload(50, args.guidance, args.calib_per_class, 0)
    copies = tail_copies(sum(len(call.seeds) for call in calls.calls))
    workload = calls.repeated(copies, VALIDATION_SEED_OFFSET, "validation seeds")
    reference = checked_images(workload(target.pipe), "validation")
    rows = []
    for path in args.plans:
        per_image = psnr_per_image(checked_images(run_with_plan(target.pipe, workload, Plan.load(path))[0],
                                                  "validation"), reference)
        bound, confidence = tail_lower_bound(per_image.tolist())
        rows.append({"plan": str(path), "images": len(per_image), "psnr": float(per_image.mean()),
                     "psnr_p5": float(torch.quantile(per_image.double(), 0.05)), "psnr_p5_bound": bound,
                     "confidence": round(confidence, 3), "worst": sorted(per_image.tolist())[:4]})
        print(f"{path.name}: {rows[-1]['psnr']:.2f} dB, p5 {rows[-1]['psnr_p5']:.2f}, bound {bound:.2f} "
              f"({confidence:.0%}), worst {', '.join(f'{v:.1f}' for v in rows[-1]['worst'])}", flush=True)
    command = (f"python benchmarks/tail_bound.py --model {args.model} --guidance {args.guidance:g} --calib-per-class "
               f"{args.calib_per_class} --threads {args.threads} " + " ".join(map(str, args.plans)))
    write_json(ROOT / "benchmarks" / "results" / f"tail_bound_{args.model}.json", {"rows": rows, "command": command})


if __name__ == "__main__":
    main()
