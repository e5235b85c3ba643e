"""Paired comparison of an evaluator's verdicts: how the share of images judged right (class
accuracy, prompt adherence) changes from the baseline's images to a setting's, drawn from the same
seeds. A raw difference of two shares on 60 images moves by several points with nothing changed
(a 49-step DDIM run reads 1 of 48 PixArt shapes differently from the 50-step one); the pairing and
its confidence interval say whether a loss is larger than that."""

from __future__ import annotations

import math

import torch

Z_TWO_SIDED_95 = 1.96


def paired_change(hits: torch.Tensor, base_hits: torch.Tensor) -> dict[str, float | int | None]:
    """``change``: the mean of ``hits`` (per image, 1 judged right, 0 wrong, or a score in between)
    minus that of ``base_hits`` (the same images' baseline verdicts); ``low`` / ``high``: its 95%
    confidence interval (normal approximation of the mean of the per-image differences, each +1 for
    wrong -> right, -1 for right -> wrong, 0 otherwise: indicative when only a few images flip; kept
    within -1..+1, and +-3/n when no image flips);
    ``se``: the change's standard error; ``flips``: how many images changed verdict."""
    hits, base_hits = hits.reshape(-1).double(), base_hits.reshape(-1).double()
    if hits.shape != base_hits.shape or not len(hits):
        raise ValueError(f"paired verdicts need as many images on each side, got {len(hits)} and {len(base_hits)}")
    diff = hits - base_hits
    change, flips = float(diff.mean()), int((diff != 0).sum())
    if len(diff) < 2:
        return {"change": change, "low": None, "high": None, "se": None, "flips": flips}
    se = float(diff.std()) / math.sqrt(len(diff))
    half = Z_TWO_SIDED_95 * se if flips else 3 / len(diff)  # no flip seen: the rule of three, not a certainty
    return {"change": change, "low": max(change - half, -1.0), "high": min(change + half, 1.0), "se": se,
            "flips": flips}  # a share changes by at most 100 points either way
