"""DeepCache: on partial steps, run only the shallow path of a U-Net and reuse the deep features
below skip branch ``branch`` from the last full step."""

from __future__ import annotations

from diffaccel.adapters.unet import deep_units
from diffaccel.methods.base import key_steps_early_dense, key_steps_uniform, make_plan, rows_from, unit_names
from diffaccel.plan import Plan


def deepcache(unet, num_steps: int = 50, interval: int = 3, branch: int = 0, uniform: bool = True,
              power: float = 1.6, key_steps: int | None = None) -> Plan:
    """``interval`` N: one full step then N-1 partial ones (uniform), or about num_steps/N full
    steps crowded at the start (``uniform=False``, spacing exponent ``power``; ``key_steps``
    sets the number of full steps directly instead of through N)."""
    units = unit_names(unet)
    levels = len(unet.down_blocks)
    if uniform:
        keys = key_steps_uniform(num_steps, interval)
    else:
        keys = key_steps_early_dense(num_steps, interval, power, count=key_steps)
    rows = rows_from(num_steps, units, keys, deep_units(levels, branch))
    params = {"interval": interval, "branch": branch, "uniform": uniform, "power": power}
    if key_steps is not None:
        params["key_steps"] = key_steps
    return make_plan(unet, rows, "deepcache", params)
