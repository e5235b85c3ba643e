"""The two text-conditioned latent denoisers and their training loss.

* ``pixart``: a ``PixArtTransformer2DModel`` (PixArt-alpha: adaLN-single, self-attention, cross-attention
  to the text tokens, patch size 2 over 16x16x4 latents). Text tokens are masked as in the PixArt
  pipeline, which pads prompts to ``max_sequence_length``: with a causal text encoder and the mask,
  a prompt gives the same embedding of its real tokens at any padded length.
* ``sd``: a ``UNet2DConditionModel`` (Stable Diffusion style, cross-attention at 16x16 and 8x8); as in
  the SD pipeline, it attends to every token of the prompt padded to the tokenizer's 16 tokens.

Both are trained jointly with their own small text encoder (:mod:`.text`), v-prediction with min-SNR
weighting on the embedded models' noise schedule (``diffaccel.zoo.models.SCHEDULER_CONFIG``), the
caption replaced by ``""`` (the pipelines' null prompt) 10% of the time for classifier-free guidance.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PixArtTransformer2DModel, UNet2DConditionModel

from diffaccel.zoo.models import SCHEDULER_CONFIG
from diffaccel.zoo.t2i import captions, text
from diffaccel.zoo.t2i.vae import LATENT_CHANNELS

LATENT_SIZE = captions.RESOLUTION // 4
DENOISERS = ("pixart", "sd")


def pixart_config(width: int = 192, depth: int = 6, heads: int = 4, text_dim: int = 128) -> dict:
    return dict(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=LATENT_CHANNELS,
                out_channels=LATENT_CHANNELS, num_layers=depth, cross_attention_dim=width,
                sample_size=LATENT_SIZE, patch_size=2, caption_channels=text_dim, norm_num_groups=32,
                use_additional_conditions=False)


def unet_config(channels: tuple[int, int, int] = (32, 64, 128), text_dim: int = 128) -> dict:
    return dict(sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=channels, layers_per_block=1, norm_num_groups=16,
                cross_attention_dim=text_dim, attention_head_dim=8)


def _init_pixart(model: PixArtTransformer2DModel) -> None:
    """Xavier linears, and a zeroed output projection and cross-attention outputs, so training starts
    from a model that predicts zero and lets the text in gradually (as PixArt-alpha initialises)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.attn2.to_out[0].weight)
    torch.nn.init.zeros_(model.proj_out.weight)
    for name, module in model.adaln_single.named_modules():
        if isinstance(module, torch.nn.Linear) and "timestep_embedder" in name:
            torch.nn.init.normal_(module.weight, std=0.02)


class TextToImage(torch.nn.Module):
    """Text encoder plus denoiser, trained as one module (checkpoints and EMA treat them alike)."""

    def __init__(self, kind: str, overrides: dict | None = None, text_overrides: dict | None = None):
        super().__init__()
        if kind not in DENOISERS:
            raise ValueError(f"unknown denoiser {kind!r}; choose one of {', '.join(DENOISERS)}")
        self.kind = kind
        self.tokenizer = text.build_tokenizer()
        self.text_encoder = text.build_text_encoder(**(text_overrides or {}))
        text_dim = self.text_encoder.config.hidden_size
        if kind == "pixart":
            self.transformer = PixArtTransformer2DModel(**{**pixart_config(text_dim=text_dim), **(overrides or {})})
            _init_pixart(self.transformer)
        else:
            self.unet = UNet2DConditionModel(**{**unet_config(text_dim=text_dim), **(overrides or {})})

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer if self.kind == "pixart" else self.unet

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings and (PixArt only) the token mask, as the matching diffusers pipeline makes them."""
        ids, mask = text.tokenize(self.tokenizer, prompts)
        if self.kind == "pixart":
            return self.text_encoder(ids, attention_mask=mask)[0], mask
        return self.text_encoder(ids)[0], None

    def forward(self, latents: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeddings, mask = self.encode(prompts)
        if self.kind == "pixart":
            return self.transformer(latents, encoder_hidden_states=embeddings, encoder_attention_mask=mask, timestep=t,
                                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return self.unet(latents, t, encoder_hidden_states=embeddings).sample


_NOISE = DDPMScheduler(**SCHEDULER_CONFIG)


class LossSettings(Protocol):
    """The training settings the loss reads (a ``TrainConfig`` has them)."""

    caption_dropout: float
    min_snr_gamma: float


def diffusion_loss(model: TextToImage, latents: torch.Tensor, attributes: np.ndarray, gen: torch.Generator,
                   cfg: LossSettings) -> torch.Tensor:
    """v-prediction loss with min-SNR weighting; captions dropped to "" with probability ``cfg.caption_dropout``."""
    n = latents.shape[0]
    t = torch.randint(0, _NOISE.config.num_train_timesteps, (n,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    drop = (torch.rand(n, generator=gen) < cfg.caption_dropout).tolist()
    prompts = ["" if d else captions.caption(captions.Attributes(*map(int, a))) for d, a in zip(drop, attributes)]
    alpha_bar = _NOISE.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)
    noisy = _NOISE.add_noise(latents, noise, t)
    target = _NOISE.get_velocity(latents, noise, t)
    per_sample = F.mse_loss(model(noisy, t, prompts), target, reduction="none").mean(dim=(1, 2, 3))
    return (weight * per_sample).mean() / weight.mean().detach()
