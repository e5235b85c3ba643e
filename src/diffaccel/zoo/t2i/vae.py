"""The latent space: a small diffusers ``AutoencoderKL`` (64x64x3 <-> 16x16x4) and the training-set latents.

Trained here on captioned shapes with a mean-squared reconstruction loss and a light KL term. Its
``scaling_factor`` is 1 / std of the posterior means of training images, so that the diffusion
models see latents of unit variance. Latents of the training split are cached to a safetensors
file, computed with the exported (fp16-rounded) weights the pipelines ship, so the denoisers are
trained on exactly the latents the shipped VAE produces.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torchmetrics.functional.image import peak_signal_noise_ratio

from diffaccel.errors import DiffaccelError
from diffaccel.zoo.t2i import captions
from diffaccel.zoo.weights import _load

LATENT_CHANNELS = 4
DOWNSCALE = 4


def vae_config(channels: tuple[int, ...] = (32, 64, 64), groups: int = 8) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=groups,
        sample_size=captions.RESOLUTION,
        scaling_factor=1.0,
    )


def build_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**vae_config(), **overrides})


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, gen: torch.Generator, kl_weight: float) -> torch.Tensor:
    """Mean squared reconstruction error of a posterior sample plus ``kl_weight`` x the KL summed per image."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator=gen)).sample
    return F.mse_loss(recon, images) + kl_weight * posterior.kl().mean()


def train_images(step: int, batch: int) -> torch.Tensor:
    """Training images of step ``step`` (all attribute combinations: the VAE is not the part under test)."""
    images, _ = captions.make_batch("train", batch, start=step * batch, include_held_out=True)
    return torch.from_numpy(images)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Posterior means of images in [-1, 1], multiplied by the VAE's scaling factor."""
    chunks = [vae.encode(chunk).latent_dist.mode() for chunk in images.split(batch)]
    return torch.cat(chunks) * vae.config.scaling_factor


@torch.no_grad()
def latent_std(vae: AutoencoderKL, count: int = 2048) -> float:
    """Standard deviation of unscaled posterior means over ``count`` training images."""
    images, _ = captions.make_batch("train", count, include_held_out=True)
    means = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in torch.from_numpy(images).split(128)])
    return float(means.std())


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, count: int = 720, batch: int = 120) -> dict[str, float]:
    """PSNR (images in [0, 1]) of reconstructions of ``count`` balanced ``eval`` images: mean, 5th percentile, min."""
    images, _ = captions.make_batch("eval", count)
    values = []
    for chunk in torch.from_numpy(images).split(batch):
        recon = vae.decode(vae.encode(chunk).latent_dist.mode()).sample
        values.append(peak_signal_noise_ratio((recon.clamp(-1, 1) + 1) / 2, (chunk + 1) / 2, data_range=1.0,
                                              reduction="none", dim=(1, 2, 3)))
    psnr = torch.cat(values)
    return {"psnr": float(psnr.mean()), "psnr_p5": float(psnr.quantile(0.05)), "psnr_min": float(psnr.min()),
            "n_images": count}


def load_vae(folder: Path) -> AutoencoderKL:
    return _load(AutoencoderKL, folder)


def export_vae(vae: AutoencoderKL, dest: Path, info: dict) -> dict:
    """Set the scaling factor, write fp16 weights to ``dest`` and measure the exported weights' PSNR."""
    vae = vae.eval()
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae))
    vae.to(torch.float16).save_pretrained(dest, safe_serialization=True)
    shipped = load_vae(dest)
    info = {**info, "scaling_factor": shipped.config.scaling_factor, **reconstruction_psnr(shipped)}
    (dest / "training.json").write_text(json.dumps(info, indent=2))
    return info


def weights_digest(vae_folder: Path) -> str:
    """SHA-256 of the VAE's weights file: a latent cache is valid only for the weights that made it."""
    return hashlib.sha256((vae_folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


def cache_latents(vae_folder: Path, path: Path, count: int, batch: int = 256) -> None:
    """Encode items ``0 .. count`` of the training split (held-out combinations excluded) into ``path``."""
    vae = load_vae(vae_folder)
    latents, attrs = [], []
    for start in range(0, count, batch):
        images, chunk_attrs = captions.make_batch("train", min(batch, count - start), start=start)
        latents.append(encode(vae, torch.from_numpy(images)))
        attrs.extend(chunk_attrs)
    tensors = {"latents": torch.cat(latents).contiguous(),
               "attributes": torch.from_numpy(captions.attribute_tensor(attrs))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"vae": weights_digest(vae_folder), "count": str(count)})
    tmp.replace(path)


def load_latents(vae_folder: Path, path: Path, count: int) -> tuple[torch.Tensor, np.ndarray]:
    """The cached latents and attributes of the first ``count`` training items (cached first if missing, made
    again if stale). A file that is no latent cache is refused, not overwritten: it may be the user's."""
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as handle:
                digest, keys = (handle.metadata() or {}).get("vae"), set(handle.keys())
        except (SafetensorError, OSError):
            digest, keys = None, set()
        if digest is None or not {"latents", "attributes"} <= keys:
            raise DiffaccelError(f"--latents {path} is not a latent cache diffaccel wrote: point --latents at a new "
                                 "file (it is made there) or at an earlier cache")
        tensors = load_file(str(path))
        if digest == weights_digest(vae_folder) and len(tensors["latents"]) >= count:
            return tensors["latents"][:count], tensors["attributes"][:count].numpy()
    cache_latents(vae_folder, path, count)
    tensors = load_file(str(path))
    return tensors["latents"], tensors["attributes"].numpy()
