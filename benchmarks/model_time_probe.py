"""Probe: the timestep the denoiser is told, shifted per step while the solver keeps its own (the
idea of timestep tuners: a few-step solver's inputs sit off the trajectory the model was trained
on), each step's shift fitted on the calibration images by coordinate search.

    python benchmarks/model_time_probe.py --model unet \
        benchmarks/results/plans/unet-joint-evodiff5-fitted-coefficients.json

Prints the plan's PSNR against the 50-step reference on the calibration, validation (seeds + 2000)
and held-out images before and after the fit. Not a plan setting (yet): a forward pre-hook here.
"""

from __future__ import annotations

import argparse

import torch

from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import checked_images, run_with_plan
from diffaccel.eval.fidelity import fidelity
from diffaccel.plan import Plan
from diffaccel.targets import load_target

GUIDANCE = {"unet": 3.0, "dit": 3.0, "pixart": 4.0, "sd": 4.0}


class Shifter:
    """A forward pre-hook adding ``shift[i]`` to the timestep of the i-th denoiser call of each run."""

    def __init__(self) -> None:
        self.shift: list[float] = []
        self.last: float | None = None
        self.step = -1

    def __call__(self, module, args, kwargs):
        ts = args[1] if len(args) > 1 else kwargs["timestep"]
        value = float(torch.as_tensor(ts).reshape(-1).max())
        self.step = 0 if self.last is None or value > self.last else self.step + 1
        self.last = value
        shift = self.shift[self.step] if self.step < len(self.shift) else 0.0
        if not shift:
            return None
        new = (torch.as_tensor(ts).float() + shift).clamp(0, 999)
        new = new.to(ts.dtype) if torch.is_tensor(ts) and ts.dtype.is_floating_point else \
            new.round().to(ts.dtype) if torch.is_tensor(ts) else float(new)
        if len(args) > 1:
            return (args[0], new, *args[2:]), kwargs
        return args, {**kwargs, "timestep": new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    shifter = Shifter()
    find_denoiser(target.pipe)[0].register_forward_pre_hook(shifter, with_kwargs=True)
    calib = target.workload(50, GUIDANCE[args.model], args.per_class, 0)
    sets = {"calibration": calib, "validation": calib.reseeded(2000, "validation"),
            "held-out": target.workload(50, GUIDANCE[args.model], args.per_class, 0, calibration=False)}
    references = {name: checked_images(w(target.pipe), name) for name, w in sets.items()}

    def psnr(plan: Plan, shift: list[float], name: str = "calibration") -> float:
        shifter.shift, shifter.last = list(shift), None
        images = checked_images(run_with_plan(target.pipe, sets[name], plan)[0], name)
        return fidelity(images, references[name])["psnr"]

    for path in args.plans:
        plan = Plan.load(path)
        shift = [0.0] * plan.solver.steps
        print(path, "before:", {name: round(psnr(plan, shift, name), 2) for name in sets}, flush=True)
        best = psnr(plan, shift)
        for deltas in ((-40, -20, -10, 10, 20, 40), (-8, -4, 4, 8)):
            for step in range(len(shift)):
                for delta in deltas:
                    trial = list(shift)
                    trial[step] += delta
                    score = psnr(plan, trial)
                    if score > best + 0.01:
                        best, shift = score, trial
        print(path, f"shifts {shift}, after:", {name: round(psnr(plan, shift, name), 2) for name in sets}, flush=True)


if __name__ == "__main__":
    main()
