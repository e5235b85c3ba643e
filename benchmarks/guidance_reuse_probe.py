"""Probe: a cheaper guidance difference instead of running the unconditional half.

On a step listed in ``--skip`` the embedded pipeline's denoiser runs the conditional half of its
guidance batch only, and the unconditional output is rebuilt as the conditional one minus a
difference (conditional - unconditional): the last full step's, or with ``--low-res`` this step's,
computed by the same model on the input average-pooled to half the resolution (a quarter of the
MACs of a full guidance batch) and upsampled bilinearly. The plan (e.g. a searched few-step sampler)
runs as usual around it. A probe of whether this trade beats one step fewer, not a method:

    python benchmarks/guidance_reuse_probe.py --model unet \
        --plan benchmarks/results/plans/unet-joint-unipc6-fitted-coefficients.json --skip 1 --skip 2,4

Prints the PSNR (mean, 5th percentile) against the 50-step DDIM output of the calibration images
(``--per-class`` per class, guidance ``--guidance``) for the plan alone and for each skip set.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from diffaccel.calibration.reference import checked_images, run_with_plan
from diffaccel.eval.fidelity import fidelity
from diffaccel.plan import Plan
from diffaccel.targets import load_target


class GuidanceReuse:
    """Replaces ``pipe.denoise`` while active: on the steps in ``skip`` only the conditional half runs."""

    def __init__(self, pipe, skip: set[int], low_res: bool = False):
        self.pipe, self.skip, self.inner, self.low_res = pipe, skip, pipe.denoise, low_res
        self.step, self.difference, self.last_timestep = 0, None, None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.last_timestep is None or float(t[0]) > self.last_timestep:  # timesteps fall within a call
            self.step, self.difference = 0, None
        self.last_timestep = float(t[0])
        step, self.step = self.step, self.step + 1
        half = x.shape[0] // 2  # the embedded pipelines batch [unconditional, conditional]
        if step in self.skip and self.low_res:
            uncond, cond = self.inner(F.avg_pool2d(x, 2), t, labels).chunk(2)
            self.difference = F.interpolate(cond - uncond, scale_factor=2, mode="bilinear", align_corners=False)
        if step in self.skip and self.difference is not None:
            cond = self.inner(x[half:], t[half:], labels[half:])
            return torch.cat([cond - self.difference, cond])
        out = self.inner(x, t, labels)
        uncond, cond = out.chunk(2)
        self.difference = cond - uncond
        return out

    def __enter__(self):
        self.pipe.denoise = self
        return self

    def __exit__(self, *exc):
        self.pipe.denoise = self.inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="unet", choices=["unet", "dit"])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--skip", action="append", default=[], help="steps (0-based, comma-separated) to reuse on")
    parser.add_argument("--low-res", action="store_true", help="this step's difference at half resolution")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    work = target.workload(50, args.guidance, per_class=args.per_class)
    reference = checked_images(work(target.pipe), "reference")
    plan = Plan.load(args.plan)
    for skip in [set(), *({int(s) for s in text.split(",")} for text in args.skip)]:
        with GuidanceReuse(target.pipe, skip, args.low_res):
            images = checked_images(run_with_plan(target.pipe, work, plan)[0], "probe")
        scores = fidelity(images, reference)
        how = "half-resolution difference" if args.low_res else "reuse"
        print(f"{how} on steps {sorted(skip)}: {scores['psnr']:.2f} dB (p5 {scores['psnr_p5']:.2f})", flush=True)


if __name__ == "__main__":
    main()
