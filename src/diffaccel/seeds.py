"""Noise seeds: which image gets which noise, and the seed ranges kept apart.

Evaluation images use seeds from the user's base seed (0 by default); calibration images (what
methods and the search profile, fit and calibrate on) use seeds from ``CALIBRATION_SEED`` on, so
a plan is never scored on the noise it was tuned on.
"""

from __future__ import annotations

import numpy as np

CALIBRATION_SEED = 7_000_001
HELDOUT_SHIFT = 1_000_003  # user calls with their own seeds: held-out checks shift them by this
SEED_RANGE = 2 ** 63  # torch.Generator.manual_seed takes a signed 64-bit seed


def image_seed(seed: int, class_id: int, index: int) -> int:
    """The noise seed of the ``index``-th image of a class: independent of batching and of which
    other classes are requested, so the same (seed, class, index) always gives the same image."""
    return int(np.random.SeedSequence([seed, class_id, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def shifted_seed(seed: int, offset: int) -> int:
    """``seed`` moved by ``offset`` within the seeds a generator takes: the embedded models' hashed
    seeds reach 2**63 - 1, past which a shift would overflow (wrapped around, distinct seeds stay
    distinct)."""
    return (seed + offset) % SEED_RANGE
