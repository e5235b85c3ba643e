"""Methods: small functions that return a Plan for a pipeline's denoiser (or a model).

| function | paper idea |
|---|---|
| ``deepcache`` | U-Net skip-branch reuse (DeepCache) |
| ``faster_diffusion`` | encoder propagation, parallel decoding, noise injection (Faster Diffusion) |
| ``fora`` | static block / component caching (FORA) |
| ``taylorseer`` | Taylor forecasting of cached units (TaylorSeer) |
| ``first_block_cache`` / ``dbcache`` | dynamic first-block / dual-block residual rule (FBCache, DBCache) |
| ``erta`` | profiled reuse steps with fitted residual correction (ERTACache) |
| ``keysteps`` | key steps placed by dynamic programming on a profile (DDT / CacheQuant) |
| ``ptq`` | timestep-aware post-training quantization (PTQ4DM / Q-Diffusion) |
| ``fit_feature_correction`` | per-channel correction of cached features (CacheQuant) |
| ``fit_guidance`` | the unconditional guidance branch predicted at some steps (adaptive guidance, LinearAG) |

Static methods take ``(pipe_or_model, num_steps, ...)``; calibrated ones take
``(pipe, calls, ...)``, ``calls`` being the pipeline calls to calibrate on.
"""

from diffaccel.methods.deepcache import deepcache
from diffaccel.methods.erta import erta
from diffaccel.methods.faster_diffusion import faster_diffusion
from diffaccel.methods.feature_correction import fit_feature_correction
from diffaccel.methods.first_block_cache import dbcache, first_block_cache
from diffaccel.methods.fora import fora
from diffaccel.methods.guidance import fit_guidance
from diffaccel.methods.keysteps import keysteps
from diffaccel.methods.ptq import ptq, quant_spec
from diffaccel.methods.registry import METHODS, applicable, build, parameters
from diffaccel.methods.taylorseer import taylorseer

__all__ = ["METHODS", "applicable", "build", "dbcache", "deepcache", "erta", "faster_diffusion",
           "first_block_cache", "fit_feature_correction", "fit_guidance", "fora", "keysteps", "parameters", "ptq",
           "quant_spec", "taylorseer"]
