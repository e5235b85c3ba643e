"""What counting FLOPs on a plan's first forward costs in wall-clock, on a short plan.

    python benchmarks/flop_count_overhead.py [--model unet] [--plan PLAN.json] [--pairs 3]

An executor measures each unit's MACs under torch's FLOP counter on its first forward of an input
shape, unless it is given an earlier executor's table (``unit_macs``). The unaccelerated pipeline
pays nothing of the kind, so a timed run whose executor counts is charged an overhead that is the
executor's, not the plan's. This runs the baseline, the plan with a remembered table and the plan
counting afresh, interleaved, on 12 held-out images, and writes the two wall-clock ratios to
``benchmarks/results/flop_count_overhead_<model>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from diffaccel.calibration.reference import identity_plan, run_with_plan
from diffaccel.eval.io import write_json
from diffaccel.plan import Plan
from diffaccel.targets import load_target

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet")
    parser.add_argument("--plan", default=str(ROOT / "benchmarks/results/plans/unet-joint-unipc8.json"))
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = load_target(args.model)
    work = target.workload(50, 3.0, 2, 0, calibration=False)
    plan = Plan.load(args.plan)
    _, warm = run_with_plan(target.pipe, work, plan)
    _, full = run_with_plan(target.pipe, work, identity_plan(warm.model))
    times: dict[str, list[float]] = {"baseline": [], "remembered": [], "counted": []}
    runs = {"baseline": lambda: work(target.pipe), "remembered": lambda: run_with_plan(target.pipe, work, plan,
                                                                                        warm.unit_macs),
            "counted": lambda: run_with_plan(target.pipe, work, plan)}
    for _ in range(args.pairs):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    record = {"model": args.model, "plan": Path(args.plan).name, "images": 12, "pairs": args.pairs, "threads": 1,
              "speedup_macs": full.stats.full_macs / warm.stats.macs,
              "speedup_wall_remembered": median["baseline"] / median["remembered"],
              "speedup_wall_counted": median["baseline"] / median["counted"], "seconds": median,
              "command": f"python benchmarks/flop_count_overhead.py --model {args.model} --plan "
                         f"{Path(args.plan).relative_to(ROOT)} --pairs {args.pairs}"}
    print({k: round(v, 3) for k, v in record.items() if k.startswith("speedup")})
    write_json(ROOT / "benchmarks" / "results" / f"flop_count_overhead_{args.model}.json", record)


if __name__ == "__main__":
    main()
