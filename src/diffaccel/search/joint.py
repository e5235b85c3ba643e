"""The ``joint`` strategy: sampler x steps x start x caching (x quantization), searched together
against the pipeline's own (e.g. 50-step DDIM) output.

A grid would be large and mostly useless, so the search moves in phases, each cut by the deadline
(the key steps of the pipeline's own sampler, phase 2's first setting, come before phase 1: they
need no profile run and are the plans a short search must not miss):

1. **samplers**: every solver (and informed start), no caching: until a setting clears the budget,
   at increasing step counts until one clears it with ``HEADROOM`` dB to spare (more steps would only
   buy quality that caching can trade for speed); after that, from the evaluations of the cheapest
   setting that clears down while the user's budget holds (a solver that misses at the most steps
   it may use misses below: on the embedded SD pipeline 4 runs instead of 32); once one clears, the
   phase takes at most ``SAMPLERS_SHARE`` of the time it started with;
1b. **fitted timesteps**: the solver of the cheapest setting that clears the budget at fewer steps,
   its timesteps fitted to the reference on the calibration set (``timesteps.py``), from the fewest
   steps whose plain run came within ``FIT_GAIN`` dB of the budget, then down while fits clear it
   (skipping counts that the first fit's gain over its plain run says will clear), else up until
   one does (each fit gets a third of the time left); a fit that clears by ``AMPLE`` dB stops there,
   skips the every-step coefficient fit, and gets its caching phase (2) at once, before the next fit
   (caching spends the headroom; on a slow pipeline the descent may take the rest);
1c. **fitted coefficients**: each timestep fit also with its steps' coefficients fitted to the
   reference trajectory (``coefficients.py``: one calibration run per step), kept where it scores
   better;
1d. **told timesteps**: after phase 4, in half the time it leaves, the cheapest fit that clears a
   PSNR budget by less than ``AMPLE`` dB with the timesteps its denoiser is told fitted
   (``model_timesteps.py``; phases 1b-1d and 4 live in ``fits.py``): more margin for the
   validation, not fewer steps;
2. **caching**: for the pipeline's own sampler (profiled already by the reference run, so free:
   key steps at its full step count are often the best plan when fewer-step samplers leave no
   headroom, as on a text-to-image U-Net) and for the cheapest sampler settings that clear the
   budget, one profile run each (``CalibrationRun`` of that sampler), the DP's key steps for
   several budgets of full steps and every unit level, bisected between the last budget that met
   the quality bar (at first the setting itself: all its steps full) and the first that missed it:
   the quality headroom is spent on reuse. A plan that costs at least as much as one that already
   meets the budget is not scored; with a validator, the one that bars it must also meet the budget
   on fresh seeds (``validation.py``), as the returned plan must;
2b. **predicted guidance**: the cheapest plans that clear the budget, with the unconditional
   classifier-free-guidance branch predicted from the last step back (``guided.py``): half a step's
   MACs each, kept while the budget holds; run after the fits (it takes a few runs, where the
   caching sweeps of a few-step sampler can take the time left) and again after caching;
3. **quantization** (with a quant spec): the cheapest plans that clear the budget, and those that
   clear it with the quantization's own error to spare, again quantized. Quantization leaves the
   MACs as they are; its latency estimate is the plain plan's scaled by the measured wall-time
   ratio of the quantized to the plain full-compute calibration run (interleaved, median of two),
   and its bit-operations by the weight bits (W8: a quarter of fp32 per MAC);
4. **refinement**: the time left goes to the fit one step below the cheapest that cleared, restarted
   from its best timesteps, and to caching on it once it clears (``refine``); then phase 1d.

Every candidate is an ordinary plan (solver section, schedule, quant section), scored on the
calibration set against the pipeline's own output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from diffaccel.adapters import adapter_for, find_denoiser
from diffaccel.calibration.dp import optimal_keys, set_matrix
from diffaccel.calibration.reference import CalibrationRun, Scores, identity_plan
from diffaccel.errors import PlanError, SearchError
from diffaccel.methods.base import make_plan, rows_from
from diffaccel.plan import Plan
from diffaccel.search.candidates import Candidate, ordered
from diffaccel.search.coefficients import ReferenceTrajectory
from diffaccel.search.config import Budget
from diffaccel.search.fits import FitPhases
from diffaccel.search.guided import GuidancePhase
from diffaccel.search.validation import Validator
from diffaccel.solvers.calls import added_noise
from diffaccel.solvers.flow import FLOW_SOLVERS
from diffaccel.solvers.paths import is_flow
from diffaccel.solvers.schedulers import solver_scheduler
from diffaccel.solvers.spec import SolverSpec

HEADROOM = 6.0  # dB above the budget at which a sampler needs no more steps
KEY_FRACTIONS = (0.8, 0.65, 0.5, 0.4, 0.3, 0.22, 0.16)
KEY_START = 0.5  # the fraction of full steps phase 2 tries first at each level
CONFIGS_CACHED = 6  # sampler settings whose headroom phase 2 spends on caching
QUANTIZED = 4  # plans quantized per headroom tier in phase 3
SAMPLERS_SHARE = 0.4  # of the time left that phase 1 may use once a setting clears


@dataclass(frozen=True)
class JointSpace:
    # the usual few-step leaders first: the first setting that clears bounds the others' step counts
    solvers: tuple[str, ...] = ("unipc", "dpm++3", "dpm++2", "evodiff", "ddim")
    steps: tuple[int, ...] = (5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30)
    starts: tuple[float, ...] = (1.0,)
    key_fractions: tuple[float, ...] = KEY_FRACTIONS


def _gap(meets: dict[int, bool]) -> tuple[int, int] | None:
    """The most keys that missed the budget below the fewest that met it, and those fewest, when a
    key count lies between them."""
    met = min((k for k, ok in meets.items() if ok), default=None)
    missed = max((k for k, ok in meets.items() if not ok and met is not None and k < met), default=None)
    return (missed, met) if met is not None and missed is not None and met - missed > 1 else None


def _headroom_for(threshold: float, quant_db: float) -> float:
    """dB above ``threshold`` a plan needs so that, with an independent error of ``quant_db`` added
    (errors add as squared differences), it still reaches ``threshold``; 0 when nothing would."""
    left = 10 ** (-threshold / 10) - 10 ** (-quant_db / 10)
    return -10 * math.log10(left) - threshold if left > 0 else 0.0


class JointSearch(FitPhases, GuidancePhase):
    """Runs the phases; ``candidates`` collects every scored plan."""

    def __init__(self, calib: CalibrationRun, budget: Budget, objective: str, deadline: float | None,
                 log: Callable[[str], None], space: JointSpace | None = None, quant: object = None,
                 validator: Validator | None = None, plain: Budget | None = None):
        self.calib, self.budget, self.objective, self._deadline, self.log = calib, budget, objective, deadline, log
        self.space = space or JointSpace()
        self.quant = quant
        self.plain = plain or budget  # the user's budget, before the margin that ``budget`` adds
        self.validator = validator  # when given, only a plan it confirms bars dearer ones (``_cannot_win``)
        self.candidates: list[Candidate] = []
        self.quant_speed: float | None = None  # measured quantized / plain wall time (phase 3)
        self.fit_solver: str | None = None  # phases 1b and 4: the solver whose timesteps are fitted
        self.fit_ceiling = 0  # ... below the steps of its plain run that cleared
        self.fits: dict[int, Candidate] = {}  # the best fit per step count
        self._fit_scores: dict[SolverSpec, Scores] = {}  # every fit run's scores, by solver setting
        self._reference: ReferenceTrajectory | None = None  # the reference run's trajectory (phase 1c)
        self._cached: list[SolverSpec | None] = []  # the settings phase 2 has run for
        self._guided: set[int | None] = set()  # the candidates phase 2b has tried
        self.flow = False  # a flow-matching pipeline: no told timesteps (phase 1d)

    @property
    def deadline(self) -> float | None:
        """When the phases stop: the search's deadline, moved on by the validation runs made during
        the search, up to the time kept back for the validation after it (``Validator.reserve_used``)."""
        if self._deadline is None or self.validator is None:
            return self._deadline
        return self._deadline + self.validator.reserve_used()

    def late(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def score(self, plan: Plan, source: str, latency_scale: float = 1.0) -> Candidate | None:
        """``plan`` scored on the calibration set and kept as a candidate; ``latency_scale`` scales
        its latency estimate (a quantized plan: the measured speed of the quantized model)."""
        if self.late():
            return None
        s = self._scores(plan, source)
        return None if s is None else self._keep(plan, s, source, latency_scale)

    def _keep(self, plan: Plan, s: Scores, source: str, latency_scale: float = 1.0) -> Candidate:
        bops = s.mac_fraction * (plan.quant.weight_bits / 32 if plan.quant is not None else 1.0)
        candidate = Candidate(None, list(plan.schedule or []), s.psnr, s.psnr_min, s.ssim, s.mac_fraction,
                              s.latency_fraction * latency_scale, source, len(self.candidates), {}, bops,
                              s.psnr_p5, plan)
        self.candidates.append(candidate)
        self.log(f"  {source}: {s.psnr:.2f} dB (p5 {s.psnr_p5:.2f}), {1 / s.mac_fraction:.2f}x MACs")
        return candidate

    def _scores(self, plan: Plan, source: str | None) -> Scores | None:
        """``plan``'s calibration scores, or None when it breaks the pipeline (logged as ``source``)."""
        try:
            return self.calib.score(plan)
        except SearchError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a setting that breaks the pipeline is left out
            if source is not None:
                self.log(f"  {source}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            return None

    def run(self) -> int:
        self.cached(None)  # the pipeline's own sampler first: no profile run, the known-good family
        configs = self.samplers()
        configs = self.fitted(configs) + configs
        self.guided()  # a few runs: before the caching sweeps, which can take the time left on few steps
        for spec in configs[:CONFIGS_CACHED]:
            self.cached(spec)
        self.guided()
        if self.quant is not None:
            self.quantized()
        self.refine()
        return len(self.candidates)

    def samplers(self) -> list[SolverSpec]:
        """Phase 1; returns the sampler settings that clear the budget, cheapest first. Until one
        clears, each solver goes up in steps (``_upward``); once one has, each later solver goes down
        from its evaluations (``_downward``): more could not be cheaper, and a solver that misses there
        misses below. The phase stops once something clears and it has used ``SAMPLERS_SHARE`` of the
        time left at its start (the fit and caching phases need the rest)."""
        clearing: list[tuple[float, SolverSpec]] = []
        names = self._solvers_applying()
        cap = None if self.deadline is None else time.time() + SAMPLERS_SHARE * (self.deadline - time.time())
        for name in names:
            for start in self.space.starts:
                if not clearing:
                    self._upward(name, start, clearing)
                elif cap is None or time.time() < cap:
                    self._downward(name, start, clearing, cap)
        return [spec for _, spec in sorted(clearing, key=lambda x: x[0])]

    def _solvers_applying(self) -> tuple[str, ...]:
        """The solvers the pipeline's scheduler can host: none for a stochastic one (ancestral, SDE, eta > 0),
        whose trajectory no deterministic solver follows; on a flow-matching one those of ``solvers/flow.py``."""
        if not (self.space.solvers and self.space.steps):
            return ()
        scheduler = find_denoiser(self.calib.pipe)[1]
        calls = [c.kwargs for c in getattr(self.calib.calibrate, "calls", ())]
        self.flow = is_flow(scheduler)
        names = tuple(n for n in self.space.solvers if not self.flow or n in FLOW_SOLVERS)
        try:
            if not names:
                raise PlanError(f"none of {', '.join(self.space.solvers)} runs on a flow-matching schedule")
            solver_scheduler(SolverSpec(name=names[0], steps=self.space.steps[0]), scheduler)
            noise = added_noise(scheduler, calls)
            if noise is not None:
                raise PlanError(f"{noise}, which no deterministic solver can follow: the plans keep that sampler")
        except PlanError as exc:
            self.log(f"  the sampler, its steps and their fits are skipped: {exc}")
            return ()
        if self.flow:
            self.log(f"  a flow-matching pipeline: the samplers {', '.join(names)}; no told timesteps (need betas)")
        return names

    def _plain_steps(self, spec: SolverSpec) -> Candidate | None:
        return self.score(identity_plan(self.calib.model).model_copy(update={"solver": spec, "method": "steps"}),
                          spec.label)

    def _upward(self, name: str, start: float, clearing: list[tuple[float, SolverSpec]]) -> None:
        """``name`` at increasing step counts until one clears the budget with ``HEADROOM`` dB to
        spare (more steps would only buy quality that caching can trade for speed), or goes past the
        evaluations of the cheapest that clears, or stops gaining (the sampler saturates)."""
        previous = None
        for steps in self.space.steps:
            spec = SolverSpec(name=name, steps=steps, start=start)
            if clearing and spec.evaluations > min(s.evaluations for _, s in clearing):
                break
            c = self._plain_steps(spec)
            if c is None:
                continue
            if c.meets(self.budget):
                clearing.append((c.cost(self.objective), spec))
            if c.psnr >= self.budget.threshold + HEADROOM or (previous is not None and c.psnr < previous):
                break
            previous = c.psnr

    def _downward(self, name: str, start: float, clearing: list[tuple[float, SolverSpec]], cap: float | None) -> None:
        """``name`` from the most steps within the evaluations of the cheapest setting that clears,
        down while it meets the user's own budget (``plain``: a plain sampler meeting it is the
        comparison a user makes, so the cheapest one must be found) and no further."""
        most = min(s.evaluations for _, s in clearing)
        for steps in sorted(self.space.steps, reverse=True):
            spec = SolverSpec(name=name, steps=steps, start=start)
            if spec.evaluations > most:
                continue
            if cap is not None and time.time() >= cap:
                return
            c = self._plain_steps(spec)
            if c is None or not c.meets(self.plain):
                return
            if c.meets(self.budget):
                clearing.append((c.cost(self.objective), spec))

    def cached(self, spec: SolverSpec | None) -> None:
        """Phase 2 for one sampler setting (None: the pipeline's own): its profile, then DP key steps at several
        budgets per level, from about half the steps full: fewer while quality holds (down to one), else more until
        one meets the budget (the dear plans with most steps full, each nearly a full run, only when needed); then
        the key count refined between the fewest keys that met the budget and the most that missed (a bisection)."""
        if self.late() or spec in self._cached:
            return
        self._cached.append(spec)
        profile = self.calib if spec is None else CalibrationRun(self.calib.pipe, self.calib.calibrate, solver=spec)
        label = spec.label if spec is not None else f"own sampler {profile.num_steps}"
        steps = profile.num_steps
        counts = sorted({1} | {k for f in self.space.key_fractions if (k := round(f * steps)) in range(1, steps)})[::-1]
        first = min(range(len(counts)), key=lambda i: abs(counts[i] - KEY_START * steps), default=0)
        for level in reversed(adapter_for(profile.model).levels(profile.model)[1:]):  # the most reuse first
            meets = {steps: True}  # key count -> whether its plan met the budget (all keys: the setting itself)
            below, above = counts[first:], counts[:first][::-1]
            if self._probe(profile, level, below, meets, spec, label) and not any(meets.get(k) for k in below):
                self._probe(profile, level, above, meets, spec, label, up=True)
            while (gap := _gap(meets)) is not None:
                keys = sum(gap) // 2
                c = self._keys(profile, level, keys, spec, label)
                if not c:
                    break
                meets[keys] = c.meets(self.budget)

    def _probe(self, profile: CalibrationRun, level, counts: list[int], meets: dict[int, bool],
               spec: SolverSpec | None, label: str, up: bool = False) -> bool:
        """Scores the key counts in order into ``meets``: going down until quality breaks, going ``up``
        until one meets the budget. False when the deadline passed or a plan failed."""
        for keys in counts:
            c = self._keys(profile, level, keys, spec, label)
            if c is False:  # cannot win: fewer keys may (going down); more cannot (going up)
                if up:
                    break
                continue
            if c is None:
                return False
            meets[keys] = c.meets(self.budget)
            if meets[keys] if up else c.psnr < self.budget.threshold - 2:
                break
        return True

    def _keys(self, profile: CalibrationRun, level, keys: int, spec: SolverSpec | None,
              label: str) -> Candidate | None | bool:
        """The DP's ``keys`` key steps at ``level`` scored; False when the plan cannot win (not
        scored), None when the deadline passed or it failed."""
        if self.late():
            return None
        chosen, _ = optimal_keys(set_matrix(profile.dissimilarity, profile.units, level.reused), keys)
        rows = rows_from(profile.num_steps, profile.units, chosen, set(level.reused))
        plan = make_plan(profile.model, rows, "search-joint", {"keys": keys, "level": level.name, "key_steps": chosen},
                         solver=spec)
        if self._cannot_win(plan):
            return False
        return self.score(plan, f"{label} + {level.name} keys {keys}")

    def _cannot_win(self, plan: Plan) -> bool:
        """Whether ``plan`` needs at least the MACs of a candidate already meeting the budget (and,
        with a validator, confirmed on its fresh seeds: a fit that only its calibration images
        flatter must not bar the plans that could replace it): scoring it could not change the
        result. Its schedule alone says so; under the latency objective the estimate is too loose."""
        if self.objective != "macs":
            return False
        cost = self.calib.fractions(plan)[0]
        cheaper = [c for c in ordered(self.candidates, self.budget, "macs") if c.cost("macs") <= cost]
        return any(self.validator is None or self.validator.confirmed(c) for c in cheaper)

    def quantized(self) -> None:
        """Phase 3: the cheapest plans that clear the budget, and the cheapest that clear it by the
        quantization's own error (measured on the full-compute run), quantized."""
        if self.deadline is not None and time.time() + 4 * self.calib.seconds >= self.deadline:
            self.log("  warning: no time left to measure the quantized model: phase 3 skipped, the searched plans stay "
                     "unquantized beside the quantized hand-made ones; give more time to quantize them")
            return
        full = identity_plan(self.calib.model)
        speed, quantized = self.calib.timed_against(full.with_quant(self.quant), full)
        self.quant_speed = 1 / speed
        self.log(f"  {self.quant.label} ({self.quant.backend}) on the full-compute run: {quantized.psnr:.2f} dB, "
                 f"{speed:.2f}x the plain run's speed")
        chosen: list[Candidate] = []
        spare = _headroom_for(self.budget.threshold, quantized.psnr) if self.budget.metric == "psnr" else 0.0
        for extra in (0.0, spare):
            tier = sorted((c for c in self.candidates if c.plan.quant is None and c.meets(self.budget)
                           and c.quality(self.budget) >= self.budget.threshold + extra),
                          key=lambda c: c.cost(self.objective))
            chosen += [c for c in tier[:QUANTIZED] if c not in chosen]
        for c in chosen:
            self.score(c.plan.with_quant(self.quant), c.source + " + " + self.quant.label, self.quant_speed)
