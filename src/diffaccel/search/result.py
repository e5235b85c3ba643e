"""What a search returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffaccel.errors import SearchWarning, warn
from diffaccel.plan import Plan
from diffaccel.search.candidates import Candidate
from diffaccel.search.config import Budget


@dataclass
class SearchResult:
    plan: Plan
    met: bool
    shortfall: float
    chosen: Candidate
    front: list[Candidate]
    handmade: list[Candidate]
    summary: dict
    out: Path | None
    points: list[Candidate] = field(default_factory=list)  # every scored candidate, hand-made ones too


def marked(plan: Plan, summary: dict, budget: Budget) -> Plan:
    """``plan`` with whether it met the budget in its params; a Python warning, not only a log line,
    when it missed: a caller of ``find_plan`` gets a plan either way, and the log is off by default."""
    if not summary["met"]:
        warn(SearchWarning(f"no plan that saves work met {budget.text} on the calibration set: the closest "
                           f"is returned, short by {summary['shortfall_text']} (its plan.params "
                           "say budget_met: false); loosen the budget or search longer"))
    elif summary.get("heldout_met") is False:
        warn(SearchWarning(f"the plan returned met {budget.text} on the calibration set but misses it on the "
                           f"held-out seeds ({summary['heldout_' + budget.metric]:.4g}{budget.unit()} mean, "
                           f"5th percentile {summary['heldout_psnr_p5']:.4g} dB); search again with more "
                           "calibration images or a larger margin"))
    elif summary["validation_confirmed"] is False:
        warn(SearchWarning(f"no plan that met {budget.text} on the calibration set met it on the validation seeds: "
                           "the one that scored best there is returned (its plan.params say validation_confirmed: "
                           "false); search again with more calibration images or a larger margin"))
    return plan.model_copy(update={"params": {**plan.params, "budget_met": summary["met"],
                                              "heldout_met": summary.get("heldout_met"),
                                              "validation_confirmed": summary["validation_confirmed"]}})
