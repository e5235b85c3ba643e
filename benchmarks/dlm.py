"""Diffusion-LM benchmark: dKV-Cache, prompt caching and block diffusion on the shipped masked diffusion LM.

    python benchmarks/dlm.py [--rows baseline,dkv-decode,...] [--per-task 100] [--repeats 5] [--threads 1]

Every row is measured by ``diffaccel.lm.evaluate.compare`` against the uncached LLaDA sampler at
the same number of steps (default: one token per step), on held-out evaluation problems, baseline
and plan interleaved in one process, median of ``--repeats`` after a warm-up. The ``search`` row
chooses its plan with ``search_lm`` on the calibration problems (disjoint from the evaluation
ones) under ``accuracy>=-1``. Rows are merged by name into ``benchmarks/results/dlm.json``, so one
row can be re-measured alone (the ``command`` of each row does exactly that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from diffaccel.lm import held_out, load_dlm, make_lm_plan
from diffaccel.lm.evaluate import compare
from diffaccel.lm.search import search_lm

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "dlm.json"
ROWS = {
    "baseline": ("none", {}),
    "dkv-decode": ("dkv-decode", {"refresh_every": 0}),
    "dkv-decode-refresh4": ("dkv-decode", {"refresh_every": 4}),
    "dkv-decode-refresh2": ("dkv-decode", {"refresh_every": 2}),
    "dkv-greedy-w2": ("dkv-greedy", {"window": 2}),
    "dkv-greedy-w4-refresh4": ("dkv-greedy", {"window": 4, "refresh_every": 4}),
    "prompt-cache": ("prompt-cache", {}),
    "block-2": ("block", {"block_size": 2}),
    "block-3": ("block", {"block_size": 3}),
    "block-4": ("block", {"block_size": 4}),
    "block-6": ("block", {"block_size": 6}),
    "block-12": ("block", {"block_size": 12}),
    "block-4-nocache": ("block", {"block_size": 4, "block_cache": False}),
    "search": None,
}


def measure(name: str, pipe, problems: list, args: argparse.Namespace) -> dict:
    """One row: the plan named ``name`` compared with the uncached sampler."""
    if name == "search":
        plan = search_lm(pipe, "accuracy>=-1", held_out("calib", per_task=args.calib_per_task), steps=args.steps)
    else:
        method, settings = ROWS[name]
        plan = make_lm_plan(method, **settings)
    result = compare(pipe, plan, problems, repeats=args.repeats, steps=args.steps)
    if name == "baseline":  # the reference itself; the measured none-vs-baseline ratio shows the timing noise
        result["timing_noise"] = {"speedup_wall": result["speedup_wall"], "speedup_macs": result["speedup_macs"]}
        result.update(speedup_wall=1.0, speedup_macs=1.0, tokens_per_second=result["baseline_tokens_per_second"],
                      setting=f"LLaDA sampler, {result['steps']} steps, no cache")
    command = f"python benchmarks/dlm.py --rows {name}"
    if args.steps:
        command += f" --steps {args.steps}"
    command += f" --per-task {args.per_task} --repeats {args.repeats} --threads {args.threads}"
    return {"name": name, **result, "command": command}


def table(record: dict) -> str:
    """The rows as a markdown table (for docs/language-models.md)."""
    lines = ["| row | method | setting | accuracy % | agreement % | MAC speedup | wall speedup | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in record["rows"]:
        lines.append(f"| {row['name']} | {row['method']} | {row['setting']} | {row['accuracy']:.1f} | "
                     f"{row['agreement']:.1f} | {row['speedup_macs']:.2f}x | {row['speedup_wall']:.2f}x | "
                     f"{row['tokens_per_second']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names: " + ", ".join(ROWS))
    parser.add_argument("--per-task", type=int, default=100, help="held-out evaluation problems per task")
    parser.add_argument("--calib-per-task", type=int, default=40, help="calibration problems per task (search)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the answer length)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--weights", type=Path, default=None, help="an exported LM folder (default: the shipped one)")
    parser.add_argument("--table", action="store_true", help="print the saved rows as a markdown table and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    pipe = load_dlm(args.weights)
    problems = held_out("eval", per_task=args.per_task)
    record = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = {row["name"]: row for row in record["rows"]}
    for name in names:
        started = time.time()
        rows[name] = measure(name, pipe, problems, args)
        rows[name]["row_seconds"] = round(time.time() - started, 1)
        print(json.dumps({k: rows[name][k] for k in ("name", "setting", "accuracy", "speedup_macs", "speedup_wall",
                                                     "tokens_per_second")}), flush=True)
        record.update({"model": "dlm (src/diffaccel/zoo/weights/dlm)", "split": "eval",
                       "problems": len(problems), "repeats": args.repeats, "threads": args.threads,
                       "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(),
                       "torch": torch.__version__, "accuracy_unit": "percent exact match",
                       "tokens_per_second_unit": "answer positions decoded per second (eos fill included)",
                       "rows": [rows[n] for n in ROWS if n in rows]})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
