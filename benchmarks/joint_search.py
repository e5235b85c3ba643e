"""The joint search (sampler x steps x caching) on an embedded model, against the alternatives a
user would try, measured on held-out seeds in one process.

    python benchmarks/joint_search.py --model dit [--time 15m] [--threads 1] [--calib-per-class 2]
    python benchmarks/joint_search.py --model dit --quant w8a8 --quant-backend int8-dynamic  # int8 as the last step
    python benchmarks/joint_search.py --model dit --quant w8a8 --quant-backend int8 --objective latency

1. ``diffaccel search --strategy joint`` on the calibration seeds (budget ``psnr>=30`` by default);
2. on held-out seeds, interleaved with the unaccelerated 50-step DDIM pipeline (``--pairs``
   repeats): the searched plan, the cheapest plain sampler whose calibration PSNR cleared the
   budget (the search's own phase-1 rows; if it misses the budget's PSNR on the held-out seeds, the
   next cheapest ones too, until one meets it there), and the best hand-made caching plan; each with MAC and
   wall-clock speedup, PSNR (mean, 5th percentile), SSIM, evaluator accuracy and Fréchet distance.
   When the searched plan runs in a lower precision (``--precision``, default auto) or in int8
   (``--quant`` with a real backend), two more rows say what that part is worth: the same plan in
   float32, and the plain sampler in that precision or int8.

Results go to ``benchmarks/results/joint_search_<model>[_c<n>][_m<margin>][_<quant>][_t<time>].json`` (the
settings that differ from the defaults) with the commands that reproduce them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from diffaccel.calibration.reference import checked_images, run_with_plan
from diffaccel.eval.io import write_json
from diffaccel.methods.ptq import quant_spec
from diffaccel.runtime.features.precision import emulated_on_cpu
from diffaccel.search import compare, parse_budget, parse_duration, search
from diffaccel.search.candidates import choose
from diffaccel.targets import class_labels, load_target

ROOT = Path(__file__).resolve().parent.parent


def evaluate(target, images, heldout) -> dict:
    """Accuracy (and, on a text-to-image model, prompt adherence) and Fréchet distance of ``images``."""
    if target.evaluator is None:
        return {}
    if not target.embedded:
        return target.prompt_scores(images, list(heldout.calls))
    return target.evaluator.score(images, class_labels(heldout.calls))


def scores(target, plan, heldout, reference) -> dict:
    out = evaluate(target, checked_images(run_with_plan(target.pipe, heldout, plan)[0], "held-out"), heldout)
    ref = evaluate(target, reference, heldout)
    return {"accuracy": out.get("accuracy"), "fd": out.get("fd"), "baseline_accuracy": ref.get("accuracy"),
            "baseline_fd": ref.get("fd"), "adherence": out.get("adherence"),
            "baseline_adherence": ref.get("adherence")}


def measure(target, name: str, plan, heldout, reference, pairs: int) -> dict:
    started = time.time()
    row = {"name": name, "plan": plan.method, "solver": plan.solver.label if plan.solver else None,
           **compare(target.pipe, heldout, plan, pairs), **scores(target, plan, heldout, reference)}
    print(f"{name}: {row['speedup_wall']:.2f}x wall, {row['speedup_macs']:.2f}x MACs, {row['psnr']:.2f} dB "
          f"(p5 {row['psnr_p5']:.2f}) ({time.time() - started:.0f} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (a pipeline folder for pixart|sd) "
                        "instead of the shipped one")
    parser.add_argument("--budget", default="psnr>=30")
    parser.add_argument("--time", default="15m")
    parser.add_argument("--heldout-per-class", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance of every run")
    parser.add_argument("--calib-per-class", type=int, default=2)
    parser.add_argument("--margin", type=float, default=None, help="dB the calibration PSNR must clear the budget by")
    parser.add_argument("--objective", default="macs", help="macs, latency (needed with --quant) or bops")
    parser.add_argument("--quant", default=None, help="e.g. w8a8: the search may also quantize its plans")
    parser.add_argument("--quant-backend", default="int8", help="with --quant: fake, int8 or int8-dynamic")
    parser.add_argument("--precision", default="auto", help="auto, none, bfloat16 or float16 (see docs/search.md)")
    parser.add_argument("--judge-images", type=int, default=600, help="under a judge>=X budget: images judged")
    parser.add_argument("--suffix", default="", help="appended to the results file's name (say, what machine ran it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model, weights=args.weights)
    calibrate = target.workload(50, args.guidance, args.calib_per_class, 0)
    heldout = target.workload(50, args.guidance, args.heldout_per_class, 0, calibration=False)
    name = f"joint_search_{args.model}" + (f"_c{args.calib_per_class}" if args.calib_per_class != 2 else "") \
        + (f"_m{args.margin:g}" if args.margin is not None else "") + (f"_{args.quant}" if args.quant else "") \
        + (f"_t{args.time}" if args.time != "15m" else "") \
        + (f"_{args.precision}" if args.precision != "auto" else "") + (f"_{args.suffix}" if args.suffix else "")
    out = ROOT / "out" / "joint-search" / name  # one study per setting: the storage refuses to mix them
    started = time.time()
    spec = quant_spec(target.pipe, calibrate, args.quant, args.quant_backend) if args.quant else None
    result = search(target.pipe, calibrate, budget=args.budget, strategy="joint", time_limit=parse_duration(args.time),
                    heldout=heldout, pairs=args.pairs, out=out, model_name=f"{args.model}-ddim",
                    objective=args.objective, quant=spec, margin=args.margin, precision=args.precision,
                    judge=target.judge(), judge_images=args.judge_images, log=lambda line: print(line, flush=True))
    seconds = time.time() - started
    reference = checked_images(heldout(target.pipe), "held-out")
    rows = [measure(target, "searched (joint)", result.plan, heldout, reference, args.pairs)]
    budget = parse_budget(result.summary["budget"])
    plain = [c for c in result.points if c.plan is not None and c.plan.method == "steps"  # not fitted timesteps
             and c.plan.quant is None and c.meets(budget)]
    best_sampler = min(plain, key=lambda c: c.mac_fraction) if plain else None  # plain: fp32, no caching
    if best_sampler is not None:
        rows.append(measure(target, f"plain sampler {best_sampler.plan.solver.label}", best_sampler.plan, heldout,
                            reference, args.pairs))
        for dearer in sorted(plain, key=lambda c: c.mac_fraction)[1:]:  # until one meets the budget held-out too
            if rows[-1][budget.metric] >= budget.threshold:
                break
            rows.append(measure(target, f"plain sampler {dearer.plan.solver.label} (next cheapest)", dearer.plan,
                                heldout, reference, args.pairs))
    plan = result.plan
    arithmetic = {"precision": plan.precision} if plan.precision else {"quant": plan.quant} if plan.quant else {}
    if arithmetic:  # what the lower precision or int8 is worth: without it, and given to the plain sampler too
        label = plan.precision or f"{plan.quant.label} {plan.quant.backend}"
        rows.append(measure(target, "searched (joint) in float32", plan.model_copy(update=dict.fromkeys(arithmetic)),
                            heldout, reference, args.pairs))
        if best_sampler is not None:
            rows.append(measure(target, f"plain sampler {best_sampler.plan.solver.label} in {label}",
                                best_sampler.plan.model_copy(update=arithmetic), heldout, reference, args.pairs))
    hand = choose(result.handmade, budget, args.objective)[0] if result.handmade else None
    if hand is not None and hand.plan is not None:
        rows.append(measure(target, f"hand-made {hand.source}", hand.plan, heldout, reference, args.pairs))
    write_json(ROOT / "benchmarks" / "results" / f"{name}.json", {
        "model": args.model, "budget": args.budget, "time_limit": args.time, "search_seconds": round(seconds, 1),
        "summary": {k: v for k, v in result.summary.items() if k not in ("unit_macs", "unit_seconds", "units")},
        "heldout_images": len(reference), "guidance": args.guidance, "rows": rows, "threads": args.threads,
        "machine": platform.machine(), "processor": platform.processor(),
        "bf16_native": not emulated_on_cpu("bfloat16"), "torch": torch.__version__,
        "weights": str(args.weights) if args.weights else None,
        "command": f"python benchmarks/joint_search.py --model {args.model} --budget '{args.budget}' --time "
                   f"{args.time} --heldout-per-class {args.heldout_per_class} --pairs {args.pairs} --threads "
                   f"{args.threads} --calib-per-class {args.calib_per_class} --objective {args.objective} "
                   f"--guidance {args.guidance:g}"
                   + (f" --margin {args.margin:g}" if args.margin is not None else "")
                   + (f" --precision {args.precision}" if args.precision != "auto" else "")
                   + (f" --judge-images {args.judge_images}" if args.judge_images != 600 else "")
                   + (f" --suffix {args.suffix}" if args.suffix else "")
                   + (f" --weights {args.weights}" if args.weights else "")
                   + (f" --quant {args.quant} --quant-backend {args.quant_backend}" if args.quant else ""),
        "search_out": os.path.relpath(out, ROOT)})


if __name__ == "__main__":
    main()
