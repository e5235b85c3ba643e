"""Cost accounting: multiply-accumulates counted by torch's own FLOP counter."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

if TYPE_CHECKING:  # the plan sits beside cost in the layers; only its type is needed
    from diffaccel.plan import Plan


def _register_cpu_attention() -> None:
    """torch counts attention FLOPs for its GPU kernels only; on a CPU the fused attention kernel
    would count as zero and every MAC figure would leave out the attention scores. Register the
    same formula torch uses for the GPU kernels."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return
    try:
        @register_flop_formula(op)
        def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)
    except RuntimeError:  # already registered (module reloaded)
        pass


def _register_int8_matmul() -> None:
    """Count int8 x int8 matrix products (quantized layers) as the MACs they are."""
    try:
        @register_flop_formula(torch.ops.aten._int_mm)
        def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    except RuntimeError:  # already registered
        pass
    dynamic = getattr(getattr(torch.ops, "quantized", None), "linear_dynamic", None)
    if dynamic is None:
        return
    try:  # fbgemm's fused dynamic int8 linear: (rows, in) x packed (in, out); out_shape gives ``out``
        @register_flop_formula(dynamic)
        def _linear_dynamic_flops(x_shape, packed, *args, out_shape=None, **kwargs) -> int:
            return 2 * x_shape[0] * x_shape[1] * out_shape[-1]
    except RuntimeError:
        pass


_registered = False


def register_flop_formulas() -> None:
    """Teach torch's FLOP counter the kernels it leaves out (CPU attention, int8 matrix products);
    called by the executor and ``count_macs`` before they count (idempotent)."""
    global _registered
    if not _registered:
        _register_cpu_attention()
        _register_int8_matmul()
        _registered = True


def count_macs(fn: Callable[[], object]) -> int:
    """MACs executed by ``fn()`` (torch counts FLOPs = 2 x MACs for matmuls and convolutions)."""
    register_flop_formulas()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def plan_mac_fraction(plan: Plan, unit_macs: list[float]) -> float | None:
    """Share of the full model's MACs a static plan executes, from per-sample MACs
    ``[total, unit 0, unit 1, ...]``; 1 for a plan that computes everything, None for rule plans,
    whose cost is decided at run time."""
    if plan.schedule is None:
        return None if plan.rule is not None else 1.0
    total, units = unit_macs[0], unit_macs[1:]
    spent = sum(total - sum(m for m, a in zip(units, row) if a != "C") for row in plan.schedule)
    return spent / (total * len(plan.schedule))


def predicted_steps_saved(plan: Plan) -> float:
    """Full steps' worth of MACs a plan's predicted guidance saves: half of each predicted step (the
    unconditional half of its batch never runs)."""
    return len(plan.guidance.steps) / 2 if plan.guidance is not None else 0.0


def condition_shapes(arguments: dict) -> tuple:
    """The per-sample shapes of a forward's tensor inputs by argument name (text embeddings, masks),
    and the lists of whole numbers it takes (SD3's ``skip_layers`` skip blocks): with the sample's,
    what its MACs depend on."""
    shapes = tuple((k, tuple(v.shape[1:])) for k, v in arguments.items() if isinstance(v, torch.Tensor) and v.dim() > 1)
    return shapes + tuple((k, tuple(v)) for k, v in arguments.items()
                          if isinstance(v, (list, tuple)) and v and all(type(i) is int for i in v))
