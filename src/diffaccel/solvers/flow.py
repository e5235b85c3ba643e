"""A plan's solver section on a flow-matching pipeline (SD3, Flux): the plan's sampler at the plan's
step count, on the noise levels the pipeline's own flow-matching scheduler sets at that count (its
shift, or its resolution-dependent shift from the ``mu`` the pipeline passes for the image size), or
at explicit timesteps (noise level x 1000), with fitted coefficients if the plan has them.

On a flow path x_t = (1 - s) x_0 + s noise, DDIM's deterministic step is Euler's, so ``ddim`` and
``euler`` both run the pipeline's own scheduler at the plan's steps (exactly its run at that
count); ``dpm++1``-``dpm++3`` and ``unipc`` are diffusers' multistep solvers in their flow mode
(``use_flow_sigmas``, ``flow_prediction``), placed on those same noise levels."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from diffaccel.errors import PlanError
from diffaccel.solvers.calls import check_call
from diffaccel.solvers.corrected import Corrected, Fitter
from diffaccel.solvers.spec import SolverSpec

FLOW_SOLVERS: dict[str, tuple[type, dict]] = {
    "ddim": (FlowMatchEulerDiscreteScheduler, {}),  # DDIM's deterministic step on a flow path is Euler's
    "euler": (FlowMatchEulerDiscreteScheduler, {}),
    "dpm++1": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 1}),
    "dpm++2": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": (UniPCMultistepScheduler, {}),
}
# every setting a multistep solver needs to read its sigmas as flow-matching noise levels
_FLOW_MODE = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "final_sigmas_type": "zero",
              "flow_shift": 1.0, "use_dynamic_shifting": False, "lower_order_final": True}


def flow_solver(spec: SolverSpec, base: Any, exact_steps: bool = False, fitter: Fitter | None = None) -> Any:
    """``spec`` on ``base``'s flow schedule (in a ``Corrected`` with its coefficients or a ``fitter``), or a
    clear error for what a flow path has no meaning for."""
    if spec.name not in FLOW_SOLVERS:
        raise PlanError(f"the solver {spec.name} needs a noise-schedule (betas) scheduler; on this flow-matching "
                        f"pipeline ({type(base).__name__}) use one of {', '.join(FLOW_SOLVERS)}")
    unsupported = [what for what, given in (("a spacing", spec.spacing), ("an informed start", spec.start < 1),
                                            ("a bottleneck", spec.bottleneck),
                                            ("model_timesteps", spec.model_timesteps)) if given]
    if unsupported:
        raise PlanError(f"on a flow-matching pipeline ({type(base).__name__}) a solver section sets the sampler, "
                        f"its steps, their timesteps and coefficients only; leave out {', '.join(unsupported)}")
    trained = base.config.num_train_timesteps
    if spec.timesteps is not None and max(spec.timesteps) > trained:
        raise PlanError(f"the plan's timesteps reach {max(spec.timesteps)}; on this flow schedule they run from 0 to "
                        f"{trained} (the noise level times {trained})")
    if base.config.get("stochastic_sampling") or base.config.get("invert_sigmas"):
        raise PlanError(f"this pipeline's {type(base).__name__} runs stochastic or inverted sigmas, which the "
                        "plan's solvers cannot follow: leave the plan's solver out for it")
    solver = FlowSolver(spec, base, exact_steps)
    return Corrected(solver, spec.coefficients, fitter) if spec.coefficients is not None or fitter is not None \
        else solver


class FlowSolver:
    """The scheduler a flow pipeline gets for the call: ``set_timesteps`` always sets the plan's
    steps; the pipeline's own scheduler (a copy) computes the noise levels and, for ``ddim`` and
    ``euler``, steps; a multistep solver steps on the same levels. ``config`` stays the pipeline's
    scheduler's, whose shift settings the pipeline reads before it sets the timesteps."""

    flow_path = True  # for ``paths.is_flow``, through any wrapper

    def __init__(self, spec: SolverSpec, base: Any, exact_steps: bool = False) -> None:
        self.spec, self.exact_steps, self.config = spec, exact_steps, base.config
        self.own = type(base).from_config(base.config)
        cls, extra = FLOW_SOLVERS[spec.name]
        trained = {"num_train_timesteps": base.config.num_train_timesteps}
        if type(base) is cls and not extra:  # the pipeline's own Euler: exactly its run at the plan's steps
            self.inner = self.own
        elif cls is FlowMatchEulerDiscreteScheduler:
            self.inner = cls(**trained)
        else:
            self.inner = cls.from_config(trained, **_FLOW_MODE, **extra)
        # a resolution-dependent shift before any call: the one at the base image size
        self._mu = base.config.get("base_shift", 0.5) if base.config.get("use_dynamic_shifting") else None
        self.own.set_timesteps(spec.steps, mu=self._mu)
        if self.inner is not self.own:
            self.inner.set_timesteps(spec.steps)
        self.timesteps = self.inner.timesteps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      mu: float | None = None, timesteps: Any = None, **kwargs: Any) -> None:
        """The plan's steps whatever the pipeline asks for; the pipeline's default sigmas (Flux passes
        ``linspace(1, 1/n, n)``) are taken as its request for ``n`` steps, other sigmas refused."""
        default = sigmas is not None and _default_sigmas(sigmas)
        asked = len(sigmas) if default else num_inference_steps
        check_call(self.spec, asked, timesteps, None if default else sigmas, self.exact_steps)
        steps, mu = self.spec.steps, self._mu if mu is None else mu
        if self.spec.timesteps is not None:  # explicit (fitted) timesteps: the noise levels they name, unshifted
            placed = torch.tensor(self.spec.timesteps, dtype=torch.float32)
            self._place(torch.cat([placed / self.config.num_train_timesteps, torch.zeros(1)]), placed, device)
            return
        if not isinstance(self.inner, FlowMatchEulerDiscreteScheduler) \
                and isinstance(self.own, FlowMatchEulerDiscreteScheduler):
            # diffusers' own flow grid for its multistep solvers, shifted as the pipeline's scheduler shifts it:
            # on an Euler grid ending near sigma 0 (SD3's) their higher orders diverge as the steps grow
            self.own.set_timesteps(sigmas=_multistep_grid(self.inner, steps), device=device, mu=mu)
        elif default and "sigmas" in inspect.signature(self.own.set_timesteps).parameters:
            self.own.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
        else:
            self.own.set_timesteps(steps, device=device, mu=mu)
        if self.inner is self.own:
            self.timesteps = self.own.timesteps
        else:
            self._place(self.own.sigmas, self.own.timesteps, device)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor) -> torch.Tensor:
        """``sample`` noised to ``timestep`` on the flow path (an image-to-image call's start), for every
        solver: diffusers' multistep ones have no ``scale_noise``."""
        sigma = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1) / self.config.num_train_timesteps
        sigma = sigma.to(sample.device, sample.dtype).reshape(-1, *[1] * (sample.dim() - 1))
        return sigma * noise + (1 - sigma) * sample

    def _place(self, levels: torch.Tensor, timesteps: torch.Tensor, device: Any) -> None:
        """Run the inner solver at ``timesteps`` and the noise levels ``levels`` (one more: the last, 0)."""
        multistep = not isinstance(self.inner, FlowMatchEulerDiscreteScheduler)
        self.inner.set_timesteps(len(timesteps), device=device, **({} if multistep else {"mu": self._mu}))  # resets
        levels = levels.detach().float().clone()
        if multistep:  # kept on the CPU, with log(1 - sigma) finite, as diffusers' UniPC keeps them
            levels = levels.cpu()
            levels[0] = min(float(levels[0]), 1 - 1e-6)
        self.inner.sigmas = levels if multistep else levels.to(self.inner.sigmas.device)
        # Euler refuses integer timesteps; a multistep solver keeps the dtype its own scheduler gave them
        self.inner.timesteps = (timesteps.clone() if multistep else timesteps.float()).to(self.inner.timesteps.device)
        self.timesteps = self.inner.timesteps

def _multistep_grid(solver: Any, steps: int) -> np.ndarray:
    """The unshifted noise levels diffusers' ``solver`` sets in its flow mode at ``steps`` steps."""
    trained = solver.config.num_train_timesteps
    if isinstance(solver, UniPCMultistepScheduler):
        return np.linspace(1.0, 1 / trained, steps + 1)[:-1]
    top = 1 - 1 / trained  # DPM-Solver's: one minus its evenly spaced alphas
    return np.linspace(top, top / steps, steps)


def _default_sigmas(sigmas: Any) -> bool:
    """Whether ``sigmas`` are the evenly spaced ``linspace(1, 1/n, n)`` a pipeline passes by default."""
    values = np.asarray(torch.as_tensor(sigmas, dtype=torch.float64).cpu())
    n = len(values)
    return n > 0 and np.allclose(values, np.linspace(1.0, 1 / n, n), atol=1e-6)

