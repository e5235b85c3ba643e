"""The joint search's guidance phase (``joint.py``, phase 2b): the cheapest plans that clear the
budget, with the unconditional guidance branch predicted (``methods/guidance.py``) at their last
step, then at the steps before it while the budget holds; a plan with fitted solver coefficients
gets them fitted again under the prediction (they absorb part of its error: on the embedded DiT's
7-step fit, 0.26 dB lost before the refit, 0.09 after). A mixin of ``JointSearch``."""

from __future__ import annotations

from collections.abc import Callable

from diffaccel.calibration.reference import CalibrationRun
from diffaccel.errors import MethodError, PlanError
from diffaccel.methods.guidance import fit_guidance
from diffaccel.plan import Plan
from diffaccel.search.candidates import Candidate
from diffaccel.search.coefficients import ReferenceTrajectory, fit_coefficients, record_reference
from diffaccel.search.config import Budget

GUIDED = 2  # the cheapest plans clearing the budget that the phase tries


class GuidancePhase:
    """Phase 2b of ``JointSearch``, which provides what is declared here and the scoring (``score``,
    ``late``)."""

    calib: CalibrationRun
    budget: Budget
    objective: str
    deadline: float | None
    log: Callable[[str], None]
    candidates: list[Candidate]
    _reference: ReferenceTrajectory | None
    _guided: set[int | None]  # the candidates (by trial number) the phase has tried
    _refused: bool = False  # a first prediction failed: the pipeline cannot take one (no doubled guidance batch)

    def guided(self) -> None:
        """Phase 2b over the ``GUIDED`` cheapest plans that clear the budget and can take it, the best
        first among equally cheap ones (a sampler's fits: the prediction spends their headroom)."""
        tier = sorted((c for c in self.candidates if c.plan is not None and _takes_guidance(c.plan)
                       and c.meets(self.budget)), key=lambda c: (c.cost(self.objective), -c.quality(self.budget)))
        for c in tier[:GUIDED]:
            if self.late() or self._refused:
                return
            if c.trial not in self._guided:
                self._guided.add(c.trial)
                self._predict_back(c)

    def _predict_back(self, c: Candidate) -> None:
        """``c``'s plan with the unconditional branch predicted from its last step back, each step
        kept while the plan still clears the budget."""
        steps = c.plan.solver.evaluations if c.plan.solver is not None else c.plan.num_steps or self.calib.num_steps
        predicted: list[int] = []
        for step in range(steps - 1, 0, -1):
            if self.late():
                return
            source = f"{c.source} + guidance predicted at step{'s' if predicted else ''} " + \
                ", ".join(map(str, sorted([step, *predicted]))) + " (0-based, as in the plan)"
            try:
                plan = self._refitted(fit_guidance(self.calib.pipe, c.plan, [step, *predicted], self.calib.calibrate))
            except (MethodError, PlanError) as exc:
                self._refused = not predicted  # the plan's own run failed to take it: so would every other
                rest = "; guidance prediction is left out of the rest of the search" if self._refused else ""
                self.log(f"  {source}: not fitted ({str(exc)[:160]}){rest}")
                return
            found = self.score(plan, source)
            if not found or not found.meets(self.budget):
                return
            predicted.append(step)

    def _refitted(self, plan: Plan) -> Plan:
        """``plan`` with its solver's coefficients fitted again under its guidance prediction (every
        step's if it had them, else the last step's); as it is without coefficients, or when the
        deadline comes first (the phase runs late in the search, its fits are few runs each)."""
        spec = plan.solver
        if spec is None or spec.coefficients is None:
            return plan
        every = any(any(w != 0 for w in row) for row in spec.coefficients[:-1])
        self._reference = self._reference or record_reference(self.calib.pipe, self.calib.calibrate)
        refit = fit_coefficients(self.calib.pipe, self.calib.calibrate, spec, self._reference, self.deadline, every,
                                 plan)
        return plan if refit is None else plan.model_copy(update={"solver": refit})


def _takes_guidance(plan: Plan) -> bool:
    """Whether the phase can try ``plan``: static, not yet predicted, not quantized (quantization is
    phase 3's), its last step computing every unit."""
    return (plan.guidance is None and plan.rule is None and not plan.parallel_decode and plan.quant is None
            and (plan.schedule is None or set(plan.schedule[-1]) == {"C"}))
