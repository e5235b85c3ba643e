"""Search acceptance benchmark: every strategy on one embedded model, against the best hand-made plan.

    python benchmarks/search.py --model dit [--budget "psnr>=30"] [--time 15m] [--steps 50] [--threads 2]

Each strategy runs as ``diffaccel search`` does (calibration seeds for the search; the chosen plan
and the best hand-made plan meeting the budget are re-measured on held-out evaluation seeds,
interleaved with the unaccelerated pipeline in this process). Rows are written to
``benchmarks/results/search_<model>.json`` as strategies finish, each with the command that
reproduces it; outputs of each search land in ``out/search/<model>-<strategy>``, whose study.db
lets an interrupted benchmark continue where it stopped.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import time
from pathlib import Path

import torch

from diffaccel.generate import write_json
from diffaccel.search import embedded_calibration, parse_duration, search
from diffaccel.zoo.weights import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dit", "unet"], required=True)
    parser.add_argument("--budget", default="psnr>=30")
    parser.add_argument("--objective", choices=["macs", "latency"], default="macs")
    parser.add_argument("--strategies", nargs="+", default=["greedy", "dp", "nsga2"])
    parser.add_argument("--time", default="15m", help="time limit of each strategy")
    parser.add_argument("--trials", type=int, default=None, help="nsga2: trials in the study")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--calib-per-class", type=int, default=2)
    parser.add_argument("--heldout-per-class", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "search")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file (default benchmarks/results/search_<model>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = args.results or ROOT / "benchmarks" / "results" / f"search_{args.model}.json"
    pipe = load_pipeline(args.model)
    calibrate = embedded_calibration(None, args.calib_per_class, args.steps, seed=args.seed)
    heldout = embedded_calibration(None, args.heldout_per_class, args.steps, seed=0, calibration=False)
    rows = []
    for strategy in args.strategies:
        out = args.out / f"{args.model}-{strategy}"
        command = (f"diffaccel search --model {args.model} --budget {shlex.quote(args.budget)} --objective "
                   f"{args.objective} --strategy {strategy} --time {args.time} --steps {args.steps} --seed {args.seed} "
                   f"--calib-per-class {args.calib_per_class} --heldout-per-class {args.heldout_per_class} "
                   f"--pairs {args.pairs} --threads {args.threads} --out {out}"
                   + (f" --trials {args.trials}" if args.trials and strategy == "nsga2" else ""))
        start = time.time()
        result = search(pipe, calibrate, args.steps, budget=args.budget, objective=args.objective, strategy=strategy,
                        seed=args.seed, out=out, time_limit=parse_duration(args.time),
                        trials=args.trials if strategy == "nsga2" else None, heldout=heldout, pairs=args.pairs,
                        model_name=f"{args.model}-ddim", log=lambda line: print(line, flush=True))
        s = result.summary
        hand = s.get("best_handmade", {})
        row = {"strategy": strategy, "command": command, "seconds": round(time.time() - start, 1),
               **{k: v for k, v in s.items() if k not in ("unit_macs", "unit_seconds", "units")},
               "front": [{"calib_psnr": c.psnr, "mac_fraction": c.mac_fraction, "source": c.source}
                         for c in result.front],
               "beats_handmade_macs": (s["met"] and hand.get("met", False)
                                       and s["speedup_macs"] > hand.get("speedup_macs", float("inf")))}
        rows.append(row)
        print(f"{args.model} {strategy}: {s['speedup_macs']:.2f}x MACs, {s['speedup_wall']:.2f}x wall, PSNR "
              f"{s['calib_psnr']:.2f} calib / {s['heldout_psnr']:.2f} held-out"
              + (f" | best hand-made {hand['name']} {hand['settings']}: {hand['speedup_macs']:.2f}x MACs, "
                 f"{hand['speedup_wall']:.2f}x wall, PSNR {hand['heldout_psnr']:.2f} held-out"
                 + ("" if hand["met"] else " (misses the budget)") if hand else ""),
              flush=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        write_json(results, {"model": args.model, "budget": args.budget, "objective": args.objective,
                             "steps": args.steps, "machine": platform.machine(), "torch": torch.__version__,
                             "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
