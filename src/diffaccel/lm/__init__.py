"""Diffusion language models: a small masked diffusion LM, its samplers and its KV caches as plans.

    from diffaccel.lm import load_dlm, held_out, make_lm_plan, lm_accelerate
    pipe = load_dlm()
    problems = held_out("eval", per_task=20)
    with lm_accelerate(pipe, make_lm_plan("dkv-decode", refresh_every=0)) as run:
        out = pipe(problems)
    print(out.texts[:3], run.stats.mac_ratio)
"""

from diffaccel.lm.executor import LMRun, LMStats, lm_accelerate
from diffaccel.lm.pipeline import DLMOutput, DLMPipeline, load_dlm
from diffaccel.lm.plan import LM_METHODS, LMPlan, LMPlanError, make_lm_plan
from diffaccel.lm.tasks import LANGUAGE, TASKS, Problem, held_out, is_correct, solve

__all__ = ["LANGUAGE", "LM_METHODS", "TASKS", "DLMOutput", "DLMPipeline", "LMPlan", "LMPlanError", "LMRun", "LMStats",
           "Problem", "held_out", "is_correct", "lm_accelerate", "load_dlm", "make_lm_plan", "solve"]
