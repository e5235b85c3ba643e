"""Methods by name, for the CLI and the benchmarks: ``build(name, pipe, num_steps, **params)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from diffaccel.methods.block_cache import fora
from diffaccel.methods.deepcache import deepcache
from diffaccel.methods.dynamic import first_block_cache
from diffaccel.methods.erta import erta
from diffaccel.methods.faster_diffusion import faster_diffusion
from diffaccel.methods.forecast import taylorseer
from diffaccel.methods.keysteps import keysteps
from diffaccel.methods.ptq import ptq
from diffaccel.plan import Plan

# name -> (function, adapters it applies to, whether it needs the whole pipeline)
METHODS: dict[str, tuple[Callable[..., Plan], tuple[str, ...], bool]] = {
    "deepcache": (deepcache, ("unet",), False),
    "faster_diffusion": (faster_diffusion, ("unet",), False),
    "fora": (fora, ("dit", "pixart", "sd3", "flux", "unet"), False),
    "taylorseer": (taylorseer, ("dit", "pixart", "sd3", "flux", "unet"), False),
    "first_block_cache": (first_block_cache, ("dit", "pixart", "sd3", "flux"), False),
    "dbcache": (first_block_cache, ("dit", "pixart", "sd3", "flux"), False),
    "erta": (erta, ("dit", "pixart", "sd3", "flux", "unet"), True),
    "keysteps": (keysteps, ("dit", "pixart", "sd3", "flux", "unet"), True),
    "ptq": (ptq, ("dit", "pixart", "sd3", "flux", "unet"), True),
}


def parameters(name: str) -> dict[str, object]:
    """The knobs of a method and their defaults."""
    fn = METHODS[name][0]
    skip = {"model", "unet", "pipe", "num_steps"}
    return {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[1:] if p.name not in skip}


def build(name: str, pipe, num_steps: int, guidance: float | None = None, **params) -> Plan:
    """A plan of method ``name`` for the pipeline's denoiser; unknown names or knobs raise ValueError.
    ``guidance`` reaches the methods that calibrate on sampling runs, unless ``params`` sets it."""
    from diffaccel.adapters import adapter_for

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    fn, adapters, needs_pipe = METHODS[name]
    model = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    adapter = adapter_for(model).name
    if adapter not in adapters:
        raise ValueError(f"{name} does not apply to a {type(model).__name__}; it works on {', '.join(adapters)}")
    known = parameters(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{name} has no setting {', '.join(unknown)}; its settings are {', '.join(known)}")
    if name == "dbcache" and "last_blocks" not in params:
        params["last_blocks"] = 1
    if guidance is not None and "guidance" in known and "guidance" not in params:
        params["guidance"] = guidance
    if "num_steps" in inspect.signature(fn).parameters:
        params["num_steps"] = num_steps
    return fn(pipe if needs_pipe else model, **params)
