"""EVODiff (entropy-aware variance-optimized diffusion inference) as a diffusers scheduler.

A second-order multistep solver in the data-prediction parameterisation (as DPM-Solver++), whose
free coefficients are chosen to reduce the conditional variance of each update without reference
data:

* the difference term ``D = m_0 - r m_1`` of two consecutive data predictions takes ``r`` between
  the schedule's own ratio and the projection ``<m_0, m_1> / <m_1, m_1>`` (per sample and channel),
  which minimises ``Var(D)``: the projection weighs more late in sampling, where predictions settle;
* the predictor's step ratio is scaled by a bounded function of that balance;
* after the next model evaluation (no extra one), a corrector combines the previous and the new
  difference terms with weights again chosen by projections (the "eta" and "zeta" factors), the
  way UniPC corrects with the newest evaluation.

The last step is first order and returns the final data prediction. Works with epsilon-, v- and
sample-prediction models on any betas schedule diffusers knows (it borrows DDIM's schedule and
timestep spacing). Written from the paper's description and its published sampler for EDM models;
on the VP schedules here the corrector is kept to steps of similar log-SNR size (``CORRECTED_RATIOS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

CLAMP = 2.0  # projection coefficients are kept within +-CLAMP (a near-orthogonal pair is noise)
# The corrector assumes consecutive steps of similar size in log-SNR: with a step ratio outside
# this range (the first steps of a trailing schedule on a cosine noise schedule reach 11x) its
# combination of the two differences overshoots, and the predictor's result is kept instead.
CORRECTED_RATIOS = (0.67, 1.5)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample and channel inner products, shaped to broadcast over the remaining dimensions."""
    dims = tuple(range(2, a.dim()))
    return (a * b).sum(dim=dims, keepdim=True)


def _projection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_dot(a, b) / _dot(b, b).clamp_min(1e-12)).clamp(-CLAMP, CLAMP)


@dataclass
class _Pending:
    """What the last second-order predictor left for the corrector at the next evaluation."""

    x_euler: torch.Tensor
    d1: torch.Tensor
    m0: torch.Tensor
    coeff: float  # alpha_t - sigma_t alpha_s / sigma_s: the first-order data coefficient
    ratio: torch.Tensor  # r_i, the predictor's step ratio
    r_logh: float
    h: float
    weight: float
    base: float
    sigma_ratio: float  # sigma_t / sigma_s of the predicted step


class EVODiffScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        self._ddim = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                                   beta_schedule=beta_schedule, trained_betas=trained_betas,
                                   prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                                   steps_offset=steps_offset, rescale_betas_zero_snr=rescale_betas_zero_snr,
                                   clip_sample=False, set_alpha_to_one=True)
        self.alphas_cumprod = self._ddim.alphas_cumprod
        self.init_noise_sigma = 1.0
        self.timesteps = self._ddim.timesteps
        self.num_inference_steps: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._index = 0
        self._models: list[torch.Tensor] = []
        self._pending: _Pending | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self._ddim.set_timesteps(num_inference_steps, device)
        self.timesteps = self._ddim.timesteps
        self.num_inference_steps = num_inference_steps
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``begin_index`` of the schedule (a truncated run)."""
        self._index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    # -- the schedule --------------------------------------------------------------------------------
    def _alpha_sigma(self, index: int) -> tuple[float, float]:
        """sqrt(alpha_bar), sqrt(1 - alpha_bar) at timestep ``index`` of the run (the end: 1, 0)."""
        if index >= len(self.timesteps):
            return 1.0, 0.0
        a = float(self.alphas_cumprod[int(self.timesteps[index])])
        return a ** 0.5, (1 - a) ** 0.5

    def _data(self, model_output: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(index)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - sigma * model_output) / alpha
        if kind == "v_prediction":
            return alpha * sample - sigma * model_output
        if kind == "sample":
            return model_output
        raise ValueError(f"EVODiff supports epsilon, v_prediction and sample models, not {kind!r}")

    # -- one step ---------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             return_dict: bool = True, **_: object) -> SchedulerOutput | tuple:
        i = self._index
        m = self._data(model_output, sample, i)
        if self._pending is not None:
            lo, hi = CORRECTED_RATIOS
            sample = self._correct(m, sample) if lo <= self._pending.r_logh <= hi else sample
            self._pending = None
        self._models = [*self._models[-1:], m]
        last = i + 1 >= len(self.timesteps)
        if last:
            prev = m  # lower order at the end: the final data prediction
        elif len(self._models) < 2:
            prev = self._first_order(sample, m, i)
        else:
            prev = self._predict(sample, i)
        self._index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _first_order(self, x: torch.Tensor, m: torch.Tensor, i: int) -> torch.Tensor:
        alpha_s, sigma_s = self._alpha_sigma(i)
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        return (sigma_t / sigma_s) * x + (alpha_t - sigma_t * alpha_s / sigma_s) * m

    def _predict(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Second-order step from ``x`` (timestep i) to i + 1 with the variance-balanced difference."""
        m1, m0 = self._models
        (a_p1, s_p1), (a_p0, s_p0), (a_t, s_t) = (self._alpha_sigma(k) for k in (i - 1, i, i + 1))
        k_p1, k_p0, k_t = s_p1 / a_p1, s_p0 / a_p0, s_t / a_t
        h = 1 / k_t - 1 / k_p0
        coeff = a_t - s_t * a_p0 / s_p0
        x_euler = (s_t / s_p0) * x + coeff * m0
        r_logh = float(torch.log(torch.tensor(k_p1 / k_p0)) / torch.log(torch.tensor(k_p0 / k_t)))
        t_norm = float(self.timesteps[i + 1]) / self.config.num_train_timesteps
        weight = 0.5 * (1 - t_norm ** 2)
        base = ((s_t / s_p0) / (s_p0 / s_p1)) ** 0.5
        balance = (1 - weight) * base + weight * _projection(m0, m1)
        d1 = m0 - balance * m1
        ratio = (torch.sigmoid(0.25 * balance.abs()) * r_logh).clamp(0.25 * r_logh, 1.5 * r_logh)
        self._pending = _Pending(x_euler, d1, m0, coeff, ratio, r_logh, h, weight, base, s_t / s_p0)
        return x_euler + 0.5 * coeff / ratio * d1

    def _correct(self, m_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Combine the predictor's difference with the new one (no extra evaluation)."""
        p, self._pending = self._pending, None
        d2 = m_t - ((1 - p.weight) * p.base + p.weight * _projection(m_t, p.m0)) * p.m0
        before, after = p.d1 / (p.r_logh * p.h), p.r_logh * d2 / p.h
        eta = 0.5 * torch.sigmoid((0.5 * _projection(after + before, after - before)).abs())
        theta = -eta / p.r_logh * p.d1 + p.r_logh * (1 - eta) * d2
        residual = x - p.x_euler - 0.5 * p.coeff / p.ratio * theta
        zeta_star = _projection(residual, p.d1) / p.coeff
        shift = zeta_star.abs() - 0.5
        if (self.num_inference_steps or 0) > 20:  # long runs: damp by the predictions' consistency
            slope = (p.m0 - self._models[0]) / p.h  # the predictor's two data predictions
            shift = -shift * torch.sigmoid(_projection(p.m0, slope) * (2 - p.sigma_ratio ** 2))
        zeta = torch.sigmoid(shift)
        return p.x_euler + 0.5 * p.coeff / zeta * theta

    def __len__(self) -> int:
        return self.config.num_train_timesteps
