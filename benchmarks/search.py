"""Search acceptance benchmark: every strategy on one embedded model, against the best hand-made plan.

    python benchmarks/search.py --model dit [--budget "psnr>=30"] [--time 15m] [--steps 50] [--threads 2]

Each strategy runs as ``diffaccel search`` does (calibration seeds for the search; the chosen plan
and the best hand-made plan meeting the budget are re-measured on held-out evaluation seeds,
interleaved with the unaccelerated pipeline in this process). Then the comparison at equal quality:
every hand-made plan (the search's hand-made set plus ERTA and, on transformers, first-block caching
at several thresholds) runs on the same held-out images; the searched plan is placed on their
Pareto front, giving the hand-made cost at its PSNR (MACs and wall-clock, the wall-clock of the two
bracketing hand-made plans measured interleaved like the searched plan's) and the hand-made PSNR at
its cost. Rows are written to
``benchmarks/results/search_<model>.json`` as strategies finish, each with the command that
reproduces it; outputs of each search land in ``out/search/<model>-<strategy>``, whose study.db
lets an interrupted benchmark continue where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import time
from pathlib import Path

import torch

from diffaccel.calibration.reference import checked_images
from diffaccel.eval.io import write_json
from diffaccel.methods.registry import build
from diffaccel.search import compare, parse_duration, search
from diffaccel.search.handmade import handmade_plans
from diffaccel.search.versus import bracket, cost_at, cost_bracket, front, measure, psnr_at, psnr_at_wall
from diffaccel.zoo.weights import load_pipeline

# Beyond the search's own hand-made set: the aggressive settings that reach the searched plans'
# speed (so the comparison at equal PSNR interpolates instead of extrapolating), and the methods
# whose plan comes from calibration runs or is decided at run time.
EXTRA = {
    "dit": {"fora": [{"interval": i} for i in (7, 8, 10)],
            "taylorseer": [{"interval": i, "order": 1} for i in (6, 7, 8)],
            "erta": [{"threshold": t, "correct": c} for t in (0.1, 0.2, 0.3, 0.4, 0.6, 0.8) for c in (False, True)],
            "first_block_cache": [{"threshold": t} for t in (0.05, 0.1, 0.2, 0.3, 0.4)]},
    "unet": {"deepcache": [{"interval": i, "uniform": u} for i in (6, 7, 8, 10) for u in (True, False)],
             "fora": [{"interval": i} for i in (5, 6, 8, 10)],
             "taylorseer": [{"interval": i, "order": 1} for i in (4, 6, 8)],
             "erta": [{"threshold": t, "correct": False} for t in (0.1, 0.2, 0.4, 0.6, 0.8, 1.2)]},
}


def handmade_on_heldout(pipe, model: str, steps: int, heldout, reference) -> tuple[list, dict]:
    plans = [(h.name, h.settings, h.plan) for h in handmade_plans(pipe.denoiser, steps)]
    for name, settings in EXTRA[model].items():
        plans += [(name, x, build(name, pipe, steps, guidance=3.0, **x)) for x in settings]
    print(f"hand-made plans on the held-out set: {len(plans)}", flush=True)
    points = measure(pipe, heldout, plans, reference, log=lambda line: print(line, flush=True))
    return points, {(p.name, str(p.settings)): plan for p, (_, _, plan) in zip(points, plans)}


def equal_quality(pipe, heldout, searched: dict, points: list, by_key: dict, pairs: int) -> dict:
    """The searched plan (its held-out row) against the hand-made front at its PSNR and at its cost."""
    psnr, macs, wall = searched["heldout_psnr"], searched["speedup_macs"], searched["speedup_wall"]
    found = bracket(points, psnr)
    out = {"psnr": psnr, "front": [p.as_dict() for p in front(points)],
           "handmade_psnr_at_equal_macs": psnr_at(points, macs)}
    if out["handmade_psnr_at_equal_macs"] is not None:
        out["psnr_gain_at_equal_macs"] = psnr - out["handmade_psnr_at_equal_macs"]
    around = cost_bracket(points, macs)
    if around is not None:  # the hand-made plans around the searched plan's cost, timed alike
        for p in around:
            if p.speedup_wall is None:
                p.speedup_wall = compare(pipe, heldout, by_key[(p.name, str(p.settings))], pairs)["speedup_wall"]
        out["equal_cost_bracket"] = [p.as_dict() for p in around]
        out["handmade_psnr_at_equal_wall"] = psnr_at_wall(around, wall)
        if out["handmade_psnr_at_equal_wall"] is not None:
            out["psnr_gain_at_equal_wall"] = psnr - out["handmade_psnr_at_equal_wall"]
    if found is None:
        out["note"] = "the searched plan's PSNR lies outside the hand-made front's range: no equal-PSNR point"
        return out
    for p in found[:2]:  # wall-clock of the two bracketing hand-made plans, interleaved as the searched one
        measured = compare(pipe, heldout, by_key[(p.name, str(p.settings))], pairs)
        p.speedup_wall = measured["speedup_wall"]
        print(f"  bracket {p.name} {p.settings}: {p.psnr:.2f} dB, {p.speedup_macs:.2f}x MACs, "
              f"{p.speedup_wall:.2f}x wall", flush=True)
    hand_macs, hand_wall = cost_at(points, psnr), cost_at(points, psnr, "speedup_wall")
    out.update(bracket=[p.as_dict() for p in found[:2]], weight=found[2],
               handmade_speedup_macs=1 / hand_macs, handmade_speedup_wall=1 / hand_wall,
               cheaper_macs=1 - (1 / macs) / hand_macs, cheaper_wall=1 - (1 / wall) / hand_wall)
    out["meets_15pct"] = out["cheaper_macs"] >= 0.15 and out["cheaper_wall"] >= 0.15
    return out

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
    parser.add_argument("--margin", type=float, default=None, help="calibration margin over the budget "
                                                                   "(default: diffaccel search's)")
    parser.add_argument("--correct", action="store_true", help="fit the feature correction to the chosen plan "
                                                               "(rows named <strategy>+correction)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "search")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file (default benchmarks/results/search_<model>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = args.results or ROOT / "benchmarks" / "results" / f"search_{args.model}.json"
    pipe = load_pipeline(args.model)
    calibrate = pipe.workload_calls(args.steps, 3.0, args.calib_per_class, args.seed)
    heldout = pipe.workload_calls(args.steps, 3.0, args.heldout_per_class, 0, calibration=False)
    reference = checked_images(heldout(pipe), "held-out")
    hand_points, by_key = handmade_on_heldout(pipe, args.model, args.steps, heldout, reference)
    rows = []
    for strategy in args.strategies:
        out = args.out / f"{args.model}-{strategy}"
        label = f"{strategy}+correction" if args.correct else strategy
        command = (f"diffaccel search --model {args.model} --budget {shlex.quote(args.budget)} --objective "
                   f"{args.objective} --strategy {strategy} --time {args.time} --steps {args.steps} --seed {args.seed} "
                   f"--calib-per-class {args.calib_per_class} --heldout-per-class {args.heldout_per_class} "
                   f"--pairs {args.pairs} --threads {args.threads} --out {os.path.relpath(out, ROOT)}"
                   + (f" --margin {args.margin}" if args.margin is not None else "")
                   + (" --correct" if args.correct else "")
                   + (f" --trials {args.trials}" if args.trials and strategy == "nsga2" else ""))
        start = time.time()
        result = search(pipe, calibrate, budget=args.budget, objective=args.objective, strategy=strategy,
                        seed=args.seed, out=out, time_limit=parse_duration(args.time),
                        trials=args.trials if strategy == "nsga2" else None, heldout=heldout, pairs=args.pairs,
                        model_name=f"{args.model}-ddim", margin=args.margin, correct=args.correct,
                        log=lambda line: print(line, flush=True))
        s = result.summary
        hand = s.get("best_handmade", {})
        row = {**{k: v for k, v in s.items() if k not in ("unit_macs", "unit_seconds", "units")},
               "strategy": label, "command": command, "seconds": round(time.time() - start, 1),
               "front": [{"calib_psnr": c.psnr, "mac_fraction": c.mac_fraction, "source": c.source}
                         for c in result.front],
               "beats_handmade_macs": (s["met"] and hand.get("met", False)
                                       and s["speedup_macs"] > hand.get("speedup_macs", float("inf"))),
               "equal_quality": equal_quality(pipe, heldout, s, hand_points, by_key, args.pairs)}
        rows.append(row)
        eq = row["equal_quality"]
        if "cheaper_macs" in eq:
            print(f"{args.model} {strategy} at equal held-out PSNR ({eq['psnr']:.2f} dB): hand-made "
                  f"{eq['handmade_speedup_macs']:.2f}x MACs / {eq['handmade_speedup_wall']:.2f}x wall, searched "
                  f"{eq['cheaper_macs']:.0%} cheaper in MACs and {eq['cheaper_wall']:.0%} in wall-clock", flush=True)
        if eq.get("handmade_psnr_at_equal_macs") is not None:
            print(f"{args.model} {strategy} at equal MACs: hand-made {eq['handmade_psnr_at_equal_macs']:.2f} dB, "
                  f"searched {eq['psnr']:.2f} dB ({eq['psnr_gain_at_equal_macs']:+.2f} dB)", flush=True)
        if eq.get("handmade_psnr_at_equal_wall") is not None:
            print(f"{args.model} {strategy} at equal wall-clock: hand-made {eq['handmade_psnr_at_equal_wall']:.2f} "
                  f"dB, searched {eq['psnr']:.2f} dB ({eq['psnr_gain_at_equal_wall']:+.2f} dB)", flush=True)
        print(f"{args.model} {strategy}: {s['speedup_macs']:.2f}x MACs, {s['speedup_wall']:.2f}x wall, PSNR "
              f"{s['calib_psnr']:.2f} calib / {s['heldout_psnr']:.2f} held-out"
              + (f" | best hand-made {hand['name']} {hand['settings']}: {hand['speedup_macs']:.2f}x MACs, "
                 f"{hand['speedup_wall']:.2f}x wall, PSNR {hand['heldout_psnr']:.2f} held-out"
                 + ("" if hand["met"] else " (misses the budget)") if hand else ""),
              flush=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(results.read_text())["rows"] if results.exists() else []  # read as late as possible
        kept = [r for r in previous if r["strategy"] not in {row["strategy"] for row in rows}]
        write_json(results, {"model": args.model, "budget": args.budget, "objective": args.objective,
                             "steps": args.steps, "machine": platform.machine(), "torch": torch.__version__,
                             "threads": args.threads, "heldout_images": len(reference),
                             "handmade_heldout": [p.as_dict() for p in hand_points], "rows": kept + rows})


if __name__ == "__main__":
    main()
