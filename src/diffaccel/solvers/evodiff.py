"""EVODiff (entropy-aware variance-optimized diffusion inference) as a diffusers scheduler.

A multistep predictor-corrector solver in the data-prediction parameterisation (the paper's first
insight: data prediction reduces the conditional entropy better than noise prediction) whose free
coefficients are chosen to minimise the conditional variance of the update, without reference data
(its second insight). The update over a step of log-SNR size ``h`` is the exponential integrator

    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) m_s + alpha_t phi2(h) D,   phi2 = (h - 1 + e^-h) / h

where ``D`` estimates ``h`` times the data prediction's slope. Two estimates are at hand without an
extra evaluation: the backward difference of the last two predictions (rescaled to the step) and,
once the next evaluation is made, the forward difference across the step. Any combination of them
whose weights sum to one keeps the solver second-order; EVODiff takes, per sample and channel, the
weight that minimises the variance of ``D`` over the pixels, within a band around the weight that
would make the step third-order on a smooth trajectory:

* predictor (to reach the next timestep): backward differences only, the last one blended with the
  one before by the same rule once three predictions exist;
* corrector (after the next evaluation, as UniPC corrects, no extra evaluation): the forward and the
  backward difference blended; the corrected sample is the one the next step starts from.

Because every free weight multiplies a difference of two estimates of the same slope, the choice
changes the result by O(h^3) per step: the solver converges to the exact trajectory at second order
as steps grow, whatever the weights. The last step goes to the clean sample at first order (the
final data prediction), as DPM-Solver++ does. Works with epsilon-, v- and sample-prediction models
on any betas schedule diffusers knows (it borrows DPM-Solver's schedule and timestep spacing),
including zero-terminal-SNR ones. Written from the paper's description, not its code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

BAND = 0.25  # how far the variance-chosen weight may move from the third-order weight
# The predictor's third-order weight extrapolates the older slope; a step much longer than the ones
# before it (explicit timesteps that crowd together, then spread) would extrapolate far, so it is
# capped (1.83 for equal steps).
MAX_EXTRAPOLATION = 2.0


@dataclass(frozen=True)
class _Point:
    """One evaluated timestep: its noise level and the model's data prediction there."""

    alpha: float
    sigma: float
    lam: float  # log-SNR, log(alpha / sigma); -inf where alpha is 0
    model: torch.Tensor


def _centred(x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(2, x.dim()))
    return x - x.mean(dim=dims, keepdim=True) if dims else x


def _min_variance_weight(a: torch.Tensor, b: torch.Tensor, centre: float) -> torch.Tensor:
    """Per sample and channel, the ``w`` that minimises the pixel variance of ``w a + (1 - w) b``,
    kept within ``centre +- BAND``."""
    dims = tuple(range(2, a.dim())) or (a.dim() - 1,)
    ca, cb = _centred(a), _centred(b)
    gap = ca - cb
    w = -(cb * gap).sum(dim=dims, keepdim=True) / (gap * gap).sum(dim=dims, keepdim=True).clamp_min(1e-20)
    return w.clamp(centre - BAND, centre + BAND)


def _phi(h: float) -> tuple[float, float]:
    """``1 - e^-h`` and ``(h - 1 + e^-h) / h``: the weights of the prediction and of its slope."""
    if math.isinf(h):
        return 1.0, 1.0
    return -math.expm1(-h), (h + math.expm1(-h)) / h


class EVODiffScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"EVODiff supports epsilon, v_prediction and sample models, not {prediction_type!r}")
        # The noise schedule and the timestep grid are DPM-Solver's: a multistep solver's spacings
        # (linspace ends short of t=0, the last step goes to the clean sample), so EVODiff, UniPC and
        # DPM-Solver++ at equal steps and spacing evaluate the model at the same timesteps.
        self._grid = DPMSolverMultistepScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, prediction_type=prediction_type,
            timestep_spacing=timestep_spacing, steps_offset=steps_offset, rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.alphas_cumprod = self._grid.alphas_cumprod
        self.timesteps = self._grid.timesteps
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._index = 0
        self._points: list[_Point] = []  # the newest last, at most three
        self._start: torch.Tensor | None = None  # the sample the last predictor started from

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self._grid.set_timesteps(num_inference_steps, device)
        self.timesteps = self._grid.timesteps
        self.num_inference_steps = num_inference_steps
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``begin_index`` of the schedule (a truncated run)."""
        self._index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def _alpha_sigma(self, index: int) -> tuple[float, float]:
        """sqrt(alpha_bar), sqrt(1 - alpha_bar) at timestep ``index`` of the run (the end: 1, 0).
        Read from ``self.timesteps`` at each step: a plan may place its own timesteps."""
        if index >= len(self.timesteps):
            return 1.0, 0.0
        a = float(self.alphas_cumprod[int(self.timesteps[index])])
        return a ** 0.5, (1 - a) ** 0.5

    def _point(self, model_output: torch.Tensor, sample: torch.Tensor, index: int) -> _Point:
        alpha, sigma = self._alpha_sigma(index)
        kind = self.config.prediction_type
        if kind == "epsilon":
            if alpha == 0:
                raise ValueError("EVODiff: an epsilon-prediction model cannot be sampled from zero terminal SNR "
                                 "(alpha is 0 at the first timestep); use a v-prediction model or another spacing")
            model = (sample - sigma * model_output) / alpha
        elif kind == "v_prediction":
            model = alpha * sample - sigma * model_output
        else:
            model = model_output
        lam = math.log(alpha / sigma) if alpha > 0 else -math.inf
        return _Point(alpha, sigma, lam, model)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             return_dict: bool = True, **_: object) -> SchedulerOutput | tuple:
        i = self._index
        new = self._point(model_output, sample, i)
        if self._start is not None and len(self._points) >= 1:
            sample = self._correct(new)
        self._points = [*self._points[-2:], new]
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        if sigma_t == 0:  # the last step: the clean sample, first order
            prev, self._start = new.model, None
        else:
            prev, self._start = self._predict(sample, alpha_t, sigma_t), sample
        self._index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _slopes(self) -> list[torch.Tensor]:
        """Backward differences of the stored predictions, each per unit of log-SNR, newest first;
        none across a step of infinite size (from zero SNR)."""
        pts, out = self._points, []
        for later, earlier in zip(pts[:0:-1], pts[-2::-1]):
            step = later.lam - earlier.lam
            if not math.isfinite(step):
                break
            out.append((later.model - earlier.model) / step)
        return out

    def _update(self, x: torch.Tensor, s: _Point, alpha_t: float, sigma_t: float,
                slope: torch.Tensor | None) -> torch.Tensor:
        """The exponential-integrator update from ``x`` at ``s`` to (alpha_t, sigma_t) with the
        data prediction's ``slope`` per unit of log-SNR (None: first order)."""
        h = math.log(alpha_t / sigma_t) - s.lam
        phi1, phi2 = _phi(h)
        out = (sigma_t / s.sigma) * x + alpha_t * phi1 * s.model
        if slope is None or math.isinf(h):
            return out
        return out + alpha_t * phi2 * h * slope

    def _predict(self, x: torch.Tensor, alpha_t: float, sigma_t: float) -> torch.Tensor:
        """From ``x`` at the newest point to the next timestep, with backward slopes only."""
        slopes, s = self._slopes(), self._points[-1]
        if not slopes:
            return self._update(x, s, alpha_t, sigma_t, None)
        slope = slopes[0]
        if len(slopes) > 1:
            # Both slopes estimate the derivative, at h_0 / 2 and h_0 + h_1 / 2 behind s; extrapolating
            # linearly to a third of the coming step (where the update needs it) is the third-order weight.
            h = math.log(alpha_t / sigma_t) - s.lam
            h0, h1 = s.lam - self._points[-2].lam, self._points[-2].lam - self._points[-3].lam
            centre = min(1 + (h / 3 + h0 / 2) / ((h0 + h1) / 2), MAX_EXTRAPOLATION)
            slope = slopes[1] + _min_variance_weight(slopes[0], slopes[1], centre) * (slopes[0] - slopes[1])
        return self._update(x, s, alpha_t, sigma_t, slope)

    def _correct(self, new: _Point) -> torch.Tensor:
        """Redo the last step with the prediction just evaluated at its end (no extra evaluation)."""
        s, x = self._points[-1], self._start
        h = new.lam - s.lam
        forward = (new.model - s.model) / h
        backward = self._slopes()
        if not backward or not math.isfinite(h):
            return self._update(x, s, new.alpha, new.sigma, forward if math.isfinite(h) else None)
        # forward sits at h / 2 after s, backward at h0 / 2 before it; the step needs the slope at h / 3.
        h0 = s.lam - self._points[-2].lam
        centre = (h / 3 + h0 / 2) / (h / 2 + h0 / 2)
        w = _min_variance_weight(forward, backward[0], centre)
        return self._update(x, s, new.alpha, new.sigma, backward[0] + w * (forward - backward[0]))

    def __len__(self) -> int:
        return self.config.num_train_timesteps
