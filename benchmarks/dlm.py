"""Diffusion-LM benchmark: dKV-Cache, prompt caching and block diffusion on the shipped masked diffusion LM.

    python benchmarks/dlm.py [--rows baseline,dkv-decode,...] [--per-task 100] [--repeats 5] [--threads 1]

The rows and their measurement live in ``diffaccel.lm.bench`` (``diffaccel bench --model dlm`` runs
the same ones); this script keeps the committed results file.

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
from pathlib import Path

import torch

from diffaccel.lm import held_out, load_dlm
from diffaccel.lm.bench import ROWS, check_rows, run_rows, table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "dlm.json"


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
    try:
        check_rows(names)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    pipe = load_dlm(args.weights)
    record = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    record["model"] = f"dlm ({args.weights or 'src/diffaccel/zoo/weights/dlm'})"

    def command(name: str) -> str:
        steps = f" --steps {args.steps}" if args.steps else ""
        return (f"python benchmarks/dlm.py --rows {name}{steps} --per-task {args.per_task} "
                f"--repeats {args.repeats} --threads {args.threads}")

    def save(current: dict) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(current, indent=1) + "\n")

    run_rows(names, pipe, held_out("eval", per_task=args.per_task), held_out("calib", per_task=args.calib_per_task),
             record, save, command, steps=args.steps, repeats=args.repeats)


if __name__ == "__main__":
    main()
