"""The plan features the executor composes, one module each; ``build`` picks those a plan needs."""

from __future__ import annotations

from typing import Any

from diffaccel.plan import Plan
from diffaccel.runtime.features.base import Feature, overrides
from diffaccel.runtime.features.correction import ResidualCorrection
from diffaccel.runtime.features.feature_fit import FeatureFitCorrection
from diffaccel.runtime.features.guidance import PredictedGuidance
from diffaccel.runtime.features.parallel_decode import ParallelDecode
from diffaccel.runtime.features.precision import Precision
from diffaccel.runtime.features.quantization import Quantization
from diffaccel.runtime.features.rule import ResidualRuleFeature
from diffaccel.runtime.features.scheduler import NoiseInjection, StepScale

# in the order their hooks run: quantization first (it changes the layers the others see)
FEATURES: tuple[type[Feature], ...] = (Quantization, Precision, ResidualRuleFeature, ResidualCorrection,
                                       FeatureFitCorrection, ParallelDecode, PredictedGuidance, StepScale,
                                       NoiseInjection)


def build(plan: Plan, executor: Any, existing: list[Feature] | None = None) -> list[Feature]:
    """The features ``plan`` needs; one of ``existing`` built from an equal plan part is kept (a
    resampled plan keeps its quantized layers)."""
    out = []
    for cls in FEATURES:
        if not cls.applies(plan):
            continue
        same = [f for f in existing or [] if type(f) is cls and cls.part(f.plan) == cls.part(plan)]
        out.append(same[0] if same else cls(plan, executor))
    return out


__all__ = ["FEATURES", "Feature", "build", "overrides"]
