"""Methods: small functions that return a Plan (or a rule) for a model.

| function | paper idea |
|---|---|
| ``deepcache`` | U-Net skip-branch reuse (DeepCache) |
| ``faster_diffusion`` | encoder propagation, parallel decoding, noise injection (Faster Diffusion) |
| ``fora`` | static block / component caching (FORA) |
| ``taylorseer`` | Taylor forecasting of cached units (TaylorSeer) |
| ``first_block_cache`` | dynamic first-block / dual-block residual rule (FBCache, DBCache) |
| ``erta`` | profiled reuse steps with fitted residual correction (ERTACache) |
"""

from diffaccel.methods.block_cache import fora
from diffaccel.methods.deepcache import deepcache
from diffaccel.methods.dynamic import first_block_cache
from diffaccel.methods.faster_diffusion import faster_diffusion
from diffaccel.methods.forecast import taylorseer

__all__ = ["deepcache", "faster_diffusion", "first_block_cache", "fora", "taylorseer"]
