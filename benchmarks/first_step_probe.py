"""Probe: could a plan skip the first denoiser evaluation? At t=999 of the embedded models' cosine
schedule the noisy input carries almost nothing of the image (alpha-bar 2.4e-9), so the first output
might depend on the condition alone and be shared by every image of one class or prompt. Here each
row of the first forward gets the output of the first row with the same condition.

    python benchmarks/first_step_probe.py --model unet \\
        benchmarks/results/plans/unet-joint-evodiff5-fitted-coefficients.json

Prints, per plan, the PSNR against the 50-step reference on the validation seeds with its own first
output and with the shared one, and how far the rows of one condition differ there (relative L2).
"""

from __future__ import annotations

import argparse

import torch

from diffaccel.adapters import find_denoiser
from diffaccel.calibration.reference import checked_images, run_with_plan
from diffaccel.eval.fidelity import fidelity
from diffaccel.plan import Plan
from diffaccel.runtime.features.base import model_sample
from diffaccel.targets import load_target

GUIDANCE = {"unet": 3.0, "dit": 3.0, "pixart": 4.0, "sd": 4.0}
INPUTS = ("sample", "hidden_states", "timestep")


class FirstStepSharing:
    """A forward hook: at each run's first forward, rows of one condition may take one row's output."""

    def __init__(self) -> None:
        self.share, self.last, self.spread = False, None, 0.0

    def __call__(self, module, args, kwargs, out):
        ts = args[1] if len(args) > 1 else kwargs["timestep"]
        value = float(torch.as_tensor(ts).reshape(-1).max())
        first = self.last is None or value > self.last
        self.last = value
        if not first:
            return out
        sample = model_sample(out)
        rows = len(sample)
        conditions = [v.reshape(rows, -1).float() for k, v in sorted(kwargs.items())
                      if k not in INPUTS and torch.is_tensor(v) and v.shape[:1] == (rows,)]
        keys = torch.cat(conditions, 1) if conditions else torch.zeros(rows, 1)
        seen: dict[bytes, int] = {}
        owner = torch.tensor([seen.setdefault(keys[i].numpy().tobytes(), i) for i in range(rows)])
        shared = sample[owner]
        spread = (shared - sample).flatten(1).norm(dim=1) / sample.flatten(1).norm(dim=1).clamp_min(1e-12)
        self.spread = max(self.spread, float(spread.max()))
        if self.share:
            sample.copy_(shared)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    hook = FirstStepSharing()
    find_denoiser(target.pipe)[0].register_forward_hook(hook, with_kwargs=True)
    workload = target.workload(50, GUIDANCE[args.model], args.per_class, 0).reseeded(2000, "validation seeds")
    reference = checked_images(workload(target.pipe), "reference")
    for path in args.plans:
        plan = Plan.load(path)
        for share in (False, True):
            hook.share, hook.last, hook.spread = share, None, 0.0
            images = checked_images(run_with_plan(target.pipe, workload, plan)[0], "plan")
            quality = fidelity(images, reference)
            print(f"{path} first output {'shared' if share else 'own'}: {quality['psnr']:.2f} dB "
                  f"(p5 {quality['psnr_p5']:.2f}); rows of one condition differ by up to {hook.spread:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
