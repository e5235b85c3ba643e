"""The joint search's fit phases (``joint.py``): 1b, fitted timesteps; 1c, fitted solver
coefficients on each timestep fit; 4, refinement of the fit one step below the cheapest that clears;
1d, after it, the timesteps the denoiser is told, fitted on the cheapest fit that clears.
A mixin of ``JointSearch``: the phases share its candidates, calibration run and deadline."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from diffaccel.calibration.reference import CalibrationRun, Scores, identity_plan
from diffaccel.search.candidates import Candidate
from diffaccel.search.coefficients import ReferenceTrajectory, coefficient_fits, record_reference
from diffaccel.search.config import Budget
from diffaccel.search.model_timesteps import fit_model_timesteps
from diffaccel.search.timesteps import fit_timesteps, next_fit_count, resampled
from diffaccel.solvers.schedulers import solver_scheduler
from diffaccel.solvers.spec import PLACEABLE, SolverSpec

FIT_GAIN = 3.0  # dB fitted timesteps add at 5-10 steps (2.4-4.2 dB on the embedded models): where fits start
AMPLE = 5.0  # dB above the budget at which a fit stops and is cached before the next fit (caching spent 4.3 dB
# of SD's 15-step fit for 2.1x its MACs, 4.0 dB of PixArt's 12-step fit for 1.7x; at 6 dB PixArt's fit at +5.9 never
# reached its caching in 40 minutes)
TOLD_SHARE = 1 / 2  # of the time phase 4 leaves, for the told timesteps of the cheapest fit that clears (phase 1d).
# Only there: told fits added 0.1-0.5 dB where tried (U-Net, DiT, SD), moved no step count, and on the SD pipeline's
# tail-bounded 40-minute search, run on each fit near the budget, took 7 minutes and left the validation no time
# to reach the 7-step plans; on the U-Net's cheapest clearing fit they added 0.15 dB of held-out margin
RESTART_GAIN = 0.05  # dB a restarted fit must gain for phase 4 to restart it again, and a timestep fit within its
# stall window (``timesteps.STALL_PER_STEP``) to go on


class FitPhases:
    """Phases 1b, 1c and 4 of ``JointSearch``, which provides what is declared here and the scoring
    (``score``, ``_keep``, ``_scores``, ``late``), caching (``cached``) and guidance (``guided``,
    ``_refitted``) they call."""

    calib: CalibrationRun
    budget: Budget
    deadline: float | None
    log: Callable[[str], None]
    candidates: list[Candidate]
    fit_solver: str | None  # the solver whose timesteps are fitted
    flow: bool  # a flow-matching pipeline: no told timesteps (phase 1d)
    fit_ceiling: int  # ... below the steps of its plain run that cleared
    fits: dict[int, Candidate]  # the best fit per step count
    _fit_scores: dict[SolverSpec, Scores]  # every fit run's scores, by solver setting
    _reference: ReferenceTrajectory | None  # the reference run's trajectory, recorded for phase 1c

    def fitted(self, configs: list[SolverSpec]) -> list[SolverSpec]:
        """Phase 1b; returns the fitted settings that clear the budget, cheapest first. The first fit
        is at the fewest steps whose plain run came within ``FIT_GAIN`` dB of the budget; the next
        is chosen by ``_next_fit``, until the counts that clear and those that miss meet."""
        plain = [spec for spec in configs if spec.name in PLACEABLE and spec.start == 1 and spec.spacing is None]
        if not plain:
            return []
        self.fit_solver, self.fit_ceiling = plain[0].name, plain[0].steps
        steps = self._first_fit(self.fit_solver, self.fit_ceiling)
        steps = steps if 3 <= steps < self.fit_ceiling else None
        while steps is not None and not self.late():
            c = self._fit(SolverSpec(name=self.fit_solver, steps=steps), self._warm())
            if c is None:
                break
            self.fits[steps] = c
            if self._ample(c):  # spend its headroom now: on a slow pipeline the descent may use the time left
                self.cached(c.plan.solver)
            steps = self._next_fit()
        return [c.plan.solver for _, c in sorted(self.fits.items()) if c.meets(self.budget)]

    def _ample(self, c: Candidate) -> bool:
        """Whether the fit ``c`` clears a PSNR budget by ``AMPLE`` dB: enough for caching alone to beat
        the next fits' step savings, so its caching phase runs before them."""
        return self.budget.metric == "psnr" and c.meets(self.budget) and c.psnr >= self.budget.threshold + AMPLE

    def _cheapest_fit(self) -> int | None:
        return min((n for n, c in self.fits.items() if c.meets(self.budget)), default=None)

    def _warm(self) -> tuple[int, ...] | None:
        """Where the next fit starts: the cheapest fit that cleared, else the last one, resampled."""
        c = self.fits.get(self._cheapest_fit()) or (list(self.fits.values())[-1] if self.fits else None)
        return c.plan.solver.timesteps if c is not None else None

    def _next_fit(self) -> int | None:
        meets = {n: c.meets(self.budget) for n, c in self.fits.items()}
        plain = self._plain_psnr(self.fit_solver)
        met = self._cheapest_fit()
        gain = 0.0 if met is None else self.fits[met].psnr - plain.get(met, self.fits[met].psnr)
        return next_fit_count(meets, plain, gain, self.budget.threshold, self.fit_ceiling)

    def _plain_psnr(self, name: str) -> dict[int, float]:
        """Phase 1's scores of ``name`` with its own timesteps, by step count."""
        return {c.plan.solver.steps: c.psnr for c in self.candidates if c.plan is not None
                and c.plan.method == "steps" and c.plan.solver == SolverSpec(name=name, steps=c.plan.solver.steps)}

    def _first_fit(self, name: str, ceiling: int) -> int:
        if self.budget.metric != "psnr":
            return ceiling - 1
        near = [n for n, psnr in self._plain_psnr(name).items()
                if psnr >= self.budget.threshold - FIT_GAIN and n < ceiling]
        return min(near, default=ceiling - 1)

    def refine(self) -> None:
        """Phase 4: the time left goes on to the step count just below the cheapest fit that cleared:
        its fit restarted from its best timesteps with a fresh simplex while that gains
        ``RESTART_GAIN`` dB (a fit cut short by its time share, as on a slow pipeline, goes on; one
        that had converged stops after one restart), or a new fit one step further down once it
        clears; each new clearing fit gets its caching phase. What time is left then goes to the
        told timesteps of the cheapest fit that cleared (``_told``)."""
        while self.fit_solver is not None and not self.late() and self._refined():
            pass
        met = self.fits.get(self._cheapest_fit())
        if met is not None and not self.late() and self._short_of_ample(met) and not self.flow \
                and met.plan.solver.model_timesteps is None:
            self._told(met)

    def _refined(self) -> bool:
        """One step of phase 4; False when it has nothing more to gain."""
        steps = self._next_fit()
        if steps is None and self.fits:  # the count just below the cheapest clear missed: restart it
            met = self._cheapest_fit()
            steps = max((n for n in self.fits if met is None or n < met), default=None)
        if steps is None:
            return False
        before = self.fits.get(steps)
        spec = before.plan.solver if before else SolverSpec(name=self.fit_solver, steps=steps)
        c = self._fit(spec, None if before else self._warm())
        if c is None or (before is not None and c.psnr < before.psnr + RESTART_GAIN):
            return False
        self.fits[steps] = c
        if c.meets(self.budget):
            self.cached(c.plan.solver)
            self.guided()
        return True

    def _fit(self, spec: SolverSpec, warm: tuple[int, ...] | None) -> Candidate | None:
        """``spec`` with fitted timesteps (from its own when it has them: a restart), kept as a
        candidate with the scores of the fit's best run (None when out of time)."""
        own, restart = spec.timesteps, spec.timesteps is not None
        spec = spec.model_copy(update={"timesteps": None, "coefficients": None, "model_timesteps": None})
        own = own or self._own_timesteps(spec)
        share = None if self.deadline is None else time.time() + (self.deadline - time.time()) / 3
        psnr = self.budget.metric == "psnr"
        enough = self.budget.threshold + AMPLE if psnr else None
        fit = fit_timesteps(spec, own, self._fit_objective, share, warm=resampled(warm, spec.steps) if warm else None,
                            enough=enough, stall_gain=RESTART_GAIN if psnr else None)
        how = "fit restarted" if restart else "timesteps fitted"
        ample = f" (the budget cleared by {AMPLE:g} dB: the fit stops)" if enough and fit.quality >= enough else ""
        stalled = f" (no {RESTART_GAIN:g} dB gained in its last runs: the fit stops)" if fit.stalled else ""
        self.log(f"  {spec.label}: {how} in {fit.evaluations} runs, {fit.start_quality:.2f} -> "
                 f"{fit.quality:.2f}{self.budget.unit()}{ample}{stalled}")
        scores = self._fit_scores.get(fit.spec)
        if scores is None:
            return None
        plan = identity_plan(self.calib.model).model_copy(update={"solver": fit.spec, "method": "fitted-timesteps"})
        timed = self._keep(plan, scores, fit.spec.label)
        fits = [timed, *self._corrected(fit.spec, every=not self._ample(timed))]
        return max(fits, key=self._rank)

    def _rank(self, c: Candidate) -> tuple[bool, float]:
        return c.meets(self.budget), c.quality(self.budget)

    def _short_of_ample(self, c: Candidate) -> bool:
        """Whether phase 1d may pay on the fit ``c``: under a PSNR budget, ``c`` not clearing it by
        ``AMPLE`` dB (caching spends that)."""
        return self.budget.metric == "psnr" and c.psnr < self.budget.threshold + AMPLE

    def _own_timesteps(self, spec: SolverSpec) -> tuple[int, ...]:
        scheduler = solver_scheduler(spec.model_copy(update={"model_timesteps": None}), self.calib.scheduler)
        scheduler.set_timesteps(spec.steps)
        return tuple(int(t) for t in scheduler.timesteps)

    def _told(self, c: Candidate) -> list[Candidate]:
        """Phase 1d: ``c``'s solver with the timesteps its denoiser is told fitted (``model_timesteps.py``),
        within ``TOLD_SHARE`` of the time left, then its coefficients (if it has them) fitted again
        under them; each kept as a candidate (none when nothing moved or time ran out)."""
        spec = c.plan.solver
        share = None if self.deadline is None else time.time() + (self.deadline - time.time()) * TOLD_SHARE
        fit = fit_model_timesteps(spec, spec.timesteps or self._own_timesteps(spec), self._fit_objective, share,
                                  len(self.calib.scheduler.alphas_cumprod))
        if not fit.evaluations:
            return []
        self.log(f"  {spec.label}: the timesteps its denoiser is told, fitted in {fit.evaluations} runs, "
                 f"{fit.start_quality:.2f} -> {fit.quality:.2f}{self.budget.unit()}")
        scores = self._fit_scores.get(fit.spec)
        if fit.spec == spec or scores is None:
            return []
        plan = c.plan.model_copy(update={"solver": fit.spec, "method": "fitted-model-timesteps"})
        found = [self._keep(plan, scores, fit.spec.label)]
        refit = self._refitted(plan)
        if refit is not plan:
            found += [x for x in [self.score(refit, f"{fit.spec.label} (coefficients refitted)")] if x is not None]
        return found

    def _corrected(self, spec: SolverSpec, every: bool = True) -> list[Candidate]:
        """Phase 1c: ``spec`` with its coefficients fitted to the reference trajectory (the last
        step's, then, if ``every``, every step's: ``coefficients.py``), scored, within a third of the
        time left (as a timestep fit: on a slow pipeline the descent to fewer steps needs the rest).
        A fit with ample headroom skips the every-step fit (a run per step): caching spends the
        headroom, and the time goes to the fits at fewer steps."""
        found = []
        base = identity_plan(self.calib.model).model_copy(update={"method": "fitted-solver"})
        try:
            self._reference = self._reference or record_reference(self.calib.pipe, self.calib.calibrate)
            share = None if self.deadline is None else time.time() + (self.deadline - time.time()) / 3
            for fitted, which in coefficient_fits(self.calib.pipe, self.calib.calibrate, spec, self._reference,
                                                  share, every=every):
                found += [c for c in [self.score(base.model_copy(update={"solver": fitted}),
                                                 f"{fitted.label} ({which})")] if c is not None]
        except Exception as exc:  # noqa: BLE001 -- a fit that fails or breaks the pipeline is left out
            self.log(f"  {spec.label}: coefficients not fitted ({type(exc).__name__}: {str(exc)[:160]})")
        return found

    def _fit_objective(self, spec: SolverSpec) -> float:
        """What a timestep fit maximizes: the budget's quality, less three times any shortfall of the
        tail bound; a setting that fails scores nothing."""
        s = self._fit_scores.get(spec) or self._scores(identity_plan(self.calib.model).model_copy(
            update={"solver": spec}), None)
        if s is None:
            return -math.inf
        self._fit_scores[spec] = s  # a restart begins at its best timesteps: scored already
        quality = s.psnr if self.budget.metric == "psnr" else s.ssim
        return quality - 3 * max(0.0, (self.budget.tail or -math.inf) - s.psnr_p5)
