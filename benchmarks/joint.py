"""Joint caching + quantization benchmark (CacheQuant's questions, on the embedded models).

    python benchmarks/joint.py --model dit [--keys 10 12 14] [--time 8m] [--threads 1]

1. Does the DP schedule gain from knowing the quantization error? Key steps chosen from the
   full-precision profile and from the profile plus each step's quantization error, both run
   quantized (W8A8 and W4A8, simulated) on held-out seeds; PSNR against the fp32 50-step output.
2. Does the per-channel correction of cached features reduce the compounded error? The same
   quantized key-step plans with and without the correction (fitted on the quantized model).
3. Bit widths per layer group: NSGA-II over schedules and per-unit weight bits (8 or 4) under a
   PSNR budget, ranked by bit-weighted MACs, against the uniform W8 and W4 plans on the same seeds.

Rows go to ``benchmarks/results/joint_<model>.json``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from diffaccel.calibration.dp import optimal_keys, set_errors, set_matrix
from diffaccel.calibration.reference import CalibrationRun, checked_images
from diffaccel.eval.io import write_json
from diffaccel.methods.feature_correction import fit_feature_correction
from diffaccel.methods.ptq import quant_spec
from diffaccel.search import parse_duration, search
from diffaccel.search.space import Space
from diffaccel.search.versus import measure
from diffaccel.zoo.weights import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "unet"], required=True)
    parser.add_argument("--keys", type=int, nargs="+", default=[10, 12, 14])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--heldout-per-class", type=int, default=8)
    parser.add_argument("--time", default="8m", help="time limit of the NSGA-II joint search")
    parser.add_argument("--budget", default="psnr>=28")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "joint")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    log = lambda line: print(line, flush=True)  # noqa: E731
    pipe = load_pipeline(args.model)
    steps = args.steps
    calibrate = pipe.workload_calls(steps, 3.0, 2)
    heldout = pipe.workload_calls(steps, 3.0, args.heldout_per_class, 0, calibration=False)
    reference = checked_images(heldout(pipe), "held-out")
    specs = {bits: quant_spec(pipe, calibrate, bits) for bits in ("w8a8", "w4a8")}
    space = Space(pipe.denoiser, steps)
    calib = CalibrationRun(pipe, calibrate)
    everything = space.by_name["all"].reused
    d = set_matrix(calib.dissimilarity, space.units, everything)
    rows = []
    for bits, spec in specs.items():
        q = set_errors(calib.unit_error(space.plan(space.all_compute()).with_quant(spec)), space.units, everything)
        log(f"{bits}: quantization error per step {[round(float(v), 4) for v in q]}")
        for k in args.keys:
            plain, _ = optimal_keys(d, k)
            aware, _ = optimal_keys(d, k, q)
            plans = []
            for name, keys in (("dp fp32 profile", plain), ("dp + quantization error", aware)):
                genome = tuple("C" if s in keys else "all" for s in range(1, steps))
                plan = space.plan(genome, "keysteps", {"keys": k, "key_steps": keys}).with_quant(spec)
                plans.append((name, {"bits": bits, "keys": k, "key_steps": keys}, plan))
                if name == "dp + quantization error":
                    plans.append(("dp + quantization error + feature correction",
                                  {"bits": bits, "keys": k, "key_steps": keys},
                                  fit_feature_correction(pipe, plan, pipe.workload_calls(steps, 3.0, 1))))
            for point in measure(pipe, heldout, plans, reference, log=log):
                rows.append({"part": "dp", **point.as_dict(), "same_keys_as_plain": plain == aware})
            write_json(ROOT / "benchmarks" / "results" / f"joint_{args.model}.json", record(args, rows, started))
    spec = specs["w8a8"]
    result = search(pipe, calibrate, budget=args.budget, objective="bops", strategy="nsga2", seed=0,
                    out=args.out / f"{args.model}-nsga2-bits", time_limit=parse_duration(args.time), quant=spec,
                    bits=(8, 4), model_name=f"{args.model}-ddim", log=log)
    s = result.summary
    bit_space = Space(pipe.denoiser, steps, quant=spec, bits=(8, 4))
    schedule = bit_space.schedule(result.chosen.genome)
    n = len(bit_space.units)
    candidates = [("searched schedule + per-unit bits", {"unit_bits": s["quant"]["unit_bits"]}, result.plan,
                   result.chosen.genome)]
    for bits, width in (("w8a8", "8"), ("w4a8", "4")):
        uniform = Space(pipe.denoiser, steps, quant=specs[bits])
        candidates.append((f"searched schedule, uniform {bits}", {"bits": bits},
                           uniform.plan(uniform.complete(schedule)), schedule + (width,) * n))
    points = measure(pipe, heldout, [c[:3] for c in candidates], reference, log=log)
    for point, (_, _, _, genome) in zip(points, candidates):
        rows.append({"part": "bits", **point.as_dict(), "bops_fraction": bit_space.bit_mac_fraction(
            genome, calib.unit_macs), "calib_psnr": s["calib_psnr"] if genome == result.chosen.genome else None})
    write_json(ROOT / "benchmarks" / "results" / f"joint_{args.model}.json", record(args, rows, started))
    for row in rows:
        log(f"{row['part']} {row['name']} {row['settings']}: {row['psnr']:.2f} dB, {row['speedup_macs']:.2f}x MACs"
            + (f", bops {row['bops_fraction']:.3f}" if row.get("bops_fraction") else ""))


def record(args, rows: list[dict], started: float) -> dict:
    return {"model": args.model, "steps": args.steps, "heldout_images": args.heldout_per_class * 6,
            "budget": args.budget, "machine": platform.machine(), "torch": torch.__version__,
            "threads": args.threads, "seconds": round(time.time() - started, 1),
            "command": f"python benchmarks/joint.py --model {args.model} --keys {' '.join(map(str, args.keys))} "
                       f"--time {args.time} --budget '{args.budget}' --threads {args.threads}",
            "rows": rows}


if __name__ == "__main__":
    main()
