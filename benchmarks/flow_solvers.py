"""The plan's solvers on flow-matching pipelines (stock SD3 and Flux, tiny, random weights): the
latent error of each solver at several step counts against a 200-step run of the pipeline's own
Euler sampler, and the joint search on SD3. Random weights show that the solvers run and converge
with their order, not what they gain on a trained model.

    python benchmarks/flow_solvers.py [--search-seconds 120]

Results: ``benchmarks/results/flow_solvers.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import diffaccel
from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import identity_plan
from diffaccel.eval.io import write_json
from diffaccel.solvers import SolverSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from stock_pipelines import build  # noqa: E402

SCHEDULERS = {"flux": {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0},
              "sd3": {"shift": 3.0}}
SOLVERS = ("euler", "dpm++2", "dpm++3", "unipc")


def latents(pipe, call: dict, steps: int | None = None) -> torch.Tensor:
    kwargs = {**call, **({"num_inference_steps": steps} if steps else {})}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(1), output_type="latent").images


def convergence(name: str, counts: tuple[int, ...] = (6, 10, 16)) -> dict:
    pipe, call = build(name)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name])
    reference, model = latents(pipe, call, 200), find_denoiser(pipe)[0]
    rows = {}
    for steps in counts:
        for solver in SOLVERS:
            plan = identity_plan(model).model_copy(update={"solver": SolverSpec(name=solver, steps=steps)})
            with diffaccel.accelerate(pipe, plan):
                rows[f"{solver} {steps}"] = float((latents(pipe, call) - reference).pow(2).mean())
        print(name, steps, {k: f"{v:.2e}" for k, v in rows.items() if k.endswith(f" {steps}")}, flush=True)
    return rows


def joint_search(seconds: float) -> dict:
    pipe, call = build("sd3")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS["sd3"])
    calls = [{**call, "num_inference_steps": 28, "seed": i} for i in range(4)]
    lines: list[str] = []
    plan = diffaccel.find_plan(pipe, calls=calls, budget="psnr>=30", strategy="joint", time_limit=seconds,
                               log=lines.append)
    print("\n".join(lines))
    return {"log": lines, "solver": plan.solver.model_dump() if plan.solver else None, "method": plan.method}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search-seconds", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"mse_vs_200_step_euler": {name: convergence(name) for name in SCHEDULERS},
              "sd3_joint_search": joint_search(args.search_seconds)}
    write_json(ROOT / "benchmarks" / "results" / "flow_solvers.json", result)


if __name__ == "__main__":
    main()
