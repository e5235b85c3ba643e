"""Measuring a diffusion LM and an LM plan: exact match per task, MACs, wall-clock, tokens/s.

Accuracy is exact match (percent) of the decoded answer against the answer computed from the
prompt, on held-out problems. ``compare`` runs the uncached LLaDA sampler and the plan on the same
problems, interleaved in one process (baseline, plan, baseline, ...), and reports the median of the
repeats after a discarded warm-up, as ratios to the baseline of the same run.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from diffaccel.lm.executor import lm_accelerate
from diffaccel.lm.pipeline import DLMOutput, DLMPipeline
from diffaccel.lm.plan import LMPlan
from diffaccel.lm.tasks import Problem, is_correct


def score(problems: list[Problem], texts: list[str]) -> dict:
    """``{"accuracy": %, "per_task": {task: %}, "problems": n}`` (exact match, in percent)."""
    if len(problems) != len(texts):
        raise ValueError(f"{len(problems)} problems but {len(texts)} answers")
    hits: dict[str, list[bool]] = defaultdict(list)
    for problem, text in zip(problems, texts):
        hits[problem.task].append(is_correct(problem.prompt, text))
    every = [h for task in hits.values() for h in task]
    return {"accuracy": _percent(every), "per_task": {task: _percent(h) for task, h in hits.items()},
            "problems": len(every)}


def _percent(flags: list[bool]) -> float:
    return round(100.0 * sum(flags) / len(flags), 2) if flags else float("nan")


def run(pipe: DLMPipeline, problems: list[Problem], plan: LMPlan | None = None, **call) -> tuple[DLMOutput, float]:
    """One call with or without ``plan``: its output and wall-clock seconds."""
    start = time.perf_counter()
    if plan is None:
        out = pipe(problems, **call)
    else:
        with lm_accelerate(pipe, plan):
            out = pipe(problems, **call)
    return out, time.perf_counter() - start


def evaluate(pipe: DLMPipeline, problems: list[Problem], plan: LMPlan | None = None, **call) -> dict:
    """Accuracy (overall and per task), MACs and tokens per second of one call."""
    out, seconds = run(pipe, problems, plan, **call)
    tokens = len(problems) * pipe.answer_length
    return {**score(problems, out.texts), "macs": out.macs, "full_macs": out.full_macs, "seconds": seconds,
            "tokens_per_second": tokens / seconds}


def compare(pipe: DLMPipeline, plan: LMPlan, problems: list[Problem], repeats: int = 5, **call) -> dict:
    """The plan against the uncached LLaDA sampler on ``problems`` (``call``: ``steps``,
    ``block_length``, ``batch_size``), timed interleaved: a warm-up pair, then ``repeats`` pairs.

    ``tokens_per_second`` counts answer positions decoded (``answer_length`` per problem, the
    ``<eos>`` fill included) per second of the median plan run; ``agreement`` is the share of
    problems whose answer is identical to the baseline's."""
    if repeats < 1:
        raise ValueError("compare needs at least one timed repeat")
    if not problems:
        raise ValueError("compare needs at least one problem (e.g. tasks.held_out(...))")
    run(pipe, problems[:pipe.batch_size], None, **call)
    run(pipe, problems[:pipe.batch_size], plan, **call)
    base_times, plan_times = [], []
    for _ in range(repeats):
        base, seconds = run(pipe, problems, None, **call)
        base_times.append(seconds)
        out, seconds = run(pipe, problems, plan, **call)
        plan_times.append(seconds)
    base_wall, plan_wall = statistics.median(base_times), statistics.median(plan_times)
    tokens = len(problems) * pipe.answer_length
    planned, baseline = score(problems, out.texts), score(problems, base.texts)
    return {
        "method": plan.method, "setting": plan.setting(), "plan": plan.model_dump(exclude_none=True),
        "accuracy": planned["accuracy"], "baseline_accuracy": baseline["accuracy"],
        "per_task": planned["per_task"], "baseline_per_task": baseline["per_task"],
        "agreement": round(100.0 * sum(a == b for a, b in zip(out.texts, base.texts)) / len(problems), 2),
        "speedup_macs": base.macs / out.macs, "speedup_wall": base_wall / plan_wall,
        "tokens_per_second": tokens / plan_wall, "baseline_tokens_per_second": tokens / base_wall,
        "macs_per_problem": out.macs / len(problems), "baseline_macs_per_problem": base.macs / len(problems),
        "seconds": plan_wall, "baseline_seconds": base_wall, "repeats": repeats, "problems": len(problems),
        "steps": call.get("steps") or pipe.default_steps, "threads": torch.get_num_threads(),
    }
