"""Train an embedded model on a GPU for a fixed time budget, then check it and time plans on CUDA.

    python benchmarks/gpu_train.py --model dit --seconds 300 --out OUT [--batch 512 --lr 1.5e-3]

1. A short probe measures this GPU's training speed; the step count is chosen so the run fits the
   budget. It is written into ``training.json`` with the rest of the configuration, so the same
   weights come from ``python -m diffaccel.zoo.train --device cuda --steps N ...`` anywhere.
2. Trains, exports fp16 safetensors into ``OUT`` (a folder ``load_pipeline(weights_dir=OUT)`` reads).
3. Scores 600 samples (50-step DDIM and 20-step DPM-Solver++, guidance 3, the seeds of
   ``benchmarks/quality.py``) with the evaluator: a first look only; the published quality figures
   are measured on the CPU by ``quality.py`` with the exported weights.
4. Times the unaccelerated model against a few plans on CUDA, interleaved, with synchronisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffaccel.eval.fidelity import fidelity
from diffaccel.methods.registry import build
from diffaccel.runtime import accelerate
from diffaccel.zoo.pipeline import sample, shapes_workload
from diffaccel.zoo.train import TrainConfig, export, train
from diffaccel.zoo.weights import load_evaluator, load_pipeline

PROBE_STEPS = 200
PLANS_TO_TIME = {"dit": [("fora", {"interval": 2}), ("fora", {"interval": 3}), ("erta", {"threshold": 0.2})],
                 "unet": [("deepcache", {"interval": 3}), ("deepcache", {"interval": 5})]}


def probe_seconds_per_step(cfg: TrainConfig) -> float:
    """Seconds per training step after warm-up, measured on a throw-away run."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = TrainConfig(**{**asdict(cfg), "steps": 10**6, "checkpoint_every": 10**6, "stop_after": PROBE_STEPS})
        return train(probe, Path(tmp), show_progress=False)["seconds_per_step"]


def score(weights: Path, model: str, device: str) -> list[dict]:
    evaluator = load_evaluator()
    rows = []
    for sampler, steps in (("ddim", 50), ("dpm", 20)):
        pipe = load_pipeline(model, sampler, weights_dir=weights).to(device)
        calls = shapes_workload(list(range(6)), steps, 3.0, per_class=100, calibration=False, batch_size=600)
        labels = torch.tensor(calls.calls[0].kwargs["class_labels"])
        images = sample(pipe, labels, list(calls.calls[0].seeds), steps, 3.0, batch_size=len(labels)).cpu()
        rows.append({"sampler": sampler, "steps": steps, **evaluator.score(images, labels)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def time_plans(weights: Path | None, model: str, device: str, batch: int = 64, repeats: int = 7,
               plans: list[tuple[str, dict]] | None = None) -> list[dict]:
    """CUDA wall-clock of each plan (default ``PLANS_TO_TIME``) against the baseline, interleaved,
    median of ``repeats``; PSNR of the plan's images against the baseline's."""
    pipe = load_pipeline(model, "ddim", weights_dir=weights).to(device)
    labels = torch.arange(batch) % 6

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(plan) -> float:
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        sync()
        start = time.perf_counter()
        if plan is None:
            images = pipe(labels, num_inference_steps=50, guidance_scale=3.0, generator=gens).images
        else:
            with accelerate(pipe, plan):
                images = pipe(labels, num_inference_steps=50, guidance_scale=3.0, generator=gens).images
        sync()
        timed.images = images
        return time.perf_counter() - start

    rows = []
    for name, params in plans or PLANS_TO_TIME[model]:
        try:
            plan = build(name, pipe, 50, guidance=3.0, **params)
            timed(None)  # warm-up
            reference = timed.images
            timed(plan)
            psnr = fidelity(timed.images.float().cpu(), reference.float().cpu())["psnr"]
            base, fast = [], []
            for _ in range(repeats):
                base.append(timed(None))
                fast.append(timed(plan))
            with accelerate(pipe, plan) as executor:
                pipe(labels, num_inference_steps=50, guidance_scale=3.0,
                     generator=[torch.Generator().manual_seed(i) for i in range(batch)])
            rows.append({"method": name, "params": params, "batch": batch,
                         "baseline_s": statistics.median(base), "plan_s": statistics.median(fast),
                         "speedup_wall": statistics.median(base) / statistics.median(fast),
                         "speedup_macs": executor.stats.mac_ratio, "psnr": psnr})
        except Exception as exc:  # report and go on: this is a measurement run, not a test
            rows.append({"method": name, "params": params, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "unet"], default="dit")
    parser.add_argument("--seconds", type=float, default=300.0, help="training time budget")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run", type=Path, default=Path("runs/gpu"), help="checkpoint folder")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--time-batch", type=int, default=64, help="batch of the CUDA timing runs")
    parser.add_argument("--no-score", action="store_true", help="skip the 600-sample quality look")
    parser.add_argument("--no-timing", action="store_true", help="skip the CUDA timing of plans")
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_train.py trains on a GPU and none is visible here; train on CPUs with "
                         "`diffaccel train`, or pass --device cpu to try this script's steps there")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = TrainConfig(model=args.model, batch=args.batch, lr=args.lr, warmup=args.warmup, device=device,
                      workers=args.workers, overrides=args.overrides, checkpoint_every=2000)
    per_step = probe_seconds_per_step(cfg)
    cfg.steps = int(args.seconds / per_step) // 100 * 100
    cfg.time_limit_min = (args.seconds * 1.15 + 30) / 60  # a safety net; the schedule is sized to finish first
    print(json.dumps({"seconds_per_step": per_step, "steps": cfg.steps}), flush=True)
    start = time.perf_counter()
    summary = train(cfg, args.run, show_progress=False)
    print(json.dumps({"trained_steps": summary["step"], "seconds": time.perf_counter() - start,
                      "seconds_per_step": summary["seconds_per_step"], "loss_last": summary["loss_last"][-5:]}),
          flush=True)
    weights = args.out
    export(args.run, weights)
    report = {"gpu": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__,
              "seconds_per_step": per_step, "train": asdict(cfg), "trained_steps": summary["step"]}
    report["quality"] = [] if args.no_score else score(weights, args.model, device)
    if not args.no_timing:
        report["cuda_timing"] = time_plans(weights, args.model, device, batch=args.time_batch)
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
