"""``search_lm``: the fastest LM plan whose calibration accuracy stays within an accuracy budget.

The space is small (dKV-Cache-Decode refresh intervals, dKV-Cache-Greedy windows, prompt
caching, block sizes of block diffusion), so every candidate is scored: accuracy on calibration
problems (a split disjoint from the evaluation problems, see ``tasks``) and cost. The cost is the
MACs the plan executed by default (deterministic, so the choice does not depend on what else the
machine runs); ``objective="wall"`` ranks by measured seconds instead.

Budgets: ``"accuracy>=-1"`` (a signed number: at most one point below the baseline's calibration
accuracy) or ``"accuracy>=95"`` (an unsigned number: at least 95 % exact match).
"""

from __future__ import annotations

import re

from diffaccel.lm.evaluate import evaluate
from diffaccel.lm.pipeline import DLMPipeline
from diffaccel.lm.plan import LMPlan, LMPlanError, make_lm_plan
from diffaccel.lm.sampler import check_schedule
from diffaccel.lm.tasks import Problem, held_out

_BUDGET = re.compile(r"^\s*accuracy\s*>=\s*([+-]?)(\d+(?:\.\d*)?)\s*$")


def parse_budget(budget: str, baseline_accuracy: float) -> float:
    """The accuracy floor (percent) a budget string sets, given the baseline's accuracy."""
    match = _BUDGET.match(budget)
    if not match:
        raise LMPlanError(f"cannot read the budget {budget!r}; write 'accuracy>=-1' (points relative to the "
                          "baseline) or 'accuracy>=95' (absolute percent)")
    sign, number = match.group(1), float(match.group(2))
    if sign:
        return baseline_accuracy + (number if sign == "+" else -number)
    return number


def default_candidates(answer_length: int, steps: int) -> list[LMPlan]:
    """dKV-Cache, prompt-cache and block-diffusion plans that fit ``steps`` steps of this answer length."""
    plans = [make_lm_plan("dkv-decode", refresh_every=r) for r in (0, 2, 4, 6)]
    plans += [make_lm_plan("dkv-greedy", window=w, refresh_every=r) for w in (1, 2, 4) for r in (0, 4)]
    plans += [make_lm_plan("prompt-cache", refresh_every=r) for r in (0, 4)]
    plans += [make_lm_plan("block", block_size=b) for b in range(2, answer_length + 1) if answer_length % b == 0]
    fitting = []
    for plan in plans:
        try:
            check_schedule(answer_length, steps, None, plan)
        except LMPlanError:
            continue
        fitting.append(plan)
    return fitting


def search_lm(pipe: DLMPipeline, budget: str = "accuracy>=-1", problems: list[Problem] | None = None,
              candidates: list[LMPlan] | None = None, steps: int | None = None, objective: str = "macs") -> LMPlan:
    """The fastest candidate whose calibration accuracy meets ``budget``; its ``params["search"]``
    records the baseline, the floor and every candidate's score. If none qualifies, the all-compute
    plan (``method="none"``) is returned; an absolute floor the baseline itself misses is an error."""
    if objective not in ("macs", "wall"):
        raise LMPlanError(f"objective must be 'macs' or 'wall', not {objective!r}")
    parse_budget(budget, 100.0)  # read before any work
    if problems is not None and not problems:
        raise LMPlanError("search_lm needs calibration problems to score the plans on: got none (leave problems "
                          "out for the calibration split)")
    problems = problems if problems is not None else held_out("calib", per_task=40)
    steps = pipe.default_steps if steps is None else steps
    check_schedule(pipe.answer_length, steps, None, None)  # steps=0 had been run as the default
    candidates = candidates if candidates is not None else default_candidates(pipe.answer_length, steps)
    base = evaluate(pipe, problems, None, steps=steps)
    floor = parse_budget(budget, base["accuracy"])
    if floor > base["accuracy"]:
        raise LMPlanError(f"the budget asks for {floor:.1f} % but the uncached sampler itself reaches "
                          f"{base['accuracy']:.1f} % on the calibration problems")
    scored = []
    for plan in candidates:
        result = evaluate(pipe, problems, plan, steps=steps)
        speed = base["macs"] / result["macs"] if objective == "macs" else base["seconds"] / result["seconds"]
        scored.append({"method": plan.method, "setting": plan.setting(), "accuracy": result["accuracy"],
                       "speedup": round(speed, 3), "plan": plan})
    fine = [s for s in scored if s["accuracy"] >= floor]
    best = max(fine, key=lambda s: s["speedup"]) if fine else None
    record = {"budget": budget, "floor": floor, "objective": objective, "steps": steps, "problems": len(problems),
              "baseline_accuracy": base["accuracy"],
              "candidates": [{k: v for k, v in s.items() if k != "plan"} for s in scored],
              "chosen": None if best is None else {k: v for k, v in best.items() if k != "plan"}}
    chosen = best["plan"] if best is not None else make_lm_plan("none")
    return chosen.model_copy(update={"answer_length": pipe.answer_length, "params": {"search": record}})
