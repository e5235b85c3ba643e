"""Do the plan's samplers converge as steps grow? Each solver on a stock pipeline (tiny config, random
weights, tests/stock_pipelines.py) against the same pipeline's 500-step DDIM run: the relative error
of the final latents per step count.

    python benchmarks/solver_convergence.py --case sd-pndm --spacing linspace
    python benchmarks/solver_convergence.py --case sd-pndm            # the pipeline's own (leading) spacing

A second-order solver's error falls about four times per doubling until the reference's own error
(DDIM 500: about a fifth of DDIM 100's) is reached. Prints one line per solver.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import diffaccel
from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import identity_plan
from diffaccel.solvers import SolverSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from stock_pipelines import build  # noqa: E402  (the test suite's stock pipelines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="sd-pndm")
    parser.add_argument("--spacing", default=None, help="trailing, leading or linspace (default: the pipeline's)")
    parser.add_argument("--solvers", default="ddim,unipc,evodiff")
    parser.add_argument("--steps", default="5,10,20,50,100")
    args = parser.parse_args()
    pipe, call = build(args.case)
    spacing = {"spacing": args.spacing} if args.spacing else {}

    def run(name: str, steps: int) -> torch.Tensor:
        solver = SolverSpec(name=name, steps=steps, **spacing)
        plan = identity_plan(find_denoiser(pipe)[0]).model_copy(update={"solver": solver})
        with diffaccel.accelerate(pipe, plan):
            out = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent")
        return out.images.float()

    reference = run("ddim", 500)
    for name in args.solvers.split(","):
        errors = [float((run(name, n) - reference).norm() / reference.norm()) for n in map(int, args.steps.split(","))]
        print(f"{args.case} {args.spacing or 'own spacing'} {name}: "
              + " ".join(f"{n}:{e:.3f}" for n, e in zip(args.steps.split(","), errors)), flush=True)


if __name__ == "__main__":
    main()
