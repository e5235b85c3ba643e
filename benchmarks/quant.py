"""Quantization acceptance benchmark: bit widths, execution paths and a joint caching + W8A8 plan.

    python benchmarks/quant.py --model dit [--per-class 20] [--threads 1] [--only NAME,...]

Each row runs the quantized (or joint) plan and the fp32 model on the same held-out seeds, batch by
batch interleaved in one process (``diffaccel generate --compare``), and records MAC and wall-clock
speedups, PSNR/SSIM against fp32, evaluator accuracy, the Fréchet distance, and the weight memory
of the quantized denoiser against fp32. Rows go to ``benchmarks/results/quant_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from pathlib import Path

import torch

from diffaccel.eval.io import write_json
from diffaccel.generate import GenerateConfig, run_generate
from diffaccel.methods.ptq import ptq, quant_spec
from diffaccel.methods.registry import build
from diffaccel.plan import Plan
from diffaccel.quant import Calibration, quantize_, weight_bytes
from diffaccel.targets import load_target

# name -> (caching method and settings or None, bits, backend, per-step scales, images per class or None)
ROWS = {
    "dit": {
        "W8A8 simulated": (None, "w8a8", "fake", False, None),
        "W8A8 simulated, per-step scales": (None, "w8a8", "fake", True, None),
        "W8A8 int8 (calibrated scales)": (None, "w8a8", "int8", False, None),
        "W8A8 int8-dynamic (fbgemm)": (None, "w8a8", "int8-dynamic", False, None),
        "W4A8 simulated": (None, "w4a8", "fake", False, None),
        "W4A8 simulated, per-step scales": (None, "w4a8", "fake", True, None),
        "erta 0.3 + W8A8 int8-dynamic": (("erta", {"threshold": 0.3}), "w8a8", "int8-dynamic", False, 100),
    },
    "unet": {
        "W8A8 simulated": (None, "w8a8", "fake", False, None),
        "W8A8 simulated, per-step scales": (None, "w8a8", "fake", True, None),
        "W8A8 int8-dynamic (fbgemm)": (None, "w8a8", "int8-dynamic", False, None),
        "W4A8 simulated": (None, "w4a8", "fake", False, None),
        "W4A8 simulated, per-step scales": (None, "w4a8", "fake", True, None),
        "taylorseer 8 + W8A8 int8-dynamic": (("taylorseer", {"interval": 8, "order": 1}), "w8a8", "int8-dynamic",
                                             False, 100),
        # the plan `diffaccel search --model unet --strategy dp` found (benchmarks/search.py), saved here
        "searched DP plan + W8A8 int8-dynamic": (("plan", {"path": "benchmarks/results/plans/unet-dp.json"}),
                                                 "w8a8", "int8-dynamic", False, 100),
    },
}


def command(model: str, caching, bits: str, backend: str, per_step: bool, per_class: int, args) -> str:
    parts = ["diffaccel", "generate", "--model", model]
    if caching is not None and caching[0] == "plan":
        parts += ["--plan", caching[1]["path"]]
    elif caching is not None:
        method, settings = caching
        parts += ["--method", method]
        for key, value in settings.items():
            parts += ["--param", f"{key}={json.dumps(value)}"]
    parts += ["--quant", bits, "--quant-backend", backend] + (["--quant-per-step"] if per_step else [])
    parts += ["--per-class", str(per_class), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
              "--threads", str(args.threads), "--compare", "--out", f"out/quant/{model}"]
    return shlex.join(parts)


def memory_ratio(pipe, plan) -> float:
    """Weight bytes of the quantized denoiser over its fp32 bytes."""
    model = pipe.denoiser
    full = weight_bytes(model)
    handle = quantize_(model, plan.quant, Calibration.load(plan.quant.calibration))
    try:
        return weight_bytes(model) / full
    finally:
        handle.restore()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ROWS), required=True)
    parser.add_argument("--per-class", type=int, default=20, help="images per class of the rows that name none")
    parser.add_argument("--seed", type=int, default=100, help="held-out noise seeds")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="row names to run, separated by semicolons")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    pipe = target.pipe
    path = args.out / f"quant_{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    wanted = [name.strip() for name in args.only.split(";")] if args.only else list(ROWS[args.model])
    for index, name in enumerate(wanted):
        caching, bits, backend, per_step, per_class = ROWS[args.model][name]
        per_class = per_class or args.per_class
        started = time.time()
        cfg = GenerateConfig(per_class=per_class, seed=args.seed, batch_size=args.batch_size)
        if caching is None:
            plan = ptq(pipe, pipe.workload_calls(cfg.steps), bits=bits, backend=backend, per_step=per_step)
        else:
            cache_plan = Plan.load(caching[1]["path"]) if caching[0] == "plan" else build(
                caching[0], pipe, cfg.steps, **caching[1])
            plan = cache_plan.with_quant(quant_spec(pipe, pipe.workload_calls(cfg.steps), bits, backend, per_step))
        record = run_generate(target, cfg, Path("out/quant") / f"{args.model}-{index}", plan=plan,
                              compare=True, progress=False)
        row = {
            "name": name, "bits": bits, "backend": backend, "per_step": per_step,
            "caching": None if caching is None else {"method": caching[0], **caching[1]},
            "speedup_macs": round(record["speedup_macs"], 3), "speedup_wall": round(record["speedup_wall"], 3),
            "psnr": round(record["psnr"], 2), "ssim": round(record["ssim"], 4),
            "accuracy": record["accuracy"], "baseline_accuracy": record["baseline"]["accuracy"],
            "fd": round(record["fd"], 3), "baseline_fd": round(record["baseline"]["fd"], 3),
            "fd_floor": round(record["fd_floor"], 3), "weight_memory_ratio": round(memory_ratio(pipe, plan), 4),
            "n_images": record["n_images"], "wall_pairs": record["wall_pairs"],
            "command": command(args.model, caching, bits, backend, per_step, per_class, args),
            "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__,
        }
        rows = json.loads(path.read_text()) if path.exists() else []
        write_json(path, [r for r in rows if r["name"] != name] + [row])
        print(f"[{index + 1}/{len(wanted)}] {name}: {row['speedup_wall']:.2f}x wall, PSNR {row['psnr']:.1f}, "
              f"acc {row['accuracy']:.1%} (fp32 {row['baseline_accuracy']:.1%}), FD {row['fd']:.3f} "
              f"(fp32 {row['baseline_fd']:.3f}), memory {row['weight_memory_ratio']:.1%} "
              f"({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
