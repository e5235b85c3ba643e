"""One verb: ``quantize_(model, spec, calibration)`` swaps Linear/Conv2d layers for quantized ones
and returns a handle whose ``restore()`` puts the original layers back.

Everything is checked before the first layer is swapped, so a bad request leaves the model as it was.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch

from diffaccel.quant.calibrate import Calibration, QuantError, quantizable
from diffaccel.quant.layers import QuantizedLayer, StepClock, quantized
from diffaccel.quant.spec import FULL_PRECISION, QuantSpec


def layer_bits(spec: QuantSpec, names: list[str], modules: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Weight bits of every layer after the overrides (last matching pattern wins); checks that each
    pattern names at least one layer and only layers that can be quantized."""
    bits = dict.fromkeys(names, spec.weight_bits)
    for pattern, value in spec.overrides.items():
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            others = [name for name, m in modules.items() if fnmatch.fnmatchcase(name, pattern) and name]
            if others:
                kind = type(modules[others[0]]).__name__
                raise QuantError(f"override {pattern!r} names {others[0]}, a {kind}: only Linear and Conv2d "
                                 "layers can be quantized")
            raise QuantError(f"override {pattern!r} matches no Linear or Conv2d layer of this model "
                             f"(e.g. {', '.join(names[:3])})")
        for name in matched:
            bits[name] = value
    return bits


Replacement = tuple[torch.nn.Module, str, torch.nn.Module, QuantizedLayer]  # parent, name, original, new


def quantized_layers(model: torch.nn.Module, spec: QuantSpec, calibration: Calibration,
                     clock: StepClock | None = None) -> list[Replacement]:
    """Check the request and build the quantized stand-ins, without touching the model."""
    calibration.check(model, spec.act_bits)
    modules = dict(model.named_modules())
    layers = quantizable(model)
    missing = sorted(set(layers) - set(calibration.absmax))
    if missing:
        raise QuantError(f"the calibration has no range for {missing[0]} ({len(missing)} layers in all): "
                         "calibrate this model again")
    bits = layer_bits(spec, list(layers), modules)
    replacements: list[Replacement] = []
    for name, layer in layers.items():
        if bits[name] == FULL_PRECISION:
            continue
        ranges = calibration.absmax[name]
        if not spec.per_step:
            ranges = ranges[-1:]
        split = calibration.splits.get(name) if spec.split_shortcut else None
        if split is None and ranges.shape[1] > 1:
            ranges = ranges.amax(dim=1, keepdim=True)
        try:
            new = quantized(layer, bits[name], spec.act_bits, ranges, split, clock, spec.backend)
        except (TypeError, ValueError) as exc:
            raise QuantError(f"cannot quantize {name}: {exc}") from None
        parent_name, _, child = name.rpartition(".")
        replacements.append((modules[parent_name], child, layer, new.to(layer.weight.device)))
    return replacements


class QuantHandle:
    """Quantized stand-ins for some of a model's layers: ``apply()`` swaps them in, ``restore()`` puts
    the originals back (both idempotent), as often as needed without quantizing again."""

    def __init__(self, replacements: list[Replacement]) -> None:
        self.replacements = replacements
        self.applied = False

    def apply(self) -> QuantHandle:
        if not self.applied:
            for parent, child, _original, new in self.replacements:
                setattr(parent, child, new)
            self.applied = True
        return self

    def restore(self) -> None:
        """Put the originals back, moved to the device and dtype the stand-ins have now (a ``pipe.to``
        while quantized moved those, not the originals, which are no part of the model meanwhile)."""
        if self.applied:
            for parent, child, original, new in reversed(self.replacements):
                scale = new.weight_scale
                setattr(parent, child, original.to(device=scale.device, dtype=scale.dtype))
            self.applied = False


def prepare(model: torch.nn.Module, spec: QuantSpec, calibration: Calibration | str | Path,
            clock: StepClock | None = None) -> QuantHandle:
    """Check the request and build the quantized layers, leaving the model as it is until ``apply()``.
    ``calibration``: a ``Calibration`` or its file (``spec.calibration``). ``clock`` returns the current
    step for per-step scales (the executor passes its own)."""
    check_float32(model)
    if isinstance(calibration, (str, Path)):
        calibration = Calibration.load(calibration)
    return QuantHandle(quantized_layers(model, spec, calibration, clock))


def check_float32(model: torch.nn.Module) -> None:
    """The quantized layers compute from float32 weights and activations: a half-precision model
    is refused before anything is calibrated or swapped (it failed mid-run on a dtype mismatch)."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise QuantError(f"quantization needs a float32 denoiser; this {type(model).__name__} holds {dtype}: load "
                         "it in float32 (torch_dtype=torch.float32); for lower precision use a plan's precision "
                         "(autocast) instead")


def quantize_(model: torch.nn.Module, spec: QuantSpec, calibration: Calibration | str | Path,
              clock: StepClock | None = None) -> QuantHandle:
    """Quantize ``model`` in place as ``spec`` says; ``handle.restore()`` undoes it."""
    return prepare(model, spec, calibration, clock).apply()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as it stands (quantized layers count their
    integer weights and scales, not the float originals a handle keeps for ``restore()``; fbgemm's
    packed weights count as their int8 payload)."""
    seen: set[int] = set()
    total = sum(getattr(module, "packed_bytes", 0) for module in model.modules())  # fbgemm's opaque copies
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
