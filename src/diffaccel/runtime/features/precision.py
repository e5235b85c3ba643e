"""The plan's precision: the denoiser's forward runs under ``torch.autocast`` at a lower float dtype.

Matrix products and convolutions then run in bfloat16 or float16 (on CPUs with AVX-512 BF16 or AMX,
and on GPUs, faster than float32), while autocast keeps reductions and normalizations in float32.
Only the denoiser is cast: the text encoder, the VAE and the scheduler's arithmetic stay as they
are, and the denoiser's output is cast back to the dtype of its input sample, so the sampler sees
what it would see without the plan. The forward is patched through the executor (``Host.patch``),
below the executor's own wrapper, so that removing the plan undoes both in order.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from diffusers.utils import BaseOutput

from diffaccel.errors import PlanError, warn
from diffaccel.plan import Plan
from diffaccel.runtime.features.base import Feature

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def emulated_on_cpu(precision: str) -> bool:
    """Whether this CPU lacks native matrix products in ``precision`` (AVX-512 BF16 / AMX for
    bfloat16, AVX-512 FP16 / AMX-FP16 for float16; oneDNN's own checks): there autocast still works,
    but emulated, and a forward ran 0.05x as fast as in float32 on an AVX2-only CPU."""
    if not torch.backends.mkldnn.is_available():
        return True
    native = {"bfloat16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
              "float16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return not native[precision]()


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (a tensor, a tuple or list, or a diffusers output) with its float tensors cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, BaseOutput):
        return type(value)(**{k: cast_floats(v, dtype) for k, v in value.items()})
    return value


class Precision(Feature):
    """``Plan.precision``: the denoiser's forward under autocast, its output in the sample's dtype."""

    @classmethod
    def applies(cls, plan: Plan) -> bool:
        return plan.precision is not None

    @classmethod
    def part(cls, plan: Plan) -> Any:
        return plan.precision

    def install(self) -> None:
        model, dtype = self.executor.model, DTYPES[self.plan.precision]
        original, sample_arg = model.forward, self.executor.adapter.sample_arg
        signature = inspect.signature(original)
        weight = next(model.parameters(), None)
        if weight is not None and weight.dtype not in (torch.float32, dtype):
            raise PlanError(f"the plan runs the denoiser's products in {self.plan.precision}, and this model's "
                            f"weights are {str(weight.dtype).removeprefix('torch.')} (autocast mixes the two and "
                            "fails): drop the plan's precision, which a half-precision model has no use for "
                            "(plan.model_copy(update={'precision': None})), or load the model in float32")
        if weight is not None and weight.device.type == "cpu" and emulated_on_cpu(self.plan.precision):
            warn(f"this CPU has no native {self.plan.precision} matrix products: the plan's precision is "
                 "emulated and runs slower than float32 (drop it from the plan, or search with "
                 "--precision auto, which measures it)")

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            sample = signature.bind(*args, **kwargs).arguments[sample_arg]
            with torch.autocast(sample.device.type, dtype=dtype):
                out = original(*args, **kwargs)
            return cast_floats(out, sample.dtype)

        self.executor.patch(model, "forward", forward)
