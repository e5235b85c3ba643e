"""Would giving each image its own step count pay? An upper bound, with an oracle for the routing.

Each plan (say the 4-, 5- and 6-step fits of one sampler) runs on the same held-out seeds against
the 50-step DDIM images. Then every image starts on the cheapest plan, and an oracle that knows each
image's PSNR under every plan moves images to dearer plans, the best dB per extra model evaluation
first, until the mean reaches ``--target``. No real rule picks as well as the oracle, and the cost
counts an image's evaluations only (a real router would also pay for its own test), so the step
count it prints is a lower bound on what routing could reach.

    python benchmarks/step_routing_probe.py --model unet --guidance 3 --per-class 8 PLAN4.json PLAN5.json PLAN6.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffaccel.calibration.reference import checked_images, run_with_plan
from diffaccel.eval.fidelity import psnr_per_image
from diffaccel.eval.io import write_json
from diffaccel.plan import Plan
from diffaccel.targets import load_target

ROOT = Path(__file__).resolve().parent.parent


def oracle_steps(steps: list[int], psnr: torch.Tensor, target: float) -> tuple[float, float]:
    """Mean evaluations per image (and the mean PSNR reached) when an oracle routes each image
    (``psnr``: plans x images) to a plan, greedily by dB gained per extra evaluation."""
    choice = [0] * psnr.shape[1]
    total = float(psnr[0].sum())
    while total / psnr.shape[1] < target:
        moves = [((psnr[p, i] - psnr[c, i]) / (steps[p] - steps[c]), i, p)
                 for i, c in enumerate(choice) for p in range(c + 1, len(steps))]
        if not moves:
            break
        _, image, plan = max(moves)
        total += float(psnr[plan, image] - psnr[choice[image], image])
        choice[image] = plan
    return sum(steps[c] for c in choice) / len(choice), total / psnr.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plans", nargs="+", type=Path, help="plans of one sampler, fewest steps first")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--per-class", type=int, default=8, help="held-out images per class or prompt")
    parser.add_argument("--target", type=float, default=30.0, help="mean PSNR the routing must reach")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    workload = target.workload(50, args.guidance, args.per_class, 0, calibration=False)
    reference = checked_images(workload(target.pipe), "held-out")
    plans = [Plan.load(path) for path in args.plans]
    steps = [plan.solver.steps for plan in plans]
    psnr = torch.stack([psnr_per_image(checked_images(run_with_plan(target.pipe, workload, plan)[0], "held-out"),
                                       reference) for plan in plans])
    for path, n, row in zip(args.plans, steps, psnr):
        print(f"{path.name}: {n} steps, {row.mean():.2f} dB, p5 {torch.quantile(row.double(), 0.05):.2f}")
    mean_steps, reached = oracle_steps(steps, psnr, args.target)
    print(f"oracle routing: {mean_steps:.2f} evaluations per image for {reached:.2f} dB (target {args.target:g})")
    command = (f"python benchmarks/step_routing_probe.py --model {args.model} --guidance {args.guidance:g} "
               f"--per-class {args.per_class} --target {args.target:g} --threads {args.threads} "
               + " ".join(map(str, args.plans)))
    write_json(ROOT / "benchmarks" / "results" / f"step_routing_{args.model}.json", {
        "plans": [str(p) for p in args.plans], "steps": steps, "images": psnr.shape[1],
        "psnr": [float(row.mean()) for row in psnr], "psnr_per_image": psnr.tolist(),
        "oracle_mean_evaluations": mean_steps, "oracle_psnr": reached, "target": args.target, "command": command})


if __name__ == "__main__":
    main()
