"""Fidelity to the unaccelerated output of the same seed: PSNR and SSIM (torchmetrics)."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP = 100.0  # identical images have infinite PSNR; report them at this cap so means stay finite


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image in [0, 1] against its reference, capped at ``PSNR_CAP``."""
    values = peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.nan_to_num(nan=0.0, posinf=PSNR_CAP).clamp(max=PSNR_CAP)  # a NaN image: 0 dB, ruined


def fidelity(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB, per image then averaged), its 5th percentile and worst image (the tail a mean
    hides), and mean SSIM (7x7 Gaussian window, which suits 16x16 images)."""
    if images.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(reference.shape)}")
    psnr = psnr_per_image(images, reference)
    # a NaN image (a peer's float16 overflow) scores as black there, not as a NaN mean over every image
    ssim = structural_similarity_index_measure(images.nan_to_num(nan=0.0, posinf=1.0, neginf=0.0), reference,
                                               data_range=1.0, kernel_size=7)
    return {"psnr": float(psnr.mean()), "psnr_p5": float(torch.quantile(psnr.double(), 0.05)),
            "psnr_min": float(psnr.min()), "ssim": float(ssim)}
