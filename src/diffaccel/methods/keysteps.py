"""Key steps by dynamic programming (DDT / CacheQuant): compute the whole model at ``keys`` steps
chosen from a profile, and reuse ``level``'s units at the others.

One full-compute run of the calibration workload (seeds disjoint from evaluation seeds) records
how far each unit's output moves between any two steps (``calibration.reference``); the DP of
``calibration.dp`` then places the key steps where reuse costs least. This is the schedule the plan
search finds on the embedded models, packaged as one method with one knob.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import Field

from diffaccel.adapters import adapter_for
from diffaccel.calibration.dp import optimal_keys, set_matrix
from diffaccel.calibration.reference import CalibrationRun
from diffaccel.calibration.workload import Workload, calibration_workload
from diffaccel.errors import MethodError
from diffaccel.methods.base import Method, Settings, make_plan, rows_from
from diffaccel.methods.feature_correction import fit_feature_correction
from diffaccel.plan import Plan


class KeystepsSettings(Settings):
    keys: int = Field(12, ge=1, description="steps that compute the whole model")
    level: str = Field("all", description="units reused between key steps: all, or a search level (mid, deep0, ...)")
    correct: bool = Field(False, description="fit a per-channel correction of the reused features")


def build(pipe: Any, workload: Workload, s: KeystepsSettings) -> Plan:
    run = CalibrationRun(pipe, workload)
    model, steps = run.model, run.num_steps
    levels = {level.name: level for level in adapter_for(model).levels(model)}
    if s.level not in levels or s.level == "C":
        raise MethodError(f"unknown level {s.level!r} for this model; choose one of "
                          f"{', '.join(n for n in levels if n != 'C')}")
    if s.keys > steps:
        raise MethodError(f"keys must lie in [1, {steps}] (the run has {steps} denoiser evaluations), got {s.keys}: "
                          f"give fewer (keys=..., --keys on the command line)")
    reused = levels[s.level].reused
    chosen, loss = optimal_keys(set_matrix(run.dissimilarity, run.units, reused), s.keys)
    params = {"keys": s.keys, "level": s.level, "correct": s.correct, "key_steps": chosen,
              "estimated_loss": round(loss, 5), "calibration_images": len(run.reference)}
    rows = rows_from(steps, run.units, chosen, set(reused))
    plan = make_plan(model, rows, "keysteps", params, calibration=run.info())
    return fit_feature_correction(pipe, plan, workload) if s.correct else plan


KEYSTEPS = Method("keysteps", "key steps placed by DP on a profile (DDT / CacheQuant)", KeystepsSettings, build,
                  calibrated=True)


def keysteps(pipe: Any, calls: Workload | Iterable[dict] | None = None, keys: int = 12, **settings: Any) -> Plan:
    """A key-step plan fitted on ``calls`` (the pipeline calls to calibrate on; the embedded
    pipelines' default workload if None); settings: ``KeystepsSettings``."""
    return KEYSTEPS.build(pipe, calibration_workload(calls, pipe), KEYSTEPS.make_settings(keys=keys, **settings))
