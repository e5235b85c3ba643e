"""The language model's bench: every LM method at its standard settings, and the searched plan,
each against the uncached LLaDA sampler on the same held-out problems, interleaved in one process.

Used by ``diffaccel bench --model dlm`` and ``benchmarks/dlm.py`` (which commits
``benchmarks/results/dlm.json``); the rows are the same in both.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch

from diffaccel.lm.evaluate import compare
from diffaccel.lm.pipeline import DLMPipeline
from diffaccel.lm.plan import LMPlanError, make_lm_plan
from diffaccel.lm.sampler import check_schedule
from diffaccel.lm.search import search_lm
from diffaccel.lm.tasks import Problem

# name -> (method, settings); ``search`` is chosen by search_lm under the bench's budget.
ROWS: dict[str, tuple[str, dict] | None] = {
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
SUMMARY_KEYS = ("name", "setting", "accuracy", "speedup_macs", "speedup_wall", "tokens_per_second")


def check_rows(names: list[str], answer_length: int | None = None, steps: int | None = None) -> None:
    """Refuse row names the bench does not know, naming the ones it does, and (given the answer length
    and the step count) rows whose plan cannot take that many steps: before any row runs, not when
    the bench reaches them."""
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise ValueError(f"unknown or no rows {unknown}; rows are {', '.join(ROWS)}")
    if answer_length is None or steps is None:
        return
    check_schedule(answer_length, steps, None, None)  # no row runs a step count the sampler cannot
    misfits = {n: why for n in ROWS if (why := _misfit(n, answer_length, steps))}
    if any(n in misfits for n in names):
        fitting = ",".join(n for n in ROWS if n not in misfits)
        raise LMPlanError(f"rows that cannot run {steps} steps: "
                          + "; ".join(f"{n} ({misfits[n]})" for n in names if n in misfits)
                          + f". Drop them (--only {fitting}) or choose other --steps")


def _misfit(name: str, answer_length: int, steps: int) -> str | None:
    """Why row ``name``'s plan cannot decode ``answer_length`` tokens in ``steps`` steps (None: it can)."""
    plan = None if ROWS[name] is None else make_lm_plan(ROWS[name][0], **ROWS[name][1])
    try:
        check_schedule(answer_length, steps, None, plan)
    except LMPlanError as exc:
        return str(exc)
    return None


def measure_row(name: str, pipe: DLMPipeline, problems: list[Problem], calibration: list[Problem], *,
                budget: str = "accuracy>=-1", steps: int | None = None, repeats: int = 5) -> dict:
    """One row: the plan named ``name`` (for ``search``: the fastest plan within ``budget`` on the
    calibration problems) against the uncached sampler on ``problems``."""
    if name == "search":
        plan = search_lm(pipe, budget, calibration, steps=steps)
    else:
        method, settings = ROWS[name]
        plan = make_lm_plan(method, **settings)
    started = time.time()
    result = compare(pipe, plan, problems, repeats=repeats, steps=steps)
    if name == "baseline":  # the reference itself; the measured none-vs-baseline ratio shows the timing noise
        result["timing_noise"] = {"speedup_wall": result["speedup_wall"], "speedup_macs": result["speedup_macs"]}
        result.update(speedup_wall=1.0, speedup_macs=1.0, tokens_per_second=result["baseline_tokens_per_second"],
                      setting=f"LLaDA sampler, {result['steps']} steps, no cache")
    if name == "search":
        result["budget"] = budget
    return {"name": name, **result, "row_seconds": round(time.time() - started, 1)}


def run_rows(names: list[str], pipe: DLMPipeline, problems: list[Problem], calibration: list[Problem],
             record: dict, save: Callable[[dict], None], command: Callable[[str], str], *,
             budget: str = "accuracy>=-1", steps: int | None = None, repeats: int = 5,
             log: Callable[[str], None] = print) -> dict:
    """Measure ``names`` into ``record["rows"]`` (merged by name, in ROWS order), saving after
    every row so an interrupted bench keeps what it measured."""
    check_rows(names, pipe.answer_length, steps if steps is not None else pipe.default_steps)
    rows = {row["name"]: row for row in record.get("rows", [])}
    for name in names:
        rows[name] = {**measure_row(name, pipe, problems, calibration, budget=budget, steps=steps, repeats=repeats),
                      "command": command(name)}
        log(" ".join(f"{k}={rows[name][k]}" for k in SUMMARY_KEYS))
        record.update({"problems": len(problems), "tasks": sorted({p.task for p in problems}), "repeats": repeats,
                       "threads": torch.get_num_threads(), "machine": platform.machine(),
                       "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "accuracy_unit": "percent exact match",
                       "tokens_per_second_unit": "answer positions decoded per second (eos fill included)",
                       "rows": [rows[n] for n in ROWS if n in rows]})
        save(record)
    return record


def table(record: dict) -> str:
    """The rows as a markdown table."""
    lines = ["| row | method | setting | accuracy % | agreement % | MAC speedup | wall speedup | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in record["rows"]:
        lines.append(f"| {row['name']} | {row['method']} | {row['setting']} | {row['accuracy']:.1f} | "
                     f"{row['agreement']:.1f} | {row['speedup_macs']:.2f}x | {row['speedup_wall']:.2f}x | "
                     f"{row['tokens_per_second']:.0f} |")
    return "\n".join(lines)
