"""Quantized stand-ins for ``nn.Linear`` and ``nn.Conv2d``.

Weights: symmetric, one scale per output channel, stored as integers (int8, or two 4-bit values
per byte at 4 bits and below), never as floats. Activations: symmetric, one scale per tensor (or per
channel group, for a U-Net skip concatenation), taken from the calibrated range of the current
denoising step or of the whole trajectory.

``QuantLinear`` with ``real_int8`` multiplies int8 by int8 into int32 (``torch._int_mm``); every
other case dequantizes and runs the float kernel, which gives the same numbers (fake quantization).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

StepClock = Callable[[], "int | None"]


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights (int8 storage) and per-output-channel scales."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / qmax(bits)
    q = torch.clamp(torch.round(flat / scale[:, None]), -qmax(bits), qmax(bits)).to(torch.int8)
    return q.reshape(weight.shape), scale


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte (the low nibble first); pads an odd count with a zero."""
    flat = q.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    pairs = packed.to(torch.int16)
    flat = torch.stack([pairs & 0xF, pairs >> 4], dim=1).reshape(-1)[: torch.Size(shape).numel()]
    return torch.where(flat > 7, flat - 16, flat).to(torch.int8).reshape(shape)


class QuantizedLayer(torch.nn.Module):
    """Shared parts: integer weight storage, activation scales, and their lookup per step."""

    def __init__(self, layer: torch.nn.Module, weight_bits: int, act_bits: int, act_absmax: torch.Tensor,
                 split: int | None, clock: StepClock | None):
        super().__init__()
        q, scale = quantize_weight(layer.weight, weight_bits)
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.weight_shape = layer.weight.shape
        self.register_buffer("weight_q", pack_nibbles(q) if weight_bits <= 4 else q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.detach().clone(),
                                                                       requires_grad=False)
        # act_absmax: [steps, groups]; row -1 is the whole trajectory's range
        self.register_buffer("act_scale", act_absmax.float() / qmax(act_bits))
        self.split = split
        self.clock = clock

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads a layer's weight (SDXL's pipeline its shape, other
        models its dtype or device); the layer itself runs on the integers."""
        packed = getattr(self, "packed", None)
        if packed is not None:  # fbgemm's packed copy replaced the plain one
            return torch.ops.quantized.linear_unpack(packed)[0].dequantize()
        return self.dequantized_weight()

    def integer_weight(self) -> torch.Tensor:
        if self.weight_bits <= 4:
            return unpack_nibbles(self.weight_q, self.weight_shape)
        return self.weight_q

    def dequantized_weight(self) -> torch.Tensor:
        w = self.integer_weight().float()
        return w * self.weight_scale.reshape(-1, *([1] * (w.dim() - 1)))

    def step_scale(self) -> torch.Tensor:
        """Activation scale(s) of the current step: [groups]."""
        step = self.clock() if self.clock is not None else None
        rows = self.act_scale.shape[0]
        return self.act_scale[step if step is not None and step < rows - 1 else -1]

    def fake_quant_input(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        scale = self.step_scale()
        if scale.numel() > 1:  # split: one scale per channel group
            sizes = [self.split, x.shape[channel_dim] - self.split]
            shape = [1] * x.dim()
            shape[channel_dim] = x.shape[channel_dim]
            scale = torch.repeat_interleave(scale, torch.tensor(sizes, device=scale.device)).reshape(shape)
        limit = qmax(self.act_bits)
        return torch.clamp(torch.round(x / scale), -limit, limit) * scale

    def extra_repr(self) -> str:
        split = f", split at channel {self.split}" if self.split else ""
        return f"W{self.weight_bits}A{self.act_bits}, weight {tuple(self.weight_shape)}{split}"


@functools.cache
def int8_matmul_speed() -> float:
    """How many times as fast ``torch._int_mm`` (the ``int8`` backend's kernel) multiplies int8
    matrices on this CPU as float32 ones of the same shape: measured once per process on a 256-wide
    square product (a few milliseconds). On an AVX2-only CPU it ran 30-100x slower than float32;
    fbgemm's dynamic kernel (``int8-dynamic``) does not have that problem."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    qa, qb = a.to(torch.int8), b.to(torch.int8)

    def best(product: Callable[[], torch.Tensor]) -> float:
        product()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: a @ b) / best(lambda: torch._int_mm(qa, qb))


def _use_fbgemm(module: QuantizedLayer, device: torch.device) -> None:
    """Switch a Linear to fbgemm's fused dynamic int8 kernel; the packed copy replaces the plain one.

    Convolutions are not offered this path: fbgemm's dynamic convolution gave 66% relative error on
    the U-Net's post-SiLU activations (mostly positive) while its linear kernel stays within 2%."""
    if device.type != "cpu":
        raise ValueError("the int8-dynamic backend runs on a CPU only; use int8 on a GPU")
    with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated
        warnings.simplefilter("ignore")
        scale = module.weight_scale
        qweight = torch._make_per_channel_quantized_tensor(module.weight_q, scale.double(),
                                                           torch.zeros_like(scale, dtype=torch.long), 0)
        module.packed = torch.ops.quantized.linear_prepack(qweight, module.bias)
    module.packed_bytes = module.weight_q.numel()  # what the packed int8 payload occupies
    module.weight_q = torch.empty(0, dtype=torch.int8)


class QuantLinear(QuantizedLayer):
    """``mode``: ``fake`` (simulated), ``int8`` (int8 x int8 products with the calibrated scales) or
    ``int8-dynamic`` (fbgemm's fused kernel, activation range measured per call; CPU only). The
    integer paths round a NaN into a number: the plan's quantization feature checks the model's inputs."""

    def __init__(self, layer: torch.nn.Linear, weight_bits: int, act_bits: int, act_absmax: torch.Tensor,
                 split: int | None = None, clock: StepClock | None = None, mode: str = "fake"):
        super().__init__(layer, weight_bits, act_bits, act_absmax, split, clock)
        self.in_features, self.out_features = layer.in_features, layer.out_features  # as nn.Linear's readers expect
        w8a8 = weight_bits == 8 and act_bits == 8
        self.mode = mode if w8a8 and not (mode == "int8" and split) else "fake"
        if self.mode == "int8":  # [in, out] for x @ w; the original [out, in] layout is not kept
            self.weight_q = self.weight_q.t().contiguous()
        elif self.mode == "int8-dynamic":
            _use_fbgemm(self, layer.weight.device)

    def integer_weight(self) -> torch.Tensor:
        return self.weight_q.t() if self.mode == "int8" else super().integer_weight()

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named as nn.Linear's: layer(input=...) calls work
        if self.mode == "int8-dynamic":
            rows = torch.ops.quantized.linear_dynamic(input.reshape(-1, input.shape[-1]), self.packed, True)
            return rows.reshape(*input.shape[:-1], rows.shape[-1])
        if self.mode == "fake":
            return F.linear(self.fake_quant_input(input, -1), self.dequantized_weight(), self.bias)
        scale = self.step_scale()
        rows = input.reshape(-1, input.shape[-1])
        q = torch.clamp(torch.round(rows / scale), -127, 127).to(torch.int8)
        try:
            acc = torch._int_mm(q, self.weight_q)
        except RuntimeError:  # shapes the int8 kernel of this device refuses (e.g. a tiny batch on CUDA)
            acc = q.float() @ self.weight_q.float()
        out = acc.float().mul_(scale * self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*input.shape[:-1], out.shape[-1])


class QuantConv2d(QuantizedLayer):
    """Simulated on every path (no fast int8 convolution kernel is used)."""

    def __init__(self, layer: torch.nn.Conv2d, weight_bits: int, act_bits: int, act_absmax: torch.Tensor,
                 split: int | None = None, clock: StepClock | None = None):
        super().__init__(layer, weight_bits, act_bits, act_absmax, split, clock)
        self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                              groups=layer.groups)
        self.in_channels, self.out_channels, self.kernel_size = layer.in_channels, layer.out_channels, layer.kernel_size
        self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding, layer.dilation,
                                                                 layer.groups)
        if layer.padding_mode != "zeros":
            raise ValueError(f"Conv2d with padding_mode {layer.padding_mode!r} is not supported")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.fake_quant_input(input, 1), self.dequantized_weight(), self.bias, **self.conv_args)


def quantized(layer: torch.nn.Module, weight_bits: int, act_bits: int, act_absmax: torch.Tensor,
              split: int | None, clock: StepClock | None, mode: str = "fake") -> QuantizedLayer:
    """The quantized stand-in of a Linear or Conv2d layer (``mode``: see ``QuantLinear``)."""
    if isinstance(layer, torch.nn.Linear):
        return QuantLinear(layer, weight_bits, act_bits, act_absmax, split, clock, mode)
    if isinstance(layer, torch.nn.Conv2d):
        return QuantConv2d(layer, weight_bits, act_bits, act_absmax, split, clock)
    raise TypeError(f"{type(layer).__name__} layers cannot be quantized; only Linear and Conv2d")
