"""Post-training quantization as part of a plan: calibration across the sampling trajectory,
quantized layers (simulated at any width, real int8 matrix products for W8A8), one verb to apply."""

from diffaccel.quant.apply import QuantHandle, prepare, quantize_, weight_bytes
from diffaccel.quant.calibrate import Calibration, QuantError
from diffaccel.quant.spec import QuantSpec

__all__ = ["Calibration", "QuantError", "QuantHandle", "QuantSpec", "prepare", "quantize_", "weight_bytes"]
